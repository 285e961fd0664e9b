"""5GCS / 5GCS-CC with client and importance sampling (fedkern.algorithms.fivegcs): one round
against a float64 oracle, the fixed point, unbiasedness of the server estimate under each sampler,
the claims of ALGORITHMS.md section 3 on breast_cancer (each with its control in the same test),
exact resume, bad input, and ClientBatch.local_steps_'s l2 keyword against a float64 loop."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import backend_fixture, interpreted

from fedkern import data
from fedkern.algorithms import FedAvg
from fedkern.algorithms.fivegcs import FiveGCS, client_smoothness
from fedkern.clients import ClientBatch
from fedkern.compress import RandK, TopK
from fedkern.ops.clients import IMPLS
from fedkern.problems import Problem

backend = backend_fixture(IMPLS)

F64 = torch.float64
M = 20


@pytest.fixture(scope="module")
def cancer():
    A, y = data.load("breast_cancer")
    return A, y, data.split(y, M, "label_sorted")  # heterogeneous: sorted by label


def make(cancer, l2=0.1, big=(), scale=1.0, seed=3):
    """breast_cancer over 20 label-sorted clients; the features of clients ``big`` times scale."""
    A, y, parts = cancer
    if big:
        A = A.clone()
        for i in big:
            A[parts[i]] *= scale
    return ClientBatch(Problem(A, y, parts, "logistic", l2), seed=seed)


def rounds_to(gaps, tol=1e-6):
    """First round with f - f* <= tol (f(x0) - f*), or None."""
    return next((i for i, g in enumerate(gaps) if g <= tol * gaps[0]), None)


def run_to(method, tol=1e-6, cap=1000, chunk=50):
    """Run in chunks until the gap reaches tol * gap0 (or cap rounds); returns that round."""
    while method.rounds < cap:
        method.run(chunk)
        r = rounds_to(method.history["gap"], tol)
        if r is not None or method.diverged_at is not None:
            return r
    return None


def uplink(history, upto):
    """Uplink floats of rounds 1..upto: sum of floats_up (per client) * cohort size."""
    return sum(u * c for u, c in zip(history["floats_up"][1 : upto + 1],
                                     history["cohort"][1 : upto + 1], strict=True))  # fmt: skip


def psi_grads(P, X):
    """float64 grad psi_m = grad f_m - l2 x at a shared x [d] or per client [M, d]."""
    return P.grads(X) - P.l2 * (X if X.dim() == 2 else X.expand(P.n, -1))


# ---- one round against float64 -------------------------------------------------------------------


def oracle_round(m, x, v, U, S, p, masks=None):
    """One 5GCS round in float64 from (x, v, U): plain loops, GD or Nesterov local steps with
    ``problem.grads``; masks: the Rand-k index sets of the cohort (5GCS-CC)."""
    P, M_, d = m.problem, m.batch.n, m.batch.p
    x, v, U = x.double(), v.double(), U.double().clone()
    gamma, tau, lr, K, mu = m.gamma, m.tau, m.local_lr, m.K, P.l2
    y_hat = (x - gamma * v) / (1 + gamma * mu)
    dx, dv = torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64)
    kappa = 1 / (lr * tau)
    beta_sc = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    for r, i in enumerate(S):
        a = y_hat + U[i] / tau

        def local_grad(z, i=i, a=a):
            return P.grads(z, [i])[0] - mu * z + tau * (z - a)

        y, z = y_hat.clone(), y_hat.clone()
        for t in range(K):
            if m.local_solver == "gd":
                y = y - lr * local_grad(y)
            else:
                y_new = z - lr * local_grad(z)
                z = y_new + min(beta_sc, t / (t + 3)) * (y_new - y)
                y = y_new
        delta = P.grads(y, [i])[0] - mu * y - U[i]
        if masks is not None:  # Q(delta) / (1 + omega): delta on the mask, unscaled
            keep = torch.zeros(d, dtype=F64)
            keep[masks[r]] = 1.0
            delta = delta * keep
        U[i] += delta
        dv += delta / M_
        dx += delta / (M_ * float(p[i]))
    return y_hat - gamma * dx, v + dv, U


SETUPS = {
    "uniform-gd": dict(cohort=5),
    "uniform-1": dict(cohort=1),  # a one-row stack must not alias y_hat
    "uniform-agd": dict(cohort=7, local_solver="agd", local_steps=6),
    "importance": dict(cohort=6, sampling="importance", alpha=0.7),
    "tensor-cc": dict(sampling=torch.linspace(0.15, 0.8, M), compressor=RandK(5, seed=11)),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_one_round_matches_float64(cancer, name, gen):
    B = make(cancer)
    m = FiveGCS(B, seed=5, **SETUPS[name])
    m.run(2)  # a state away from zero
    m.x = m.x + 0.1 * torch.randn(B.p, generator=gen)  # and away from the method's own path
    m.U = m.U + 0.05 * torch.randn(M, B.p, generator=gen)
    m.v = m.U.double().mean(0).float()
    x, v, U = m.x.clone(), m.v.clone(), m.U.clone()
    S = m.draw()
    masks = None
    if m.comp is not None:  # the masks the clients derive from (seed, round, client)
        ones = torch.ones(S.numel(), B.p)
        masks = m.comp.diff(ones, torch.zeros_like(ones), clients=S, step=m.key(4))[1]
    want_x, want_v, want_U = oracle_round(m, x, v, U, S.tolist(), m.probs, masks)
    m.step()
    assert m.history["cohort"][-1] == S.numel()
    torch.testing.assert_close(m.x.double(), want_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.v.double(), want_v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.U.double(), want_U, rtol=1e-4, atol=1e-5)
    # clients outside the cohort keep their duals bit for bit
    out = torch.ones(M, dtype=torch.bool)
    out[S] = False
    assert torch.equal(m.U[out], U[out])
    assert m.history["floats_up"][-1] == (B.p if m.comp is None else 5)
    assert m.history["floats_down"][-1] == B.p


# ---- the fixed point -----------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [dict(cohort=5), dict(cohort=5, sampling="importance",
                                  local_solver="agd"), dict(compressor=RandK(3, seed=2))],
                         ids=["uniform", "importance-agd", "cc"])  # fmt: skip
def test_optimum_is_a_fixed_point(cancer, opts):
    """Started at x* with u_m = grad psi_m(x*) (v = mean u_m), a round leaves x at x*. The
    control: duals grad f_m(x*) (the l2 term left in, the wrong psi) move x far from x*."""
    B = make(cancer)
    P = B.problem
    xs, _ = P.optimum()
    moved = {}
    for name, U in (("psi", psi_grads(P, xs)), ("f (control)", P.grads(xs))):
        m = FiveGCS(B, x0=xs.float(), seed=1, **opts)
        m.U, m.v = U.float(), U.mean(0).float()
        m.step()
        assert m.history["cohort"][-1] > 0
        moved[name] = float((m.x.double() - xs).norm() / xs.norm())
    assert moved["psi"] <= 1e-5
    assert not moved["f (control)"] <= 1e-5, moved


# ---- unbiasedness of the server estimate ---------------------------------------------------------


SAMPLERS = {
    "uniform": dict(cohort=5),
    "importance": dict(cohort=5, sampling="importance"),
    "tensor": dict(sampling=torch.linspace(0.05, 0.9, M).flip(0)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_server_estimate_is_unbiased(cancer, name):
    """E[sum_{m in S} Delta_m / (M p_m)] = (1/M) sum_m Delta_m: the mean over 400 seeds of the
    estimate read off the round's x step, (y_hat - x+) / gamma, is within 5 standard errors
    (sample std / sqrt(400), per coordinate) of the full-participation mean (measured: at most
    1.7, 2.6 and 3.2 standard errors for uniform, importance and the tensor). The control: the
    same draws weighted without 1/p_m (sum_S Delta_m / M, the round's v step) fail it (more than
    100 standard errors off)."""
    B = make(cancer)
    gen = torch.Generator().manual_seed(0)  # fixed: the test is statistical
    base = FiveGCS(B, seed=0, **SAMPLERS[name])
    x = 0.3 * torch.randn(B.p, generator=gen)
    U = 0.1 * torch.randn(M, B.p, generator=gen)
    v = U.double().mean(0).float()
    y_hat = (x - base.gamma * v) / (1 + base.gamma * base.mu)
    base.x, base.v, base.U = x.clone(), v.clone(), U.clone()
    D, p = base.client_updates(y_hat, torch.arange(M))[0].double(), base.probs
    full = D.mean(0)  # the target: the mean change of all M clients
    est, ctrl = [], []
    for seed in range(400):
        m = FiveGCS(B, seed=seed, **SAMPLERS[name])
        m.x, m.v, m.U = x.clone(), v.clone(), U.clone()
        S = m.draw()
        m.step()
        est.append((y_hat.double() - m.x.double()) / m.gamma)
        ctrl.append(m.v.double() - v.double())
        # and draw by draw the step is sum_S Delta_m / (M p_m) (float32 rounding of x apart)
        exact = (D[S] / (M * p[S])[:, None]).sum(0)
        assert float((est[-1] - exact).abs().max()) <= 1e-5 * (1 + float(exact.abs().max()))

    def unbiased(samples):
        S = torch.stack(samples)
        se = S.std(0) / math.sqrt(S.shape[0])
        return bool(((S.mean(0) - full).abs() <= 5 * se + 1e-6 * float(full.abs().max())).all())

    assert unbiased(est)
    assert not unbiased(ctrl)


def test_importance_probabilities(cancer):
    """p = importance(L, C, alpha): proportional to L_m**alpha below the cap 1, summing to C."""
    B = make(cancer, big=(0, 1), scale=3.0)
    L = client_smoothness(B.problem)
    assert math.isclose(float(L.max()), B.problem.L, rel_tol=1e-12)
    m = FiveGCS(B, cohort=6, sampling="importance", alpha=1.0)
    assert math.isclose(float(m.probs.sum()), 6.0, rel_tol=1e-12)
    free = m.probs < 1
    ratio = m.probs[free] / L[free]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-12, atol=0)
    u = FiveGCS(B, cohort=6)
    torch.testing.assert_close(u.probs, torch.full((M,), 0.3, dtype=F64))


# ---- the claims (each with its control) ----------------------------------------------------------


def test_claim_exact_convergence_under_client_sampling(cancer):
    """5GCS with C = 5 of 20 label-sorted clients reaches 1e-6 of the initial gap (measured: 62
    rounds); FedAvg with the same cohorts (the same seed draws them) plateaus above it (min
    1.4e-4 with K = 1, 9.4e-4 with K = 10, over 150 rounds). The duals converge to
    grad psi_m(x*) and v stays the mean of the duals."""
    B = make(cancer)
    five = FiveGCS(B, cohort=5, seed=0)
    five.run(150)
    assert set(five.history["cohort"][1:]) == {5}
    runs = {"5gcs": five.history["gap"]}
    for K in (1, 10):
        fedavg = FedAvg(B, cohort=5, local_steps=K, seed=0)
        runs[f"fedavg K={K}"] = fedavg.run(150)["gap"]
    reached = {k: min(g) <= 1e-6 * g[0] for k, g in runs.items()}
    assert reached == {"5gcs": True, "fedavg K=1": False, "fedavg K=10": False}, reached
    xs, _ = B.problem.optimum()
    G = psi_grads(B.problem, xs)
    assert float((five.U.double() - G).norm() / G.norm()) < 1e-3
    torch.testing.assert_close(five.v.double(), five.U.double().mean(0), rtol=0, atol=1e-5)


def test_same_cohorts_as_fedavg(cancer):
    """5GCS's uniform cohorts are the federated methods' (key slot 1): FedAvg with the same seed
    draws the same clients every round."""
    B = make(cancer)
    five, fedavg = FiveGCS(B, cohort=5, seed=4), FedAvg(B, cohort=5, seed=4)
    for _ in range(5):
        assert torch.equal(five.draw(), fedavg._cohort(5))
        five.rounds += 1
        fedavg.rounds += 1


def test_claim_randk_cuts_uplink_floats(cancer):
    """5GCS-CC with Rand-4 (d = 31) reaches 1e-6 of the initial gap within 7500 uplink floats
    (measured: 261 rounds, 5220 floats); plain 5GCS, the control, needs more (62 rounds, 9610
    floats: 31 per client and round), though in fewer rounds."""
    B = make(cancer)
    budget = 7500
    found = {}
    for name, comp in (("5gcs-cc", RandK(4, seed=7)), ("5gcs", None)):
        m = FiveGCS(B, cohort=5, compressor=comp, seed=0)
        r = run_to(m, cap=400)
        assert r is not None, name
        assert set(m.history["floats_up"][1:]) == {4 if comp else B.p}
        found[name] = (r, uplink(m.history, r))
    within = {k: f <= budget for k, (_, f) in found.items()}
    assert within == {"5gcs-cc": True, "5gcs": False}, found
    assert found["5gcs-cc"][0] > found["5gcs"][0]  # the moderate cost in rounds


def test_claim_importance_sampling_beats_uniform(cancer):
    """Heterogeneous smoothness: the features of 4 clients scaled by 10**0.25, so L_m spans
    2.1..22.2 (about tenfold). With the same expected cohort (5 of 20), importance sampling
    (p_m proportional to L_m, alpha = 1) reaches 1e-6 of the initial gap within 85 rounds
    (measured: 68; alpha = 0.5: 76); uniform sampling, the control, does not (103)."""
    B = make(cancer, big=(0, 1, 2, 3), scale=10**0.25)
    L = client_smoothness(B.problem)
    assert 8 < float(L.max() / L.min()) < 13
    found = {}
    for name in ("importance", "uniform"):
        m = FiveGCS(B, cohort=5, sampling=name, seed=0)
        found[name] = run_to(m, cap=300)
        assert found[name] is not None, name
        sizes = torch.tensor(m.history["cohort"][1:], dtype=F64)
        assert abs(float(sizes.mean()) - 5) < 1.0  # the same expected cohort
    within = {k: r <= 85 for k, r in found.items()}
    assert within == {"importance": True, "uniform": False}, found


def test_both_local_solvers_converge(cancer):
    """Local GD and local AGD (Nesterov) both reach 1e-6 of the initial gap within 120 rounds
    with C = 5 (measured: 62 and 69 rounds, K = 3 and 13). The control: GD with 16 times the
    default local step, past the local problems' stability limit (the gap stays near 4 times its
    start), fails the same assertion."""
    B = make(cancer)
    ref = FiveGCS(B, cohort=5)
    found = {}
    for name, kw in (("gd", {}), ("agd", {"local_solver": "agd"}),
                     ("gd, unstable local step", {"local_lr": 16 * ref.local_lr})):  # fmt: skip
        m = FiveGCS(B, cohort=5, seed=0, **kw)
        found[name] = run_to(m, cap=120, chunk=40)
    ok = {k: r is not None and r <= 120 for k, r in found.items()}
    assert ok == {"gd": True, "agd": True, "gd, unstable local step": False}, found


def test_stochastic_local_steps(cancer):
    """mode "sgd" / "rr" (minibatches of 4, keyed by the batch seed and the round): the gap falls
    below 1e-3 of its start in 60 rounds (a neighbourhood: measured 6e-5 to 2e-4, no exactness
    claimed), and a rerun draws the same minibatches (bit-identical x)."""
    B = make(cancer)
    for mode, solver in (("sgd", "gd"), ("rr", "agd")):
        runs = [FiveGCS(B, cohort=5, mode=mode, batch_size=4, local_solver=solver, seed=2)
                for _ in range(2)]  # fmt: skip
        for m in runs:
            m.run(60)
        g = runs[0].history["gap"]
        assert min(g) <= 1e-3 * g[0], (mode, min(g) / g[0])
        assert torch.equal(runs[0].x, runs[1].x)


# ---- resume, bad input ---------------------------------------------------------------------------


def test_resume_is_bit_exact(cancer):
    """12 rounds in one go equal 5 rounds, state_dict through torch.save, a fresh instance,
    load_state_dict and 7 more, bit for bit (importance sampling, Rand-k, AGD). The control: a
    fresh instance given only x (not the duals) does not."""
    B = make(cancer)
    kw = dict(cohort=6, sampling="importance", compressor=RandK(6, seed=3), local_solver="agd",
              seed=9)  # fmt: skip
    full = FiveGCS(B, **kw)
    full.run(12)
    part = FiveGCS(B, **kw)
    part.run(5)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = FiveGCS(B, **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    resumed.run(7)
    x_only = FiveGCS(B, **kw)
    x_only.x, x_only.rounds = part.x.clone(), part.rounds
    x_only.run(7)
    for name, m, same in (("resumed", resumed, True), ("x only (control)", x_only, False)):
        equal = all(torch.equal(getattr(m, a), getattr(full, a)) for a in ("x", "v", "U"))
        assert equal is same, name
    assert resumed.history == full.history
    with pytest.raises(ValueError, match="seed"):
        FiveGCS(B, **{**kw, "seed": 1}).load_state_dict(part.state_dict())


BAD = [
    (dict(cohort=0), ValueError, "cohort"),
    (dict(cohort=21), ValueError, "cohort"),
    (dict(cohort=2.5), TypeError, "cohort"),
    (dict(sampling="poisson"), ValueError, "sampling"),
    (dict(sampling=3), TypeError, "sampling"),
    (dict(sampling=torch.full((19,), 0.5)), ValueError, "sampling"),
    (dict(sampling=torch.full((M, 1), 0.5)), ValueError, "sampling"),
    (dict(sampling=torch.cat([torch.full((19,), 0.5), torch.zeros(1)])), ValueError, "sampling"),
    (dict(sampling=torch.full((M,), 1.5)), ValueError, "sampling"),
    (dict(sampling=torch.full((M,), math.nan)), ValueError, "sampling"),
    (dict(sampling=torch.full((M,), 0.5), cohort=5), ValueError, "cohort"),
    (dict(alpha=math.nan, sampling="importance"), ValueError, "alpha"),
    (dict(alpha=math.inf), ValueError, "alpha"),
    (dict(local_solver="newton"), ValueError, "local_solver"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(gamma=math.inf), ValueError, "gamma"),
    (dict(tau=0.0), ValueError, "tau"),
    (dict(tau=math.nan), ValueError, "tau"),
    (dict(local_lr=-0.1), ValueError, "local_lr"),
    (dict(local_steps=0), ValueError, "local_steps"),
    (dict(local_steps=1.5), TypeError, "local_steps"),
    (dict(compressor=TopK(3)), TypeError, "compressor"),
    (dict(compressor="randk"), TypeError, "compressor"),
    (dict(compressor=RandK(3, unbiased=False)), ValueError, "compressor"),
]


@pytest.mark.parametrize("kw, exc, match", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(cancer, kw, exc, match):
    B = make(cancer)
    A0 = B.A.clone()
    with pytest.raises(exc, match=match):
        FiveGCS(B, **kw)
    assert torch.equal(B.A, A0)


def test_bad_batch():
    with pytest.raises(TypeError, match="batch"):
        FiveGCS("not a batch")


# ---- ClientBatch.local_steps_(l2=...) ------------------------------------------------------------


def test_local_steps_l2_keyword(backend, cancer, gen):
    """local_steps_ with l2 = 0 and a FedProx term (5GCS's local problem) against a float64 loop
    on psi_m = loss_m; l2 = None is the problem's l2 bit for bit; a bad l2 raises before X
    changes."""
    A, y, parts = cancer
    sizes = 3 if interpreted(backend) else M
    P = Problem(A, y, parts[:sizes], "logistic", 0.1)
    B = ClientBatch(P, seed=2)
    S = [2, 0] if interpreted(backend) else [7, 1, 12, 3]
    X0 = 0.2 * torch.randn(len(S), P.p, generator=gen)
    anchor = 0.3 * torch.randn(len(S), P.p, generator=gen)
    tau, lr, K = 0.7, 0.1, 4
    X = X0.clone()
    B.local_steps_(X, gamma=lr, steps=K, clients=S, mu=tau, anchor=anchor, l2=0.0)
    want = X0.double().clone()
    for r, i in enumerate(S):
        for _ in range(K):
            z = want[r]
            want[r] = z - lr * (P.grads(z, [i])[0] - P.l2 * z + tau * (z - anchor[r].double()))
    torch.testing.assert_close(X.double(), want, rtol=1e-4, atol=1e-5)
    default, explicit = X0.clone(), X0.clone()
    B.local_steps_(default, gamma=lr, steps=K, clients=S)
    B.local_steps_(explicit, gamma=lr, steps=K, clients=S, l2=P.l2)
    assert torch.equal(default, explicit)
    assert not torch.equal(default, X)
    for bad, exc in ((-0.1, ValueError), (math.nan, ValueError), ("0", TypeError)):
        Z = X0.clone()
        with pytest.raises(exc, match="l2"):
            B.local_steps_(Z, gamma=lr, steps=K, clients=S, l2=bad)
        assert torch.equal(Z, X0)


def test_k_is_the_randk_shorthand(cancer):
    B = make(cancer)
    a = FiveGCS(B, cohort=5, k=6, seed=2)
    b = FiveGCS(B, cohort=5, compressor=RandK(6, seed=2), seed=2)
    a.run(4)
    b.run(4)
    assert torch.equal(a.x, b.x) and a.history["floats_up"][-1] == 6
    with pytest.raises(ValueError, match="not both"):
        FiveGCS(B, k=6, compressor=RandK(6))
    with pytest.raises(ValueError, match="k must"):
        FiveGCS(B, k=0)
