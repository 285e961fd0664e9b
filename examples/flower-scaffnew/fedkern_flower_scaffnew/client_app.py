"""The ClientApp: fedkern's ``MethodClient`` (the Scaffnew / TAMUNA protocol, the control variate
kept in the node's ``context.state``) with a ``ConvexTrainer`` (K local gradient steps on the
client's rows, the simulator's own kernel).

The client id is the node's ``partition-id``; the data split needs n, which comes from the run
configuration, so the client is built on the first message (one per process and setting)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedkern.integrations.flower import ConvexTrainer, MethodClient
from fedkern_flower_scaffnew import task

app = ClientApp()
_CLIENTS: dict = {}


def client(context: Context) -> MethodClient:
    """The ``MethodClient`` of this run's settings (n, l2, seed)."""
    cfg = task.config(context)
    key = (int(cfg["num-clients"]), float(cfg["l2"]), int(cfg["seed"]))
    if key not in _CLIENTS:
        _CLIENTS[key] = MethodClient(ConvexTrainer(task.batch(key[0], key[1])), seed=key[2])
    return _CLIENTS[key]


@app.query("fedkern_hello")
def hello(msg: Message, context: Context) -> Message:
    return client(context).hello(msg, context)


@app.train("fedkern")
def train(msg: Message, context: Context) -> Message:
    return client(context).train(msg, context)


@app.train("fedkern_sync")
def sync(msg: Message, context: Context) -> Message:
    return client(context).sync(msg, context)
