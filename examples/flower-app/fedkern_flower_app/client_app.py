"""The ClientApp: local training on the node's partition; the update leaves compressed.

The compression mod (``fedkern.integrations.flower.make_compress_mod``) replaces the trained model
the ``train`` function returns by its top-k compressed update, with the EF14 residual kept in the
node's ``context.state``. The highest ``byzantine-nodes`` partition ids are Byzantine: they return
a model shifted far away, which the server's robust rule must withstand.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkern.compress import TopK
from fedkern.integrations.flower import make_compress_mod
from fedkern_flower_app import task


def _mod(message, context, call_next):
    # the mod is built from the run config, which only a running node knows
    ratio = float(task.config(context)["topk-ratio"])
    return make_compress_mod(TopK(ratio=ratio))(message, context, call_next)


app = ClientApp(mods=[_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = task.config(context)
    pid = int(context.node_config["partition-id"])
    parts = int(context.node_config["num-partitions"])
    net = task.model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    inputs, labels = task.partition(pid, parts)
    loss = task.train(net, inputs, labels, epochs=int(cfg["local-epochs"]),
                      lr=float(cfg["learning-rate"]))  # fmt: skip
    if pid >= parts - int(cfg["byzantine-nodes"]):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(100.0)
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                          "metrics": MetricRecord({"train-loss": loss,
                                                   "num-examples": len(labels)})})  # fmt: skip
    return Message(content=content, reply_to=msg)
