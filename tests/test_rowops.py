"""The rowops family through fedkern.robust (bucketing, geometric median, centered clipping,
row clipping; gather-mean underneath) against independent float64 NumPy oracles, on every backend;
also what fedkern.robust promises across rules (lists of rows, Aggregator arguments, nothing
modified on error). Krum and NNM: test_gram.py; diff_compress_clip: test_diffclip.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPES, EPS, backend_fixture, device_for, interpreted, same_bits

import fedkern
from fedkern import robust as R
from fedkern.ops.rowops import IMPLS
from fedkern.random import permutation

backend = backend_fixture(IMPLS)


def stack(n, d, dtype, gen, scale=1.0):
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)


def sizes(backend):
    """(n, d) cases: small ones in Triton's interpreter."""
    if interpreted(backend):
        return [(1, 5), (3, 17), (7, 130)]
    return [(1, 1), (2, 7), (5, 33), (16, 1000), (37, 4099)]


def np64(x):
    return x.double().cpu().numpy()


def assert_close(actual, expected, dtype, rtol_ulps=8, scale=1.0):
    eps = EPS[dtype]
    np.testing.assert_allclose(actual.double().cpu().numpy(), expected, equal_nan=True,
                               rtol=rtol_ulps * eps, atol=rtol_ulps * eps * scale)  # fmt: skip


# ---- bucketing --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_bucketing(backend, dtype, gen):
    for n, d in sizes(backend):
        X = stack(n, d, dtype, gen)
        for s in sorted({1, 2, 3, n, n + 2}):
            perm = permutation(n, 7, 3)
            a = np64(X)[perm]
            want = np.stack([a[i : i + s].mean(0) for i in range(0, n, s)])
            got = R.bucketing(X, s, seed=7, step=3)
            assert got.shape == (math.ceil(n / s), d) and got.dtype == dtype
            assert_close(got, want, dtype)
    if n > 2:
        assert not torch.equal(R.bucketing(X, 1, seed=7, step=3), R.bucketing(X, 1, seed=7, step=4))


# ---- geometric median and centered clipping ------------------------------------------------------


def oracle_geometric_median(a, z, iters, nu):
    good = np.isfinite(a).all(1)
    for _ in range(iters):
        r = np.sqrt(((a[good] - z) ** 2).sum(1))
        w = 1 / np.maximum(r, nu)
        z = (w[:, None] * a[good]).sum(0) / w.sum()
    return z


def oracle_cclip(a, v, iters, tau):
    n = a.shape[0]
    good = np.isfinite(a).all(1)
    for _ in range(iters):
        u = a[good] - v
        r = np.sqrt((u * u).sum(1))
        s = np.where(r > 0, np.minimum(1, tau / np.where(r > 0, r, 1)), 1)
        v = v + (s[:, None] * u).sum(0) / n
    return v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", [None, "mean", "median", "tensor"])
def test_geometric_median(backend, dtype, init, gen):
    for n, d in sizes(backend):
        X = stack(n, d, dtype, gen, scale=3.0)
        start = torch.randn(d, generator=gen) if init == "tensor" else init
        z0 = {None: np.zeros(d), "mean": np64(X).mean(0), "tensor": None}.get(init)
        if init == "median":
            z0 = np.median(np64(X), axis=0)
        if init == "tensor":
            z0 = start.double().numpy()
        for iters, nu in [(0, 0.1), (1, 0.1), (8, 0.1), (5, 1e-6)]:
            want = oracle_geometric_median(np64(X), z0, iters, nu)
            got = R.geometric_median(X, iters=iters, nu=nu, init=start)
            # z is rounded to float32 after every step; the map is contractive near the median
            assert_close(got, want, dtype, rtol_ulps=64 if dtype == torch.float32 else 4, scale=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_centered_clip(backend, dtype, gen):
    for n, d in sizes(backend):
        X = stack(n, d, dtype, gen, scale=2.0)
        cases = [(0, 1.0, None), (1, 0.5, None), (3, 2.0, "mean"), (5, 1e3, None)]
        for iters, tau, center in cases:
            v0 = np.zeros(d) if center is None else np64(X).mean(0)
            want = oracle_cclip(np64(X), v0, iters, tau)
            got = R.centered_clip(X, tau=tau, iters=iters, center=center)
            assert_close(got, want, dtype, rtol_ulps=32 if dtype == torch.float32 else 4, scale=2)


def test_iterative_aggregators_ignore_bad_rows_and_stay_bounded(backend, gen):
    n, d = 9, 40 if interpreted(backend) else 2000
    X = torch.randn(n, d, generator=gen)
    X[2, 5] = float("nan")
    X[6] = float("inf")
    gm = R.geometric_median(X, iters=10)
    good = X[[i for i in range(n) if i not in (2, 6)]]
    assert torch.isfinite(gm).all()
    assert bool((gm >= good.min(0).values - 1e-6).all() and (gm <= good.max(0).values + 1e-6).all())
    want = oracle_geometric_median(np64(X), np.zeros(d), 10, 0.1)
    assert_close(gm, want, torch.float32, rtol_ulps=64, scale=1)
    v0 = torch.randn(d, generator=gen)
    cc = R.centered_clip(X, tau=0.3, iters=4, center=v0)
    assert torch.isfinite(cc).all()
    assert float((cc - v0).norm()) <= 4 * 0.3 * (1 + 1e-5)  # each step moves at most tau
    assert torch.isnan(R.geometric_median(torch.full((3, d), float("nan")), iters=2)).all()


def test_identical_honest_rows(backend, gen):
    """n - f identical honest rows and f arbitrary rows: the aggregators that promise it return the
    honest vector (median and Krum exactly, the trimmed mean to rounding) or get close (geometric
    median)."""
    n, f, d = 9, 3, 50 if interpreted(backend) else 5000
    honest = torch.randn(d, generator=gen)
    X = honest.expand(n, d).clone()
    X[[0, 4, 8]] = torch.randn(f, d, generator=gen) * 1e4
    assert same_bits(R.coordinate_median(X), honest)
    tight = {"rtol": 4 * EPS[torch.float32], "atol": 0.0}  # an average of equal copies
    torch.testing.assert_close(R.trimmed_mean(X, f), honest, **tight)
    assert same_bits(R.krum(X, f), honest)
    gm = R.geometric_median(X, iters=50, nu=1e-8, init="median")
    assert float((gm - honest).norm()) <= 1e-3 * float(honest.norm())


# ---- clipping -----------------------------------------------------------------------------------


def oracle_clip(a, c):
    norms = np.sqrt((a * a).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(norms > c, c / norms, 1.0)
    out = a * s[:, None]
    out[~np.isfinite(norms)] = 0.0
    return out, norms


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_rows_(backend, dtype, gen):
    for n, d in sizes(backend):
        X = stack(n, d, dtype, gen, scale=2.0)
        if n > 2:
            X[1, 0] = float("nan")
        c = torch.rand(n, generator=gen, dtype=torch.float64) * 2 * math.sqrt(d) + 0.1
        want, norms = oracle_clip(np64(X), c.numpy())
        before = X.clone()
        assert R.clip_rows_(X, c) is X
        assert_close(X, want, dtype, rtol_ulps=4, scale=0)
        inside = norms <= c.numpy()
        assert same_bits(X[torch.from_numpy(inside)], before[torch.from_numpy(inside)])
        Y = before.clone()
        R.clip_rows_(Y, 1.0)  # a float bound
        assert_close(Y, oracle_clip(np64(before), np.ones(n))[0], dtype, rtol_ulps=4, scale=0)


def test_backends_agree(backend, gen):
    """This backend vs the reference: averages to rounding; run to run: the same bytes."""
    n, d = (7, 150) if interpreted(backend) else (33, 3000)
    X = torch.randn(n, d, generator=gen)
    with fedkern.backend("reference"):
        ref = [R.geometric_median(X), R.centered_clip(X, tau=1.0)]
    for got, want in zip([R.geometric_median(X), R.centered_clip(X, tau=1.0)], ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    again = R.geometric_median(X)
    assert same_bits(again, R.geometric_median(X))  # run to run: the same bytes


# ---- bad input ----------------------------------------------------------------------------------

X0 = torch.randn(6, 10)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: R.bucketing(X0, 0, seed=1), ValueError, "s must be"),
        (lambda: R.bucketing(X0, 2, seed=-1), ValueError, "seed"),
        (lambda: R.geometric_median(X0, nu=0.0), ValueError, "nu must be > 0"),
        (lambda: R.geometric_median(X0, nu=math.nan), ValueError, "nu must be finite"),
        (lambda: R.geometric_median(X0, iters=-1), ValueError, "iters"),
        (lambda: R.geometric_median(X0, init="mode"), ValueError, "init must be"),
        (lambda: R.geometric_median(X0, init=torch.zeros(9)), ValueError, "init must have"),
        (lambda: R.centered_clip(X0, tau=math.inf), ValueError, "tau must be finite"),
        (lambda: R.centered_clip(X0, tau=-1.0), ValueError, "tau must be > 0"),
        (lambda: R.clip_rows_(X0.clone(), math.inf), ValueError, "max_norm must be finite"),
        (lambda: R.clip_rows_(X0.clone(), torch.ones(5)), ValueError, "max_norm must be"),
        (lambda: R.clip_rows_(X0.clone(), 0.0), ValueError, "max_norm must be finite and > 0"),
        (lambda: R.clip_rows_(X0.double(), 1.0), TypeError, "float32 or bfloat16"),
        (lambda: R.krum([], 0), ValueError, "at least one row"),
        (lambda: R.coordinate_median([X0[0], X0[1].double()]), TypeError, "X\\[1\\] must have"),
        (lambda: R.krum([X0[0], X0[1, :5]], 0), ValueError, "X\\[1\\] must have X\\[0\\]'s shape"),
        (lambda: R.nnm([X0[0], X0[1].to("meta")], 0), ValueError, "X\\[1\\] must be on"),
        (lambda: R.geometric_median([X0]), ValueError, "X\\[0\\] must be a 1-D"),
        (lambda: R.Aggregator("mode"), ValueError, "rule must be one of"),
        (lambda: R.Aggregator("krum", pre="sort"), ValueError, "pre must be"),
        (lambda: R.Aggregator("krum", tau=1.0), TypeError, "takes no option tau"),
        (lambda: R.Aggregator("centered_clip"), TypeError, "needs the option tau"),
        (lambda: R.Aggregator("trimmed_mean", 2, pre="bucketing")(X0), ValueError, "2\\*f < n"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_list_of_rows_is_a_stack(gen):
    rows = list(torch.randn(9, 40, generator=gen))
    X = torch.stack(rows)
    assert torch.equal(R.coordinate_median(rows), R.coordinate_median(X))
    assert torch.equal(R.krum(tuple(rows), 2), R.krum(X, 2))
    assert torch.equal(R.geometric_median(rows), R.geometric_median(X))
    assert torch.equal(
        R.Aggregator("trimmed_mean", 2, pre="nnm")(rows), R.trimmed_mean(R.nnm(X, 2), 2)
    )


def test_nothing_modified_on_error():
    X = torch.randn(4, 8)
    before = X.clone()
    with pytest.raises(ValueError):
        R.clip_rows_(X, torch.tensor([1.0, 1.0, -1.0, 1.0]))
    assert torch.equal(X, before)


def test_opcheck(gen):
    X = torch.randn(5, 12, generator=gen)
    idx = torch.tensor([[0, 2, -1], [4, 1, 3]])
    mn = torch.full((5,), 1.0, dtype=torch.float64)
    ops = torch.ops.fedkern
    torch.library.opcheck(ops.gather_mean.default, (X, idx))
    torch.library.opcheck(ops.geometric_median.default, (X, torch.zeros(12), 3, 0.1))
    torch.library.opcheck(ops.centered_clip.default, (X, torch.zeros(12), 3, 0.5))
    torch.library.opcheck(ops.clip_rows_.default, (X.clone(), mn))


def test_no_host_reads_on_the_hot_path(backend, gen, host_reads):
    """clip_rows_ with a float bound, Krum and Multi-Krum read no tensor value on the host (on
    CUDA each read is a synchronization): the float is checked on the host and the selection's
    rows go to gather_mean with check_indices=False. Controls in the same test: a tensor bound is
    read once, and gather_mean's default index check reads."""
    from fedkern.ops import rowops as ops

    dev = device_for(backend)
    X = stack(9, 40, torch.float32, gen).to(dev)
    idx = torch.tensor([[0, 3, 5], [2, 7, -1]], device=dev)
    reads = {}
    for name, call in {
        "clip float": lambda: R.clip_rows_(X.clone(), 1.5),
        "krum": lambda: R.krum(X, 2),
        "multi-krum": lambda: R.krum(X, 2, 3),
        "gather unchecked": lambda: ops.gather_mean(X, idx, False),
        "control: clip tensor": lambda: R.clip_rows_(X.clone(), torch.full((9,), 1.5)),
        "control: gather checked": lambda: ops.gather_mean(X, idx),
    }.items():
        before = host_reads()
        call()
        reads[name] = host_reads() - before
    assert reads.pop("control: clip tensor") == 1 and reads.pop("control: gather checked") > 0
    assert reads == dict.fromkeys(reads, 0), reads
    # same results with and without the index check; bad bounds still raise, naming the argument
    assert same_bits(ops.gather_mean(X, idx, False), ops.gather_mean(X, idx))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_norm must be finite and > 0"):
            R.clip_rows_(X.clone(), bad)
