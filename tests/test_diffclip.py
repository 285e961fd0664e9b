"""The diffclip family through fedkern.robust.diff_compress_clip (difference -> top-k / rand-k /
dense -> clipping) against independent float64 NumPy oracles, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPES, backend_fixture, interpreted, oracle_topk, same_bits
from test_rowops import assert_close, np64, oracle_clip, sizes, stack

import fedkern
from fedkern import robust as R
from fedkern.compress import RandK, TopK
from fedkern.ops.diffclip import IMPLS
from fedkern.random import client_seed

backend = backend_fixture(IMPLS)


def diffs(n, d, dtype, gen):
    g_new, g_old = stack(n, d, dtype, gen), stack(n, d, dtype, gen)
    return g_new, g_old, (g_new.float() - g_old.float()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_compress_clip_topk(backend, dtype, gen):
    for n, d in sizes(backend):
        g_new, g_old, diff = diffs(n, d, dtype, gen)
        k = max(1, d // 10)
        c = torch.rand(n, generator=gen, dtype=torch.float64) * math.sqrt(k) + 0.05
        values, indices = R.diff_compress_clip(g_new, g_old, TopK(k), c)
        assert values.shape == indices.shape == (n, k) and values.dtype == dtype
        for i in range(n):
            assert torch.equal(indices[i], oracle_topk(diff[i], k))
        kept = np.take_along_axis(np64(diff), indices.numpy(), 1)
        assert_close(values, oracle_clip(kept, c.numpy())[0], dtype, rtol_ulps=4, scale=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_diff_compress_clip_randk(backend, dtype, unbiased, gen):
    for n, d in sizes(backend):
        g_new, g_old, diff = diffs(n, d, dtype, gen)
        comp = RandK(ratio=0.3, seed=11, unbiased=unbiased)
        k = comp.k_for(d)
        clients = [5 * i + 2 for i in range(n)]
        values, indices = R.diff_compress_clip(g_new, g_old, comp, 0.5, clients=clients, step=4)
        assert comp.step == 0  # an explicit step does not advance the counter
        scale = d / k if unbiased else 1.0
        for i in range(n):
            with fedkern.backend("reference"):
                _, want_idx = fedkern.randk_compress(diff[i], k, seed=client_seed(11, clients[i]),
                                                     step=4, unbiased=unbiased)  # fmt: skip
            assert torch.equal(indices[i], want_idx)
        kept = np.take_along_axis(np64(diff), indices.numpy(), 1) * np.float32(scale)
        assert_close(values, oracle_clip(kept, np.full(n, 0.5))[0], dtype, rtol_ulps=6, scale=0)
        R.diff_compress_clip(g_new, g_old, comp)
        assert comp.step == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_compress_clip_dense(backend, dtype, gen):
    for n, d in sizes(backend):
        g_new, g_old, diff = diffs(n, d, dtype, gen)
        out = R.diff_compress_clip(g_new, g_old, None, 1.5)
        assert_close(out, oracle_clip(np64(diff), np.full(n, 1.5))[0], dtype, rtol_ulps=4, scale=0)
        assert same_bits(R.diff_compress_clip(g_new, g_old), diff)  # no bound: the difference


def test_backends_agree(backend, gen):
    """Same input, this backend vs the reference: the selection bit for bit."""
    n, d = (7, 150) if interpreted(backend) else (33, 3000)
    X = torch.randn(n, d, generator=gen)
    g_old = torch.randn(n, d, generator=gen)
    with fedkern.backend("reference"):
        ref = R.diff_compress_clip(X, g_old, TopK(9), 1.0)[1]
    assert torch.equal(R.diff_compress_clip(X, g_old, TopK(9), 1.0)[1], ref)


X0 = torch.randn(6, 10)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: R.diff_compress_clip(X0, X0.bfloat16()), TypeError, "G_old must have"),
        (lambda: R.diff_compress_clip(X0, X0[:5]), ValueError, "G_old must have"),
        (lambda: R.diff_compress_clip(X0, X0, "topk"), TypeError, "compressor must be"),
        (lambda: R.diff_compress_clip(X0, X0, TopK(3), math.nan), ValueError, "max_norm"),
        (lambda: R.diff_compress_clip(X0, X0, RandK(2), clients=[1, 2]), ValueError, "clients"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_opcheck(gen):
    X = torch.randn(5, 12, generator=gen)
    mn = torch.full((5,), 1.0, dtype=torch.float64)
    ops = torch.ops.fedkern
    torch.library.opcheck(ops.diff_topk_clip.default, (X, X.flip(0), 3, mn))
    torch.library.opcheck(ops.diff_clip.default, (X, X.flip(0), mn))
