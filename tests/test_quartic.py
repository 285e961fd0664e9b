"""The quartic problem (fedkern.problems.Quartic) and its batched local steps (op family "quartic":
reference, C++ core, Triton in the interpreter), against a NumPy float64 oracle written from the
math: f_i(x) = mean_j ||x - x_j||^4, the gd / sgd / rr schedules on the keyed permutation, control
variates and clipping.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import backend_fixture, fresh_seed, interpreted, same_bits

import fedkern
from fedkern.clients import ClientBatch
from fedkern.ops import quartic as qops
from fedkern.problems import Quartic
from fedkern.random import client_seeds, randk_keys_tensor
from fedkern.reference.clients import permutation

backend = backend_fixture(qops.IMPLS)
MODES = {"gd": 0, "sgd": 1, "rr": 2}


def np_grad(x, P):
    D = x[None, :] - P
    return 4 * ((D * D).sum(1)[:, None] * D).mean(0)


def np_local(x, P, K, gamma, mode, b, keys, h=None, clip=0.0):
    """float64 oracle of one client's K local steps (keys [K, 8] for sgd / rr)."""
    x = x.astype(np.float64).copy()
    m = P.shape[0]
    for t in range(K):
        if mode == "gd" or m == 0:
            batches = [np.arange(m)]
        else:
            perm = permutation(m, keys[t]).numpy()
            batches = [perm[: min(b, m)]] if mode == "sgd" else np.array_split(
                perm, range(b, m, b))  # fmt: skip
        for B in batches:
            u = np_grad(x, P[B]) if len(B) else np.zeros_like(x)
            if h is not None:
                u = u - h
            if clip > 0:
                nrm = np.linalg.norm(u)
                if nrm > clip:
                    u = u * clip / nrm
            x = x - gamma * u
    return x


def make(seed, n, d, sizes=None):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [int(s) for s in torch.randint(1, 9, (n,), generator=g)]
    pts = torch.rand(sum(sizes), d, generator=g, dtype=torch.float64) * 4 - 2
    parts = list(torch.split(torch.arange(sum(sizes)), sizes))
    return Quartic(pts, parts), g


@pytest.mark.parametrize("mode", ["gd", "sgd", "rr"])
@pytest.mark.parametrize("opts", ["plain", "H", "clip"])
def test_local_steps_match_float64_oracle(backend, mode, opts):
    seed = fresh_seed()
    small = interpreted(backend)
    n, d = (3, 5) if small else (7, 13)
    q, g = make(seed, n, d)
    batch = ClientBatch(q, seed=seed % 1000)
    clients = torch.tensor([2, 0]) if small else torch.tensor([5, 1, 3, 0])
    K, b = (2 if small else 3), 3
    X = torch.randn(clients.numel(), d, generator=g)
    # a stable step by construction: the curvature 12 ||x - x_j||^2 of the start is the largest
    # the steps see (GD on a convex function below 1/curvature stays in the sublevel set)
    R = float(X.double().norm(dim=1).max() + q.A.norm(dim=1).max())
    gamma = 0.1 / (12 * R * R)
    H = torch.randn(clients.numel(), d, generator=g) if opts == "H" else None
    # clip below the typical update norm, drawn from the data: the clipping path runs
    clip = 0.5 * float(
        np.linalg.norm(np_grad(X[0].double().numpy(), q.A[: int(q.sizes[0])].numpy()))
    )
    clip = clip if opts == "clip" else None
    X0 = X.clone()
    batch.local_steps_(X, gamma=gamma, steps=K, clients=clients, H=H, mode=mode, batch_size=b,
                       clip=clip, round=4)  # fmt: skip
    keys = randk_keys_tensor(client_seeds(batch.seed, clients)[:, None],
                             4 * K + torch.arange(K)[None, :])  # fmt: skip
    for r, i in enumerate(clients.tolist()):
        P = q.A[int(q.offsets[i]) : int(q.offsets[i + 1])].numpy()
        want = np_local(X0[r].numpy(), P, K, np.float32(gamma), mode, b, keys[r],
                        None if H is None else H[r].double().numpy(), clip or 0.0)  # fmt: skip
        scale = 1 + np.abs(want).max()
        np.testing.assert_allclose(X[r].double().numpy(), want, rtol=1e-4, atol=1e-5 * scale)


def test_backends_agree_and_are_deterministic(backend):
    seed = fresh_seed()
    q, g = make(seed, 3, 4, sizes=[5, 3, 7])
    batch = ClientBatch(q, seed=1)
    X = torch.randn(3, 4, generator=g)
    rad = float(X.norm(dim=1).max() + q.A.norm(dim=1).max())
    gamma = 0.1 / (12 * rad * rad)  # stable by construction (see the oracle test)
    outs = []
    for _ in range(2):
        Y = X.clone()
        batch.local_steps_(Y, gamma=gamma, steps=2, mode="rr", batch_size=2, round=1)
        outs.append(Y)
    assert torch.equal(outs[0], outs[1])
    with fedkern.backend("reference"):
        R = X.clone()
        batch.local_steps_(R, gamma=gamma, steps=2, mode="rr", batch_size=2, round=1)
    torch.testing.assert_close(outs[0], R, rtol=1e-5, atol=1e-6)


def test_cpu_thread_count_does_not_change_bits():
    from fedkern import _C  # noqa: F401

    q, g = make(fresh_seed(), 9, 6)
    batch = ClientBatch(q, seed=2)
    X = torch.randn(9, 6, generator=g)
    outs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            Y = X.clone()
            with fedkern.backend("cpu"):
                batch.local_steps_(Y, gamma=0.01, steps=3, mode="sgd", batch_size=2, round=0)
            outs.append(Y)
        finally:
            torch.set_num_threads(before)
    assert same_bits(outs[0], outs[1])


def test_opcheck(backend):
    q, g = make(fresh_seed(), 2, 3, sizes=[3, 4])
    A = q.A.float()
    X = torch.randn(2, 3, generator=g)
    keys = randk_keys_tensor(torch.tensor([[1], [2]]), torch.tensor([[0, 1]]))
    torch.library.opcheck(
        torch.ops.fedkern.quartic_local_steps_,
        (X, torch.tensor([1, 0]), A, q.offsets, 2, 0.01, None, 2, 2, keys, 0.0, True),
    )  # fmt: skip


def test_bad_input():
    q, g = make(1, 2, 3, sizes=[3, 4])
    A, off = q.A.float(), q.offsets
    X = torch.zeros(2, 3)
    cl = torch.tensor([0, 1])
    f = qops.local_steps_
    with pytest.raises(TypeError, match="points"):
        f(X, cl, A.double(), off, 1, 0.1, None, 0, 1, None, 0.0)
    with pytest.raises(ValueError, match="X must be"):
        f(torch.zeros(2, 4), cl, A, off, 1, 0.1, None, 0, 1, None, 0.0)
    with pytest.raises(ValueError, match="clients must be ids"):
        f(X, torch.tensor([0, 5]), A, off, 1, 0.1, None, 0, 1, None, 0.0)
    with pytest.raises(ValueError, match="offsets must rise"):
        f(X, cl, A, torch.tensor([0, 2, 9]), 1, 0.1, None, 0, 1, None, 0.0)
    with pytest.raises(ValueError, match="gamma must be finite"):
        f(X, cl, A, off, 1, math.nan, None, 0, 1, None, 0.0)
    with pytest.raises(ValueError, match="mode"):
        f(X, cl, A, off, 1, 0.1, None, 3, 1, None, 0.0)
    with pytest.raises(TypeError, match="keys"):
        f(X, cl, A, off, 1, 0.1, None, 1, 1, None, 0.0)
    with pytest.raises(ValueError, match="H must be"):
        f(X, cl, A, off, 1, 0.1, torch.zeros(1, 3), 0, 1, None, 0.0)
    assert torch.equal(X, torch.zeros(2, 3))
    batch = ClientBatch(q)
    with pytest.raises(ValueError, match="mu"):
        batch.local_steps_(X, gamma=0.1, steps=1, mu=0.1, anchor=torch.zeros(3))


# ---- the problem --------------------------------------------------------------------------------


def test_quartic_loss_grad_hessian_against_numpy():
    q, g = make(fresh_seed(), 4, 3)
    x = torch.randn(3, generator=g, dtype=torch.float64)
    P = q.A.numpy()
    w = np.concatenate([np.full(int(m), 1.0 / (int(m) * q.n)) for m in q.sizes])
    D = x.numpy()[None] - P
    s = (D * D).sum(1)
    assert math.isclose(q.loss(x), float(w @ (s * s)), rel_tol=1e-12)
    np.testing.assert_allclose(q.grad(x).numpy(), 4 * (w * s) @ D, rtol=1e-12)
    Hn = 4 * ((w * s).sum() * np.eye(3) + 2 * (D * w[:, None]).T @ D)
    np.testing.assert_allclose(q.hessian(x).numpy(), Hn, rtol=1e-12)
    u = torch.randn(3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(q.hvp(x, u).numpy(), Hn @ u.numpy(), rtol=1e-12)
    # finite differences of the loss
    e = 1e-6
    fd = [
        (q.loss(x + e * v) - q.loss(x - e * v)) / (2 * e) for v in torch.eye(3, dtype=torch.float64)
    ]
    np.testing.assert_allclose(fd, q.grad(x).numpy(), rtol=1e-6)
    G = q.grads(x)
    np.testing.assert_allclose(G.mean(0).numpy(), q.grad(x).numpy(), rtol=1e-12)


def test_optimum_is_stationary_and_minimal():
    q, g = make(fresh_seed(), 5, 4)
    xs, fs = q.optimum()
    assert float(q.grad(xs).norm()) < 1e-8 * (1 + float(q.grad(torch.zeros(4)).norm()))
    for _ in range(5):
        assert q.loss(xs + 1e-3 * torch.randn(4, generator=g, dtype=torch.float64)) > fs


def test_constants_bound_hessian_by_gradient():
    """||H(x)|| <= L0 + L1 ||grad f_i(x)|| at random points near and far, for f and every f_i."""
    q, g = make(fresh_seed(), 4, 3)
    L0, L1 = q.L0, q.L1
    for scale in (0.1, 1.0, 10.0, 1e3):
        for _ in range(20):
            x = scale * torch.randn(3, generator=g, dtype=torch.float64)
            for c in [None, *range(q.n)]:
                cl = None if c is None else [c]
                H = float(torch.linalg.matrix_norm(q.hessian(x, cl), 2))
                assert H <= (L0 + L1 * float(q.grad(x, cl).norm())) * (1 + 1e-12)


def test_sorted_split_and_points():
    pts = Quartic.uniform_points(50, 3, seed=4)
    assert pts.shape == (50, 3) and float(pts.min()) >= -10 and float(pts.max()) <= 10
    assert torch.equal(pts, Quartic.uniform_points(50, 3, seed=4))
    q = Quartic.sorted_split(pts, 5)
    norms = q.A.norm(dim=1)
    assert bool((norms[1:] >= norms[:-1]).all()) and q.sizes.tolist() == [10] * 5


def test_problem_bad_input():
    with pytest.raises(ValueError, match="points must be"):
        Quartic(torch.zeros(3), [torch.arange(3)])
    with pytest.raises(ValueError, match="needs a point"):
        Quartic(torch.zeros(3, 2), [torch.arange(3), torch.tensor([], dtype=torch.int64)])
    with pytest.raises(ValueError, match="finite"):
        Quartic(torch.tensor([[math.nan]]), [torch.arange(1)])
    with pytest.raises(ValueError, match="L1 must be > 0"):
        Quartic(torch.ones(2, 1), [torch.arange(2)]).constants(-1.0)
