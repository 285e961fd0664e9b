"""Kernel-level tests of the rowops family: gather-mean, geometric median (smoothed Weiszfeld),
centered clipping and in-place row clipping.

Gather-mean is checked bit for bit against an fp32 NumPy loop in t order, on both backends. The
C++ core (fedkern._C.geometric_median / centered_clip / clip_rows) and the Triton kernels
(fedkern.kernels.rowops; the interpreter on CPU without a GPU) against a NumPy/float64 brute force
that follows the spec step by step (fp32 differences, fp64 squares and sums, weights in row order,
one rounding to fp32 per step). The brute force can sum the squares in the C++ core's documented
order (tiles of T columns, 16 lanes, a lane tree, tiles in order), so the C++ results are checked
bit for bit; the Triton kernels, whose fp64 summation order differs (allowed by the spec), are
checked to rounding accuracy, and row clipping exactly given the kernel's own norms. Also: edge
cases (n = 1, d = 1, ragged tiles, inf/NaN rows, all rows bad, zeros, iters = 0, bf16),
determinism (two runs; OpenMP 1 vs 2 threads in subprocesses; forced block splits; AVX2 vs the
baseline-ISA build).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA, fresh_seed, same_bits
from test_kernels_gram import special_rows

C = pytest.importorskip("fedkern._C")
NO_TRITON = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"
TRITON = pytest.param("triton", marks=pytest.mark.skipif(NO_TRITON, reason="no Triton"))
IMPLS = ["cpu", TRITON]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def kernels():
    from fedkern.kernels import rowops

    return rowops


def tag(x):
    return 1 if x.dtype == torch.bfloat16 else 0


def dev(impl):
    return "cuda" if impl == "triton" and HAS_CUDA else "cpu"


# ---- the NumPy / float64 brute force ---------------------------------------------------------


def cpp_tile(n, dtype):
    """Columns per tile of the C++ Weiszfeld / centered clipping (rowops.cpp tile_cols)."""
    elem = 2 if dtype == torch.bfloat16 else 4
    t = 2048
    while t > 256 and n * t * elem > 512 * 1024:
        t //= 2
    return t


def sum_squares(dm, tile):
    """Row sums of dm**2 (dm: float64 [n, d] of fp32 values). tile=None: NumPy's order; else the
    C++ order: per tile 16 lanes (column k in lane k % 16) summed in column order, the lanes as a
    binary tree, the tiles in order."""
    sq = dm * dm
    if tile is None:
        return sq.sum(1)
    n, d = sq.shape
    total = np.zeros(n)
    for k0 in range(0, d, tile):
        blk = sq[:, k0 : k0 + tile]
        blk = np.pad(blk, ((0, 0), (0, -blk.shape[1] % 16)))  # + 0.0: sums are >= +0 or NaN
        acc = np.zeros((n, 16))
        for g in range(blk.shape[1] // 16):
            acc = acc + blk[:, 16 * g : 16 * g + 16]
        b = acc[:, 0::2] + acc[:, 1::2]
        c = b[:, 0::2] + b[:, 1::2]
        total = total + ((c[:, 0] + c[:, 1]) + (c[:, 2] + c[:, 3]))
    return total


def distances(x32, z, tile):
    dm = (x32 - z[None, :]).astype(np.float64)  # the difference rounded in fp32
    return np.sqrt(sum_squares(dm, tile))


def to_dtype(z32, dtype):
    return torch.from_numpy(np.ascontiguousarray(z32, dtype=np.float32)).to(dtype)


def oracle_gm(x, z0, iters, nu, tile=None):
    x32 = x.float().numpy()
    x64 = x32.astype(np.float64)
    n, d = x32.shape
    z = z0.numpy().astype(np.float32).copy()
    with np.errstate(all="ignore"):
        for _ in range(iters):
            r = distances(x32, z, tile)
            w = np.where(np.isfinite(r), 1.0 / np.maximum(r, nu), 0.0)
            W = 0.0
            for wi in w:  # row order
                W = W + wi
            if W == 0.0:
                z = np.full(d, np.nan, np.float32)
                break
            acc = np.zeros(d)
            for i in range(n):
                if w[i] > 0:
                    acc = acc + (w[i] / W) * x64[i]
            z = acc.astype(np.float32)
    return to_dtype(z, x.dtype)


def oracle_cc(x, v0, iters, tau, tile=None):
    x32 = x.float().numpy()
    x64 = x32.astype(np.float64)
    n, d = x32.shape
    v = v0.numpy().astype(np.float32).copy()
    with np.errstate(all="ignore"):
        for _ in range(iters):
            r = distances(x32, v, tile)
            s = np.where(r == 0, 1.0, np.minimum(1.0, tau / r))
            s = np.where(np.isfinite(r), s, 0.0)
            vd = v.astype(np.float64)
            acc = np.zeros(d)
            for i in range(n):
                if s[i] > 0:
                    acc = acc + (s[i] / n) * (x64[i] - vd)
            v = (vd + acc).astype(np.float32)
    return to_dtype(v, x.dtype)


def gather_mean_ref(x, idx):
    """fp32 NumPy loop in t order from the first valid term; one division by the count."""
    xf = x.float().numpy()
    rows = []
    for row in idx.tolist():
        valid = [i for i in row if i >= 0]
        acc = xf[valid[0]].copy()
        for i in valid[1:]:
            acc = acc + xf[i]
        if len(valid) > 1:
            acc = acc / np.float32(len(valid))
        rows.append(acc)
    return torch.from_numpy(np.stack(rows)).to(x.dtype)


def random_idx(gen, n, r, s, pad=True):
    """idx [r, s]: distinct rows per output row when s <= n, counts in [1, s], -1 trailing."""
    if s <= n:
        idx = torch.stack([torch.randperm(n, generator=gen)[:s] for _ in range(r)])
    else:
        idx = torch.randint(0, n, (r, s), generator=gen)
    if pad:
        counts = torch.randint(1, s + 1, (r,), generator=gen)
        idx[torch.arange(s)[None, :] >= counts[:, None]] = -1
    return idx


def oracle_norms(x, tile=2048):
    with np.errstate(all="ignore"):
        return torch.from_numpy(np.sqrt(sum_squares(x.float().numpy().astype(np.float64), tile)))


def oracle_clip(x, max_norm, norms):
    """The clipped copy of x given the (pre-clip) norms the kernel reports (inf = bad row)."""
    out = x.clone()
    for i in range(x.shape[0]):
        nm, mx = float(norms[i]), float(max_norm[i])
        if not np.isfinite(nm):
            out[i] = 0.0
        elif nm > mx:
            s = torch.tensor(min(1.0, mx / nm), dtype=torch.float64).float()
            out[i] = (s * x[i].float()).to(x.dtype)
    return out


# ---- running the kernels ---------------------------------------------------------------------


def run_gather(impl, x, idx):
    n, d = x.shape
    r, s = idx.shape
    out = torch.empty(r, d, dtype=x.dtype, device=dev(impl))
    if impl == "cpu":
        C.gather_mean(x.data_ptr(), tag(x), n, d, idx.data_ptr(), r, s, out.data_ptr())
    else:
        kernels().gather_mean(x.to(out.device), idx.to(out.device), out)
    return out.cpu()


def run_iter(impl, name, x, p0, iters, hyper):
    n, d = x.shape
    out = torch.empty(d, dtype=x.dtype, device=dev(impl))
    if impl == "cpu":
        getattr(C, name)(x.data_ptr(), tag(x), n, d, p0.data_ptr(), iters, hyper, out.data_ptr())
    else:
        getattr(kernels(), name)(x.to(out.device), p0.to(out.device), iters, hyper, out)
    return out.cpu()


def run_clip(impl, x, max_norm):
    y = x.clone().to(dev(impl))
    if impl == "cpu":
        norms = torch.empty(x.shape[0], dtype=torch.float64)
        C.clip_rows(y.data_ptr(), tag(y), *y.shape, max_norm.data_ptr(), norms.data_ptr())
    else:
        norms = kernels().clip_rows_(y, max_norm.to(y.device))
    return y.cpu(), norms.cpu()


def stack(n, d, dtype, gen, kind="normal"):
    """[n, d] test stack: normal (with a few outlier rows), or with inf/NaN entries in some rows."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if n > 2:
        x[torch.randperm(n, generator=gen)[: max(1, n // 5)]] *= 30.0  # outlier clients
    if kind == "special":
        bad = torch.rand(n, generator=gen) < 0.3
        for i in torch.nonzero(bad).flatten().tolist():
            x[i, int(torch.randint(0, d, (1,), generator=gen))] = [np.inf, -np.inf, np.nan][i % 3]
    if kind == "zeros":
        x = torch.where(torch.rand(n, d, generator=gen) < 0.5, -0.0, 0.0)
    return x.to(dtype)


def same64(a, b):
    """Bit-for-bit equality of two float64 tensors."""
    return a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


def same(a, b):
    return same64(a, b) if a.dtype == torch.float64 else same_bits(a, b)


def check_close(got, want, dtype, scale):
    eps = EPS[dtype]
    torch.testing.assert_close(got.double(), want.double(), equal_nan=True, rtol=4 * eps,
                               atol=4 * eps * scale)  # fmt: skip


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(fresh_seed("torch.Generator"))


@pytest.fixture
def blocking():
    """Set the core's blocking test hook for one test; restored afterwards."""
    yield C._blocking
    C._blocking(0, 0)


CPU_SHAPES = [(1, 1), (1, 7), (2, 3), (5, 17), (16, 300), (13, 4099), (64, 1000), (200, 700)]
TRITON_SHAPES = [(1, 1), (2, 3), (5, 17), (16, 300), (11, 129)]


def shapes(impl):
    return CPU_SHAPES if impl == "cpu" else TRITON_SHAPES


def small(impl):
    """Triton in its interpreter is slow: keep its cases small (n <= 16, d <= 300)."""
    return impl == "triton" and not HAS_CUDA


# ---- gather-mean ------------------------------------------------------------------------------

GM_CASES = [  # n, d, r, s
    (1, 1, 1, 1), (3, 5, 2, 3), (5, 7, 3, 4), (10, 64, 1, 7), (10, 65, 10, 8), (16, 300, 16, 12),
    (9, 130, 3, 3), (7, 33, 4, 20), (40, 5000, 40, 30), (64, 3001, 64, 48), (30, 20000, 1, 25),
    (33, 1027, 9, 4),
]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,r,s", GM_CASES)
def test_gather_mean(impl, dtype, n, d, r, s):
    if small(impl) and (n > 16 or d > 300):
        pytest.skip("interpreter: small sizes only")
    gen = torch.Generator().manual_seed(7 * n + 3 * d + r + s)
    x = torch.randn(n, d, generator=gen).to(dtype)
    idx = random_idx(gen, n, r, s)
    out = run_gather(impl, x, idx)
    assert out.dtype == dtype and out.shape == (r, d)
    assert same_bits(out, gather_mean_ref(x, idx))
    assert same_bits(out, run_gather(impl, x, idx))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_mean_special(impl, dtype):
    """inf / NaN / zero / -0.0 rows; count 1 copies -0.0; repeated indices; no padding."""
    gen = torch.Generator().manual_seed(11)
    n, d = (12, 150) if small(impl) else (30, 3000)
    x = special_rows(torch.randn(n, d, generator=gen), gen).to(dtype)
    x[1] = -0.0
    m = n // 2
    idx = torch.cat([
        random_idx(gen, n, n, m),
        torch.tensor([[1] + [-1] * (m - 1), [1, 1] + [-1] * (m - 2)]),
        torch.randint(0, n, (3, m), generator=gen),
    ])  # fmt: skip
    out = run_gather(impl, x, idx)
    assert same_bits(out, gather_mean_ref(x, idx))
    for q in (n, n + 1):  # -0.0 / 1 and (-0.0 + -0.0) / 2 keep the sign
        assert bool(torch.signbit(out[q].float()).all()) and not out[q].float().any()


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_mean_bucketing_and_krum_shapes(impl):
    """Bucketing (r = ceil(n / s), disjoint rows, the last bucket padded) and Multi-Krum (r = 1)."""
    gen = torch.Generator().manual_seed(5)
    n, d = (10, 257) if small(impl) else (50, 40000)
    s = 3
    perm = torch.randperm(n, generator=gen)
    pad = torch.full(((n + s - 1) // s * s - n,), -1, dtype=torch.int64)
    buckets = torch.cat([perm, pad]).view(-1, s)
    x = torch.randn(n, d, generator=gen)
    assert same_bits(run_gather(impl, x, buckets), gather_mean_ref(x, buckets))
    krum = torch.randperm(n, generator=gen)[: n - 2].view(1, -1)
    assert same_bits(run_gather(impl, x, krum), gather_mean_ref(x, krum))


# ---- geometric median / centered clipping ------------------------------------------------------

ITERATIVE = [("geometric_median", oracle_gm, 1e-6), ("centered_clip", oracle_cc, None)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "special"])
@pytest.mark.parametrize("name,oracle,hyper", ITERATIVE, ids=["geometric_median", "centered_clip"])
def test_iterative(impl, dtype, kind, name, oracle, hyper, gen):
    for n, d in shapes(impl):
        x = stack(n, d, dtype, gen, kind)
        p0 = (0.1 * torch.randn(d, generator=gen)).float()
        h = hyper if hyper is not None else 0.5 * float(np.sqrt(d))  # tau: some rows clipped
        for iters in (0, 1, 4):
            got = run_iter(impl, name, x, p0, iters, h)
            assert got.dtype == dtype and got.shape == (d,)
            if impl == "cpu":  # same summation order as the core: bit for bit
                want = oracle(x, p0, iters, h, tile=cpp_tile(n, dtype))
                assert same_bits(got, want), (name, n, d, iters)
            else:
                want = oracle(x, p0, iters, h)
                finite = x.float()[torch.isfinite(x.float())]
                check_close(got, want, dtype, float(finite.abs().max()) if finite.numel() else 1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_iterative_edges(impl, dtype, gen):
    d = 37
    p0 = torch.randn(d, generator=gen).float()
    # every row bad: Weiszfeld gives NaN; centered clipping keeps v0 (every s_i = 0)
    x = torch.randn(4, d, generator=gen).to(dtype)
    x[:, 3] = float("nan")
    x[1, 5] = float("inf")
    assert torch.isnan(run_iter(impl, "geometric_median", x, p0, 3, 1e-6)).all()
    assert same_bits(run_iter(impl, "centered_clip", x, p0, 3, 1.0), p0.to(dtype))
    # z0 with a NaN: every distance is NaN
    q = p0.clone()
    q[0] = float("nan")
    x = torch.randn(4, d, generator=gen).to(dtype)
    assert torch.isnan(run_iter(impl, "geometric_median", x, q, 2, 1e-6)).all()
    # one row: its value, exactly (c = 1)
    x1 = torch.randn(1, d, generator=gen).to(dtype)
    assert same_bits(run_iter(impl, "geometric_median", x1, p0, 2, 1e-6), x1[0])
    # zeros of both signs, start at 0: distances 0 -> w = 1/nu, s = 1; the result is +0.0
    xz = stack(6, d, dtype, gen, "zeros")
    zero = torch.zeros(d)
    for name in ("geometric_median", "centered_clip"):
        assert same_bits(run_iter(impl, name, xz, zero, 3, 1e-6), torch.zeros(d, dtype=dtype))
    # a row equal to v (r = 0, s = 1) next to far rows; iters = 0 rounds z0 to the dtype
    x = torch.randn(5, d, generator=gen)
    x[2] = p0
    x = x.to(dtype)
    want = oracle_cc(x, p0, 2, 0.5, tile=cpp_tile(5, dtype) if impl == "cpu" else None)
    got = run_iter(impl, "centered_clip", x, p0, 2, 0.5)
    if impl == "cpu":
        assert same_bits(got, want)
    else:  # Triton sums in its own tile order: a few rounding steps of the dtype
        torch.testing.assert_close(got, want, rtol=8 * EPS[dtype], atol=8 * EPS[dtype])
    assert same_bits(run_iter(impl, "centered_clip", x, p0, 0, 0.5), p0.to(dtype))
    # z0 is not modified
    keep = p0.clone()
    run_iter(impl, "geometric_median", x, p0, 2, 1e-6)
    assert same_bits(p0, keep)


@pytest.mark.parametrize("dtype", DTYPES)
def test_geometric_median_converges(dtype, gen):
    """Many iterations: the C++ result is the fixed point of the fp64 Weiszfeld map."""
    x = torch.randn(9, 50, generator=gen).to(dtype)
    z0 = x.float().mean(0)
    got = run_iter("cpu", "geometric_median", x, z0, 200, 1e-9).double()
    xd = x.double()
    r = (xd - got).norm(dim=1).clamp_min(1e-9)
    fixed = ((xd / r[:, None]).sum(0) / (1 / r).sum()).to(dtype).double()
    torch.testing.assert_close(got, fixed, rtol=8 * EPS[dtype], atol=8 * EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_cpu(dtype, gen):
    if NO_TRITON:
        pytest.skip("no Triton")
    x = stack(16, 300, dtype, gen, "special")
    p0 = torch.randn(300, generator=gen).float()
    for name, hyper in (("geometric_median", 1e-6), ("centered_clip", 3.0)):
        a = run_iter("cpu", name, x, p0, 3, hyper)
        b = run_iter("triton", name, x, p0, 3, hyper)
        check_close(b, a, dtype, 30.0)


# ---- row clipping ------------------------------------------------------------------------------


def clip_bounds(x, gen):
    """max_norm [n] float64: around the median norm, so that some rows are clipped, some not."""
    nm = x.double().norm(dim=1)
    nm = torch.where(torch.isfinite(nm), nm, 1.0)
    med = float(nm.median()) if nm.numel() else 1.0
    return (torch.rand(x.shape[0], generator=gen, dtype=torch.float64) + 0.5) * max(med, 1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "special", "zeros"])
def test_clip_rows(impl, dtype, kind, gen):
    shp = shapes(impl) + ([(1, 5000), (3, 4097)] if impl == "cpu" else [])
    for n, d in shp:
        x = stack(n, d, dtype, gen, kind)
        mx = clip_bounds(x, gen)
        y, norms = run_clip(impl, x, mx)
        want_norms = oracle_norms(x, tile=2048 if impl == "cpu" else None)
        bad = ~torch.isfinite(want_norms)
        assert torch.isinf(norms[bad]).all() and (norms[bad] > 0).all()
        if impl == "cpu":
            assert same64(norms, torch.where(bad, float("inf"), want_norms)), (n, d)
        else:
            torch.testing.assert_close(norms[~bad], want_norms[~bad], rtol=1e-14, atol=1e-300)
        assert same_bits(y, oracle_clip(x, mx, norms)), (n, d)
        ybits = y.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
        assert (ybits[bad] == 0).all()  # +0.0, not -0.0
        kept = norms <= mx
        assert same_bits(y[kept], x[kept])  # untouched rows, bit for bit (NaN rows are not kept)
        within = y.double().norm(dim=1) <= mx * (1 + 4 * EPS[dtype])
        assert within.all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_rows_paths(dtype, gen, blocking):
    """The C++ column split (fewer rows than blocks) and row split give the same bits."""
    x = stack(3, 9000, dtype, gen, "normal")
    mx = clip_bounds(x, gen)
    results = []
    for grain, blocks in ((0, 0), (1, 1), (1, 2), (1, 3), (1, 5), (1, 6)):
        blocking(grain, blocks)
        results.append(run_clip("cpu", x, mx))
    for y, nm in results[1:]:
        assert same_bits(y, results[0][0]) and same64(nm, results[0][1])


# ---- determinism -------------------------------------------------------------------------------


def _all_outputs(impl, x, p0, mx):
    n = x.shape[0]
    nearest = torch.stack([torch.roll(torch.arange(n), -i)[: max(1, n - 2)] for i in range(n)])
    gm = run_iter(impl, "geometric_median", x, p0, 3, 1e-6)
    cc = run_iter(impl, "centered_clip", x, p0, 3, 2.0)
    return [run_gather(impl, x, nearest), gm, cc, *run_clip(impl, x, mx)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_repeatable(impl, dtype, gen):
    x = stack(16, 300 if impl != "cpu" else 5000, dtype, gen, "special")
    p0 = torch.randn(x.shape[1], generator=gen).float()
    mx = clip_bounds(x, gen)
    a, b = _all_outputs(impl, x, p0, mx), _all_outputs(impl, x, p0, mx)
    for u, v in zip(a, b, strict=True):
        assert same(u, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_blocks_and_isa(dtype, gen, blocking):
    """Any block split of the tiles, and the baseline-ISA build, give the AVX2 build's bits."""
    x = stack(7, 6000, dtype, gen, "special")
    p0 = torch.randn(6000, generator=gen).float()
    mx = clip_bounds(x, gen)
    ref = _all_outputs("cpu", x, p0, mx)
    for grain, blocks in ((1, 1), (1, 2), (1, 3), (1, 4)):
        blocking(grain, blocks)
        for u, v in zip(_all_outputs("cpu", x, p0, mx), ref, strict=True):
            assert same(u, v), (grain, blocks)
    blocking(0, 0)
    old = C._force_baseline(True)
    try:
        for u, v in zip(_all_outputs("cpu", x, p0, mx), ref, strict=True):
            assert same(u, v)
    finally:
        C._force_baseline(old)


_SCRIPT = r"""
import hashlib, torch
from fedkern import _C
g = torch.Generator().manual_seed(7)
h = hashlib.sha256()
for dt, t in ((torch.float32, 0), (torch.bfloat16, 1)):
    for n, d in ((16, 70000), (1, 600000), (40, 9000)):
        x = torch.randn(n, d, generator=g).to(dt)
        x[0, 3] = float("nan") if n > 1 else x[0, 3]
        p0 = torch.randn(d, generator=g)
        out = torch.empty(d, dtype=dt)
        for name, hyper in (("geometric_median", 1e-6), ("centered_clip", 100.0)):
            getattr(_C, name)(x.data_ptr(), t, n, d, p0.data_ptr(), 3, hyper, out.data_ptr())
            h.update(out.view(torch.uint8).numpy().tobytes())
        idx = torch.stack([torch.randperm(n, generator=g)[: max(1, n - 3)] for _ in range(n)])
        mean = torch.empty(n, d, dtype=dt)
        _C.gather_mean(x.data_ptr(), t, n, d, idx.data_ptr(), n, idx.shape[1], mean.data_ptr())
        h.update(mean.view(torch.uint8).numpy().tobytes())
        mx = torch.full((n,), 0.5 * d ** 0.5, dtype=torch.float64)
        norms = torch.empty(n, dtype=torch.float64)
        _C.clip_rows(x.data_ptr(), t, n, d, mx.data_ptr(), norms.data_ptr())
        h.update(x.view(torch.uint8).numpy().tobytes())
        h.update(norms.numpy().tobytes())
print(h.hexdigest())
"""


def test_cpu_thread_count_invariant():
    """OpenMP with 1 and 2 threads (separate processes): the same bytes."""
    digests = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == len(hashlib.sha256().hexdigest())
