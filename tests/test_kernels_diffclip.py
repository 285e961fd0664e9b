"""Kernel-level tests of the diffclip family (difference -> top-k / rand-k / dense -> clipping).

The C++ core (fedkern._C.diff_topk_clip / diff_randk_clip / diff_clip) and the Triton kernels
(fedkern.kernels.diffclip; interpreter on CPU without a GPU) against a NumPy/float64 brute force:
the row difference rounded to the dtype, the selection by (NaN first, |diff| descending, index
ascending) or the rand-k permutation, the fp64 norm, and the clipping rule. Indices and values must
match bit for bit; norms to fp64 summation-order accuracy (values are checked with the kernel's own
norm, so the clipping arithmetic is checked exactly). Also: identity with fedkern.topk_compress /
fedkern.randk_compress per row, every kernel path (many tiles, the Triton path over the data when
the candidate buffer overflows, the C++ refining radix levels, the C++ column split), and
determinism (two runs; OpenMP 1 vs 2 threads in subprocesses; AVX2 vs baseline-ISA loops).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA, device_for, interpreted

import fedkern
from fedkern.ops.randk import scale_for
from fedkern.random import randk_keys

C = pytest.importorskip("fedkern._C")
NO_TRITON = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"
IMPLS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(NO_TRITON, reason="no Triton"))]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
I16 = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def kernels():
    from fedkern.kernels import diffclip

    return diffclip


def tag(x):
    return 1 if x.dtype == torch.bfloat16 else 0


# ---- running the kernels ---------------------------------------------------------------------


def run_topk(impl, gn, go, k, mx):
    n = gn.shape[0]
    idx = torch.empty(n, k, dtype=torch.int64, device=gn.device)
    val = torch.empty(n, k, dtype=gn.dtype, device=gn.device)
    if impl == "cpu":
        norms = torch.empty(n, dtype=torch.float64)
        C.diff_topk_clip(gn.data_ptr(), go.data_ptr(), tag(gn), n, gn.shape[1], k, mx.data_ptr(),
                         idx.data_ptr(), val.data_ptr(), norms.data_ptr())  # fmt: skip
    else:
        norms = kernels().diff_topk_clip(gn, go, k, mx, idx, val)
    return idx.cpu(), val.cpu(), norms.cpu()


def run_randk(impl, gn, go, k, keys, scale, mx):
    n = gn.shape[0]
    idx = torch.empty(n, k, dtype=torch.int64, device=gn.device)
    val = torch.empty(n, k, dtype=gn.dtype, device=gn.device)
    if impl == "cpu":
        norms = torch.empty(n, dtype=torch.float64)
        C.diff_randk_clip(gn.data_ptr(), go.data_ptr(), tag(gn), n, gn.shape[1], k,
                          keys.data_ptr(), scale, mx.data_ptr(), idx.data_ptr(), val.data_ptr(),
                          norms.data_ptr())  # fmt: skip
    else:
        norms = kernels().diff_randk_clip(gn, go, k, keys.to(gn.device), scale, mx, idx, val)
    return idx.cpu(), val.cpu(), norms.cpu()


def run_dense(impl, gn, go, mx):
    out = torch.empty_like(gn)
    if impl == "cpu":
        norms = torch.empty(gn.shape[0], dtype=torch.float64)
        C.diff_clip(gn.data_ptr(), go.data_ptr(), tag(gn), gn.shape[0], gn.shape[1], mx.data_ptr(),
                    out.data_ptr(), norms.data_ptr())  # fmt: skip
    else:
        norms = kernels().diff_clip(gn, go, mx, out)
    return out.cpu(), norms.cpu()


# ---- the NumPy / float64 oracle --------------------------------------------------------------


def rdiff(gn, go):
    """round(fp32(a) - fp32(b)) to the dtype (torch rounds bf16 to nearest even, NaN quiet)."""
    return (gn.cpu().float() - go.cpu().float()).to(gn.dtype)


def oracle_topk_idx(diff_row, k):
    a = diff_row.double().numpy()
    nan = np.isnan(a)
    mag = np.where(nan, 0.0, np.abs(a))
    order = np.lexsort((np.arange(a.size), -mag, -nan.astype(np.int64)))
    return np.sort(order[:k])


def oracle_norm(c):
    c = c.double().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sqrt(np.sum(c * c)))


def oracle_clip(c, norm, mx):
    """The clipping rule applied to message c (1-D, dtype) with the given norm."""
    if norm <= mx:
        return c.clone()
    if not np.isfinite(norm):
        return torch.zeros_like(c)
    s = np.float32(min(1.0, mx / norm))
    return (c.float() * float(s)).to(c.dtype)  # fp32 product, one rounding to the dtype


def bits(x):
    return x.contiguous().view(I16[x.dtype])


def check_messages(idx, val, norms, want_idx, msgs, mx):
    """Row by row: indices exact; norm ~ oracle (fp64 order); values = clip(msg) bit for bit."""
    assert torch.equal(idx, want_idx)
    for i, c in enumerate(msgs):
        want = oracle_norm(c)
        got = float(norms[i])
        if np.isnan(want):
            assert np.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-12, abs=1e-300), i
        assert torch.equal(bits(val[i]), bits(oracle_clip(c, got, float(mx[i])))), i


# ---- inputs -----------------------------------------------------------------------------------


def pair(n, d, dtype, seed, kind="normal"):
    """(G_new, G_old): normal; heavy ties and signed zeros; or with inf/NaN entries."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind in ("ties", "special"):
        a = torch.randint(-3, 4, (n, d), generator=g).double()
        b = torch.randint(-1, 2, (n, d), generator=g).double()
        a = torch.where(torch.rand(n, d, generator=g) < 0.2, -0.0, a)
        b = torch.where(torch.rand(n, d, generator=g) < 0.2, 0.0, b)
    if kind == "special":
        specials = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
        rows = torch.rand(n, 1, generator=g) < 0.5  # about half the rows get specials
        hit = rows & (torch.rand(n, d, generator=g) < 0.05)
        a = torch.where(hit, specials[torch.randint(0, 3, (n, d), generator=g)], a)
    return a.to(dtype), b.to(dtype)


def max_norms(n, seed):
    """Per-row max_norm: some rows far below their norm, some far above, some in between."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-4.0, 6.0, generator=g))


def sizes(impl):
    """(n, d, k): n = 1, d = 1, d and k off every tile size; small when interpreted."""
    if impl == "triton" and interpreted("triton"):
        return [(1, 1, 1), (3, 300, 17), (5, 97, 97), (2, 257, 1)]
    return [(1, 1, 1), (3, 300, 17), (5, 97, 97), (16, 4099, 41), (2, 3 * 4096 + 5, 123)]


def dev(impl):
    return device_for(impl)


# ---- top-k ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_topk_oracle(impl, dtype, kind):
    for s, (n, d, k) in enumerate(sizes(impl)):
        gn, go = pair(n, d, dtype, 100 + s, kind)
        mx = max_norms(n, s)
        idx, val, norms = run_topk(impl, gn.to(dev(impl)), go.to(dev(impl)), k, mx.to(dev(impl)))
        diff = rdiff(gn, go)
        want = torch.from_numpy(np.stack([oracle_topk_idx(diff[i], k) for i in range(n)]))
        msgs = [diff[i][want[i]] for i in range(n)]
        check_messages(idx, val, norms, want, msgs, mx)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_same_as_topk_compress(impl, dtype):
    """Row i's unclipped message is fedkern.topk_compress(diff row, k), indices and values."""
    n, d, k = 4, 200, 9
    gn, go = pair(n, d, dtype, 7, "ties")
    big = torch.full((n,), 1e300, dtype=torch.float64)  # no clipping
    idx, val, _ = run_topk(impl, gn.to(dev(impl)), go.to(dev(impl)), k, big.to(dev(impl)))
    diff = rdiff(gn, go)
    for i in range(n):
        v, ix = fedkern.topk_compress(diff[i], k)
        assert torch.equal(idx[i], ix)
        assert torch.equal(bits(val[i]), bits(v))


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_edge_rows(impl):
    """Zero rows (norm 0, kept), -0.0 kept, norm == max_norm kept, an inf row and a NaN row
    zeroed (+0.0), a row clipped; k = d (everything selected)."""
    d = 6
    go = torch.zeros(5, d)
    gn = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [-0.0, 3.0, 0.0, 4.0, 0.0, 0.0],  # norm exactly 5 == max_norm
            [1.0, float("inf"), -2.0, 0.0, 0.0, 1.0],
            [1.0, 2.0, float("nan"), 0.0, -0.0, 1.0],
            [-3.0, 0.0, 4.0, 0.0, 0.0, 0.0],  # norm 5 > max_norm 1
        ]
    )
    mx = torch.tensor([1.0, 5.0, 1e300, 1e300, 1.0], dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = gn.to(dtype), go.to(dtype)
        for k in (2, d):
            idx, val, norms = run_topk(impl, a.to(dev(impl)), b.to(dev(impl)), k, mx.to(dev(impl)))
            assert norms[0] == 0 and norms[1] == 5 and norms[2] == float("inf") and norms[4] == 5
            assert torch.isnan(norms[3])
            assert torch.equal(bits(val[2]), torch.zeros(k, dtype=I16[dtype]))  # +0.0 bits
            assert torch.equal(bits(val[3]), torch.zeros(k, dtype=I16[dtype]))
            diff = rdiff(a, b)
            for i in (0, 1, 4):
                want = torch.from_numpy(oracle_topk_idx(diff[i], k))
                assert torch.equal(idx[i], want)
                assert torch.equal(bits(val[i]), bits(oracle_clip(diff[i][want], 5.0 * (i > 0),
                                                                  float(mx[i]))))  # fmt: skip
            if k == d:
                assert bits(val[1])[0] == bits(torch.tensor([-0.0], dtype=dtype))[0]  # -0.0 kept


def test_topk_triton_paths(monkeypatch):
    """Triton: many tiles per row, and candidate buffers so small that some rows take the digit
    levels over the data while others use the candidates, in one call."""
    dc = kernels()
    from fedkern.kernels import topk

    device = dev("triton")
    if device == "cpu":
        monkeypatch.setattr(
            dc, "TILING", dc.TILING._replace(block_interpreted=16, tiles_interpreted=8)
        )
    else:
        monkeypatch.setattr(dc, "TILING", dc.TILING._replace(block=16))
    for cap_kind, seed in (("tight", 11), ("normal", 12)):
        if cap_kind == "tight":  # the select's candidate buffer (topk.py)
            monkeypatch.setattr(topk, "_capacity", lambda d, k: k + 1)
        for kind in ("normal", "ties"):
            n, d, k = 4, 200, 13
            gn, go = pair(n, d, torch.float32, seed, kind)
            gn[0] = go[0]  # an all-zero diff row: every key equal
            mx = max_norms(n, seed)
            idx, val, norms = run_topk("triton", gn.to(device), go.to(device), k, mx.to(device))
            diff = rdiff(gn, go)
            want = torch.from_numpy(np.stack([oracle_topk_idx(diff[i], k) for i in range(n)]))
            check_messages(idx, val, norms, want, [diff[i][want[i]] for i in range(n)], mx)


def test_topk_cpu_refining_levels():
    """C++: a row of > 2^18 equal |diff| (the threshold bin is refined, not gathered) next to a
    normal row, with rows in parallel."""
    n, d, k = 2, (1 << 18) + 77, 5
    gn, go = pair(n, d, torch.float32, 3)
    gn[0] = go[0] + torch.where(torch.arange(d) % 3 == 0, 1.0, -1.0)
    gn[0, 1000] = go[0, 1000] + 2.0
    mx = torch.tensor([1.0, 1e9], dtype=torch.float64)
    idx, val, norms = run_topk("cpu", gn, go, k, mx)
    diff = rdiff(gn, go)
    want = torch.from_numpy(np.stack([oracle_topk_idx(diff[i], k) for i in range(n)]))
    check_messages(idx, val, norms, want, [diff[i][want[i]] for i in range(n)], mx)


# ---- rand-k -----------------------------------------------------------------------------------


def keys_for(seeds, step):
    return torch.tensor([list(randk_keys(s, step)) for s in seeds], dtype=torch.int64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [False, True])
def test_randk_same_as_randk_compress(impl, dtype, unbiased):
    """Row i = clip(fedkern.randk_compress(diff row, k, seed=seeds[i], step, unbiased)), and the
    values also equal round(scale * diff[idx]) computed here."""
    for s, (n, d, k) in enumerate(sizes(impl)):
        kind = ("normal", "special", "ties")[s % 3]
        gn, go = pair(n, d, dtype, 200 + s, kind)
        mx = max_norms(n, 50 + s)
        seeds, step = [1000 * s + i for i in range(n)], 3 + s
        scale = scale_for(d, k, unbiased)
        idx, val, norms = run_randk(impl, gn.to(dev(impl)), go.to(dev(impl)), k,
                                    keys_for(seeds, step), scale, mx.to(dev(impl)))  # fmt: skip
        diff = rdiff(gn, go)
        want_idx, msgs = [], []
        for i in range(n):
            v, ix = fedkern.randk_compress(diff[i], k, seed=seeds[i], step=step, unbiased=unbiased)
            mine = (diff[i][ix].float() * np.float32(scale)).to(dtype)
            assert torch.equal(bits(v), bits(mine)) or torch.isnan(v.float()).any()
            want_idx.append(ix)
            msgs.append(v)
        check_messages(idx, val, norms, torch.stack(want_idx), msgs, mx)


# ---- dense ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_dense_oracle(impl, dtype, kind):
    for s, (n, d, _) in enumerate(sizes(impl)):
        gn, go = pair(n, d, dtype, 300 + s, kind)
        mx = max_norms(n, 70 + s)
        out, norms = run_dense(impl, gn.to(dev(impl)), go.to(dev(impl)), mx.to(dev(impl)))
        diff = rdiff(gn, go)
        check_messages(torch.zeros(0), out, norms, torch.zeros(0), list(diff), mx)


def test_dense_triton_tiles(monkeypatch):
    dc = kernels()
    device = dev("triton")
    small = {"block_interpreted" if device == "cpu" else "block": 16, "tiles_interpreted": 8}
    monkeypatch.setattr(dc, "TILING", dc.TILING._replace(**small))
    for dtype in (torch.float32, torch.bfloat16):
        gn, go = pair(5, 299, dtype, 9, "special")
        mx = max_norms(5, 9)
        out, norms = run_dense("triton", gn.to(device), go.to(device), mx.to(device))
        check_messages(torch.zeros(0), out, norms, torch.zeros(0), list(rdiff(gn, go)), mx)


def test_dense_cpu_column_split():
    """C++ with fewer rows than threads: each row's chunks split over the threads (d > 2^20)."""
    gn, go = pair(1, (1 << 20) + 4096 * 3 + 7, torch.float32, 5)
    for m in (1.0, 1e9):
        mx = torch.tensor([m], dtype=torch.float64)
        out, norms = run_dense("cpu", gn, go, mx)
        check_messages(torch.zeros(0), out, norms, torch.zeros(0), list(rdiff(gn, go)), mx)


# ---- determinism ------------------------------------------------------------------------------


_DIGEST = r"""
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from test_kernels_diffclip import digest_all
print(digest_all({baseline}))
"""


def digest_all(baseline=False):
    """sha256 of every C++ output on fixed inputs covering the row-parallel, row-serial and
    column-split paths (the numbers that must not depend on threads or ISA)."""
    C._force_baseline(baseline)
    h = hashlib.sha256()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for n, d, k in ((1, (1 << 20) + 1234, 777), (3, 70001, 301), (8, 5000, 50)):
                gn, go = pair(n, d, dtype, n + d, "normal")
                gn[0, 5] = float("nan") if n == 3 else gn[0, 5]
                mx = max_norms(n, d)
                outs = run_topk("cpu", gn, go, k, mx)
                outs += run_randk("cpu", gn, go, k, keys_for(list(range(n)), 1), 1.5, mx)
                outs += run_dense("cpu", gn, go, mx)
                for t in outs:
                    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    finally:
        C._force_baseline(False)
    return h.hexdigest()


def test_cpu_deterministic_threads_and_isa():
    """Same bytes: two runs, OMP_NUM_THREADS = 1 and 2 (subprocesses; also with nested regions
    allowed), AVX2 and baseline loops."""
    here = digest_all()
    assert digest_all() == here
    assert digest_all(baseline=True) == here
    tests = os.path.dirname(os.path.abspath(__file__))
    for threads, levels in (("1", "1"), ("2", "1"), ("2", "2")):  # also with nesting allowed
        env = dict(os.environ, OMP_NUM_THREADS=threads, OMP_MAX_ACTIVE_LEVELS=levels)
        code = _DIGEST.format(tests=tests, baseline=False)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == here, threads


@pytest.mark.skipif(NO_TRITON, reason="no Triton")
def test_triton_deterministic():
    device = dev("triton")
    gn, go = pair(4, 250, torch.bfloat16, 21, "normal")
    gn, go = gn.to(device), go.to(device)
    mx = max_norms(4, 21).to(device)
    keys = keys_for([1, 2, 3, 4], 0)
    a = run_topk("triton", gn, go, 11, mx) + run_randk("triton", gn, go, 11, keys, 2.0, mx)
    b = run_topk("triton", gn, go, 11, mx) + run_randk("triton", gn, go, 11, keys, 2.0, mx)
    a += run_dense("triton", gn, go, mx)
    b += run_dense("triton", gn, go, mx)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
