"""fedkern.manifolds: the fused sphere / Stiefel steps on every backend against float64 NumPy
oracles written from the formulas, the geometry (proj, retr, exp, log, dist, transports, random)
against identities that characterize it, the renormalization over 1e5 fp32 steps, opcheck and bad
input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import backend_fixture, fresh_seed, interpreted, same_bits

import fedkern
from fedkern.manifolds import Sphere, Stiefel, gaussian
from fedkern.ops.manifolds import IMPLS

backend = backend_fixture(IMPLS)
F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture
def rng():
    return np.random.default_rng(fresh_seed("np.random.default_rng"))


# ---- float64 oracles ---------------------------------------------------------------------------


def sphere_oracle(x, u, w, eta, use_exp, transport):
    """The fused sphere step in float64, row by row, from the definitions."""
    X, W = x.astype(np.float64).copy(), None if w is None else w.astype(np.float64).copy()
    for r in range(X.shape[0]):
        xr, ur = X[r].copy(), u[r].astype(np.float64)
        g = ur - (xr @ ur) * xr
        gn = np.linalg.norm(g)
        if use_exp:
            t = eta * gn
            y = np.cos(t) * xr - (np.sin(t) / gn) * g if t > 0 else xr.copy()
        else:
            y = xr - eta * g
        xn = y / np.linalg.norm(y)
        if W is not None:
            v = W[r]
            if transport == "projection":
                W[r] = v - (xn @ v) * xn
            else:
                W[r] = v - (v @ xn) / (1 + xr @ xn) * (xr + xn)
        X[r] = xn
    return X, W


def stiefel_oracle(x, u, w, eta):
    """The fused Stiefel step in float64: projection, QR with diag(R) > 0, projection transport."""
    X = x.astype(np.float64).copy()
    W = None if w is None else w.astype(np.float64).copy()
    for i in range(X.shape[0]):
        xi, ui = X[i].copy(), u[i].astype(np.float64)
        a = xi.T @ ui
        g = ui - xi @ ((a + a.T) / 2)
        q, r = np.linalg.qr(xi - eta * g)
        q = q * np.sign(np.diag(r))
        if W is not None:
            b = q.T @ W[i]
            W[i] = W[i] - q @ ((b + b.T) / 2)
        X[i] = q
    return X, W


def unit_rows(rng, b, n):
    x = rng.standard_normal((b, n))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tangent_rows(rng, x):
    v = rng.standard_normal(x.shape)
    return v - (v * x).sum(1, keepdims=True) * x


# ---- fused sphere step -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("use_exp", [False, True], ids=["retr", "exp"])
@pytest.mark.parametrize("transport", ["parallel", "projection", None])
def test_sphere_step_matches_the_float64_oracle(backend, dtype, use_exp, transport, rng):
    shapes = [(3, 1), (2, 7), (3, 40)] if interpreted(backend) else [(1, 1), (5, 7), (9, 1000)]
    S = Sphere()
    for b, n in shapes:
        x = unit_rows(rng, b, n)
        u = rng.standard_normal((b, n))
        if b > 1:
            u[0] = 3.0 * x[0]  # u normal to the sphere: g = 0, the point does not move
        w = tangent_rows(rng, x) if transport else None
        eta = float(rng.uniform(0.05, 0.8))
        X = torch.tensor(x, dtype=dtype)
        W = None if w is None else torch.tensor(w, dtype=dtype)
        S.step(X, torch.tensor(u, dtype=dtype), eta, W, exp=use_exp,
               transport=transport or "parallel")  # fmt: skip
        want_x, want_w = sphere_oracle(X.new_tensor(x).double().numpy(), u, w, eta, use_exp,
                                       transport)  # fmt: skip
        tol = 50 * TOL[dtype]
        np.testing.assert_allclose(X.double().numpy(), want_x, rtol=tol, atol=tol)
        if W is not None:
            np.testing.assert_allclose(W.double().numpy(), want_w, rtol=tol, atol=tol)
        assert float(S.off_manifold(X).max()) <= 4 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_w", [True, False])
def test_stiefel_step_matches_the_float64_oracle(backend, dtype, with_w, rng):
    shapes = [(2, 5, 1), (1, 6, 6), (2, 9, 3)] if interpreted(backend) else [
        (1, 4, 1), (2, 7, 7), (5, 37, 5), (3, 300, 8)]  # fmt: skip
    for b, n, p in shapes:
        St = Stiefel(n, p)
        x = St.random(b, seed=int(rng.integers(1 << 31)), dtype=F64).numpy()
        u = rng.standard_normal((b, n, p))
        w = None
        if with_w:
            w = rng.standard_normal((b, n, p))
            w = w - np.einsum("bij,bjk->bik", x, (np.swapaxes(x, 1, 2) @ w + np.swapaxes(w, 1, 2)
                                                 @ x) / 2)  # fmt: skip
        eta = float(rng.uniform(0.05, 0.5))
        X = torch.tensor(x, dtype=dtype)
        W = None if w is None else torch.tensor(w, dtype=dtype)
        St.step(X, torch.tensor(u, dtype=dtype), eta, W)
        want_x, want_w = stiefel_oracle(X.new_tensor(x).double().numpy(), u, w, eta)
        tol = 200 * TOL[dtype]
        np.testing.assert_allclose(X.double().numpy(), want_x, rtol=tol, atol=tol)
        if W is not None:
            np.testing.assert_allclose(W.double().numpy(), want_w, rtol=tol, atol=tol)
        assert float(St.off_manifold(X).max()) <= 20 * TOL[dtype]


def test_fused_steps_deterministic_and_thread_independent(rng):
    C = pytest.importorskip("fedkern._C")
    S, St = Sphere(), Stiefel(33, 4)
    x = torch.tensor(unit_rows(rng, 64, 333), dtype=torch.float32)
    u, w = torch.randn(64, 333), torch.tensor(tangent_rows(rng, x.double().numpy())).float()
    X = St.random(40, seed=5)
    U, W = torch.randn(40, 33, 4), St.random_tangent(X, seed=6)

    def run():
        a, aw, b, bw = x.clone(), w.clone(), X.clone(), W.clone()
        S.step(a, u, 0.3, aw, exp=True)
        St.step(b, U, 0.3, bw)
        return a, aw, b, bw

    with fedkern.backend("cpu"):
        first = run()
        outs = [run()]
        try:
            for grain, blocks in ((1, 1), (1, 3), (1, 7)):
                C._blocking(grain, blocks)
                outs.append(run())
        finally:
            C._blocking(0, 0)
    for got in outs:
        assert all(same_bits(a, b) for a, b in zip(got, first, strict=True))


def test_1e5_fp32_steps_stay_on_the_manifold():
    """Every step renormalizes (the sphere divides by ||y||, Stiefel re-orthonormalizes by
    Gram-Schmidt twice): after 1e5 fp32 steps of the C++ kernels the iterates are on the manifold
    to 1e-6 (float64 check), with no drift."""
    C = pytest.importorskip("fedkern._C")
    S, St = Sphere(257), Stiefel(40, 3)
    x = S.random(1, seed=1)
    U = gaussian((8, 1, 257), 2)
    w = S.random_tangent(x, seed=3)
    X = St.random(1, seed=4)
    V = gaussian((8, 1, 40, 3), 5)
    W = St.random_tangent(X, seed=6)
    us, vs = [t.data_ptr() for t in U], [t.data_ptr() for t in V]
    worst = 0.0
    for i in range(100_000):
        C.sphere_step(x.data_ptr(), us[i % 8], w.data_ptr(), 1, 257, 0.05, i % 2 == 0, i % 3 == 0,
                      False)  # fmt: skip
        C.stiefel_step(X.data_ptr(), vs[i % 8], W.data_ptr(), 1, 40, 3, 0.05, False)
        if i % 5000 == 4999:
            worst = max(worst, float(S.off_manifold(x).max()), float(St.off_manifold(X).max()))
    assert torch.isfinite(x).all() and torch.isfinite(X).all()
    assert worst <= 1e-6, worst
    # the same through the op on every backend, fewer steps
    for name, steps in (("reference", 300), ("cpu", 300)):
        a, b = S.random(1, seed=7), St.random(1, seed=8)
        with fedkern.backend(name):
            for i in range(steps):
                S.step(a, U[i % 8], 0.05, exp=bool(i % 2))
                St.step(b, V[i % 8], 0.05)
        assert float(S.off_manifold(a).max()) <= 1e-6 and float(St.off_manifold(b).max()) <= 1e-6


def test_opcheck(rng):
    x = torch.tensor(unit_rows(rng, 3, 6), dtype=torch.float32)
    u, w = torch.randn(3, 6), torch.randn(3, 6)
    torch.library.opcheck(torch.ops.fedkern.sphere_step_.default, (x, u, w, 0.2, True, 1))
    torch.library.opcheck(torch.ops.fedkern.sphere_step_.default, (x, u, None, 0.2, False, 0))
    X = Stiefel(5, 2).random(2, seed=1)
    torch.library.opcheck(torch.ops.fedkern.stiefel_step_.default,
                          (X, torch.randn(2, 5, 2), torch.randn(2, 5, 2), 0.1))  # fmt: skip


# ---- the geometry in plain PyTorch -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sphere_geometry(dtype):
    seed = fresh_seed()
    S = Sphere(17)
    x, y = S.random(6, seed, dtype=dtype), S.random(6, seed, step=1, dtype=dtype)
    u = S.random_tangent(x, seed, step=2)
    tol = 100 * TOL[dtype]
    assert float(S.inner(x, x, u).abs().max()) < tol  # tangent
    for y_ in (S.retr(x, u), S.exp(x, u)):
        assert float(S.off_manifold(y_).max()) < tol
    # exp moves along the great circle by ||u||; log inverts it
    u_small = 0.7 * u / S.norm(x, u)[:, None]
    torch.testing.assert_close(S.dist(x, S.exp(x, u_small)), torch.full((6,), 0.7, dtype=dtype),
                               rtol=tol, atol=tol)  # fmt: skip
    torch.testing.assert_close(S.log(x, S.exp(x, u_small)), u_small, rtol=tol, atol=tol)
    torch.testing.assert_close(S.exp(x, S.log(x, y)), y, rtol=tol, atol=tol)
    torch.testing.assert_close(S.norm(x, S.log(x, y)), S.dist(x, y), rtol=tol, atol=tol)
    assert float(S.log(x, x).abs().max()) < tol
    # parallel transport: tangent at y, an isometry, log_x(y) goes to -log_y(x)
    w = S.random_tangent(x, seed, step=3)
    Pu, Pw = S.transport(x, y, u), S.transport(x, y, w)
    assert float(S.inner(y, y, Pu).abs().max()) < tol
    torch.testing.assert_close(S.inner(y, Pu, Pw), S.inner(x, u, w), rtol=tol, atol=tol)
    torch.testing.assert_close(S.transport(x, y, S.log(x, y)), -S.log(y, x), rtol=tol, atol=tol)
    Qu = S.transport(x, y, u, "projection")
    assert float(S.inner(y, y, Qu).abs().max()) < tol
    # random points: keyed, reproducible, unit norm
    assert torch.equal(S.random(6, seed, dtype=dtype), x)
    assert not torch.equal(S.random(6, seed + 1, dtype=dtype), x)


def test_stiefel_geometry():
    seed = fresh_seed()
    St = Stiefel(9, 3)
    X = St.random(4, seed, dtype=F64)
    U = St.random_tangent(X, seed, step=1)
    U = 0.6 * U / St.norm(X, U)[:, None, None]
    tol = 1e-9
    A = X.transpose(-1, -2) @ U
    torch.testing.assert_close(A + A.transpose(-1, -2), torch.zeros_like(A), atol=tol, rtol=0)
    for Y in (St.retr(X, U), St.retr(X, U, "polar"), St.exp(X, U)):
        assert float(St.off_manifold(Y).max()) < tol
    # polar: the closest point of the manifold to X + U, hence its Q factor's polar part
    Yp = St.retr(X, U, "polar")
    Qf = St.retr(X, U)
    torch.testing.assert_close(
        Yp.transpose(-1, -2) @ (X + U), (Yp.transpose(-1, -2) @ (X + U)).transpose(-1, -2)
    )  # symmetric
    assert float((Qf - X - U).norm()) >= float((Yp - X - U).norm()) - 1e-12
    # exp: a geodesic (Y'' normal to the manifold) of length ||U||; log inverts it
    Y = St.exp(X, U)
    torch.testing.assert_close(St.log(X, Y), U, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(St.dist(X, Y), torch.full((4,), 0.6, dtype=F64), atol=1e-8,
                               rtol=0)  # fmt: skip
    h = 1e-4
    Yh, Ym = St.exp(X, (0.5 + h) * U), St.exp(X, (0.5 - h) * U)
    Y0 = St.exp(X, 0.5 * U)
    acc = (Yh - 2 * Y0 + Ym) / h**2
    assert float(St.proj(Y0, acc).norm()) < 1e-5 * float(acc.norm()) + 1e-6
    # Stiefel(n, 1) is the sphere: exp, log and the parallel transport agree with the closed forms
    S1, S = Stiefel(9, 1, transport_steps=64), Sphere(9)
    x, y = S.random(3, seed, step=2, dtype=F64), S.random(3, seed, step=3, dtype=F64)
    y = S.exp(x, 0.8 * S.log(x, y) / S.dist(x, y)[:, None])  # within the shooting's reach
    u = S.random_tangent(x, seed, step=4)
    torch.testing.assert_close(S1.exp(x[..., None], u[..., None])[..., 0], S.exp(x, u))
    torch.testing.assert_close(S1.log(x[..., None], y[..., None])[..., 0], S.log(x, y))
    got = S1.transport(x[..., None], y[..., None], u[..., None], "parallel")[..., 0]
    torch.testing.assert_close(got, S.transport(x, y, u), rtol=1e-9, atol=1e-9)
    # parallel transport on St(9, 3) is an isometry and lands in T_Y
    Y = St.exp(X, U)
    V, W = St.random_tangent(X, seed, step=5), St.random_tangent(X, seed, step=6)
    PV, PW = St.transport(X, Y, V, "parallel"), St.transport(X, Y, W, "parallel")
    torch.testing.assert_close(St.inner(Y, PV, PW), St.inner(X, V, W), rtol=1e-7, atol=1e-7)
    B = Y.transpose(-1, -2) @ PV
    assert float((B + B.transpose(-1, -2)).abs().max()) < 1e-9
    # random: Haar points from the seed, reproducible
    assert torch.equal(St.random(4, seed, dtype=F64), X)


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input():
    S, St = Sphere(4), Stiefel(5, 2)
    x, X = S.random(2, 0), St.random(2, 0)
    u, U = torch.randn(2, 4), torch.randn(2, 5, 2)
    before = x.clone()
    with pytest.raises(ValueError, match="x is not on the Sphere\\(4\\) manifold"):
        S.step(2 * x, u, 0.1, check=True)
    with pytest.raises(ValueError, match="x is not on the Stiefel\\(5, 2\\) manifold"):
        St.check(X + 0.01)
    with pytest.raises(ValueError, match="eta must be finite"):
        S.step(x, u, float("nan"))
    with pytest.raises(ValueError, match="u must match x"):
        S.step(x, torch.randn(3, 4), 0.1)
    with pytest.raises(ValueError, match="last dimension 4"):
        S.step(torch.randn(2, 5), torch.randn(2, 5), 0.1)
    with pytest.raises(TypeError, match="float32 or float64"):
        S.step(x.half(), u.half(), 0.1)
    with pytest.raises(ValueError, match="transport must be"):
        S.step(x, u, 0.1, transport="schild")
    with pytest.raises(ValueError, match="kind must be 'parallel' or 'projection'"):
        S.transport(x, x, u, "ladder")
    with pytest.raises(ValueError, match="trailing shape \\(5, 2\\)"):
        St.step(torch.randn(2, 5, 3), torch.randn(2, 5, 3), 0.1)
    with pytest.raises(ValueError, match="p must be"):
        Stiefel(3, 4)
    with pytest.raises(ValueError, match="kind must be 'qr' or 'polar'"):
        St.retr(X, U, "cayley")
    op = torch.ops.fedkern
    with pytest.raises(ValueError, match="must not share memory"):
        op.sphere_step_(x, x, None, 0.1, False, 0)
    with pytest.raises(ValueError, match="transport must be 0"):
        op.sphere_step_(x, u, None, 0.1, False, 2)
    with pytest.raises(ValueError, match="p <= n"):
        op.stiefel_step_(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), None, 0.1)
    with pytest.raises(ValueError, match="non-empty"):
        op.sphere_step_(torch.zeros(0, 4), torch.zeros(0, 4), None, 0.1, False, 0)
    assert torch.equal(x, before)
