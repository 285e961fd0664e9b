"""MARINA, DIANA and EF21 on Flower (``MarinaStrategy``, ``DianaStrategy``, ``Ef21Strategy``,
``GradientClient``).

Equivalence: the strategies over an in-process Grid (Message-API ClientApps, a persistent Context
per node; conftest's grid) give the server state of ``fedkern.algorithms.MARINA`` / ``DIANA`` /
``EF21`` on the same seeds bit for bit, and the clients' shifts / feedback states equal the
simulator's H / G. Failures and restarts against an oracle written here (the documented rule:
missing messages are zero for DIANA / EF21, the live mean for MARINA). The claim on label-sorted
breast cancer clients: DIANA and EF21 reach gaps their no-shift / no-feedback controls do not.
"""

from __future__ import annotations

import copy
import io
import logging

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import in_process_grid  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedkern import data, sampling  # noqa: E402
from fedkern.algorithms import DIANA, EF21, MARINA  # noqa: E402
from fedkern.algorithms.messages import RowCompressor  # noqa: E402
from fedkern.clients import ClientBatch  # noqa: E402
from fedkern.integrations.flower import protocol as P  # noqa: E402
from fedkern.integrations.flower.compressed import (  # noqa: E402
    DianaStrategy,
    Ef21Strategy,
    MarinaStrategy,
)
from fedkern.integrations.flower.gradient_client import (  # noqa: E402
    ACTION_GRAD,
    ConvexGradients,
    GradientClient,
    ModuleGradients,
)
from fedkern.integrations.flower.method_client import module_arrays  # noqa: E402
from fedkern.problems import Problem  # noqa: E402

N = 6
NODES = [2000 + 3 * i for i in range(N)]


@pytest.fixture(autouse=True)
def _flwr_process():
    logging.getLogger("flwr").setLevel(logging.WARNING)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    logging.getLogger("flwr").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def cancer():
    return data.load("breast_cancer")


def make_batch(cancer, l2=0.05, n=N):
    A, y = cancer
    return ClientBatch(Problem(A, y, data.split(y, n, "label_sorted"), "logistic", l2), seed=3)


class Grid(in_process_grid()):
    """conftest's grid with ``fault(round, client_id)``: "drop" (never delivered), "lose"
    (delivered, error reply), "vanish" (delivered, no reply) or ``tamper(reply, request)``."""

    def __init__(self, app, fault=None, n=N):
        super().__init__(app, NODES[:n])
        self.fault = fault

    def deliver(self, m, ctx):
        cfg = m.content.config_records.get(P.RECORD, {})
        what = None
        if self.fault is not None and m.metadata.message_type == ACTION_GRAD:
            what = self.fault(cfg.get("round"), cfg.get("client_id"))
        if what == "drop":
            return Message(Error(code=1, reason="dropped"), reply_to=m)
        reply = self.app(m, ctx)
        if what == "vanish":
            return None
        if what == "lose":
            return Message(Error(code=2, reason="reply lost"), reply_to=m)
        if callable(what):
            return what(reply, m)
        return reply

    def context(self, i):
        return self.contexts[NODES[i]]


def initial(p):
    return ArrayRecord({"x": Array(np.zeros(p, np.float32))})


def app_for(gradients, **kw):
    app = ClientApp()
    client = GradientClient(gradients, **kw)
    client.register(app)
    return app, client


def run(strategy, B, rounds, *, mode="gd", fault=None, grid=None, gradients=None):
    if grid is None:
        app, client = app_for(gradients or ConvexGradients(B, mode=mode, batch_size=4))
        grid = Grid(app, fault=fault)
        grid.client = client
    res = strategy.start(grid=grid, initial_arrays=initial(B.p), num_rounds=rounds)
    return res, grid


def model(res):
    return torch.from_numpy(np.array(res.arrays["x"].numpy()))


def client_states(grid, strategy):
    """[n, p]: the clients' shifts / feedback states with their confirmed pending updates."""
    rows = []
    for i in range(N):
        s = grid.client.client_state(grid.context(i), strategy.method,
                                     agg_round=strategy.last_agg.get(i, -2))  # fmt: skip
        rows.append(s if s.numel() else torch.zeros(strategy.dim))
    return torch.stack(rows)


GAMMA = {"marina": 0.5, "diana": 0.5, "ef21": 1.0}


def pair(kind, B, compressor, mode="gd", seed=5, **kw):
    """(strategy, simulator) with the same arguments."""
    gamma = GAMMA[kind] / B.problem.L
    args = dict(gamma=gamma, compressor=compressor, seed=seed, **kw)
    if compressor != "none":
        args["k"] = 5
    if kind == "marina":
        args.setdefault("p", 0.3)
        return (MarinaStrategy(num_clients=N, **args),
                MARINA(B, mode=mode, batch_size=4, **args))  # fmt: skip
    if kind == "diana":
        return DianaStrategy(num_clients=N, **args), DIANA(B, mode=mode, batch_size=4, **args)
    return Ef21Strategy(num_clients=N, **args), EF21(B, mode=mode, batch_size=4, **args)


CASES = [("marina", "randk"), ("marina", "none"), ("diana", "randk"), ("diana", "none"),
         ("ef21", "topk"), ("ef21", "randk"), ("ef21", "none")]  # fmt: skip


# ---- equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gd", "sgd"])
@pytest.mark.parametrize("kind,compressor", CASES)
def test_equals_the_simulator_bit_for_bit(cancer, kind, compressor, mode):
    """10 rounds (after the initialization) = the simulator on the same seed: the model, the
    server's g / h and the clients' h_i / g_i bit for bit; floats per client as the simulator
    books them (the initialization also sends x0: p floats down where the simulator books 0)."""
    B = make_batch(cancer)
    strategy, sim = pair(kind, B, compressor, mode)
    res, grid = run(strategy, B, 10, mode=mode)
    sim.run(10)
    assert torch.equal(model(res), sim.x) and torch.equal(strategy.x, sim.x)
    if kind == "diana":
        assert torch.equal(strategy.h, sim.h)
        assert torch.equal(client_states(grid, strategy), sim.H)
    else:
        assert torch.equal(strategy.g, sim.g)
    if kind == "ef21":
        assert torch.equal(client_states(grid, strategy), sim.G)
    h = strategy.history
    assert strategy.rounds == 10 and len(h["floats_up"]) == 11
    assert h["floats_up_per_client"] == sim.history["floats_up"]
    down = list(sim.history["floats_down"])
    if kind != "diana":
        assert down[0] == 0
        down[0] = B.p
    assert h["floats_down_per_client"] == down
    assert h["failures"] == [0] * 11 and h["rejected"] == [0] * 11
    if kind == "marina":
        heads = [int(sampling.coin(0.3, seed=5, step=(t + 1) * 16)) for t in range(10)]
        assert h["heads"] == [1] + heads and 0 < sum(heads) < 10
    assert list(res.train_metrics_clientapp) == ([0] if kind != "diana" else []) + list(
        range(1, 11))


def test_randk_replies_carry_only_the_values(cancer):
    """A rand-k reply is k float32 values and nothing else; the server's mask derivation
    (seed, mask key, client) equals the one RowCompressor uses."""
    B = make_batch(cancer)
    strategy, _ = pair("diana", B, "randk")
    seen = []

    def spy(rnd, cid):
        def tamper(reply, request):
            seen.append({k: a.numpy().shape for k, a in reply.content[P.VALUES].items()})
            return reply

        return tamper

    run(strategy, B, 2, fault=spy)
    assert seen == [{"values": (5,)}] * (2 * N)
    assert strategy.history["floats_up"][1:] == [5 * N] * 2
