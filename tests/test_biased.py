"""SGD with biased estimators (fedkern.estimators, fedkern.algorithms.BiasedSGD): the estimators
against float64 oracles written from their definitions, the non-convex logistic problem, and the
claims of 2305.16296 on bundled data with their controls."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fresh_seed

from fedkern import data, sampling
from fedkern.algorithms import BiasedSGD
from fedkern.estimators import (
    IndependentSampling,
    RandKGradient,
    TopKGradient,
    ZerothOrder,
    build,
    gaussians,
)
from fedkern.problems import Problem


def nonconvex(name="breast_cancer", lam=1.0):
    A, y = data.load(name)
    if name == "digits":
        y = (y >= 5).long()
    return Problem(A, y, [torch.arange(A.shape[0])], "logistic", 0.0, nonconvex_reg=lam)


_P = {}


def problem(name="breast_cancer"):
    if name not in _P:
        _P[name] = nonconvex(name)
    return _P[name]


def oracle_grads(P, x):
    """[N, p] per-sample gradients of log(1 + exp(-s a.x)) + lam sum x^2 / (1 + x^2)."""
    a, s = P.A, 2 * P.y - 1
    r = -s / (1 + torch.exp(s * (a @ x)))
    return r[:, None] * a + P.nonconvex_reg * 2 * x / (1 + x * x) ** 2


def test_nonconvex_problem_against_autograd():
    P = problem()
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(P.p, generator=g, dtype=torch.float64).requires_grad_(True)
    a, y = P.A, P.y
    f = torch.nn.functional.softplus(-(2 * y - 1) * (a @ x)).mean() + (x * x / (1 + x * x)).sum()
    f0 = float(f.detach())
    (gx,) = torch.autograd.grad(f, x)
    x = x.detach()
    assert math.isclose(P.loss(x), f0, rel_tol=1e-12)
    # atol: float64 rounding of sums of O(1) per-sample terms in another order (cancellation)
    torch.testing.assert_close(P.grad(x), gx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(P.mean_grad(x), gx, rtol=1e-10, atol=1e-10)
    H = torch.autograd.functional.hessian(
        lambda z: torch.nn.functional.softplus(-(2 * y - 1) * (a @ z)).mean()
        + (z * z / (1 + z * z)).sum(), x, vectorize=True)  # fmt: skip
    torch.testing.assert_close(P.hessian(x), H, rtol=1e-8, atol=1e-10)
    assert P.has_optimum is False
    Lj = P.sample_smoothness()
    torch.testing.assert_close(Lj, (a * a).sum(1) / 4 + 2.0)


def test_independent_sampling_matches_its_definition():
    P = problem()
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(P.p, generator=g, dtype=torch.float64)
    G = oracle_grads(P, x)
    for importance in (False, True):
        for biased in (True, False):
            e = IndependentSampling(0.05, biased=biased, importance=importance)
            q = e.probs(P)
            S = sampling.independent(q, seed=3, step=11)
            got, cost = e.estimate(P, x, seed=3, step=11)
            want = G[S].mean(0) if biased else (G[S] / (P.samples * q[S])[:, None]).sum(0)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            assert cost == S.numel()
    L = P.sample_smoothness()
    q = IndependentSampling(0.05, importance=True).probs(P)
    torch.testing.assert_close(q, torch.clamp(0.05 * P.samples * L / L.sum(), max=1.0))


def test_compressed_and_zeroth_order_estimators():
    P = problem()
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(P.p, generator=g, dtype=torch.float64)
    full = oracle_grads(P, x).mean(0)
    top, _ = TopKGradient(k=5).estimate(P, x, seed=0, step=0)
    keep = torch.argsort(full.abs(), descending=True)[:5]
    want = torch.zeros_like(full)
    want[keep] = full[keep]
    torch.testing.assert_close(top, want, rtol=1e-10, atol=1e-12)
    rb, _ = RandKGradient(ratio=0.25).estimate(P, x, seed=1, step=2)
    ru, _ = RandKGradient(ratio=0.25, biased=False).estimate(P, x, seed=1, step=2)
    k = round(0.25 * P.p)
    nz = rb != 0
    assert int(nz.sum()) == k
    torch.testing.assert_close(rb[nz], full[nz], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ru, rb * (P.p / k), rtol=1e-12, atol=0)
    zo, cost = ZerothOrder(directions=4, h=1e-7).estimate(P, x, seed=5, step=1)
    U = gaussians(4 * P.p, seed=5, step=1).reshape(4, P.p)
    torch.testing.assert_close(zo, (U @ full)[:, None].mul(U).mean(0), rtol=1e-4, atol=1e-6)
    assert cost == 5 * P.samples
    z = gaussians(20000, seed=9, step=0)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05  # 7 sigma bounds


def test_theory_steps():
    P = problem()
    L, Lj, N, T = P.sample_smoothness_mean(), P.sample_smoothness(), P.samples, 400
    assert math.isclose(IndependentSampling(0.1).theory_gamma(P, T),
                        1 / math.sqrt(L * float(Lj.max()) / 0.1 * T))  # fmt: skip
    A = float((0.9 * Lj / (N * 0.1)).max())
    assert math.isclose(IndependentSampling(0.1, biased=False).theory_gamma(P, T),
                        min(1 / L, 1 / math.sqrt(L * A * T)))  # fmt: skip
    assert IndependentSampling(1.0, biased=False).theory_gamma(P, T) == 1 / L
    m = BiasedSGD(P, estimator=IndependentSampling(0.1), factor=2.0**18, budget=T)
    assert math.isclose(m.gamma, 2.0**18 * IndependentSampling(0.1).theory_gamma(P, T))


def run(P, p, factor, T, biased=True, seed=1):
    x0 = gaussians(P.p, seed=0, step=0)
    m = BiasedSGD(P, estimator=IndependentSampling(p, biased=biased), factor=factor, budget=T,
                  x0=x0, seed=seed)  # fmt: skip
    m.run(T)
    h = m.history["grad_norm_sq"]
    return m, sum(h[T // 2 :]) / len(h[T // 2 :])


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_grad_norm_falls_by_orders_of_magnitude_with_the_tuned_factor(name):
    """The official tuned factor 2^18: the mean ||grad f||^2 of the second half of T iterations is
    below 1e-2 of the start; the control, the untuned theory step (factor 1), is not."""
    P = problem(name)
    T = 200 if name == "breast_cancer" else 120
    tuned, tail = run(P, 0.5, 2.0**18, T)
    untuned, tail0 = run(P, 0.5, 1.0, T)
    g0 = tuned.history["grad_norm_sq"][0]
    print(f"{name}: ||grad f||^2 {g0:.3g} -> tuned {tail:.3g}, untuned {tail0:.3g}")
    assert tail < 1e-2 * g0 and tuned.diverged_at is None
    assert not tail0 < 1e-2 * g0


def test_larger_p_converges_faster_per_iteration():
    """p in {0.01, 0.1, 0.5} at the same factor: the second-half mean of ||grad f||^2 falls with p
    (the control: the order reversed fails, i.e. the values are not all equal)."""
    P = problem()
    tails = [run(P, p, 2.0**15, 150)[1] for p in (0.01, 0.1, 0.5)]
    print("tails", tails)
    assert tails[0] > tails[1] > tails[2]
    assert not (tails[2] > tails[1] > tails[0])


def test_biased_vs_unbiased_twin_figures():
    """The paper's claim that at small p a biased estimator beats its unbiased twin is NOT
    reproduced here (each at its own theory step times the same factor, the unbiased twin's theory
    step is ~24x larger and it ends lower): this test pins the measured figures' direction, so a
    change that flips it is seen."""
    P = problem()
    _, b = run(P, 0.01, 2.0**15, 150, biased=True)
    _, u = run(P, 0.01, 2.0**15, 150, biased=False)
    print(f"p = 0.01: biased {b:.3g}, unbiased {u:.3g}")
    assert u < b


def test_resume_bit_for_bit_and_bad_input():
    P = problem()
    for e in (IndependentSampling(0.1), ZerothOrder(3), RandKGradient(k=4)):
        full = BiasedSGD(P, estimator=e, factor=1e3, budget=10, seed=2)
        full.run(6)
        part = BiasedSGD(P, estimator=e, factor=1e3, budget=10, seed=2)
        part.run(3)
        st = part.state_dict()
        res = BiasedSGD(P, estimator=e, factor=1e3, budget=10, seed=2)
        res.load_state_dict(st)
        res.run(3)
        assert torch.equal(res.x, full.x) and res.history == full.history
    with pytest.raises(ValueError, match="unknown estimator"):
        build("bogus")
    with pytest.raises(ValueError, match="unknown estimator"):
        BiasedSGD(P, estimator="bogus")
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="p must"):
            IndependentSampling(bad)
    with pytest.raises(ValueError, match="factor must be > 0"):
        BiasedSGD(P, factor=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        TopKGradient()
    with pytest.raises(TypeError, match="Problem"):
        BiasedSGD("x")
    with pytest.raises(ValueError, match="nonconvex_reg must be >= 0"):
        nonconvex(lam=-1.0)
    from fedkern.clients import ClientBatch

    with pytest.raises(ValueError, match="nonconvex_reg"):
        ClientBatch(P)
