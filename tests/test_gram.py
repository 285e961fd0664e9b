"""The gram family through fedkern.robust (Krum, Multi-Krum, NNM: distances from the fp64 Gram
matrix, averages by gather-mean) against independent float64 NumPy oracles, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DTYPES, EPS, backend_fixture, interpreted, same_bits
from test_rowops import assert_close, np64, sizes, stack

import fedkern
from fedkern import robust as R
from fedkern.ops import gram, rowops

backend = backend_fixture({**gram.IMPLS, **rowops.IMPLS})


def sqdist64(a):
    return ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)


# ---- Krum ---------------------------------------------------------------------------------------


def oracle_krum_order(a, f):
    n = a.shape[0]
    D = sqdist64(a)
    np.fill_diagonal(D, np.inf)
    scores = np.sort(D, axis=1)[:, : n - f - 2].sum(1)
    return np.lexsort((np.arange(n), scores)), scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_krum(backend, dtype, gen):
    for n, d in sizes(backend):
        if n < 4:
            continue
        X = stack(n, d, dtype, gen)
        for f in range(0, (n - 3) // 2 + 1):
            order, scores = oracle_krum_order(np64(X), f)
            got = R.krum(X, f)
            margin = np.sort(scores)[1] - np.sort(scores)[0]
            if margin > 1e-9 * scores.max():  # no near-tie: the same row, bit for bit
                assert same_bits(got, X[order[0]])
            m = n - f
            assert_close(R.krum(X, f, m=m), np64(X)[np.sort(order[:m])].mean(0), dtype)


def test_krum_honest_majority_wins(backend, gen):
    n, f, d = 11, 4, 64 if interpreted(backend) else 3000
    honest = torch.randn(d, generator=gen)
    X = honest.expand(n, d).clone()
    X[[1, 4, 7, 9]] = torch.randn(f, d, generator=gen) * 100  # arbitrary Byzantine rows
    X[4, 3] = float("nan")
    X[9] = float("inf")
    assert same_bits(R.krum(X, f), honest)
    # Multi-Krum averages the 7 honest copies: sum 7x / 7 is x up to float32 rounding
    torch.testing.assert_close(R.krum(X, f, m=n - f), honest, rtol=4 * EPS[torch.float32], atol=0)


# ---- NNM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nnm(backend, dtype, gen):
    for n, d in sizes(backend):
        X = stack(n, d, dtype, gen)
        a = np64(X)
        for f in sorted({0, n // 3, n - 1}):
            D = sqdist64(a)
            np.fill_diagonal(D, -1.0)
            near = np.argsort(D, axis=1, kind="stable")[:, : n - f]
            want = np.stack([a[np.sort(r)].mean(0) for r in near])
            assert_close(R.nnm(X, f), want, dtype)


def test_backends_agree(backend, gen):
    """Same input, this backend vs the reference: Krum's choice bit for bit, NNM to rounding."""
    n, d = (7, 150) if interpreted(backend) else (33, 3000)
    X = torch.randn(n, d, generator=gen)
    with fedkern.backend("reference"):
        ref = [R.krum(X, 2), R.nnm(X, 2)]
    assert same_bits(R.krum(X, 2), ref[0])
    torch.testing.assert_close(R.nnm(X, 2), ref[1], rtol=1e-5, atol=1e-6)


X0 = torch.randn(6, 10)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: R.krum(X0, 2), ValueError, "n > 2\\*f \\+ 2"),
        (lambda: R.krum(X0, -1), ValueError, "f must be"),
        (lambda: R.krum(X0, 1, m=7), ValueError, "m must be"),
        (lambda: R.krum(torch.randn(0, 4), 0), ValueError, "at least one row"),
        (lambda: R.krum(torch.randn(5, 0), 0), ValueError, "must not be empty"),
        (lambda: R.nnm(X0, 6), ValueError, "f must be"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_opcheck(gen):
    X = torch.randn(5, 12, generator=gen)
    torch.library.opcheck(torch.ops.fedkern.gram.default, (X,))
