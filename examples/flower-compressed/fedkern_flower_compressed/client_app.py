"""The ClientApp: fedkern's ``GradientClient`` (the MARINA / DIANA / EF21 client protocol: the
shift, feedback state or previous model kept in the node's ``context.state``) with
``ConvexGradients`` (the client's local gradient on its rows, the simulator's own kernel).

The client id is the node's ``partition-id``; the data split needs n, which comes from the run
configuration, so the client is built on the first message (one per process and setting)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedkern.integrations.flower import ConvexGradients, GradientClient
from fedkern_flower_compressed import task

app = ClientApp()
_CLIENTS: dict = {}


def client(context: Context) -> GradientClient:
    """The ``GradientClient`` of this run's settings (n, l2, seed, mode, batch size)."""
    s = task.settings(task.config(context))
    key = (s["num-clients"], s["l2"], s["seed"], s["mode"], s["batch-size"])
    if key not in _CLIENTS:
        grads = ConvexGradients(task.batch(*key[:3]), mode=key[3], batch_size=key[4])
        _CLIENTS[key] = GradientClient(grads, seed=key[2])
    return _CLIENTS[key]


@app.query("fedkern_hello")
def hello(msg: Message, context: Context) -> Message:
    return client(context).hello(msg, context)


@app.train("fedkern_grad")
def train(msg: Message, context: Context) -> Message:
    return client(context).train(msg, context)
