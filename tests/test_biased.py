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
    # p = 0.3: 0.3 N L_j / sum L exceeds 1 for the largest L_j, so min(1, .) would lose mass; the
    # capped mass is shared out again (fedkern.sampling.importance): E|S| = p N exactly, the capped
    # samples are the largest L_j, and the others stay proportional to L_j
    q = IndependentSampling(0.3, importance=True).probs(P)
    cap = q == 1.0
    assert 0 < int(cap.sum()) < P.samples and bool((0.3 * P.samples * L / L.sum() > 1).any())
    assert math.isclose(float(q.sum()), 0.3 * P.samples, rel_tol=1e-12)
    assert float(L[cap].min()) >= float(L[~cap].max())
    ratio = q[~cap] / L[~cap]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-12, atol=0)
    assert float(q.max()) <= 1.0


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


def twin_tails(P, p, T, seeds, *, gamma=None, factor=1.0, importance=False):
    """For biased and unbiased IndependentSampling(p) (biased first): per seed, the second-half
    means of f and ||grad f||^2, or None when the run diverged (||x|| > 10 (1 + ||x0||) or not
    finite: ||grad f||^2 alone rewards running off to infinity, where the regularizer's gradient
    vanishes, so f and the divergence bound are part of the verdict)."""
    x0 = gaussians(P.p, seed=0, step=0)
    out = []
    for biased in (True, False):
        e = IndependentSampling(p, biased=biased, importance=importance)
        rows = []
        for seed in seeds:
            m = BiasedSGD(P, estimator=e, gamma=gamma, factor=factor, budget=T, x0=x0, seed=seed,
                          diverge_factor=10.0)  # fmt: skip
            m.run(T)
            h = m.history
            if m.diverged_at is not None:
                rows.append(None)
                continue
            f, g = h["loss"][T // 2 :], h["grad_norm_sq"][T // 2 :]
            rows.append((sum(f) / len(f), sum(g) / len(g)))
        out.append(rows)
    return out


def converged(rows, f_max, g_max):
    """Every seed's run stayed bounded with second-half mean f < f_max and ||grad f||^2 < g_max."""
    return all(r is not None and r[0] < f_max and r[1] < g_max for r in rows)


def test_biased_beats_its_unbiased_twin_at_the_same_factor_of_its_theory_step():
    """The paper's protocol (each estimator at its own theory step times the same factor, same p,
    same budget T): at p = 0.01 on breast cancer with factor 2^7 the biased estimator converges
    (every seed: bounded, second-half mean f < 0.5 and ||grad f||^2 < 1e-2 ||grad f(x0)||^2) and
    its unbiased twin FAILS the same assertion (its theory step is ~24x larger, 0.91 against 0.038:
    past the stable range, f stays ~3.7). The win comes from the step rule: at one common step
    size, or each at its best step of a grid, the unbiased twin is as good or better (next test)."""
    P = problem()
    T, seeds = 200, (1, 2, 3)
    g0 = float(P.mean_grad(gaussians(P.p, seed=0, step=0)).pow(2).sum())
    b, u = twin_tails(P, 0.01, T, seeds, factor=2.0**7)
    print(f"p = 0.01, factor 2^7, T = {T}: biased (f, ||grad||^2) {b}; unbiased {u}")
    assert converged(b, 0.5, 1e-2 * g0)
    assert not converged(u, 0.5, 1e-2 * g0)


@pytest.mark.parametrize("importance", [False, True])
def test_unbiased_twin_is_not_worse_at_its_best_step(importance):
    """The fair same-budget comparison (same p, same T, each at its best step of one grid
    2^-6 .. 2^-3, by second-half mean f over seeds, diverged runs excluded from the choice): the
    measured direction is the opposite of the paper's claim, the unbiased twin ends at least as low
    (uniform p: a tie within 0.2 %, unbiased slightly lower, since E[1/|S|] > 1/(N p); importance
    p_j: the biased average is biased towards large-L samples and ends clearly higher). This pins
    the figures' direction (the claim is NOT reproduced in this setting)."""
    P = problem()
    T, seeds = 150, (1, 2)
    best = [math.inf, math.inf]
    for k in range(-6, -2):
        for i, rows in enumerate(twin_tails(P, 0.01, T, seeds, gamma=2.0**k,
                                            importance=importance)):  # fmt: skip
            if all(r is not None for r in rows):
                best[i] = min(best[i], sum(r[0] for r in rows) / len(rows))
    print(f"p = 0.01, importance={importance}: best f biased {best[0]:.5f}, unbiased {best[1]:.5f}")
    assert best[1] <= best[0]
    if importance:
        assert best[0] > best[1] + 5e-3  # the bias floor, well above the seed noise


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
