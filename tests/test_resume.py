"""Exact resume of every stateful object: a run stopped at round r, saved with ``torch.save``,
loaded into a freshly built object and run on equals the uninterrupted run bit for bit (CPU).

Covered: every method of ``fedkern.algorithms`` (the test below fails when a registered method has
no case here): GD, FedAvg, FedProx, Scaffold, ProxSkip in both prox forms, Scaffnew, TAMUNA
(exact and deferred), 5GCS / 5GCS-CC, MARINA, DIANA, EF21, L-SVRG, PAGE, the (L0,L1) clipped
methods on the quartic, BiasedSGD with its estimators,
R-SGD / R-LSVRG / R-PAGE / R-MARINA on PCA, Byz-VR-MARINA-PP and PP+ with stateful aggregators,
compressors and attacks), ``fedkern.robust.Aggregator`` (bucketing's call counter, centered
clipping's warm start), and the stateless batched clients (``ClientBatch``, ``ModuleClients``):
they keep no state between calls (their randomness is keyed by the round argument), which is
tested as such.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import same_bits

from fedkern import data
from fedkern import robust as R
from fedkern.algorithms import (
    CLERR,
    DIANA,
    EF21,
    GD,
    LSVRG,
    MARINA,
    NASTYA,
    PAGE,
    REGISTRY,
    RLSVRG,
    RMARINA,
    RPAGE,
    RSGD,
    TAMUNA,
    BiasedSGD,
    ByzVRMarinaPP,
    ClipLocalGDJ,
    ClippedFedAvg,
    ClippedGD,
    ClippedRRCLI,
    FedAvg,
    FedProx,
    FiveGCS,
    LocalClippedSGD,
    LocalGD,
    ProxSkip,
    Scaffnew,
    Scaffold,
    federated,
)
from fedkern.clients import ClientBatch, ModuleClients
from fedkern.compress import RandK, TopK
from fedkern.estimators import IndependentSampling, RandKGradient, ZerothOrder
from fedkern.manifolds import PCA
from fedkern.problems import LogisticRegression, Problem, Quartic

TOTAL, STOP = 9, 4


@pytest.fixture(scope="module")
def cancer():
    A, y = data.load("breast_cancer")
    return A, y


@pytest.fixture(scope="module")
def batch(cancer):
    A, y = cancer
    return ClientBatch(Problem(A, y, data.split(y, 10, "label_sorted"), "logistic", 0.05), seed=4)


def roundtrip(state):
    """torch.save / torch.load, as a checkpoint on disk would be."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def same_history(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if len(a[key]) != len(b[key]):
            return False
        for u, w in zip(a[key], b[key], strict=True):
            if isinstance(u, float) and isinstance(w, float) and math.isnan(u) and math.isnan(w):
                continue
            if u != w:
                return False
    return True


def equal_bits(u: torch.Tensor, w: torch.Tensor) -> bool:
    """Bit equality of two tensors of any dtype (float64 included; NaN payloads aside)."""
    if u.dtype != w.dtype or u.shape != w.shape:
        return False
    if u.dtype == torch.float64:
        nan = torch.isnan(u) & torch.isnan(w)
        return bool(((u.view(torch.int64) == w.view(torch.int64)) | nan).all())
    return same_bits(u, w) if u.is_floating_point() else torch.equal(u, w)


def assert_same_state(a, b) -> None:
    """Two methods hold the same state: every state attribute, the round and the history."""
    assert a.rounds == b.rounds and a.diverged_at == b.diverged_at
    for name in a.state_attrs:
        u, w = getattr(a, name), getattr(b, name)
        if isinstance(u, torch.Tensor):
            assert equal_bits(u, w), name
        elif hasattr(u, "state_dict"):
            su, sw = u.state_dict(), w.state_dict()
            assert su.keys() == sw.keys(), name
            for key in su:
                if isinstance(su[key], torch.Tensor):
                    assert equal_bits(su[key], sw[key]), (name, key)
                else:
                    assert su[key] == sw[key], (name, key)
        else:
            assert u == w, name
    assert same_history(a.history, b.history)


def check_resume(make) -> None:
    """make() builds a fresh method; stopped at STOP and resumed it equals the straight run."""
    straight = make()
    straight.run(TOTAL)
    first = make()
    first.run(STOP)
    saved = roundtrip(first.state_dict())
    first.run(TOTAL - STOP)  # the saved state must not alias the running method
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.rounds == STOP and len(resumed.history["loss"]) == STOP + 1
    resumed.run(TOTAL - STOP)
    assert_same_state(resumed, straight)
    assert_same_state(first, straight)


FEDERATED = {
    "gd": lambda B: GD(B, mode="sgd", batch_size=5, seed=2),
    "fedavg": lambda B: FedAvg(
        B, local_steps=3, cohort=4, server_lr=0.7, mode="sgd", batch_size=4, seed=2
    ),  # fmt: skip
    "fedprox": lambda B: FedProx(
        B, local_steps=2, cohort=6, mu=0.3, mode="rr", batch_size=9, seed=2
    ),  # fmt: skip
    "scaffold": lambda B: Scaffold(B, local_steps=3, cohort=5, mode="sgd", batch_size=3, seed=2),
    "proxskip": lambda B: ProxSkip(
        B, prox="l1", lam=0.01, p=0.4, cohort=7, mode="sgd", batch_size=6, seed=2
    ),  # fmt: skip
    "scaffnew": lambda B: Scaffnew(B, p=0.3, cohort=6, mode="rr", batch_size=7, seed=2),
    "tamuna": lambda B: TAMUNA(B, cohort=6, s=3, p=0.3, mode="sgd", batch_size=4, seed=2),
    "tamuna_deferred": lambda B: TAMUNA(B, cohort=5, s=2, p=0.5, deferred=True, seed=2),
    "fivegcs": lambda B: FiveGCS(
        B, cohort=4, sampling="importance", compressor=RandK(6, seed=3), local_solver="agd", seed=2
    ),  # fmt: skip
    "fivegcs_uniform": lambda B: FiveGCS(B, cohort=3, mode="sgd", batch_size=4, seed=2),
    "marina": lambda B: MARINA(B, k=4, p=0.4, mode="sgd", batch_size=3, seed=2),
    "diana": lambda B: DIANA(B, k=4, mode="sgd", batch_size=5, seed=2),
    "ef21": lambda B: EF21(B, k=4, seed=2),
    "lsvrg": lambda B: LSVRG(B, batch_size=4, p=0.3, seed=2),
    "page": lambda B: PAGE(B, small_batch=4, p=0.3, seed=2),
}

#: The Riemannian methods on the PCA of digits over 10 nodes (coins at p = 0.3: both branches).
RIEMANNIAN = {
    "rsgd": lambda P: RSGD(P, batch_size=4, seed=2),
    "rlsvrg": lambda P: RLSVRG(P, batch_size=4, p=0.3, seed=2),
    "rpage": lambda P: RPAGE(P, small_batch=4, p=0.3, seed=2),
    "rmarina": lambda P: RMARINA(P, k=8, p=0.3, seed=2),
}


@pytest.fixture(scope="module")
def quartic_batch():
    points = Quartic.uniform_points(200, 3, seed=1)
    return ClientBatch(Quartic.sorted_split(points, 6), seed=0)


def _nonconvex():
    A, y = data.load("breast_cancer")
    return Problem(A, y, [torch.arange(len(y))], "logistic", 0.0, nonconvex_reg=0.1)


#: The (L0,L1) clipped local / reshuffling methods on the quartic (a start far out, so that the
#: clipping is active), with minibatches / cohorts so that every kind of draw is resumed.
QUARTIC = {
    "clip_localgdj": lambda B, x0: ClipLocalGDJ(
        B, local_steps=3, mode="sgd", batch_size=5, x0=x0, seed=2
    ),  # fmt: skip
    "clipped_gd": lambda B, x0: ClippedGD(B, x0=x0, seed=2),
    "local_gd": lambda B, x0: LocalGD(B, local_steps=3, x0=x0, seed=2),
    "clerr": lambda B, x0: CLERR(B, batch_size=7, x0=x0, seed=2),
    "nastya": lambda B, x0: NASTYA(B, batch_size=7, x0=x0, seed=2),
    "clipped_rr_cli": lambda B, x0: ClippedRRCLI(B, cohort=3, batch_size=6, x0=x0, seed=2),
    "local_clipped_sgd": lambda B, x0: LocalClippedSGD(B, local_steps=2, x0=x0, seed=2),
    "clipped_fedavg": lambda B, x0: ClippedFedAvg(B, clip=5.0, cohort=4, x0=x0, seed=2),
}


#: Methods whose exact resume is tested beside their claims (the model or sketch state there).
ELSEWHERE = {
    "dsgd": "tests/test_mast.py::test_mast_methods_resume_exactly",
    "ddsgd": "tests/test_mast.py::test_mast_methods_resume_exactly",
    "lsvrdsg": "tests/test_mast.py::test_mast_methods_resume_exactly",
    "raclora": "tests/test_lora.py::test_chain_methods_resume_exactly",
    "asymmlora": "tests/test_lora.py::test_chain_methods_resume_exactly",
    "cola": "tests/test_lora.py::test_chain_methods_resume_exactly",
    "lora": "tests/test_lora.py::test_chain_methods_resume_exactly",
    "fpft": "tests/test_lora.py::test_chain_methods_resume_exactly",
    "fedraclora": "tests/test_lora.py::test_fedraclora_equals_the_centralized_chain",
}


def test_every_registered_method_is_covered():
    covered = (set(FEDERATED) | set(QUARTIC) | set(RIEMANNIAN) | set(ELSEWHERE)
               | {ByzVRMarinaPP.name, BiasedSGD.name})  # fmt: skip
    assert set(REGISTRY) <= covered, set(REGISTRY) - covered


@pytest.mark.parametrize("name", sorted(RIEMANNIAN))
def test_riemannian_method_resumes_exactly(name):
    A, _ = data.load("digits")
    Z = A[:, :-1]
    P = PCA(Z, list(torch.tensor_split(torch.arange(Z.shape[0]), 10)))
    check_resume(lambda: RIEMANNIAN[name](P))


@pytest.mark.parametrize("name", sorted(QUARTIC))
def test_quartic_method_resumes_exactly(quartic_batch, name):
    x0 = torch.full((3,), 20.0)
    check_resume(lambda: QUARTIC[name](quartic_batch, x0))


@pytest.mark.parametrize("estimator", ["independent", "zeroth_order", "randk"])
def test_biased_sgd_resumes_exactly(estimator):
    P = _nonconvex()
    est = {"independent": lambda: IndependentSampling(0.1), "zeroth_order": lambda: ZerothOrder(3),
           "randk": lambda: RandKGradient(k=4)}[estimator]  # fmt: skip
    check_resume(lambda: BiasedSGD(P, estimator=est(), factor=1e3, budget=10, seed=2))


@pytest.mark.parametrize("name", sorted(FEDERATED))
def test_federated_method_resumes_exactly(batch, name, monkeypatch):
    # the L1 problem's optimum (FISTA to 1e-15, for the gap metric) is irrelevant to resuming
    monkeypatch.setattr(federated, "l1_optimum", lambda problem, lam: (torch.zeros(problem.p,
                        dtype=torch.float64), 0.0))  # fmt: skip
    check_resume(lambda: FEDERATED[name](batch))


def test_resume_restores_random_position_not_just_x(batch):
    """The draws of round r are keyed by r: a resumed ProxSkip draws the straight run's local-step
    counts and cohorts (and not those of round 0 again)."""
    straight = Scaffnew(batch, p=0.3, cohort=6, seed=5)
    straight.run(TOTAL)
    resumed = Scaffnew(batch, p=0.3, cohort=6, seed=5)
    part = Scaffnew(batch, p=0.3, cohort=6, seed=5)
    part.run(STOP)
    resumed.load_state_dict(part.state_dict())
    resumed.run(TOTAL - STOP)
    assert resumed.history["local_steps"] == straight.history["local_steps"]
    assert len(set(straight.history["local_steps"][1:])) > 1  # the counts do vary


def test_load_rejects_other_settings(batch):
    state = FedAvg(batch, local_steps=3, seed=1).state_dict()
    with pytest.raises(ValueError, match="local_steps|K = 3"):
        FedAvg(batch, local_steps=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        FedAvg(batch, local_steps=3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="state is of method 'fedavg', not 'gd'"):
        GD(batch).load_state_dict(state)
    m = FedAvg(batch, local_steps=3, seed=1)
    before = m.x.clone()
    bad = roundtrip(state)
    bad["attrs"]["x"] = torch.zeros(3)
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        m.load_state_dict(bad)
    assert torch.equal(m.x, before) and m.rounds == 0


# ---- Byz-VR-MARINA-PP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iid_problem(cancer):
    A, y = cancer
    return LogisticRegression(A, y, data.split(y, 12, "iid", seed=1), l2=0.1)


BYZ_CASES = {
    "bucketing-median": dict(aggregator=lambda: R.Aggregator("coordinate_median",
                                                              pre="bucketing", seed=3)),
    "cclip-warm-randk": dict(aggregator=lambda: R.Aggregator("centered_clip", tau=0.5,
                                                              warm_start=True),
                             compressor=lambda: RandK(ratio=0.3, seed=8)),
    "alie-topk": dict(attack="alie", compressor=lambda: TopK(5)),
    "ipm-trimmed": dict(attack="ipm", aggregator=lambda: R.Aggregator("trimmed_mean", 1)),
    "plus-shift-back": dict(plus=True),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BYZ_CASES))
def test_byz_vr_marina_pp_resumes_exactly(iid_problem, case):
    def make():
        kw = {k: (f() if callable(f) else f) for k, f in BYZ_CASES[case].items()}
        return ByzVRMarinaPP(iid_problem, byzantine=range(9, 12), cohort=5, batch_size=6,
                             p=0.35, seed=6, **kw)  # fmt: skip

    check_resume(make)


# ---- Aggregator ----------------------------------------------------------------------------------


AGGREGATORS = {
    "bucketing": lambda: R.Aggregator("coordinate_median", pre="bucketing", bucket_size=3, seed=2),
    "warm-centered-clip": lambda: R.Aggregator(
        "centered_clip", tau=0.3, iters=2, warm_start=True
    ),  # fmt: skip
    "nnm-krum": lambda: R.Aggregator("krum", 1, pre="nnm"),
    "geometric-median": lambda: R.Aggregator("geometric_median", iters=3),
}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregator_resumes_exactly(name, gen):
    stacks = [torch.randn(9, 40, generator=gen) + i for i in range(7)]
    straight = AGGREGATORS[name]()
    want = [straight(X) for X in stacks]
    first = AGGREGATORS[name]()
    for X in stacks[:3]:
        first(X)
    saved = roundtrip(first.state_dict())
    resumed = AGGREGATORS[name]()
    resumed.load_state_dict(saved)
    for X, w in zip(stacks[3:], want[3:], strict=True):
        assert same_bits(resumed(X), w)
    assert resumed.state_dict()["step"] == straight.state_dict()["step"] == 7


def test_aggregator_state_is_a_copy(gen):
    """Running on after state_dict() does not change the saved warm-start centre."""
    agg = R.Aggregator("centered_clip", tau=0.3, warm_start=True)
    agg(torch.randn(6, 10, generator=gen))
    state = agg.state_dict()
    last = state["last"].clone()
    agg(torch.randn(6, 10, generator=gen) + 5)
    assert torch.equal(state["last"], last)


# ---- the batched clients are stateless -----------------------------------------------------------


def test_client_batch_is_stateless(batch):
    """ClientBatch keeps nothing between calls: the same (X, round) gives the same bits whatever
    ran before, and a freshly built batch agrees; its randomness is the round argument's."""
    X0 = torch.randn(4, batch.p, generator=torch.Generator().manual_seed(0)) * 0.1
    S = torch.tensor([1, 3, 6, 8])

    def steps(B, rnd):
        return B.local_steps_(X0.clone(), gamma=0.05, steps=3, clients=S, mode="sgd",
                              batch_size=4, round=rnd)  # fmt: skip

    a = steps(batch, 5)
    steps(batch, 2)  # an unrelated call in between
    assert same_bits(steps(batch, 5), a)
    fresh = ClientBatch(batch.problem, seed=batch.seed)
    assert same_bits(steps(fresh, 5), a)
    assert not same_bits(steps(batch, 6), a)  # the round keys the minibatches


def test_module_clients_are_stateless(cancer):
    """ModuleClients holds data only: K steps in one call or in chunks give the same bits, two
    instances agree, and the module's own parameters are never touched."""
    A, y = cancer
    A, y = A[:120].float(), y[:120]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(A.shape[1], 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 2))  # fmt: skip
    before = [p.detach().clone() for p in net.parameters()]
    parts = data.split(y, 6, "iid", seed=2)

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out, target, reduction="none")

    make = lambda: ModuleClients(net, loss, A, y, parts, l2=0.01)  # noqa: E731
    mc = make()
    X = mc.flat().expand(6, -1).contiguous()
    once = mc.local_steps_(X.clone(), gamma=0.1, steps=4)
    chunks = mc.local_steps_(mc.local_steps_(X.clone(), gamma=0.1, steps=1), gamma=0.1, steps=3)
    assert same_bits(once, chunks)
    assert same_bits(make().local_steps_(X.clone(), gamma=0.1, steps=4), once)
    assert not same_bits(once, X)
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert not hasattr(mc, "state_dict")  # nothing to checkpoint: the caller owns X
