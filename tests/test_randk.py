"""randk_compress, ef14_randk_, ef21_randk_ and the counter-based generator behind them."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import (
    DTYPES,
    backend_fixture,
    close64,
    device_for,
    interpreted,
    np_exact,
    np_round,
    np_values,
    rand,
    same_bits,
)

import fedkern
from fedkern.ops.randk import IMPLS
from fedkern.random import feistel_params, philox4x32, randk_keys
from fedkern.reference.randk import feistel

SIZES = [1, 2, 7, 1000, 4099, 100_003]

# No CUDA C++ kernel for this family: on a GPU its kernels are Triton's.
backend = backend_fixture(IMPLS)


def sizes(backend):
    return [n for n in SIZES if not interpreted(backend) or n <= 5000]


def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 (Random123 distribution, kat_vectors).
    assert philox4x32((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32((2**32 - 1,) * 4, (2**32 - 1,) * 2) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD,
    )  # fmt: skip
    assert philox4x32(
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
    ) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_randk_compress(backend, dtype, unbiased, gen):
    dev = device_for(backend)
    for n in sizes(backend):
        x = rand(n, dtype, gen, dev, "special")
        x0 = x.clone()
        for k in sorted({1, max(1, n // 50), n}):
            values, indices = fedkern.randk_compress(x, k, seed=n + k, step=3, unbiased=unbiased)
            assert indices.dtype == torch.int64 and indices.shape == (k,)
            assert bool((indices.diff() > 0).all()) and 0 <= int(indices[0])
            assert int(indices[-1]) < n
            expect = x.double()[indices] * (n / k if unbiased else 1.0)
            close64(values, expect, dtype)
            if not unbiased:
                assert same_bits(values, x[indices])
        assert same_bits(x, x0)


def test_randk_same_mask_on_every_backend(backend):
    """The index set is a function of (seed, step, numel, k) only: the reference's, bit for bit."""
    dev = device_for(backend)
    cases = [(1, 1), (2, 1), (5, 5), (1000, 10), (4099, 4000), (2**12 + 1, 77)]
    if not interpreted(backend):
        cases += [(10**6, 10**4), (2**31 + 5, 1000)]
    for (n, k), seed, step in itertools.product(cases, (0, 12345, 2**63 - 1), (0, 9)):
        keys = randk_keys(seed, step)
        want = fedkern.reference.randk.randk_indices(n, k, keys)
        if n < 2**24:
            got = fedkern.randk_compress(torch.zeros(n, device=dev), k, seed=seed, step=step)[1]
        elif backend == "cpu":  # the index generator alone: no need for a 2**31-element tensor
            got = torch.empty(k, dtype=torch.int64)
            fedkern._C.randk_indices(n, k, list(keys), got.data_ptr())
        elif backend == "triton":
            got = fedkern.kernels.randk.randk_indices(n, k, keys, dev)
        else:
            continue
        assert torch.equal(got.cpu(), want), (n, k, seed, step)


def test_randk_masks_change_with_seed_and_step():
    x = torch.zeros(10_000)
    a = fedkern.randk_compress(x, 100, seed=1, step=0)[1]
    assert not torch.equal(a, fedkern.randk_compress(x, 100, seed=1, step=1)[1])
    assert not torch.equal(a, fedkern.randk_compress(x, 100, seed=2, step=0)[1])
    assert torch.equal(a, fedkern.randk_compress(x, 100, seed=1, step=0)[1])


def _chi2_pvalue(stat: float, dof: int) -> float:
    # Wilson-Hilferty normal approximation of the chi-square upper tail.
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("n,k", [(6, 2), (5, 3), (10, 1), (40, 3)])
def test_randk_subsets_are_uniform(n, k):
    """Chi-square over all k-subsets (or over coordinates) across consecutive seeds."""
    trials = 6000
    # the reference generator, vectorised over seeds: one column of round keys per seed
    keys = torch.tensor([randk_keys(seed, 7) for seed in range(trials)], dtype=torch.int64)
    h, mask = feistel_params(n)
    cols = [keys[:, r : r + 1] for r in range(8)]
    x = feistel(torch.arange(k).expand(trials, k), cols, h, mask)
    while bool((x >= n).any()):
        x = torch.where(x >= n, feistel(x, cols, h, mask), x)
    counts = Counter(tuple(row) for row in torch.sort(x).values.tolist())
    cells = list(itertools.combinations(range(n), k)) if math.comb(n, k) <= 200 else None
    if cells is None:
        per_coord = Counter(i for subset, c in counts.items() for i in subset for _ in range(c))
        obs, expected = [per_coord[i] for i in range(n)], trials * k / n
    else:
        obs, expected = [counts[c] for c in cells], trials / len(cells)
    stat = sum((o - expected) ** 2 / expected for o in obs)
    assert _chi2_pvalue(stat, len(obs) - 1) > 1e-4, (stat, len(obs) - 1)


def test_randk_unbiased_in_expectation():
    x = torch.randn(50, dtype=torch.float64).float()
    acc = torch.zeros(50, dtype=torch.float64)
    trials = 4000
    for step in range(trials):
        values, indices = fedkern.randk_compress(x, 5, seed=11, step=step)
        acc[indices] += values.double()
    # each coordinate is an average of 4000 draws of 10 x_j * Bernoulli(0.1): sd = 3 |x_j| / 63
    assert bool(((acc / trials - x.double()).abs() <= 5 * 3 * x.double().abs() / 63 + 1e-9).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [False, True])
def test_ef14_randk(backend, dtype, unbiased, gen):
    dev = device_for(backend)
    for n in sizes(backend):
        g, e = rand(n, dtype, gen, dev), rand(n, dtype, gen, dev)
        g0, e0 = g.clone(), e.clone()
        k = max(1, n // 10)
        values, indices = fedkern.ef14_randk_(g, e, k, seed=5, step=n, lr=0.25, unbiased=unbiased)
        assert torch.equal(
            indices.cpu(), fedkern.reference.randk.randk_indices(n, k, randk_keys(5, n))
        )
        a64 = e0.double() + 0.25 * g0.double()
        scale = float(e0.double().abs().max() + g0.double().abs().max()) * (n / k)
        close64(values, a64[indices] * (n / k if unbiased else 1.0), dtype, scale)
        recon = fedkern.sparse_add_(e.clone(), values, indices)
        close64(recon, a64, dtype, scale)
        assert same_bits(g, g0)
        if not unbiased:
            assert bool((e[indices] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [False, True])
def test_ef21_randk(backend, dtype, unbiased, gen):
    dev = device_for(backend)
    for n in sizes(backend):
        g, s = rand(n, dtype, gen, dev), rand(n, dtype, gen, dev)
        g0, s0 = g.clone(), s.clone()
        k = max(1, n // 10)
        values, indices = fedkern.ef21_randk_(g, s, k, seed=8, step=1, unbiased=unbiased)
        factor = n / k if unbiased else 1.0
        scale = float(g0.double().abs().max() + s0.double().abs().max()) * factor
        d64 = (g0.double() - s0.double())[indices]
        close64(values, d64 * factor, dtype, scale)
        close64(s[indices], s0.double()[indices] + values.double(), dtype, scale)
        rest = torch.ones(n, dtype=torch.bool, device=dev)
        rest[indices] = False
        assert same_bits(s[rest], s0[rest]) and same_bits(g, g0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_randk_backends_agree_bit_for_bit(backend, dtype, gen):
    """Every backend (the reference included) returns exactly what the NumPy float32 oracle over
    the pure-Python Feistel permutation (tests/test_properties.py) computes."""
    from test_properties import randk_oracle

    dev = device_for(backend)
    n = 3001 if interpreted(backend) else 50_001
    x, g, e = (rand(n, dtype, gen, dev, "special") for _ in range(3))
    xn, gn, en = np_values(x), np_values(g), np_values(e)
    idx = randk_oracle(n, 41, 3, 2)
    scale = np.float32(n / 41)
    v, i = fedkern.randk_compress(x, 41, seed=3, step=2)
    assert np.array_equal(i.cpu().numpy(), idx) and np_exact(v, np_round(xn[idx] * scale, dtype))
    e1, s1 = e.clone(), e.clone()
    v, i = fedkern.ef14_randk_(g, e1, 41, seed=3, step=2, lr=0.7, unbiased=True)
    a = np_round(en + (np.float32(0.7) * gn).astype(np.float32), dtype)
    c = np_round(a[idx] * scale, dtype)
    a[idx] = np_round(a[idx] - c, dtype)
    assert np.array_equal(i.cpu().numpy(), idx) and np_exact(v, c) and np_exact(e1, a)
    v, i = fedkern.ef21_randk_(g, s1, 41, seed=3, step=2, unbiased=True)
    c = np_round(np_round(gn[idx] - en[idx], dtype) * scale, dtype)
    sn = en.copy()
    sn[idx] = np_round(sn[idx] + c, dtype)
    assert np.array_equal(i.cpu().numpy(), idx) and np_exact(v, c) and np_exact(s1, sn)


def test_opcheck(backend, gen):
    dev = device_for(backend)
    x = rand(300, torch.float32, gen, dev)
    torch.library.opcheck(torch.ops.fedkern.randk_compress.default, (x, 7, 1, 2, True))
    torch.library.opcheck(
        torch.ops.fedkern.ef14_randk_.default, (x, x.clone(), 7, 1, 2, 0.5, False)
    )
    torch.library.opcheck(torch.ops.fedkern.ef21_randk_.default, (x, x.clone(), 7, 1, 2, True))


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"seed": -1}, ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": np.int64(3), "step": -2}, ValueError, "step must be an int"),
        ({"seed": 1, "unbiased": 1}, TypeError, "unbiased must be a bool"),
        ({"seed": 1, "k": 0}, ValueError, "k must be in"),
        ({"seed": 1, "k": 11}, ValueError, "k must be in"),
    ],
)
def test_randk_bad_input(kwargs, exc, msg):
    kwargs = {"k": 3, **kwargs}
    k = kwargs.pop("k")
    with pytest.raises(exc, match=msg):
        fedkern.randk_compress(torch.randn(10), k, **kwargs)
    e = torch.randn(10)
    e0 = e.clone()
    kwargs.setdefault("unbiased", False)
    for op in (fedkern.ef14_randk_, fedkern.ef21_randk_):
        with pytest.raises(exc, match=msg):
            op(torch.randn(10), e, k, **kwargs)
    assert same_bits(e, e0)


def test_randk_requires_seed():
    with pytest.raises(TypeError, match="seed"):
        fedkern.randk_compress(torch.randn(10), 3)


@pytest.mark.parametrize("unbiased", [True, False])
def test_randk_compress_backward(backend, unbiased, gen):
    dev = device_for(backend)
    x = rand(50, torch.float32, gen, dev).requires_grad_()
    values, indices = fedkern.randk_compress(x, 5, seed=2, step=0, unbiased=unbiased)
    values.sum().backward()
    expect = torch.zeros(50, dtype=torch.float64)
    expect[indices.cpu()] = 10.0 if unbiased else 1.0
    close64(x.grad, expect, torch.float32)
    torch.library.opcheck(torch.ops.fedkern.randk_compress.default, (x, 5, 2, 0, unbiased))
