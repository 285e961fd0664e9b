"""Kernel-level tests of the Triton batched local-training kernels (fedkern.kernels.clients):
local_steps_, scaffnew_sync_ and weighted_sum.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py switches
it on), so the local-steps cases are small (c <= 6, d <= 13, m_i <= 12, K <= 3); the interpreter
block sizes (kernels/clients.py INTERPRETED) are small too, so a batch spans several chunks.

The oracle is a NumPy float64 brute force written from the spec (/work/spec/CLIENTS.md): the
Feistel permutation with cycle walking in plain Python integers, the per-sample gradients of the
three model kinds, the gd / sgd / rr batch schedules, l2, FedProx, control variates and clipping.
local_steps_ is compared to it with a relative tolerance (fp32 vs fp64 after K steps); the
row-order sums of scaffnew_sync_ and weighted_sum are reproduced exactly (fp32 / fp64 sequential
sums in NumPy) and checked bit for bit, and also against float64.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA, fresh_seed, same_bits

NO_TRITON = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"
pytestmark = pytest.mark.skipif(NO_TRITON, reason="no GPU and TRITON_INTERPRET is not 1")
DEV = "cuda" if HAS_CUDA else "cpu"

KINDS = {"logistic": 0, "multinomial": 1, "least_squares": 2}
MODES = {"gd": 0, "sgd": 1, "rr": 2}
OPTIONS = {  # (H, clip, FedProx)
    "plain": (False, False, False),
    "H": (True, False, False),
    "clip": (False, True, False),
    "prox": (False, False, True),
    "all": (True, True, True),
}
# ragged client sizes: empty, single sample, below the batch sizes, several interpreter chunks
SIZES = [5, 0, 12, 1, 3, 9, 7, 2]
BATCH = {0: 1, 1: 4, 2: 3}  # b per mode (gd ignores it)


def kernels():
    from fedkern.kernels import clients

    return clients


# ---- the NumPy / float64 brute force ---------------------------------------------------------

M32 = 0xFFFFFFFF


def mix32(v):
    v ^= v >> 16
    v = (v * 0x7FEB352D) & M32
    v ^= v >> 15
    v = (v * 0x846CA68B) & M32
    return v ^ (v >> 16)


def perm(j, m, keys):
    """perm(j) of the keyed Feistel permutation of [0, m): 8 rounds on 2h bits, cycle walking."""
    b = max((m - 1).bit_length(), 2)
    b += b & 1
    h = b // 2
    mask = (1 << h) - 1

    def f(v):
        left, right = v >> h, v & mask
        for k in keys:
            left, right = right, left ^ (mix32(right ^ int(k)) & mask)
        return (left << h) | right

    v = f(j)
    while v >= m:
        v = f(v)
    return v


def batches(m, mode, b, keys):
    if mode == 0:
        return [list(range(m))]
    order = [perm(j, m, keys) for j in range(m)]
    if mode == 1:
        return [order[: min(b, m)]]
    return [order[s : s + b] for s in range(0, m, b)] or [[]]


def grad(kind, C, x, a, yv):
    if kind == 0:
        s = 2.0 * yv - 1.0
        return -s / (1.0 + np.exp(s * (a @ x))) * a  # -s sigmoid(-s z) a
    if kind == 1:
        z = x.reshape(C, -1) @ a
        e = np.exp(z - z.max())
        P = e / e.sum()
        P[int(yv)] -= 1.0
        return np.outer(P, a).ravel()
    return (a @ x - yv) * a


def brute_local_steps(X, clients, A, y, offsets, kind, C, K, gamma, l2, H, mode, b, keys, clip,
                      mu, anchor):  # fmt: skip
    """float64 local steps of every cohort row.

    Returns (X [c, p], number of clipped updates, per cohort row the norms ||g - h|| of its updates
    in order).
    """
    f64 = lambda t: None if t is None else t.detach().cpu().double().numpy()  # noqa: E731
    X, A, y, H, anchor = f64(X), f64(A), f64(y), f64(H), f64(anchor)
    clients, offsets = clients.cpu().numpy(), offsets.cpu().numpy()
    keys = None if keys is None else keys.cpu().numpy()
    gamma, l2, mu = (float(np.float32(v)) for v in (gamma, l2, mu))  # the kernel's fp32 values
    clipped, norms = 0, []
    for r, i in enumerate(clients):
        lo, m = int(offsets[i]), int(offsets[i + 1] - offsets[i])
        x = X[r].copy()
        norms.append([])
        for t in range(K):
            for B in batches(m, mode, b, None if keys is None else keys[r, t]):
                g = np.zeros_like(x)
                for j in B:
                    g += grad(kind, C, x, A[lo + j], y[lo + j])
                if B:
                    g /= len(B)
                g = g + l2 * x
                if mu != 0:
                    g = g + mu * (x - anchor[r])
                u = g - H[r] if H is not None else g
                nrm = np.sqrt(np.sum(u * u))
                norms[-1].append(nrm)
                if clip > 0 and nrm > clip:
                    u = clip / nrm * u
                    clipped += 1
                x = x - gamma * u
        X[r] = x
    return X, clipped, norms


def exercised_clip(case) -> float:
    """A clip radius that binds on this drawn case by construction, far from every update norm.

    Every client's first update is the same with or without clipping, so a radius below the largest
    first-update norm clips at least that update. The radius is moved until no norm of the clipped
    run lies within 1% of it, so float32 (kernel) and float64 (oracle) take the same branch.
    """
    first = [row[0] for row in brute_local_steps(**dict(case, clip=0.0))[2] if row]
    clip = 0.7 * max(first)
    for _ in range(50):
        norms = [n for row in brute_local_steps(**dict(case, clip=clip))[2] for n in row]
        if min(abs(n - clip) for n in norms) > 0.01 * clip:
            return clip
        clip *= 0.97
    raise AssertionError("no clip radius away from every update norm")  # not seen in practice


# ---- problem generation ------------------------------------------------------------------------


def make_case(seed, kind, mode, opts, sizes=SIZES, d=None, C=3, K=3, b=None, cohort=None):
    """A random problem and cohort (a permuted subset that holds the empty and 1-sample clients)."""
    rng = np.random.default_rng(seed)
    has_h, has_clip, has_mu = opts
    C = C if kind == 1 else 1
    d = d if d is not None else (7 if kind == 1 else 13)
    p = C * d
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    N = int(offsets[-1])
    A = (2.0 * rng.standard_normal((N, d)) / np.sqrt(d)).astype(np.float32)
    if kind == 0:
        y = rng.integers(0, 2, N).astype(np.float32)
    elif kind == 1:
        y = rng.integers(0, C, N).astype(np.float32)
    else:
        y = rng.standard_normal(N).astype(np.float32)
    if cohort is None:
        others = [i for i in range(len(sizes)) if i not in (1, 3)]
        cohort = rng.permutation(np.concatenate([rng.permutation(others)[:4], [1, 3]]))
    c = len(cohort)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEV)  # noqa: E731
    X = t((0.5 * rng.standard_normal((c, p))).astype(np.float32))
    H = t((0.3 * rng.standard_normal((c, p))).astype(np.float32)) if has_h else None
    anchor = t((0.5 * rng.standard_normal((c, p))).astype(np.float32)) if has_mu else None
    keys = t(rng.integers(0, 2**32, (c, K, 8), dtype=np.int64)) if mode != 0 else None
    return dict(
        X=X, clients=t(np.asarray(cohort, dtype=np.int64)), A=t(A), y=t(y), offsets=t(offsets),
        kind=kind, C=C, K=K, gamma=0.3, l2=0.05, H=H, mode=mode,
        b=b if b is not None else BATCH[mode], keys=keys, clip=0.6 if has_clip else 0.0,
        mu=0.2 if has_mu else 0.0, anchor=anchor,
    )  # fmt: skip


def run_kernel(case):
    args = dict(case, X=case["X"].clone())
    out = kernels().local_steps_(**args)
    assert out is args["X"]
    return out


def check_close(got, want):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=1e-4, atol=1e-5 * scale)


# ---- local_steps_ ------------------------------------------------------------------------------


def test_brute_force_perm_is_randk_permutation():
    """The oracle's Feistel permutation is rand-k's (fedkern.reference.randk.feistel)."""
    from fedkern.random import feistel_params, randk_keys
    from fedkern.reference.randk import feistel

    for m in (1, 2, 3, 5, 12, 17, 64):
        for seed, step in ((0, 0), (7, 3)):
            keys = randk_keys(seed, step)
            h, mask = feistel_params(m)
            v = feistel(torch.arange(m), keys, h, mask)
            while bool((v >= m).any()):
                v = torch.where(v >= m, feistel(v, keys, h, mask), v)
            assert [perm(j, m, keys) for j in range(m)] == v.tolist()


@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_local_steps_matches_brute_force(kind, mode, opts):
    case = make_case(fresh_seed("make_case"), KINDS[kind], MODES[mode], OPTIONS[opts])
    if case["clip"] > 0:
        case["clip"] = exercised_clip(case)
    want, clipped, _ = brute_local_steps(**case)
    got = run_kernel(case)
    check_close(got, want)
    if case["clip"] > 0:
        assert clipped > 0  # the clipping path ran (by construction of the radius)


@pytest.mark.parametrize("b", [1, 20])
@pytest.mark.parametrize("mode", ["sgd", "rr"])
def test_local_steps_batch_sizes(mode, b):
    """b = 1 (one sample per batch) and b larger than every client (sgd/rr: one full batch)."""
    case = make_case(11 + b, KINDS["least_squares"], MODES[mode], OPTIONS["H"], K=2, b=b)
    check_close(run_kernel(case), brute_local_steps(**case)[0])


def test_local_steps_more_classes_and_one_column():
    """Multinomial with a power-of-two class count and d = 1 (tiles without column padding)."""
    case = make_case(5, KINDS["multinomial"], MODES["rr"], OPTIONS["all"], C=4, d=1, K=2)
    check_close(run_kernel(case), brute_local_steps(**case)[0])
    case = make_case(6, KINDS["logistic"], MODES["sgd"], OPTIONS["all"], d=16, K=2)
    check_close(run_kernel(case), brute_local_steps(**case)[0])


def test_local_steps_k0_leaves_x():
    case = make_case(1, KINDS["logistic"], MODES["gd"], OPTIONS["all"], K=0)
    assert same_bits(run_kernel(case), case["X"])


def test_local_steps_empty_clients_step():
    """A cohort of empty clients only: g = l2 x + mu (x - anchor), one step per local step (rr)."""
    case = make_case(2, KINDS["logistic"], MODES["rr"], OPTIONS["prox"], sizes=[0, 0, 3],
                     cohort=[1, 0], K=2)  # fmt: skip
    want = brute_local_steps(**case)[0]
    x, a = case["X"].cpu().double().numpy(), case["anchor"].cpu().double().numpy()
    l2, mu, gamma = (float(np.float32(v)) for v in (0.05, 0.2, 0.3))
    for _ in range(2):
        x = x - gamma * (l2 * x + mu * (x - a))
    np.testing.assert_allclose(want, x, rtol=1e-12)
    check_close(run_kernel(case), want)


def test_local_steps_rows_independent_of_cohort():
    """A row's result depends only on its own client, keys, H and anchor: running a sub-cohort
    reproduces those rows bit for bit."""
    case = make_case(3, KINDS["multinomial"], MODES["sgd"], OPTIONS["all"], K=2)
    full = run_kernel(case)
    sel = torch.tensor([3, 0, 4], device=DEV)
    sub = {k: (v[sel].contiguous() if k in ("X", "clients", "H", "keys", "anchor") else v)
           for k, v in case.items()}  # fmt: skip
    assert same_bits(run_kernel(sub), full[sel])


def test_local_steps_deterministic():
    for kind in KINDS.values():
        case = make_case(4 + kind, kind, MODES["rr"], OPTIONS["all"], sizes=[5, 0, 9, 1, 3, 4], K=2)
        assert same_bits(run_kernel(case), run_kernel(case))


def test_local_steps_inputs_untouched():
    case = make_case(9, KINDS["logistic"], MODES["sgd"], OPTIONS["all"])
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor) and k != "X"}
    run_kernel(case)
    for k, v in before.items():
        assert torch.equal(case[k], v), k


@pytest.mark.parametrize("kind,C,d", [(0, 1, 8193), (2, 1, 10000), (1, 10, 1024), (1, 3, 4097)])
def test_local_steps_too_large_raises(kind, C, d):
    X = torch.zeros(1, C * d, device=DEV)
    A = torch.zeros(1, d, device=DEV)
    one = torch.zeros(1, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match=f"p = {C * d}"):
        kernels().local_steps_(X, one, A, torch.zeros(1, device=DEV), torch.tensor([0, 1]).to(DEV),
                               kind, C, 1, 0.1, 0.0, None, 0, 1, None, 0.0, 0.0, None)  # fmt: skip


def test_local_steps_largest_tile_runs():
    """The largest tile that fits (multinomial: next_pow2(C) * next_pow2(d) = MAX_TILE)."""
    C, d = 3, kernels().MAX_TILE // 4
    case = make_case(8, KINDS["multinomial"], MODES["gd"], OPTIONS["H"], sizes=[2, 1], C=C, d=d,
                     K=1, cohort=[1])  # fmt: skip
    check_close(run_kernel(case), brute_local_steps(**case)[0])


@pytest.mark.skipif(not HAS_CUDA, reason="GPU sizes (too slow for the interpreter)")
@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_local_steps_gpu_sizes(kind, mode):
    rng = np.random.default_rng(0)
    sizes = list(rng.integers(0, 80, 40))
    case = make_case(10, KINDS[kind], MODES[mode], OPTIONS["all"], sizes=sizes,
                     d=33 if kind == "multinomial" else 101, C=10, K=4, b=16,
                     cohort=rng.permutation(40)[:30])  # fmt: skip
    check_close(run_kernel(case), brute_local_steps(**case)[0])
    assert same_bits(run_kernel(case), run_kernel(case))


# ---- scaffnew_sync_ and weighted_sum -----------------------------------------------------------


@pytest.mark.parametrize("c,p", [(1, 1), (3, 5), (6, 37), (9, 16), (13, 70)])
def test_scaffnew_sync(c, p):
    rng = np.random.default_rng(c * 100 + p)
    X0 = rng.standard_normal((c, p)).astype(np.float32)
    H0 = rng.standard_normal((c, p)).astype(np.float32)
    coef = 0.37
    X, H = torch.from_numpy(X0).to(DEV).clone(), torch.from_numpy(H0).to(DEV).clone()
    xbar = kernels().scaffnew_sync_(X, H, coef)
    # exact fp32 brute force: sequential sum in row order, one IEEE division, separate roundings
    acc = np.zeros(p, np.float32)
    for r in range(c):
        acc = acc + X0[r]
    xb = acc / np.float32(c)
    cf = np.float32(coef)
    Hw = H0 + cf * (xb[None, :] - X0)
    assert same_bits(xbar, torch.from_numpy(xb))
    assert same_bits(X, torch.from_numpy(np.broadcast_to(xb, (c, p)).copy()))
    assert same_bits(H, torch.from_numpy(Hw))
    # and the float64 meaning
    xb64 = X0.astype(np.float64).mean(0)
    np.testing.assert_allclose(xbar.cpu().numpy(), xb64, rtol=1e-5, atol=1e-6 * c)
    np.testing.assert_allclose(H.cpu().numpy(), H0 + coef * (xb64 - X0), rtol=1e-5, atol=1e-5)
    # consensus keeps sum_r H[r] if it was 0 (Scaffnew's invariant), up to rounding
    H0 = H0 - H0.mean(0, keepdims=True)
    H = torch.from_numpy(H0.astype(np.float32)).to(DEV)
    kernels().scaffnew_sync_(torch.from_numpy(X0).to(DEV).clone(), H, coef)
    assert np.abs(H.cpu().double().numpy().sum(0)).max() < 1e-4 * c


@pytest.mark.parametrize("c,p", [(1, 1), (3, 5), (6, 37), (9, 16), (13, 70), (0, 4)])
def test_weighted_sum(c, p):
    rng = np.random.default_rng(c * 100 + p + 1)
    X0 = rng.standard_normal((c, p)).astype(np.float32)
    w = rng.standard_normal(c)
    if c > 2:
        w[1] = 0.0
    X, wt = torch.from_numpy(X0).to(DEV).clone(), torch.from_numpy(w).to(DEV).clone()
    out = kernels().weighted_sum(X, wt)
    acc = np.zeros(p)
    for r in range(c):
        acc = acc + w[r] * X0[r].astype(np.float64)
    assert out.dtype == torch.float32 and out.shape == (p,)
    assert same_bits(out, torch.from_numpy(acc.astype(np.float32)))
    assert torch.equal(X.cpu(), torch.from_numpy(X0)) and torch.equal(wt.cpu(), torch.from_numpy(w))


def test_sync_and_sum_deterministic():
    rng = np.random.default_rng(5)
    X0 = torch.from_numpy(rng.standard_normal((11, 45)).astype(np.float32)).to(DEV)
    w = torch.from_numpy(rng.random(11)).to(DEV)
    assert same_bits(kernels().weighted_sum(X0, w), kernels().weighted_sum(X0, w))
    res = []
    for _ in range(2):
        X, H = X0.clone(), torch.zeros_like(X0)
        res.append((kernels().scaffnew_sync_(X, H, 2.5), X, H))
    assert all(same_bits(a, b) for a, b in zip(*res, strict=True))
