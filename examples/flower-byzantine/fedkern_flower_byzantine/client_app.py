"""The ClientApp: fedkern's ``ByzVRMarinaClient`` with ``ProblemSampleGradients`` (the client's
gradients at the models the server sends, on its own rows; no state between rounds).

The client id is the node's ``partition-id``. With ``attack = "bit_flip"`` the Byzantine clients
(the last ``num-byzantine`` ids) reply -``bit-flip-scale`` times their honest message: one
ClientApp serves every simulated node here, so it is told which ids are Byzantine; in a deployment
the Byzantine nodes would run their own app. The other attacks are simulated at the server, and
the Byzantine clients then reply honestly. The client is built on the first message (one per
process and setting), after the run configuration is checked."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedkern.integrations.flower import ByzVRMarinaClient, ProblemSampleGradients
from fedkern_flower_byzantine import task

app = ClientApp()
_CLIENTS: dict = {}


def client(context: Context) -> ByzVRMarinaClient:
    """The ``ByzVRMarinaClient`` of this run's settings (n, f, attack, scale, l2, seed)."""
    s = task.settings(task.config(context))
    local = s["attack"] in task.CLIENT_ATTACKS
    key = (s["n"], s["f"], local, s["bit_flip_scale"], s["l2"], s["seed"])
    if key not in _CLIENTS:
        _CLIENTS[key] = ByzVRMarinaClient(
            ProblemSampleGradients(task.problem(s["n"], s["l2"])), seed=s["seed"],
            byzantine=s["byzantine"] if local else (), attack="bit_flip" if local else None,
            bit_flip_scale=s["bit_flip_scale"])  # fmt: skip
    return _CLIENTS[key]


@app.query("fedkern_hello")
def hello(msg: Message, context: Context) -> Message:
    return client(context).hello(msg, context)


@app.train("fedkern_byz")
def train(msg: Message, context: Context) -> Message:
    return client(context).train(msg, context)
