"""Property-based tests (hypothesis) of every public op against an independent NumPy oracle.

Shapes include 0-d tensors, 1, primes and 2**k +- 1, both dtypes, every k, values with ties, NaN
of several payloads, +-inf and -0.0, and non-contiguous or offset views for the inputs that may be
strided. The oracles are written here from the documented math with NumPy (float32 arithmetic
where an op promises float32 rounding, a pure-Python Feistel permutation for rand-k), never by
calling fedkern; the exact ops are checked bit for bit, the others with the documented bound
(conftest's TOLERANCES).

Backends: the reference and the C++ core (Triton's interpreter is too slow for many examples; the
per-op test files cover it). Budget: the "ci" profile (conftest) runs 20 examples per test;
``pytest --hypothesis-profile long tests/test_properties.py`` runs 1000.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKEND_PARAMS, np_exact, np_round, np_values, oracle_topk, tolerance
from hypothesis import given
from hypothesis import strategies as st

import fedkern
from fedkern import robust as R
from fedkern.random import randk_keys

BACKENDS = [p for p in BACKEND_PARAMS if p.values[0] in ("reference", "cpu")]
SIZES = [1, 2, 3, 5, 7, 13, 31, 63, 64, 65, 127, 257, 1023, 1025, 4099]
DTYPES = [torch.float32, torch.bfloat16]
F32 = np.float32


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fedkern.backend(request.param):
        yield request.param


# ---- NumPy helpers -------------------------------------------------------------------------------


def rnd(x, dtype) -> np.ndarray:
    return np_round(x, dtype)


def as_np(t: torch.Tensor) -> np.ndarray:
    return np_values(t)


def exact(got: torch.Tensor, want) -> bool:
    return np_exact(got, want)


def values(rng, n, dtype, kind) -> torch.Tensor:
    if kind == "normal":
        a = rng.standard_normal(n)
    elif kind == "ties":
        a = rng.integers(-3, 4, n).astype(np.float64) * 0.5
    else:  # specials: ties, signed zeros, infinities and NaNs of several payloads
        a = rng.integers(-3, 4, n).astype(np.float64)
        pick = rng.random(n)
        a = np.where(pick < 0.1, -0.0, a)
        a = np.where((pick >= 0.1) & (pick < 0.2), np.inf, a)
        a = np.where((pick >= 0.2) & (pick < 0.25), -np.inf, a)
    t = torch.from_numpy(a).to(dtype)
    if kind == "special":
        bits = t.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
        nan_pos = np.flatnonzero(rng.random(n) < 0.1)
        pool = [0x7FC0, 0x7F81, -0x003F, 0x7FFF] if dtype == torch.bfloat16 else [
            0x7FC00000, 0x7F800001, -0x003FFFFF, 0x7FFFFFFF]  # fmt: skip
        for j, i in enumerate(nan_pos):
            bits[int(i)] = pool[j % len(pool)]
    return t


@st.composite
def tensors(draw, dtypes=DTYPES, kinds=("normal", "ties", "special"), strided=True):
    """(tensor, numpy float32 copy of its values in logical order)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(kinds))
    layout = draw(st.sampled_from(["flat", "0d", "2d", "offset", "strided", "transposed"]
                                  if strided else ["flat", "0d", "2d"]))  # fmt: skip
    if layout == "0d":
        t = values(rng, 1, dtype, kind).reshape(())
    elif layout in ("flat", "offset", "strided"):
        n = draw(st.sampled_from(SIZES))
        if layout == "flat":
            t = values(rng, n, dtype, kind)
        elif layout == "offset":
            t = values(rng, n + 3, dtype, kind)[3:]
        else:
            t = values(rng, 2 * n, dtype, kind)[::2]
    else:
        r, c = draw(st.sampled_from([(1, 1), (3, 5), (7, 13), (2, 64), (17, 3)]))
        t = values(rng, r * c, dtype, kind).view(r, c)
        if layout == "transposed":
            t = t.t()
    return t, as_np(t.reshape(-1))


# ---- top-k ---------------------------------------------------------------------------------------


@given(data=st.data())
def test_topk_compress_property(backend, data):
    x, a = data.draw(tensors())
    k = data.draw(st.integers(1, x.numel()))
    before = x.clone()
    v, i = fedkern.topk_compress(x, k)
    assert torch.equal(i, oracle_topk(torch.from_numpy(a.astype(np.float64)), k))
    assert exact(v, a[i.numpy()])
    assert exact(x, as_np(before))  # input untouched


@given(data=st.data())
def test_ef14_topk_property(backend, data):
    g, gn = data.draw(tensors())
    dtype = g.dtype
    e, en = data.draw(tensors(dtypes=[dtype], strided=False))
    e = e.reshape(-1)[: g.numel()].clone() if e.numel() >= g.numel() else None
    if e is None:
        e = values(np.random.default_rng(1), g.numel(), dtype, "normal")
        en = as_np(e)
    en = en[: g.numel()]
    e = e.reshape(g.shape).contiguous()
    k = data.draw(st.integers(1, g.numel()))
    lr = data.draw(st.sampled_from([0.0, 1.0, 0.3, 2.5]))
    a = rnd(en + (F32(lr) * gn).astype(F32), dtype)  # round(e + round32(lr * g))
    idx = oracle_topk(torch.from_numpy(a.astype(np.float64)), k).numpy()
    v, i = fedkern.ef14_topk_(g, e, k, lr=lr)
    assert np.array_equal(i.numpy(), idx)
    assert exact(v, a[idx])
    a[idx] = 0
    assert exact(e.reshape(-1), a)


@given(data=st.data())
def test_ef21_topk_property(backend, data):
    g, gn = data.draw(tensors())
    dtype = g.dtype
    s = values(np.random.default_rng(data.draw(st.integers(0, 99))), g.numel(), dtype, "normal")
    s = s.reshape(g.shape).contiguous()
    sn = as_np(s.reshape(-1))
    k = data.draw(st.integers(1, g.numel()))
    d = rnd(gn - sn, dtype)
    idx = oracle_topk(torch.from_numpy(d.astype(np.float64)), k).numpy()
    v, i = fedkern.ef21_topk_(g, s, k)
    assert np.array_equal(i.numpy(), idx)
    assert exact(v, d[idx])
    sn[idx] = rnd(sn[idx] + d[idx], dtype)
    assert exact(s.reshape(-1), sn)


# ---- rand-k: a pure-Python transcription of the keyed Feistel permutation ------------------------


def mix32(v: int) -> int:
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


def randk_oracle(n: int, k: int, seed: int, step: int) -> np.ndarray:
    """{perm(i) : i < k} ascending, perm = 8 Feistel rounds on 2h bits + cycle walking."""
    keys = randk_keys(seed, step)
    b = max(2, (n - 1).bit_length())
    b += b & 1
    h = b // 2
    mask = (1 << h) - 1

    def f(v):
        left, right = v >> h, v & mask
        for key in keys:
            left, right = right, left ^ (mix32(right ^ key) & mask)
        return (left << h) | right

    out = []
    for i in range(k):
        v = f(i)
        while v >= n:
            v = f(v)
        out.append(v)
    return np.sort(np.array(out, dtype=np.int64))


@given(data=st.data())
def test_randk_ops_property(backend, data):
    x, xn = data.draw(tensors())
    dtype, n = x.dtype, x.numel()
    k = data.draw(st.integers(1, min(n, 100)))
    seed = data.draw(st.integers(0, 2**63 - 1))
    step = data.draw(st.integers(0, 2**40))
    unbiased = data.draw(st.booleans())
    idx = randk_oracle(n, k, seed, step)
    scale = F32(n / k) if unbiased else F32(1.0)
    v, i = fedkern.randk_compress(x, k, seed=seed, step=step, unbiased=unbiased)
    assert np.array_equal(i.numpy(), idx)
    assert exact(v, rnd(xn[idx] * scale, dtype))
    # EF14: a = round(e + lr g) everywhere; c = round(a[I] * scale); e[I] = round(a[I] - c)
    e = values(np.random.default_rng(step % 1000), n, dtype, "normal").reshape(x.shape)
    en = as_np(e)
    c, i = fedkern.ef14_randk_(x, e, k, seed=seed, step=step, lr=0.5, unbiased=unbiased)
    a = rnd(en + (F32(0.5) * xn).astype(F32), dtype)
    cw = rnd(a[idx] * scale, dtype)
    assert np.array_equal(i.numpy(), idx) and exact(c, cw)
    a[idx] = rnd(a[idx] - cw, dtype)
    assert exact(e, a)
    # EF21: d = round(g[I] - s[I]); c = round(d * scale); s[I] = round(s[I] + c)
    s = values(np.random.default_rng(step % 997), n, dtype, "normal").reshape(x.shape)
    sn = as_np(s)
    c, i = fedkern.ef21_randk_(x, s, k, seed=seed, step=step, unbiased=unbiased)
    cw = rnd(rnd(xn[idx] - sn[idx], dtype) * scale, dtype)
    assert np.array_equal(i.numpy(), idx) and exact(c, cw)
    sn[idx] = rnd(sn[idx] + cw, dtype)
    assert exact(s, sn)


# ---- sparse accumulation -------------------------------------------------------------------------


@given(data=st.data())
def test_sparse_add_batched_property(backend, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    n = data.draw(st.sampled_from(SIZES))
    m = data.draw(st.integers(1, 9))
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kind = data.draw(st.sampled_from(["normal", "ties", "special"]))
    alpha = data.draw(st.sampled_from([1.0, -0.5, 1 / 3, 0.0]))
    dense = values(rng, n, dtype, "normal")
    vals = values(rng, m * k, dtype, kind).view(m, k)
    idx = torch.from_numpy(np.stack([np.sort(rng.permutation(n)[:k]) for _ in range(m)]))
    acc = as_np(dense)
    vn = as_np(vals.reshape(-1)).reshape(m, k)
    for r in range(m):  # float32, in message order, rounded once at the end
        acc[idx[r].numpy()] = (acc[idx[r].numpy()] + (F32(alpha) * vn[r]).astype(F32)).astype(F32)
    out = fedkern.sparse_add_batched_(dense, vals, idx, alpha=alpha)
    assert out is dense and exact(dense, rnd(acc, dtype))
    single = values(rng, n, dtype, "normal")
    sn = as_np(single)
    fedkern.sparse_add_(single, vals[0], idx[0], alpha=alpha)
    sn[idx[0].numpy()] = (sn[idx[0].numpy()] + (F32(alpha) * vn[0]).astype(F32)).astype(F32)
    assert exact(single, rnd(sn, dtype))


# ---- robust aggregation (the public fedkern.robust functions) ------------------------------------


@st.composite
def stacks(draw, specials=True):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 17, 31]))
    d = draw(st.sampled_from([1, 2, 5, 64, 65, 257]))
    kind = draw(st.sampled_from(["normal", "ties", "special"] if specials else ["normal"]))
    X = values(rng, n * d, dtype, kind).view(n, d)
    if draw(st.booleans()):  # a column-major view of the same values
        X = X.t().contiguous().t()
    return X


def sorted_cols(X: torch.Tensor) -> np.ndarray:
    return np.sort(X.double().numpy(), axis=0, kind="stable")  # NaN last


@given(X=stacks())
def test_coordinate_median_property(backend, X):
    n = X.shape[0]
    s = sorted_cols(X)
    got = R.coordinate_median(X)
    if n % 2:
        assert exact(got, s[(n - 1) // 2].astype(F32))
    else:
        with np.errstate(invalid="ignore"):
            want = (s[n // 2 - 1] + s[n // 2]) * 0.5
        g = got.double().numpy()
        both = np.isnan(g) & np.isnan(want)
        with np.errstate(invalid="ignore"):
            ok = (g == want) | both | (np.abs(g - want) <= 2 * 2.0**-24 * np.abs(want))
            if X.dtype == torch.bfloat16:
                ok |= np.abs(g - want) <= 2.0**-8 * np.abs(want)
        assert bool(ok.all())


@given(X=stacks(), data=st.data())
def test_trimmed_mean_property(backend, X, data):
    n = X.shape[0]
    f = data.draw(st.integers(0, (n - 1) // 2))
    s = sorted_cols(X)[f : n - f]
    with np.errstate(invalid="ignore"):
        want = s.mean(axis=0)
    got = R.trimmed_mean(X, f).double().numpy()
    eps = 2.0**-8 if X.dtype == torch.bfloat16 else 2.0**-24
    mag = np.nan_to_num(np.abs(s), posinf=0).max(axis=0, initial=0) * (n - 2 * f)
    with np.errstate(invalid="ignore"):
        ok = (got == want) | (np.isnan(got) & np.isnan(want))
        ok |= np.abs(got - want) <= 2 * eps * (np.abs(want) + mag)
    assert bool(ok.all())


@given(X=stacks(specials=False), data=st.data())
def test_clip_rows_property(backend, X, data):
    c = data.draw(st.sampled_from([1e-3, 0.5, 3.0, 1e3]))
    X = X.contiguous()
    x = X.double().numpy()
    norms = np.sqrt((x * x).sum(1))
    R.clip_rows_(X, c)
    got = X.double().numpy()
    tol = tolerance("clip_rows_", X.dtype)
    for r in range(x.shape[0]):
        if norms[r] <= c:
            assert np.array_equal(got[r], x[r])  # untouched
        else:
            want = x[r] * (c / norms[r])
            assert np.allclose(got[r], want, rtol=tol["rtol"], atol=tol["atol"])


@given(X=stacks(specials=False), data=st.data())
def test_centered_clip_property(backend, X, data):
    tau = data.draw(st.sampled_from([0.1, 1.0, 10.0]))
    iters = data.draw(st.integers(0, 4))
    x = X.double().numpy()
    v = np.zeros(x.shape[1])
    for _ in range(iters):  # float64, v rounded to float32 after every iteration
        u = x - v
        nrm = np.sqrt((u * u).sum(1))
        w = np.where(nrm > tau, tau / np.where(nrm > 0, nrm, 1.0), 1.0)
        v = (v + (u * w[:, None]).mean(0)).astype(F32).astype(np.float64)
    got = R.centered_clip(X, tau=tau, iters=iters).double().numpy()
    tol = tolerance("centered_clip", X.dtype, (np.abs(x).max() + tau) * max(iters, 1))
    assert np.allclose(got, v, rtol=tol["rtol"], atol=tol["atol"])


@given(X=stacks(specials=False), data=st.data())
def test_krum_and_bucketing_properties(backend, X, data):
    n = X.shape[0]
    if n > 4:
        f = data.draw(st.integers(0, (n - 3) // 2))
        got = R.krum(X, f).double().numpy()
        x = X.double().numpy()
        d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        scores = np.sort(d2, axis=1)[:, 1 : n - f - 1].sum(1)
        rows = [r for r in range(n) if np.array_equal(x[r], got)]
        assert rows, "krum returns one of the rows"
        assert min(scores[r] for r in rows) <= scores.min() * (1 + 1e-9) + 1e-12
    s = data.draw(st.integers(1, 4))
    B = R.bucketing(X, s, seed=data.draw(st.integers(0, 2**62)), step=3)
    assert B.shape == (-(-n // s), X.shape[1]) and B.dtype == X.dtype
    if n % s == 0 and X.dtype == torch.float32:  # buckets of s: sum preserved up to rounding
        assert np.allclose(B.double().numpy().sum(0) * s, X.double().numpy().sum(0),
                           rtol=1e-5, atol=1e-5 * n)  # fmt: skip


# ---- batched clients' server ops -----------------------------------------------------------------


@given(data=st.data())
def test_weighted_sum_property(backend, data):
    from fedkern.ops import clients as ops

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    c = data.draw(st.sampled_from([1, 2, 3, 7, 64, 65]))
    p = data.draw(st.sampled_from([1, 31, 257]))
    X = torch.from_numpy(rng.standard_normal((c, p)).astype(F32))
    w = torch.from_numpy(rng.standard_normal(c))
    acc = np.zeros(p)
    for r in range(c):  # float64, in row order, rounded once
        acc = acc + w[r].item() * X[r].double().numpy()
    assert exact(ops.weighted_sum(X, w), acc.astype(F32))
