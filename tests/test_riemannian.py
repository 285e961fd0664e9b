"""R-SGD, R-LSVRG, R-PAGE and R-MARINA on PCA problems (fedkern's rendering of the Riemannian
loopless methods): the claims on the digits covariance and on a synthetic spectrum with a known
gap, each with its baseline failing the same assertion (R-SGD for the variance-reduced methods,
dense Riemannian GD for R-MARINA), iterates on the manifold, the Stiefel case, the updates
recomputed in float64, the PCA problem's gradients, exact resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fedkern import data
from fedkern.algorithms.riemannian import RLSVRG, RMARINA, RPAGE, RSGD
from fedkern.manifolds import PCA, Sphere
from fedkern.ops.randk import randk_compress
from fedkern.random import client_seed

F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    A, _ = data.load("digits")
    Z = A[:, :-1]  # the standardized pixels (the bias column dropped): C is their correlation
    return Z, list(torch.tensor_split(torch.arange(Z.shape[0]), 20))


def cost_to(h, key, target):
    total = 0
    for cost, angle in zip(h[key], h["angle"], strict=True):
        total += cost
        if angle <= target:
            return total
    return None


def run_until(m, key, budget, target, chunk=25):
    """Runs until the target or a cost beyond budget; the cost to the target (or None)."""
    while cost_to(m.history, key, target) is None and sum(m.history[key]) <= budget:
        m.run(chunk)
    return cost_to(m.history, key, target)


def within(cost, budget) -> bool:
    return cost is not None and cost <= budget


def vr_beats_rsgd(P, eta, b, budget, target, sgd_etas, sgd_rounds):
    figures = {}
    for name, m in (("R-LSVRG", RLSVRG(P, eta=eta, batch_size=b, seed=0)),
                    ("R-PAGE", RPAGE(P, eta=eta, small_batch=b, seed=0))):  # fmt: skip
        figures[name] = run_until(m, "grad_evals", budget, target)
        assert within(figures[name], budget), figures
        assert max(m.history["off_manifold"]) <= 1e-6
    for c in sgd_etas:
        h = RSGD(P, eta=c / P.L_avg, batch_size=2 * b, seed=0).run(sgd_rounds)
        assert sum(h["grad_evals"]) >= budget
        figures[f"R-SGD {c}/L_avg"] = f"angle {min(h['angle']):.2e}"
        assert not within(cost_to(h, "grad_evals", target), budget), figures
    return figures


def test_claim_vr_beats_rsgd_on_digits(digits, capsys):
    """Leading eigenvector of the digits correlation matrix (n = 64, gap 1.51): R-LSVRG and R-PAGE
    (b = 64, eta = 4 / L_avg) reach the angle 1e-3 within 32000 gradient evaluations; R-SGD with
    b = 128 (the same evaluations per step) and eta in {0.5, 2, 8} / L_avg does not."""
    P = PCA(*digits)
    fig = vr_beats_rsgd(P, 4 / P.L_avg, 64, 32_000, 1e-3, (0.5, 2, 8), 251)
    with capsys.disabled():
        print(f"\n[claim] digits, gradient evaluations to angle 1e-3 (budget 32000): {fig}")


def test_claim_vr_beats_rsgd_on_a_synthetic_spectrum(capsys):
    """A covariance with the exact spectrum 1, 0.5, 0.4 * 0.8^i (n = 20, N = 1000: gap 0.5):
    R-LSVRG and R-PAGE (b = 32, eta = 2 / L_avg) reach the angle 1e-3 within 16000 evaluations;
    R-SGD (b = 64, eta in {0.25, 1, 4} / L_avg) does not."""
    n = 20
    P = PCA.synthetic(n, 1000, [1.0, 0.5] + [0.4 * 0.8**i for i in range(n - 2)], seed=0)
    torch.testing.assert_close(P.eigenvalues[:3], torch.tensor([1.0, 0.5, 0.4], dtype=F64))
    assert P.gap == pytest.approx(0.5)
    fig = vr_beats_rsgd(P, 2 / P.L_avg, 32, 16_000, 1e-3, (0.25, 1, 4), 251)
    with capsys.disabled():
        print(f"\n[claim] synthetic, gradient evaluations to angle 1e-3 (budget 16000): {fig}")


def test_claim_rmarina_needs_fewer_floats_than_riemannian_gd(digits, capsys):
    """Digits over 20 nodes: R-MARINA with rand-k (k = 16 of 64, p = 1/4, the step 1/L) reaches
    the angle 1e-6 with at most 2200 floats sent per node; dense Riemannian GD (R-MARINA with
    p = 1) with the step 1/L, 1.5/L or 1.75/L does not (2/L no longer converges)."""
    P = PCA(*digits)
    m = RMARINA(P, k=16, eta=1 / P.L, seed=0)
    got = run_until(m, "floats_up", 2200, 1e-6)
    assert within(got, 2200), got
    assert set(m.history["floats_up"][1:]) == {16, 64}
    assert max(m.history["off_manifold"]) <= 1e-6
    fig = {"R-MARINA": got}
    for c in (1.0, 1.5, 1.75):
        gd = RMARINA(P, p=1.0, eta=c / P.L, seed=0)
        assert not within(run_until(gd, "floats_up", 2200, 1e-6), 2200)
        fig[f"R-GD {c}/L"] = run_until(gd, "floats_up", 10_000, 1e-6)
    with capsys.disabled():
        print(f"\n[claim] digits over 20 nodes, floats per node to angle 1e-6: {fig}")


def test_claim_stiefel_k_leading_eigenvectors(digits, capsys):
    """Stiefel(64, 3): the 3 leading eigenvectors of digits to a largest principal angle of 1e-3:
    R-LSVRG (b = 64) within 36000 evaluations where R-SGD (b = 128, eta 2 / L_avg) is not there;
    R-MARINA (rand-k, k = 48 of 192, step 1/L) to 1e-6 within 9000 floats per node where dense
    R-GD (step 1/L or 1.5/L) is not."""
    P = PCA(*digits, k=3)
    m = RLSVRG(P, eta=4 / P.L_avg, batch_size=64, seed=0)
    got = run_until(m, "grad_evals", 36_000, 1e-3)
    assert within(got, 36_000)
    h = RSGD(P, eta=2 / P.L_avg, batch_size=128, seed=0).run(282)
    assert not within(cost_to(h, "grad_evals", 1e-3), 36_000)
    mar = RMARINA(P, k=48, eta=1 / P.L, seed=0)
    floats = run_until(mar, "floats_up", 9000, 1e-6)
    assert within(floats, 9000)
    for c in (1.0, 1.5):
        gd = RMARINA(P, p=1.0, eta=c / P.L, seed=0)
        assert not within(run_until(gd, "floats_up", 9000, 1e-6), 9000)
    for hist in (m.history, mar.history):
        assert max(hist["off_manifold"]) <= 1e-6
    with capsys.disabled():
        print(f"\n[claim] Stiefel(64, 3): R-LSVRG {got} evaluations to 1e-3 (R-SGD: angle "
              f"{min(h['angle']):.2e} after {sum(h['grad_evals'])}); R-MARINA {floats} floats "
              f"to 1e-6")  # fmt: skip


# ---- the problem and the updates against float64 ------------------------------------------------


def test_pca_gradients_and_metrics(digits):
    Z, parts = digits
    P = PCA(Z, parts[:5] + [torch.cat(parts[5:])])
    x = Sphere(64).random(6, seed=3)
    spans = zip(P.offsets[:-1], P.offsets[1:], strict=True)
    C = [P.Z[a:b].T @ P.Z[a:b] / (b - a) for a, b in spans]
    want = torch.stack([-2 * Ci @ x[i].double() for i, Ci in enumerate(C)])
    torch.testing.assert_close(P.egrads(x).double(), want, rtol=2e-5, atol=2e-5)
    pooled = P.egrads(x[:1], pooled=True)[0].double()
    torch.testing.assert_close(pooled, -2 * P.C @ x[0].double(), rtol=2e-5, atol=2e-5)
    # minibatches keyed by (seed, node, step): the same samples at two points; given samples
    s = [[0, 3, 3]] * 6
    got = P.egrads(x, samples=s).double()
    for i in range(6):
        a = P.Z[int(P.offsets[i]) + torch.tensor([0, 3, 3])]
        torch.testing.assert_close(got[i], -2 * a.T @ (a @ x[i].double()) / 3, rtol=2e-5,
                                   atol=2e-5)  # fmt: skip
    y = Sphere(64).random(6, seed=4)
    g1 = P.egrads(x, mode="sgd", batch_size=5, step=9)
    g2 = P.egrads(y, mode="sgd", batch_size=5, step=9)
    lin = P.egrads(x + y, mode="sgd", batch_size=5, step=9)  # linear in x on the same samples
    torch.testing.assert_close(lin, g1 + g2, rtol=1e-4, atol=1e-4)
    v1 = P.top
    assert P.angle(v1) < 1e-7 and P.angle(-v1) < 1e-7
    assert P.loss(v1) == pytest.approx(P.f_star)
    assert float(P.grad(v1).norm()) < 1e-8
    # Stiefel: the gradient of every column, and the subspace angle
    P3 = PCA(Z, parts, k=3)
    X = P3.manifold.random(2, seed=5)
    G = P3.egrads(X, nodes=[0, 1]).double()
    Ci = P3.Z[: int(P3.offsets[1])]
    torch.testing.assert_close(G[0], -2 * Ci.T @ (Ci @ X[0].double()) / Ci.shape[0], rtol=2e-5,
                               atol=2e-5)  # fmt: skip
    Q = torch.linalg.qr(P3.top @ torch.randn(3, 3, dtype=F64)).Q  # another basis of the span
    assert P3.angle(Q) < 1e-7 and P3.f_star == pytest.approx(-float(P3.eigenvalues[:3].sum()))


def test_rlsvrg_and_rpage_rounds_by_hand():
    """Rounds recomputed in float64 from the rules with the same samples (the keyed minibatch
    at key(3) of the pooled node 0): x+ = Exp_x(-eta v), parallel transport in closed form."""
    n = 6
    P = PCA.synthetic(n, 40, [1.0, 0.6, 0.3, 0.2, 0.1, 0.05], seed=2)
    S = Sphere(n)

    def proj(x, g):
        return g - (x @ g) * x

    def grad(x, idx):
        a = P.Z[idx]
        return proj(x, -2 * a.T @ (a @ x) / len(idx))

    def exp(x, u):
        t = float(u.norm())
        y = math.cos(t) * x + math.sin(t) * u / t
        return y / y.norm()

    def batch(key):
        from fedkern.clients import minibatch_keys
        from fedkern.reference.clients import permutation

        return permutation(P.N, minibatch_keys(P.seed, [0], key)[0].tolist())[:3]

    m = RLSVRG(P, eta=0.05, p=0.3, batch_size=3, seed=1)
    x, w = m.x.double(), m.x.double()
    mu = grad(w, torch.arange(P.N))
    for _ in range(10):
        heads, key = m.coin(0.3, 0), m.key(3)
        m.step()
        B = batch(key)
        v = grad(x, B) - S.transport(w[None], x[None], (grad(w, B) - mu)[None])[0]
        if heads:
            w, mu = x, grad(x, torch.arange(P.N))
        x = exp(x, -0.05 * v)
        torch.testing.assert_close(m.x.double(), x, rtol=1e-5, atol=1e-5)
    r = RPAGE(P, eta=0.05, p=0.3, small_batch=3, seed=2)
    x = r.x.double()
    g = grad(x, torch.arange(P.N))
    for _ in range(10):
        heads, key = r.coin(0.3, 0), r.key(3)
        r.step()
        x_new = exp(x, -0.05 * g)
        if heads:
            g = grad(x_new, torch.arange(P.N))
        else:
            B = batch(key)
            g = S.transport(x[None], x_new[None], (g - grad(x, B))[None])[0] + grad(x_new, B)
        x = x_new
        torch.testing.assert_close(r.x.double(), x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.g.double(), g, rtol=1e-4, atol=1e-4)


def test_rmarina_round_by_hand():
    n, nodes, k = 8, 4, 3
    P = PCA.synthetic(n, 80, [1.0, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05], nodes=nodes, seed=4)
    S = Sphere(n)
    m = RMARINA(P, k=k, eta=0.1, p=0.4, seed=7)
    w = (P.sizes.double() / P.N)[:, None]

    def grads(x):
        out = []
        for a, b in zip(P.offsets[:-1], P.offsets[1:], strict=True):
            Zi = P.Z[a:b]
            g = -2 * Zi.T @ (Zi @ x) / (b - a)
            out.append(g - (x @ g) * x)
        return torch.stack(out)

    def exp(x, u):
        t = float(u.norm())
        y = math.cos(t) * x + math.sin(t) * u / t
        return y / y.norm()

    x = m.x.double()
    G = grads(x)
    g = (w * G).sum(0)
    seen = set()
    for _ in range(12):
        heads, key = m.coin(0.4, 0), m.key(4)
        m.step()
        x_new = exp(x, -0.1 * g)
        G_new = grads(x_new)
        if heads:
            g = (w * G_new).sum(0)
        else:
            T = S.transport(x.expand(nodes, -1), x_new.expand(nodes, -1), G)
            msg = torch.zeros_like(G_new)
            for i in range(nodes):
                _, idx = randk_compress(torch.zeros(n), k, seed=client_seed(7, i), step=key)
                msg[i, idx] = (G_new[i] - T[i])[idx] * (n / k)
            mean = (w * msg).sum(0)
            g = S.transport(x[None], x_new[None], g[None])[0] + mean - (x_new @ mean) * x_new
        x, G = x_new, G_new
        seen.add(heads)
        torch.testing.assert_close(m.x.double(), x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.g.double(), g, rtol=1e-4, atol=1e-4)
    assert seen == {True, False}


def test_defaults_resume_and_costs(digits):
    P = PCA(*digits)
    mar = RMARINA(P, k=8)
    omega, p = 64 / 8 - 1, 8 / 64
    assert mar.p == pytest.approx(p)
    assert mar.eta == pytest.approx(1 / (P.L + P.L_plus * math.sqrt((1 - p) * omega / (p * 20))))
    pg = RPAGE(P, small_batch=4)
    assert pg.p == pytest.approx(4 / (P.N + 4))
    assert pg.eta == pytest.approx(1 / (P.L_avg * (1 + math.sqrt((1 - pg.p) / (pg.p * 4)))))
    assert RLSVRG(P, batch_size=4).p == pytest.approx(4 / P.N)
    cases = [
        (RSGD, {"batch_size": 4}),
        (RLSVRG, {"batch_size": 4, "p": 0.3}),
        (RPAGE, {"small_batch": 4, "p": 0.3}),
        (RMARINA, {"k": 8, "p": 0.3}),
        (RPAGE, {"batch_size": 16, "retraction": "retr", "transport": "projection"}),
    ]
    for cls, kw in cases:
        a = cls(P, seed=2, **kw)
        a.run(5)
        state = a.state_dict()
        a.run(6)
        b = cls(P, seed=2, **kw)
        b.load_state_dict(state)
        b.run(6)
        assert torch.equal(a.x, b.x) and a.history == b.history
    h = a.history
    assert all(len(h[key]) == 12 for key in ("angle", "loss", "grad_evals", "floats_up"))
    hr = RLSVRG(P, batch_size=4, p=0.3, seed=2).run(8)
    assert hr["grad_evals"][0] == P.N and set(hr["grad_evals"][1:]) <= {8, 8 + P.N}
    hm = RMARINA(P, k=8, p=0.3, seed=2).run(8)
    assert set(hm["grad_evals"]) == {P.N} and hm["floats_up"][0] == 64


def test_bad_input(digits):
    P = PCA(*digits)
    x0 = Sphere(64).random(seed=1)
    with pytest.raises(ValueError, match="x0 is not on the Sphere"):
        RSGD(P, x0=2 * x0)
    with pytest.raises(ValueError, match="x0 must have shape \\(64,\\)"):
        RSGD(P, x0=x0[:10])
    with pytest.raises(ValueError, match="eta must be finite"):
        RLSVRG(P, eta=float("nan"))
    with pytest.raises(ValueError, match="p must be"):
        RPAGE(P, p=0.0)
    with pytest.raises(ValueError, match="compressor must be one of"):
        RMARINA(P, compressor="sign")
    with pytest.raises(ValueError, match="unbiased compressor"):
        RMARINA(P, compressor="topk")
    with pytest.raises(ValueError, match="transport must be"):
        RLSVRG(PCA(*digits, k=2), transport="parallel")
    with pytest.raises(ValueError, match="retraction must be"):
        RSGD(P, retraction="cayley")
    with pytest.raises(TypeError, match="fedkern.manifolds.PCA"):
        RSGD(digits[0])
    with pytest.raises(ValueError, match="k must be"):
        PCA(digits[0], k=64)
    with pytest.raises(ValueError, match="spectrum must hold 3 descending"):
        PCA.synthetic(3, 10, [1.0, 2.0, 0.5])


def test_fedkern_run_pca_end_to_end(tmp_path, capsys):
    import json

    from fedkern import cli

    out = tmp_path / "pca"
    rc = cli.main(["run", "rpage", "rlsvrg", "rsgd", "rmarina", "--problem", "pca", "--dataset",
                   "digits", "--clients", "10", "--rounds", "10", "--k", "8", "--out", str(out),
                   "--no-progress"])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())["results"]
    assert set(res) == {"rpage", "rlsvrg", "rsgd", "rmarina"}
    assert all(len(h["angle"]) == 11 and len(h["grad_evals"]) == 11 for h in res.values())
    assert set(res["rmarina"]["floats_up"][1:]) <= {8, 64}
    assert (out / "angle.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "stiefel"
    rc = cli.main(["run", "rlsvrg", "rmarina", "--problem", "pca_stiefel", "--dataset",
                   "synthetic", "--clients", "4", "--components", "2", "--rounds", "5", "--out",
                   str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert meta["k"] == 2 and meta["gap"] == pytest.approx(0.1)
    capsys.readouterr()
    for argv, match in (
        (["run", "gd", "--problem", "pca"], "algorithm 'gd' does not run on --problem pca"),
        (["run", "rsgd", "--problem", "pca_stiefel", "--components", "1"], "--components must"),
        (["run", "rsgd"], "algorithm 'rsgd' does not run on --problem convex"),
    ):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--no-progress", "--out", str(tmp_path / "x")])
        assert match in capsys.readouterr().err
