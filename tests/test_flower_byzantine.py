"""Byz-VR-MARINA-PP on Flower (fedkern.integrations.flower.byzantine) against the simulator
``fedkern.algorithms.ByzVRMarinaPP``: bit-for-bit equivalence under every attack, the clipping
claim with its unclipped control, failures, restarts, bad replies and bad messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import fault_grid  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedkern import data  # noqa: E402
from fedkern import robust as R  # noqa: E402
from fedkern.algorithms import ByzVRMarinaPP  # noqa: E402
from fedkern.algorithms.byzantine import STRONG  # noqa: E402
from fedkern.compress import RandK, TopK  # noqa: E402
from fedkern.integrations.flower import byzantine as B  # noqa: E402
from fedkern.integrations.flower import protocol as P  # noqa: E402
from fedkern.problems import LogisticRegression  # noqa: E402

N = 20
NODES = [500 + 3 * i for i in range(N)]
BYZ = list(range(15, 20))


pytestmark = pytest.mark.usefixtures("flower_process")  # conftest: Flower's process identity


@pytest.fixture(scope="module")
def homogeneous():
    """The simulator tests' claim setting: 20 clients, each with the whole breast cancer set."""
    A, y = data.load("breast_cancer")
    return LogisticRegression(A, y, [torch.arange(A.shape[0])] * N, l2=0.1)


@pytest.fixture(scope="module")
def heterogeneous():
    A, y = data.load("breast_cancer")
    return LogisticRegression(A, y, data.split(y, N, "iid", seed=0), l2=0.1)


class Grid(fault_grid(B.ACTION_BYZ)):
    """conftest's ``fault_grid`` with ``fault(round, client_id)`` on the round messages."""

    def __init__(self, app, fault=None):
        super().__init__(app, NODES, fault)


def x0_of(d, seed=None):
    x = np.zeros(d) if seed is None else np.random.default_rng(seed).normal(0, 0.1, d)
    return ArrayRecord({"w": Array(x.astype(np.float64))})


def make_app(problem, **kw):
    app = ClientApp()
    B.ByzVRMarinaClient(B.ProblemSampleGradients(problem), **kw).register(app)
    return app


def flower(problem, rounds, *, client=None, fault=None, x0=None, grid=None, **kw):
    """(strategy, grid) after ``rounds`` rounds."""
    strat = B.ByzVRMarinaPPStrategy(num_clients=N, gamma=kw.pop("gamma", 1.0 / problem.L),
                                    **kw)  # fmt: skip
    grid = grid or Grid(make_app(problem, **(client or {})), fault)
    strat.start(grid=grid, initial_arrays=x0 or x0_of(problem.d), num_rounds=rounds)
    return strat, grid


def attack_kw(attack):
    """(simulator keywords, strategy keywords, client keywords) of an attack."""
    knobs = {"ipm_eps": STRONG["ipm_eps"], "alie_z": 2.0, "bit_flip_scale": 3.0}
    sim = {"attack": attack, **knobs}
    if attack == "bit_flip":  # client-local
        return sim, {}, {"byzantine": BYZ, "attack": "bit_flip", "bit_flip_scale": 3.0}
    return sim, {"adversary": B.SimulatedAttack(attack, **knobs)}, {}


COMMON = {"batch_size": 16, "cohort": 3, "p": 0.3, "seed": 1}  # Byzantine majorities: rounds 10, 12


@pytest.mark.parametrize("attack", ["none", "bit_flip", "shift_back", "alie", "ipm"])
def test_equals_the_simulator_bit_for_bit(heterogeneous, attack):
    """15 rounds, cohort 3 of 20 (5 Byzantine), full rounds with p = 0.3, coordinate median with
    bucketing 2, a random start: the server's x and g equal the simulator's exactly after every
    round, and the attack did change the run (x differs from the attack-free simulator's)."""
    sim_kw, strat_kw, client_kw = attack_kw(attack)
    x0 = x0_of(heterogeneous.d, seed=11)
    sim = ByzVRMarinaPP(heterogeneous, byzantine=BYZ, gamma=0.5 / heterogeneous.L,
                        x0=torch.from_numpy(x0["w"].numpy()), **COMMON, **sim_kw)  # fmt: skip
    strat = B.ByzVRMarinaPPStrategy(num_clients=N, gamma=0.5 / heterogeneous.L, byzantine=BYZ,
                                    **COMMON, **strat_kw)  # fmt: skip
    grid = Grid(make_app(heterogeneous, **client_kw))
    strat.start(grid=grid, initial_arrays=x0, num_rounds=0)
    strat.connect(grid)
    for t in range(15):
        strat.run_round(grid)
        sim.step()
        assert torch.equal(strat.x, sim.x), (attack, t)
        assert torch.equal(strat.g, sim.g), (attack, t)
    if attack != "none":
        clean = ByzVRMarinaPP(heterogeneous, byzantine=BYZ, gamma=0.5 / heterogeneous.L,
                              x0=sim.x0, attack="none", **COMMON)  # fmt: skip
        clean.run(15)
        assert not torch.equal(clean.x, sim.x), attack
    h = strat.history
    assert sum(h["byzantine_majority"]) == 2
    assert h["full"][1:] == [int(f) for f in sim.history["full"][1:]]
    assert any(h["full"][1:]) and not all(h["full"][1:])  # both kinds of round ran
    assert h["byzantine_majority"] == [int(b) for b in sim.history["byzantine_majority"]]
    assert sum(h["failures"]) == 0 and sum(h["rejected"]) == 0
    comp = [u for u, f in zip(h["floats_up_per_client"], h["full"], strict=True) if not f]
    assert set(comp) == {heterogeneous.d}
    assert set(h["floats_down_per_client"][1:]) == {heterogeneous.d, 2 * heterogeneous.d}


@pytest.mark.parametrize("case", ["randk", "topk", "plus_noclip", "cclip_bucketing"])
def test_equals_the_simulator_with_compressors_and_rules(heterogeneous, case):
    """Compressed differences (rand-k, masks rebuilt at the server; top-k, indices sent), the
    plus variant without clipping, and rule names with options: x and g equal after 12 rounds."""
    kw = {"randk": {"compressor": RandK(ratio=0.25, seed=4)},
          "topk": {"compressor": TopK(7), "aggregator": "trimmed_mean"},
          "plus_noclip": {"plus": True, "clip": False},
          "cclip_bucketing": {"aggregator": "centered_clip", "aggregator_options": {"tau": 0.5},
                            "bucketing": 2}}[case]  # fmt: skip
    sim = ByzVRMarinaPP(heterogeneous, byzantine=BYZ, gamma=1.0 / heterogeneous.L, attack="ipm",
                        **COMMON, **kw)  # fmt: skip
    sim.run(12)
    strat, _ = flower(heterogeneous, 12, byzantine=BYZ, adversary=B.SimulatedAttack("ipm"),
                      **COMMON, **kw)  # fmt: skip
    assert torch.equal(strat.x, sim.x) and torch.equal(strat.g, sim.g), case
    if "compressor" in kw:
        k = kw["compressor"].k_for(heterogeneous.d)
        ups = {u for u, f in zip(strat.history["floats_up_per_client"], strat.history["full"],
                                 strict=True) if not f}  # fmt: skip
        assert ups == {k if case == "randk" else 2 * k}
        assert sim.history["floats_up"][1:].count(ups.pop()) > 0


def test_convex_gradients_are_the_simulators_rows(heterogeneous, gen):
    x = torch.randn(heterogeneous.d, generator=gen, dtype=torch.float64)
    prov = B.ProblemSampleGradients(heterogeneous)
    full = heterogeneous.grads(x, list(range(N)))
    smp = [torch.randint(0, int(m), (5,), generator=gen) for m in heterogeneous.sizes]
    mini = heterogeneous.grads(x, list(range(N)), smp)
    for i in range(N):
        assert torch.equal(prov(x, i, None), full[i])
        assert torch.equal(prov(x, i, smp[i]), mini[i])
        assert prov.num_samples(i) == int(heterogeneous.sizes[i])


def test_module_gradients_against_the_closed_form(heterogeneous, gen):
    """ModuleSampleGradients of a bias-free linear model with the logistic loss equals the problem's
    float64 gradient (the same function)."""
    A, y = heterogeneous.A, heterogeneous.y
    rows = torch.arange(int(heterogeneous.sizes[0]))
    lin = torch.nn.Linear(A.shape[1], 1, bias=False).double()

    def loss(out, t):
        return torch.nn.functional.softplus(-(t * 2 - 1) * out[:, 0]).mean()

    prov = B.ModuleSampleGradients(lin, loss, A[rows], y[rows].double(), l2=0.1)
    x = torch.randn(heterogeneous.d, generator=gen, dtype=torch.float64) * 0.3
    cfg = {"fedkern": {"layout": [("weight", (1, A.shape[1]))]}}
    torch.testing.assert_close(prov(x, 0, None, cfg), heterogeneous.grads(x, [0])[0])
    smp = torch.tensor([0, 3, 3, 7])
    torch.testing.assert_close(prov(x, 0, smp, cfg), heterogeneous.grads(x, [0], [smp])[0])
    with pytest.raises(ValueError, match="not the module's parameters"):
        prov(x, 0, None, {"fedkern": {"layout": [("w", (1, A.shape[1]))]}})


class PerClient:
    """One ``ModuleSampleGradients`` per client id (one ClientApp serves every simulated node)."""

    def __init__(self, providers):
        self.providers = providers

    def num_samples(self, cid):
        return self.providers[cid].num_samples(cid)

    def __call__(self, x, cid, samples, config=None):
        return self.providers[cid](x, cid, samples, config)


def test_module_gradients_run_equals_the_simulator(heterogeneous):
    """A Flower run whose clients use ``ModuleSampleGradients`` (a float64 bias-free linear layer
    with the logistic loss: the problem's function) follows the simulator to float tolerance over 8
    rounds (rand-k differences, ALIE through the adversary)."""
    A, y = heterogeneous.A, heterogeneous.y
    lin = torch.nn.Linear(A.shape[1], 1, bias=False).double()

    def loss(out, t):
        return torch.nn.functional.softplus(-(t * 2 - 1) * out[:, 0]).mean()

    off = [0, *torch.cumsum(heterogeneous.sizes, 0).tolist()]
    provs = [B.ModuleSampleGradients(lin, loss, A[off[i] : off[i + 1]],
                                     y[off[i] : off[i + 1]].double(), l2=0.1)
             for i in range(N)]  # fmt: skip
    app = ClientApp()
    B.ByzVRMarinaClient(PerClient(provs)).register(app)
    kw = {"byzantine": BYZ, "compressor": RandK(ratio=0.5, seed=2), **COMMON}
    strat = B.ByzVRMarinaPPStrategy(num_clients=N, gamma=1.0 / heterogeneous.L,
                                    adversary=B.SimulatedAttack("alie"), **kw)  # fmt: skip
    x0 = ArrayRecord({"weight": Array(np.zeros((1, heterogeneous.d)))})
    strat.start(grid=Grid(app), initial_arrays=x0, num_rounds=8)
    sim = ByzVRMarinaPP(heterogeneous, gamma=1.0 / heterogeneous.L, attack="alie", **kw)
    sim.run(8)
    torch.testing.assert_close(strat.x, sim.x, rtol=1e-5, atol=1e-6)
    assert float((sim.x - sim.x0).norm()) > 0.1  # the run moved


def test_claim_clipping_defeats_shift_back_and_the_unclipped_control_fails(homogeneous):
    """The simulator's claim, run on Flower (shift-back through the adversary hook, coordinate
    median with bucketing 2, cohort 4 of 20, 60 rounds): with clipping the gap falls 1000x and
    stays there after round 40; without clipping (the control) the Byzantine-majority rounds
    throw the model back and the same assertion fails."""
    A = B.SimulatedAttack("shift_back")
    kw = {"byzantine": BYZ, "batch_size": 16, "cohort": 4, "seed": 0, "adversary": A}
    _, fs = homogeneous.optimum(list(range(15)))

    def gaps(**more):
        out = []

        def evaluate(t, arrays):
            x = torch.from_numpy(np.array(arrays["w"].numpy()))
            out.append(homogeneous.loss(x, list(range(15))) - fs)

        strat = B.ByzVRMarinaPPStrategy(num_clients=N, gamma=1.0 / homogeneous.L, **kw, **more)
        strat.start(grid=Grid(make_app(homogeneous)), initial_arrays=x0_of(homogeneous.d),
                    num_rounds=60, evaluate_fn=evaluate)  # fmt: skip
        return strat, out

    clipped, g_clip = gaps()
    plain, g_plain = gaps(clip=False)
    gap0 = g_clip[0]
    assert sum(clipped.history["byzantine_majority"]) >= 1
    for g, ok in ((g_clip, True), (g_plain, False)):
        assert (max(g[40:]) < 1e-3 * gap0) is ok, (ok, max(g[40:]) / gap0)


class Without(ByzVRMarinaPP):
    """The simulator with ``gone(round, client)`` clients left out of the sampled set: the
    documented rule for failed and rejected replies (the round aggregates the live rows)."""

    def __init__(self, *args, gone, **kw):
        self.gone = gone
        super().__init__(*args, **kw)

    def _sample(self, size):
        full = size == self.full_cohort != self.cohort_size
        return [i for i in super()._sample(size) if not self.gone(self.rounds + 1, i, full)]


def test_failed_honest_clients_are_left_out(heterogeneous):
    """Clients 2 and 7 (honest) fail in rounds 1-8 (full and compressed rounds); in round 9
    every client fails. The run equals the simulator with those clients removed from the sampled
    sets (round 9: nothing changes, ``skipped`` = 1) -- IPM through the adversary, which then
    sees the live honest rows only."""

    def gone(t, cid):
        return (1 <= t <= 8 and cid in (2, 7)) or t == 9

    def fault(t, cid):
        return "drop" if t is not None and gone(t, cid) else None

    sim = Without(heterogeneous, byzantine=BYZ, gamma=1.0 / heterogeneous.L, attack="ipm",
                  gone=lambda t, i, full: gone(t, i) and t != 9, **COMMON)  # fmt: skip
    sim.run(8)
    strat8, _ = flower(heterogeneous, 8, fault=fault, byzantine=BYZ,
                       adversary=B.SimulatedAttack("ipm"), **COMMON)  # fmt: skip
    assert torch.equal(strat8.x, sim.x) and torch.equal(strat8.g, sim.g)
    h = strat8.history  # row 0: the initial round
    assert sum(h["failures"][1:]) >= 4 and any(h["full"][1:]) and not all(h["full"][1:])
    # round 9: every client fails -> skipped, x and g as after round 8, the counter moves on
    st9, _ = flower(heterogeneous, 9, fault=fault, byzantine=BYZ,
                    adversary=B.SimulatedAttack("ipm"), **COMMON)  # fmt: skip
    assert st9.history["skipped"][9] == 1 and st9.history["clients"][9] == 0
    assert torch.equal(st9.x, sim.x) and torch.equal(st9.g, sim.g) and st9.rounds == 9


def test_restart_resumes_exactly(heterogeneous):
    """5 rounds, a checkpoint, a fresh strategy loads it and runs 5 more: x, g and the history
    equal an uninterrupted 10-round run (the bucketing counter and centered clip's warm start are
    in the checkpoint). A checkpoint of other hyperparameters is refused before any change."""
    kw = {"byzantine": BYZ, "aggregator": "centered_clip", "bucketing": 2,
          "adversary": B.SimulatedAttack("alie"), **COMMON}  # fmt: skip
    whole, _ = flower(heterogeneous, 10, **kw)
    first, grid = flower(heterogeneous, 5, **kw)
    state = first.state_dict()
    second = B.ByzVRMarinaPPStrategy(num_clients=N, gamma=1.0 / heterogeneous.L, **kw)
    second.load_state_dict(state)
    second.start(grid=grid, initial_arrays=x0_of(heterogeneous.d), num_rounds=5)
    assert torch.equal(second.x, whole.x) and torch.equal(second.g, whole.g)
    assert second.history == whole.history and second.rounds == 10
    other = B.ByzVRMarinaPPStrategy(num_clients=N, gamma=1.0 / heterogeneous.L, alpha=2.0, **kw)
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict(state)
    assert other.x is None and other.g is None and other.rounds == 0
    bad = dict(state, g=state["g"].float())
    with pytest.raises(ValueError, match="g must be a float64"):
        second.load_state_dict(bad)
    assert second.rounds == 10


def _tampered(kind):
    def tamper(reply, request):
        rec = reply.content.array_records[P.VALUES]
        vals = rec["values"].numpy()
        cfg = reply.content.config_records[P.RECORD]
        if kind == "shape":
            rec["values"] = Array(vals[:-1].copy())
        elif kind == "nan":
            bad = vals.copy()
            bad[0] = np.nan
            rec["values"] = Array(bad)
        elif kind == "dtype":
            rec["values"] = Array(vals.astype(np.float64))
        elif kind == "round":
            cfg["round"] = cfg["round"] + 1
        elif kind == "client":
            cfg["client_id"] = 0 if cfg["client_id"] else 1
        elif kind == "record":
            del reply.content.config_records[P.RECORD]
        return reply

    return tamper


def test_bad_replies_are_skipped_with_warnings(heterogeneous, caplog):
    """From round 1 on, honest client 4's replies are corrupted (a different fault each time:
    wrong shape, NaN, float64, wrong round, wrong client id, no record): every one is skipped
    with a warning and the run equals the simulator without client 4 (the model stays finite)."""
    kinds = ["shape", "nan", "dtype", "round", "client", "record"]

    asked, kw = [], {**COMMON, "p": 0.7}  # more full rounds: client 4 is in all of them

    def fault(t, cid):
        if cid != 4 or not t:  # (round 0 is the initial round, which Without does not change)
            return None
        asked.append(t)
        return _tampered(kinds[(len(asked) - 1) % len(kinds)])

    sim = Without(heterogeneous, byzantine=BYZ, gamma=1.0 / heterogeneous.L, attack="none",
                  gone=lambda t, i, full: i == 4, **kw)  # fmt: skip
    sim.run(14)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strat, _ = flower(heterogeneous, 14, fault=fault, byzantine=BYZ, **kw)
    assert torch.equal(strat.x, sim.x) and torch.equal(strat.g, sim.g)
    skipped = [r.getMessage() for r in caplog.records
               if "reply of client 4 skipped" in r.getMessage()]  # fmt: skip
    assert len(skipped) == sum(strat.history["rejected"]) == len(asked) >= 3
    whys = ["expected float32 (31,)", "not finite", "float64", "its round is",
            "its client_id is", "no 'fedkern' ConfigRecord"]  # fmt: skip
    for msg, why in zip(skipped, whys * 3, strict=False):
        assert why in msg, (why, msg)


def test_topk_indices_are_checked(heterogeneous, caplog):
    """Top-k replies of clients 0-3 with indices out of range (odd rounds) or not ascending (even
    rounds) are skipped in every compressed round; the run equals the simulator without those
    clients in its compressed rounds."""
    comp = TopK(6)

    def tamper(reply, request):
        rec = reply.content.array_records[P.VALUES]
        if "indices" in rec:
            idx = rec["indices"].numpy().copy()
            idx[0] = heterogeneous.d if reply.content.config_records[P.RECORD]["round"] % 2 \
                else idx[1]  # fmt: skip
            rec["indices"] = Array(idx)
        return reply

    sim = Without(heterogeneous, byzantine=BYZ, gamma=1.0 / heterogeneous.L, attack="none",
                  compressor=comp, gone=lambda t, i, full: i < 4 and not full,
                  **COMMON)  # fmt: skip
    sim.run(8)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strat, _ = flower(heterogeneous, 8, byzantine=BYZ, compressor=comp,
                          fault=lambda t, c: tamper if c is not None and c < 4 else None,
                          **COMMON)  # fmt: skip
    assert torch.equal(strat.x, sim.x) and torch.equal(strat.g, sim.g)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count("indices must be strictly ascending in [0, ") >= 2
    assert sum(strat.history["rejected"]) >= 2


def _request(problem, cid=2, kind="diff", drop=(), **over):
    """A well-formed train.fedkern_byz message to client ``cid`` (fields overridable)."""
    d = problem.d
    fk = {"protocol": P.PROTOCOL, "method": B.METHOD, "seed": 1, "round": 3, "client_id": cid,
          "kind": kind, "key": 66, "lam": 0.5, "batch_size": 4, "clip": True, "comp": "none",
          "comp_k": d, "comp_seed": 0, "comp_unbiased": True, "comp_step": 2, "layout": ["w"],
          "config": "config"}  # fmt: skip
    fk.update(over)
    for k in drop:
        fk.pop(k)
    content = RecordDict({B.X_NEW: x0_of(d, 1), B.X_OLD: x0_of(d, 2),
                          P.RECORD: ConfigRecord(fk)})  # fmt: skip
    return Message(content, dst_node_id=NODES[cid], message_type=B.ACTION_BYZ)


def test_client_refuses_bad_messages(heterogeneous):
    """Malformed messages get an error reply naming the problem (and a good one a reply whose
    values equal the simulator's message formula)."""
    client = B.ByzVRMarinaClient(B.ProblemSampleGradients(heterogeneous), seed=1)
    ctx = Context(run_id=1, node_id=NODES[2], state=RecordDict(), run_config={},
                  node_config={"partition-id": 2})  # fmt: skip
    good = client.train(_request(heterogeneous), ctx)
    assert not good.has_error()
    vals = good.content.array_records[P.VALUES]["values"].numpy()
    x_new, x_old = (torch.from_numpy(x0_of(heterogeneous.d, s)["w"].numpy()) for s in (1, 2))
    from fedkern import sampling
    from fedkern.random import client_seed

    smp = sampling.uniform(int(heterogeneous.sizes[2]), 4, seed=client_seed(1, 2), step=66)
    g1 = heterogeneous.grads(x_new, [2], [smp]).float().double()
    g0 = heterogeneous.grads(x_old, [2], [smp]).float().double()
    D = (g1 - g0).float().double()[0]
    want = D * min(1.0, 0.5 / float(D.norm()))
    np.testing.assert_allclose(vals, want.numpy(), rtol=1e-6, atol=1e-7)
    cases = [
        (dict(protocol=99), "protocol version 99"),
        (dict(method="scaffnew"), "method 'scaffnew' is not served"),
        (dict(seed=2), "seed 2 differs"),
        (dict(client_id=3), "message for client 3, this is client 2"),
        (dict(kind="sync"), "field 'kind'"),
        (dict(layout="w"), "field 'layout'"),
        (dict(layout=["v"]), "no array 'v'"),
        (dict(lam=-1.0), "field 'lam'"),
        (dict(lam=float("nan")), "field 'lam'"),
        (dict(key=True), "field 'key' must be an int"),
        (dict(comp="sketch"), "unknown compressor"),
        (dict(comp="randk", comp_k=0), "field 'comp_k'"),
        (dict(drop=["round"]), "field 'round' must be an int"),
    ]
    for over, why in cases:
        reply = client.train(_request(heterogeneous, **over), ctx)
        assert reply.has_error() and why in reply.error.reason, (over, reply.error.reason)
    msg = _request(heterogeneous)
    del msg.content.array_records[B.X_OLD]
    reply = client.train(msg, ctx)
    assert reply.has_error() and "needs the ArrayRecord 'fedkern.x'" in reply.error.reason
    msg = _request(heterogeneous)
    bad = np.zeros(heterogeneous.d)
    bad[3] = np.inf
    msg.content.array_records[B.X_NEW] = ArrayRecord({"w": Array(bad)})
    assert "finite" in client.train(msg, ctx).error.reason
    msg = _request(heterogeneous)
    del msg.content.config_records[P.RECORD]
    assert "no 'fedkern' ConfigRecord" in client.train(msg, ctx).error.reason

    def broken(x, cid, samples, config=None):
        raise RuntimeError("no data")

    broken.num_samples = lambda cid: 5
    reply = B.ByzVRMarinaClient(broken).train(_request(heterogeneous, kind="full"), ctx)
    assert reply.error.code == P.ERR_TRAIN and "no data" in reply.error.reason
    assert len(ctx.state.array_records) == 0 and len(ctx.state.config_records) == 0  # stateless


def test_bad_constructor_input(heterogeneous):
    S = B.ByzVRMarinaPPStrategy
    with pytest.raises(TypeError, match="gamma"):
        S(num_clients=N)
    cases = [
        (dict(gamma=-1.0), ValueError, "gamma must be > 0"),
        (dict(gamma=1.0, p=0.0), ValueError, "p must be in"),
        (dict(gamma=1.0, cohort=21), ValueError, "cohort must be"),
        (dict(gamma=1.0, full_cohort=0), ValueError, "full_cohort must be"),
        (dict(gamma=1.0, alpha=float("inf")), ValueError, "alpha must be finite"),
        (dict(gamma=1.0, byzantine=range(20)), ValueError, "at least one client must be honest"),
        (dict(gamma=1.0, byzantine=[20]), ValueError, "byzantine must be"),
        (dict(gamma=1.0, byzantine=3), TypeError, "byzantine must be a collection"),
        (dict(gamma=1.0, aggregator="median"), ValueError, "aggregator must be one of"),
        (dict(gamma=1.0, aggregator="krum", cohort=2), ValueError, "krum needs at least 3 rows"),
        (dict(gamma=1.0, aggregator=R.Aggregator("mean"), bucketing=2), ValueError,
         "apply to a rule name"),
        (dict(gamma=1.0, aggregator=3), TypeError, "aggregator must be a rule name or callable"),
        (dict(gamma=1.0, compressor="topk"), TypeError, "compressor must be None"),
        (dict(gamma=1.0, adversary=1), TypeError, "adversary must be callable"),
        (dict(gamma=1.0, batch_size=0), ValueError, "batch_size must be"),
        (dict(gamma=1.0, fraction_train=0.5), TypeError, "fraction_train is not an option"),
    ]  # fmt: skip
    for kw, exc, why in cases:
        with pytest.raises(exc, match=why):
            S(num_clients=N, **kw)
    strat = S(num_clients=N, gamma=1.0)
    with pytest.raises(RuntimeError, match="has no model"):
        strat.run_round(Grid(make_app(heterogeneous)))
    with pytest.raises(TypeError, match="flwr.app.ArrayRecord"):
        strat.set_initial_arrays({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="finite"):
        strat.set_initial_arrays(ArrayRecord({"w": Array(np.full(3, np.nan))}))
    assert strat.x is None
    with pytest.raises(ValueError, match="attack must be None or one of"):
        B.ByzVRMarinaClient(B.ProblemSampleGradients(heterogeneous), attack="alie")
    with pytest.raises(ValueError, match="need an attack"):
        B.ByzVRMarinaClient(B.ProblemSampleGradients(heterogeneous), byzantine=[1])
    with pytest.raises(TypeError, match="num_samples"):
        B.ByzVRMarinaClient(lambda *a: None)
    with pytest.raises(ValueError, match="attack must be one of"):
        B.SimulatedAttack("label_flip")
    adv = S(num_clients=N, gamma=1.0, byzantine=BYZ, adversary=lambda view: torch.zeros(1, 1),
            p=1.0, **{k: COMMON[k] for k in ("batch_size", "cohort")})  # fmt: skip
    with pytest.raises(ValueError, match="adversary must return float32"):
        adv.start(grid=Grid(make_app(heterogeneous)), initial_arrays=x0_of(heterogeneous.d),
                  num_rounds=1)  # fmt: skip
    assert adv.g is None  # the initial round was not applied


def test_handshake_leaves_out_other_helpers(heterogeneous):
    """MethodStrategy.connect keeps only nodes serving byz_vr_marina_pp: a MethodClient
    (Scaffnew / TAMUNA) node is left out with a warning."""
    from fedkern.integrations.flower.method_client import MethodClient

    app = ClientApp()
    MethodClient(lambda *a: a[0]).register(app)
    strat = B.ByzVRMarinaPPStrategy(num_clients=N, gamma=1.0)
    assert strat.connect(Grid(app), timeout=1) == {}
    nodes = strat.connect(Grid(make_app(heterogeneous)), timeout=1)
    assert nodes == dict(zip(range(N), NODES, strict=True))


SIMULATION: dict = {}


def test_flower_simulation_engine_equals_the_simulator():
    """Flower's simulation engine (``run_simulation``, Ray backend): 6 virtual SuperNodes (client
    5 Byzantine with a client-side bit flip), cohort 3, rand-k differences, 6 rounds: the server
    model equals the simulator's bit for bit."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation] (Ray)")
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    A, y = data.load("breast_cancer")
    problem = LogisticRegression(A, y, data.split(y, 6, "iid", seed=1), l2=0.1)
    kw = {"cohort": 3, "p": 0.4, "batch_size": 8, "seed": 2, "compressor": RandK(ratio=0.3, seed=1)}
    client_app = ClientApp()
    B.ByzVRMarinaClient(B.ProblemSampleGradients(problem), byzantine=[5],
                        attack="bit_flip").register(client_app)  # fmt: skip
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        strat = B.ByzVRMarinaPPStrategy(num_clients=6, gamma=1.0 / problem.L, byzantine=[5], **kw)
        SIMULATION["res"] = strat.start(grid=grid, initial_arrays=x0_of(problem.d), num_rounds=6)
        SIMULATION["hist"] = strat.history

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "include_dashboard": False}}  # fmt: skip
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=6,
                   backend_config=backend)  # fmt: skip
    sim = ByzVRMarinaPP(problem, byzantine=[5], gamma=1.0 / problem.L, attack="bit_flip", **kw)
    sim.run(6)
    res = SIMULATION.pop("res")
    assert torch.equal(torch.from_numpy(np.array(res.arrays["w"].numpy())), sim.x)
    hist = SIMULATION.pop("hist")
    assert sum(hist["failures"]) == 0 and not all(hist["full"]) and sum(hist["full"][1:]) >= 1
