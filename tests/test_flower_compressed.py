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


# ---- failures: the documented rule ----------------------------------------------------------------


def oracle(kind, B, comp, *, gamma, rounds, live, p=0.3, alpha=None, seed=5):
    """The documented rule with every client's message formed densely (float64 sums):
    ``live(round, client)`` says whose message of wire round r the server used. DIANA / EF21:
    missing messages are zero and the failed client's state does not move; MARINA: the live
    mean; a round without a live message changes nothing. Returns (x, server g or h, H)."""
    n, d = B.n, B.p
    ids = torch.arange(n)
    x, H = torch.zeros(d), torch.zeros(n, d)
    g = torch.zeros(d)

    def mask(r):
        return torch.tensor([bool(live(r, i)) for i in range(n)])

    def mean(D, ok, over_n):
        if not ok.any():
            return None
        tot = (D.double() * ok[:, None]).sum(0)
        return (tot / (n if over_n else int(ok.sum()))).float()

    if kind == "marina":
        ok = mask(0)
        g = mean(B.grads(x), ok, False) if ok.any() else torch.zeros(d)
    elif kind == "ef21":
        ok = mask(0)
        D = comp.dense(comp.diff(B.grads(x), H, clients=ids, step=4))
        H[ok] += D[ok]
        g = mean(D, ok, True) if ok.any() else torch.zeros(d)
    for t in range(rounds):
        key, ok = (t + 1) * 16, mask(t + 1)
        if not ok.any():
            continue
        if kind == "marina":
            x_new = x - gamma * g
            if sampling.coin(p, seed=seed, step=key):
                g = mean(B.grads(x_new), ok, False)
            else:
                D = comp.dense(comp.diff(B.grads(x_new), B.grads(x), clients=ids, step=key + 4))
                g = g + mean(D, ok, False)
            x = x_new
        elif kind == "diana":
            D = comp.dense(comp.diff(B.grads(x), H, clients=ids, step=key + 4))
            m = mean(D, ok, True)
            x = x - gamma * (g + m)
            g = g + alpha * m
            H[ok] += alpha * D[ok]
        else:
            x_new = x - gamma * g
            D = comp.dense(comp.diff(B.grads(x_new), H, clients=ids, step=key + 4))
            g = g + mean(D, ok, True)
            H[ok] += D[ok]
            x = x_new
    return x, g, H


@pytest.mark.parametrize("kind,compressor", [("marina", "randk"), ("diana", "randk"),
                                             ("ef21", "topk")])  # fmt: skip
def test_client_failures_follow_the_documented_rule(cancer, kind, compressor):
    """Failures of every kind (the gradient source raises, the message is dropped, the reply is
    lost after the client computed it, no reply at all, a whole round fails) are left out: the
    model and the server state follow the oracle of the documented rule, the failed clients'
    shifts / feedback states did not move (h = mean h_i, g = mean g_i stay exact), and MARINA's
    server resent x to the clients it was not sure held it."""
    B = make_batch(cancer)
    strategy, sim = pair(kind, B, compressor)
    fail = {(1, 0): "raise", (2, 3): "drop", (3, 5): "lose", (5, 1): "vanish", (6, 2): "drop",
            (6, 4): "lose"}  # fmt: skip
    if kind != "diana":
        fail[(0, 2)] = "drop"  # the initialization
    for i in range(N):
        fail[(4, i)] = "drop"  # a whole round

    class Raising(ConvexGradients):
        def __call__(self, x, config):
            fk = config["fedkern"]
            if fail.get((fk["round"], fk["client_id"])) == "raise":
                raise RuntimeError("injected")
            return super().__call__(x, config)

    def fault(rnd, cid):
        what = fail.get((rnd, cid))
        return what if what in ("drop", "lose", "vanish") else None

    res, grid = run(strategy, B, 8, fault=fault, gradients=Raising(B))
    alpha = getattr(strategy, "alpha", None)
    x_or, g_or, H_or = oracle(kind, B, strategy.comp, gamma=strategy.gamma, rounds=8,
                              live=lambda r, i: (r, i) not in fail, alpha=alpha)  # fmt: skip
    np.testing.assert_allclose(model(res).numpy(), x_or.numpy(), rtol=1e-5, atol=1e-6)
    server = strategy.h if kind == "diana" else strategy.g
    np.testing.assert_allclose(server.numpy(), g_or.numpy(), rtol=1e-5, atol=1e-6)
    hist = strategy.history
    assert hist["skipped"][4] == 1 and hist["clients"][4] == 0
    assert sum(hist["failures"]) == len(fail)
    if kind != "marina":
        H = client_states(grid, strategy)
        np.testing.assert_allclose(H.numpy(), H_or.numpy(), rtol=1e-5, atol=1e-6)
        # the server's h / g is the mean of the clients' states
        np.testing.assert_allclose(H.double().mean(0).numpy(), server.double().numpy(),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    else:
        assert max(hist["floats_down"][1:]) > N * B.p  # x was resent (PREV)
    # the negative control: the same run without the failures is not the oracle's
    clean, _ = pair(kind, B, compressor)
    res2, _ = run(clean, B, 8)
    assert not np.allclose(model(res2).numpy(), x_or.numpy(), rtol=1e-5, atol=1e-6)


# ---- restart ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,compressor", [("marina", "randk"), ("diana", "randk"),
                                             ("ef21", "topk")])  # fmt: skip
def test_restart_resumes_exactly(cancer, kind, compressor):
    """Stop after 4 rounds, checkpoint (through torch.save), lose a round in flight (the clients
    computed round 5, the server died), resume on the same nodes: = 9 uninterrupted rounds bit for
    bit (model, server state, clients' states, history)."""
    B = make_batch(cancer)
    whole, _ = pair(kind, B, compressor, mode="sgd")
    res, grid_w = run(whole, B, 9, mode="sgd")

    first, _ = pair(kind, B, compressor, mode="sgd")
    _, grid = run(first, B, 4, mode="sgd")
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    snapshot = copy.deepcopy(state)
    grid.send_and_receive(first.configure_round(ConfigRecord()))  # in flight, never aggregated
    second, _ = pair(kind, B, compressor, mode="sgd")
    second.load_state_dict(state)
    assert second.rounds == 4 and torch.equal(second.x, snapshot["x"])
    out, _ = run(second, B, 5, grid=grid)
    assert torch.equal(model(out), model(res))
    assert list(out.train_metrics_clientapp) == [5, 6, 7, 8, 9]
    name = "h" if kind == "diana" else "g"
    assert torch.equal(getattr(second, name), getattr(whole, name))
    if kind != "marina":
        assert torch.equal(client_states(grid, second), client_states(grid_w, whole))
    assert second.history == whole.history


def test_load_state_dict_bad_input(cancer):
    B = make_batch(cancer)
    s1, _ = pair("diana", B, "randk")
    run(s1, B, 2)
    state = s1.state_dict()
    other, _ = pair("diana", B, "randk", seed=6)
    with pytest.raises(ValueError, match="seed = 5; this strategy has seed = 6"):
        other.load_state_dict(state)
    assert other.rounds == 0 and other.x is None
    with pytest.raises(ValueError, match="of method 'diana', not 'ef21'"):
        pair("ef21", B, "topk")[0].load_state_dict(state)
    bad = dict(state, server={"h": state["server"]["h"][:-1]})
    fresh, _ = pair("diana", B, "randk")
    with pytest.raises(ValueError, match="state's h must be a float32 tensor"):
        fresh.load_state_dict(bad)
    assert fresh.x is None
    with pytest.raises(TypeError, match="state must be a dict"):
        fresh.load_state_dict([1])
