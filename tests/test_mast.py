"""MAST's claims (ALGORITHMS.md section 7) on bundled data, each with its negative control, and
the MAST methods' exact resume. The update rules themselves are checked against float64 math here
(DSGD at q = 1 is gradient descent; DSGD's minibatch mode step by step against a float64
rendering of its definition; one LSVRDSG step against its formula)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import fresh_seed

from fedkern import data
from fedkern import sketch as sk
from fedkern.algorithms.base import SLOTS
from fedkern.algorithms.mast import DSGD, LSVRDSG, DistributedDSGD, finite_optimum
from fedkern.problems import Problem
from fedkern.random import client_seed, permutation_tensor

F64 = torch.float64


@pytest.fixture(scope="module")
def cancer():
    A, y = data.load("breast_cancer")
    return A, y


def _problem(A, y, l2, rows=None):
    if rows is not None:
        A, y = A[:rows], y[:rows]
    return Problem(A, y, [torch.arange(A.shape[0])], "logistic", l2)


def _grad64(A, y, l2, x):
    """grad of mean log(1 + exp(-s a^T x)) + l2/2 ||x||^2, s = 2y - 1, in float64 from the math."""
    A, s = A.to(F64), (2 * y - 1).to(F64)
    z = s * (A @ x)
    return A.T @ (-s * torch.sigmoid(-z)) / A.shape[0] + l2 * x


def test_dsgd_at_q1_is_gradient_descent(cancer):
    A, y = cancer
    P = _problem(A, y, 1e-3, rows=120)
    m = DSGD(P, sk.RandK(ratio=1.0), gamma=0.2, seed=3)
    m.run(5)
    x = torch.zeros(P.p, dtype=F64)
    for _ in range(5):
        x = x - 0.2 * _grad64(A[:120], y[:120], 1e-3, x)
    torch.testing.assert_close(m.x.double(), x, rtol=1e-5, atol=1e-6)


def test_loss_curves_are_ordered_by_sparsity(cancer):
    """DSGD (exact gradients, gamma = 1/L, 100 iterations) on breast_cancer: the ERM gap averaged
    over the last 20 iterations grows as q = K/d shrinks (q = 1 is GD, checked against float64
    gradient descent above). An ordering has no weaker baseline to fail it; the controls of the
    MAST claims are in the two tests below."""
    A, y = cancer
    P = _problem(A, y, 1e-3)
    gaps = {}
    for q in (1.0, 0.5, 0.1):
        m = DSGD(P, sk.RandK(ratio=q), gamma=1.0 / P.L, seed=0)
        m.run(100)
        gaps[q] = sum(m.history["gap"][-20:]) / 20
    print({q: f"{g:.3e}" for q, g in gaps.items()})
    assert gaps[1.0] < gaps[0.5] < gaps[0.1]


def test_lsvrdsg_converges_linearly_where_dsgd_stalls(cancer):
    """N = 4 Rand-K(1/2) sketches, b = N, l2 = 0.1, the same gamma = 4 / (L L_D) for both, 90
    iterations on 200 rows of breast_cancer: LSVRDSG reaches x_D* (the exact minimizer of f_D,
    Newton in float64) to 1e-3 and keeps shrinking geometrically; DSGD on the same sketch set fails
    the same assertion (it stalls at a neighbourhood)."""
    A, y = cancer
    P = _problem(A, y, 0.1, rows=200)
    lsvr = LSVRDSG(P, sk.RandK(ratio=0.5), sketches=4, seed=0)
    gamma = 4 * lsvr.gamma
    lsvr = LSVRDSG(P, sk.RandK(ratio=0.5), sketches=4, gamma=gamma, seed=0)
    dsgd = DSGD(P, sk.RandK(ratio=0.5), sketches=4, gamma=gamma, seed=0)
    lsvr.run(90)
    dsgd.run(90)
    out = {}
    for name, m in (("lsvrdsg", lsvr), ("dsgd", dsgd)):
        d = m.history["dist_D"]
        out[name] = (d[30], d[60], d[90])
    print({k: [f"{v:.2e}" for v in t] for k, t in out.items()})

    def linear(t):
        return t[2] <= 1e-3 and t[2] <= 0.3 * t[1] <= 0.3 * 0.3 * t[0]

    assert linear(out["lsvrdsg"])
    assert not linear(out["dsgd"])
    assert out["dsgd"][2] > 10 * out["lsvrdsg"][2]


def test_mast_solution_is_more_robust_to_random_pruning(cancer):
    """The MAST solution (x_D* of 16 Bernoulli(1/2) sketches, breast_cancer, l2 = 1e-3) against
    the ERM solution, both pruned by the same 301 random masks (coordinates kept with probability
    0.5, 0.4, 0.3; the accuracy evaluated in float64): MAST keeps the higher median
    accuracy at every level. Control: without pruning the ERM solution is at least as accurate
    (the same assertion fails), so the gain is robustness, not a better model."""
    A, y = cancer
    P = _problem(A, y, 1e-3)
    xe, _ = P.optimum()
    D = sk.apply(sk.Bernoulli(0.5), torch.ones(P.p), seed=0, step=0, node=torch.arange(16))
    xm, _ = finite_optimum(P, D)
    A64 = A.to(F64)
    gen = torch.Generator().manual_seed(1)

    def median_acc(x, M):
        pred = ((M * x) @ A64.T > 0).long()  # [masks, samples]
        return float((pred == y).to(F64).mean(1).median())

    res = {}
    for keep in (1.0, 0.5, 0.4, 0.3):
        M = (torch.rand(301, P.p, generator=gen, dtype=F64) < keep).to(F64)
        res[keep] = (median_acc(xm, M), median_acc(xe, M))
    print({k: (round(100 * a, 1), round(100 * b, 1)) for k, (a, b) in res.items()})
    for keep in (0.5, 0.4, 0.3):
        assert res[keep][0] > res[keep][1]
    assert not res[1.0][0] > res[1.0][1]


@pytest.mark.parametrize("cls", [DSGD, DistributedDSGD, LSVRDSG])
def test_mast_methods_resume_exactly(cancer, cls):
    A, y = cancer
    P = _problem(A, y, 1e-2, rows=60)
    kw = {"sketches": 3, "batch": 2} if cls is LSVRDSG else {}
    if cls is DistributedDSGD:
        P = Problem(A[:60], y[:60], [torch.arange(30), torch.arange(30, 60)], "logistic", 1e-2)
    a = cls(P, sk.RandK(ratio=0.3), seed=5, **kw)
    a.run(3)
    state = a.state_dict()
    a.run(4)
    b = cls(P, sk.RandK(ratio=0.3), seed=5, **kw)
    b.load_state_dict(state)
    b.run(4)
    assert torch.equal(a.x, b.x)
    assert a.history["loss"] == b.history["loss"]


def test_lsvrdsg_full_batch_step_is_gradient_descent_on_f_D(cancer):
    """With b = N every LSVRDSG estimator equals grad f_D(x) = (1/N) sum_j S_j grad f(S_j x)
    whatever the reference point: 4 steps against float64 GD on f_D built from the method's
    sketch diagonals (the sketches themselves are tested in tests/test_sketch.py)."""
    A, y = cancer
    A, y = A[:60], y[:60]
    P = _problem(A, y, 1e-2)
    m = LSVRDSG(P, sk.RandK(ratio=0.5), sketches=3, gamma=0.5, p=0.5, seed=2)
    m.run(4)
    D = m.diags.to(F64)
    x = torch.zeros(P.p, dtype=F64)
    for _ in range(4):
        x = x - 0.5 * torch.stack([s * _grad64(A, y, 1e-2, s * x) for s in D]).mean(0)
    torch.testing.assert_close(m.x.double(), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sketch", [sk.RandK(ratio=0.3), sk.Partition(2)])
def test_distributed_dsgd_step_matches_float64(cancer, sketch):
    """3 rounds of DistributedDSGD on 2 nodes (rows 0-29, 30-59) against float64 math:
    x <- x - (gamma / n) sum_i S_i grad f_i(S_i x), S_i the nodes' sketch diagonals of each round;
    each node sends and receives its support only (K floats for Rand-K, d / n for Partition)."""
    A, y = cancer
    A, y = A[:60], y[:60]
    parts = [torch.arange(30), torch.arange(30, 60)]
    P = Problem(A, y, parts, "logistic", 1e-2)
    m = DistributedDSGD(P, sketch, gamma=0.4, seed=4)
    m.run(3)
    x = torch.zeros(P.p, dtype=F64)
    for t in range(3):
        D = sk.apply(sketch, torch.ones(P.p), seed=4, step=t, node=torch.arange(2)).to(F64)
        g = sum(D[i] * _grad64(A[parts[i]], y[parts[i]], 1e-2, D[i] * x) for i in range(2))
        x = x - 0.4 / 2 * g
        support = int((D[0] != 0).sum())
        assert m.history["floats_up"][t + 1] == support == m.history["floats_down"][t + 1]
    torch.testing.assert_close(m.x.double(), x, rtol=1e-5, atol=1e-6)


# ---- DSGD's minibatch mode (version II) ---------------------------------------------------------

SIZES = (5, 25, 30)  # the clients' rows of breast_cancer[:60]; client 0 has fewer than a batch


def _clients_problem(A, y, l2=1e-2):
    bounds = [0, *torch.tensor(SIZES).cumsum(0).tolist()]
    parts = [torch.arange(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    return Problem(A[:60], y[:60], parts, "logistic", l2), parts


def _dsgd_minibatch_oracle(A, y, parts, sketch, *, steps, gamma, batch, seed, l2, v=None):
    """float64 rendering of DSGD mode "sgd" from its definition: at step t (round key
    (t + 1) * 16 + slot, ``Method.key``) the sketch diagonal D of (seed, t, node 0), w = v + D (x -
    v), client i's minibatch = the first min(batch, m_i) entries of the keyed permutation of its
    m_i rows (seed client_seed(seed, i), key slot 4), g = mean_i of the minibatch gradients
    (clients weighted equally), x <- x - gamma D g. Also returns the same run with the clients'
    full data (what the minibatch mode must not silently do)."""
    p = A.shape[1]
    v = torch.zeros(p, dtype=F64) if v is None else v.to(F64)
    xs = {"sgd": v.clone(), "full": v.clone()}
    for t in range(steps):
        D = sk.apply(sketch, torch.ones(p), seed=seed, step=t, node=0).to(F64)
        key = (t + 1) * SLOTS + 4
        for kind, x in xs.items():
            w = v + D * (x - v)
            g = torch.zeros(p, dtype=F64)
            for i, rows in enumerate(parts):
                if kind == "sgd":
                    b = min(batch, rows.numel())
                    rows = rows[permutation_tensor(rows.numel(), client_seed(seed, i), key,
                                                   count=b)]  # fmt: skip
                g += _grad64(A[rows], y[rows], l2, w)
            xs[kind] = x - gamma * D * (g / len(parts))
    return xs["sgd"], xs["full"]


@pytest.mark.parametrize("sketch", [sk.RandK(ratio=0.4), sk.Bernoulli(0.5)])
@pytest.mark.parametrize("pretrained", [False, True])
def test_dsgd_minibatch_step_matches_float64(cancer, sketch, pretrained):
    """4 DSGD steps in mode "sgd" (batch 7 per client; 3 clients of 5, 25 and 30 rows) against the
    float64 rendering above, from 0 or from a pre-trained point v. Control: the full-batch run of
    the same sketches is far outside the tolerance (so the check sees the minibatches)."""
    A, y = cancer
    A, y = A[:60], y[:60]
    P, parts = _clients_problem(A, y)
    gen = torch.Generator().manual_seed(fresh_seed())
    v = (0.5 * torch.randn(P.p, generator=gen)) if pretrained else None
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    m = DSGD(P, sketch, mode="sgd", batch_size=7, gamma=0.5, v=v, seed=seed)
    m.run(4)
    want, full = _dsgd_minibatch_oracle(A, y, parts, sketch, steps=4, gamma=0.5, batch=7,
                                        seed=seed, l2=1e-2, v=v)  # fmt: skip
    torch.testing.assert_close(m.x.double(), want, rtol=1e-5, atol=1e-6)
    assert float((full - want).abs().max()) > 1e-3
    assert len(m.history["loss"]) == 5


def test_dsgd_minibatch_of_every_row_is_exact_mode(cancer):
    """batch_size >= every client's rows: each minibatch is all of the client's data (permuted),
    so mode "sgd" follows mode "exact" (up to the order of the float64 sums)."""
    A, y = cancer
    P, _ = _clients_problem(A, y)
    a = DSGD(P, sk.RandK(ratio=0.5), mode="sgd", batch_size=30, gamma=0.5, seed=1)
    b = DSGD(P, sk.RandK(ratio=0.5), mode="exact", gamma=0.5, seed=1)
    a.run(5)
    b.run(5)
    torch.testing.assert_close(a.x, b.x, rtol=1e-5, atol=1e-6)
    c = DSGD(P, sk.RandK(ratio=0.5), mode="sgd", batch_size=3, gamma=0.5, seed=1)
    c.run(5)
    assert float((c.x - b.x).abs().max()) > 1e-3  # control: smaller minibatches do differ


@pytest.mark.parametrize("sketches", [None, 3])
@pytest.mark.parametrize("sketch", [sk.Bernoulli(0.4), sk.RandK(ratio=0.3)])
def test_dsgd_minibatch_resumes_exactly(cancer, sketch, sketches):
    """Mode "sgd", stopped after 3 steps, saved with torch.save, loaded into a fresh DSGD: the
    next 4 steps equal the straight run bit for bit (the minibatch and sketch-index draws are
    keyed by the round). Control: a fresh DSGD that is not loaded gives a different x."""
    A, y = cancer
    P, _ = _clients_problem(A, y)
    kw = {"mode": "sgd", "batch_size": 4, "gamma": 0.5, "seed": 9, "sketches": sketches}
    a = DSGD(P, sketch, **kw)
    a.run(3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    a.run(4)
    b = DSGD(P, sketch, **kw)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    b.run(4)
    assert torch.equal(a.x, b.x)
    assert a.history["loss"] == b.history["loss"] and b.rounds == 7
    c = DSGD(P, sketch, **kw)
    c.run(4)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"mode": "minibatch"}, ValueError, "mode must be 'exact' or 'sgd'"),
        ({"mode": None}, ValueError, "mode"),
        ({"mode": "sgd", "batch_size": 0}, ValueError, "batch_size must be in"),
        ({"mode": "sgd", "batch_size": -3}, ValueError, "batch_size"),
        ({"mode": "sgd", "batch_size": 2.5}, TypeError, "batch_size must be an int"),
        ({"mode": "sgd", "batch_size": True}, TypeError, "batch_size"),
        ({"mode": "sgd", "batch_size": 4, "gamma": -1.0}, ValueError, "gamma"),
        ({"mode": "sgd", "batch_size": 4, "gamma": float("nan")}, ValueError, "gamma"),
        ({"mode": "sgd", "sketches": 0}, ValueError, "sketches"),
    ],
)  # fmt: skip
def test_dsgd_minibatch_bad_input(cancer, kw, exc, match):
    A, y = cancer
    P, _ = _clients_problem(A, y)
    with pytest.raises(exc, match=match):
        DSGD(P, sk.RandK(ratio=0.5), **kw)
