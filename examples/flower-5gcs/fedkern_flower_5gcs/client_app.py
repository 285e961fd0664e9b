"""The ClientApp: fedkern's ``FiveGCSClient`` (the 5GCS protocol, the dual u_m kept in the node's
``context.state``) with a ``ConvexSolver`` (K local steps on the proximal local problem on the
client's rows, the simulator's own kernel).

The client id is the node's ``partition-id``; the data split needs M and l2, which come from the
run configuration, so the client is built on the first message (one per process and setting)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedkern.integrations.flower import ConvexSolver, FiveGCSClient
from fedkern_flower_5gcs import task

app = ClientApp()
_CLIENTS: dict = {}


def client(context: Context) -> FiveGCSClient:
    """The ``FiveGCSClient`` of this run's settings (M, l2, seed)."""
    cfg = task.config(context)
    key = (int(cfg["num-clients"]), float(cfg["l2"]), int(cfg["seed"]))
    if key not in _CLIENTS:
        _CLIENTS[key] = FiveGCSClient(ConvexSolver(task.batch(key[0], key[1])), seed=key[2])
    return _CLIENTS[key]


@app.query("fedkern_hello")
def hello(msg: Message, context: Context) -> Message:
    return client(context).hello(msg, context)


@app.train("fedkern_5gcs")
def train(msg: Message, context: Context) -> Message:
    return client(context).train(msg, context)
