"""fedkern.random.gaussian / bernoulli: counter-based draws, the same bits on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import backend_fixture, device_for, fresh_seed, interpreted, same_bits

import fedkern
from fedkern.ops import random as ops
from fedkern.ops.random import IMPLS
from fedkern.random import (
    STREAM_BERNOULLI,
    STREAM_GAUSSIAN,
    bernoulli,
    draw_key,
    draw_keys_tensor,
    gaussian,
    philox4x32,
)
from fedkern.reference import random as ref

backend = backend_fixture(IMPLS)


def sizes(backend):
    return [1, 3, 4, 5, 257, 1000] if interpreted(backend) else [1, 3, 4, 5, 257, 20_011]


def native(backend):
    """The bit-equality tests compare a native backend with the reference; the reference itself is
    checked against the scalar Philox and float64 math below."""
    if backend == "reference":
        pytest.skip("the reference is what the native backends are compared with")


def _reference(fn):
    with fedkern.backend("reference"):
        return fn()


def test_gaussian_same_bits_as_reference(backend):
    native(backend)
    dev = device_for(backend)
    seed = fresh_seed("gaussian seed")
    for n in sizes(backend):
        for step in (0, 2**63 - 1):
            for std in (1.0, 0.37):
                got = gaussian((n,), seed=seed, step=step, device=dev, std=std)
                want = _reference(lambda n=n, s=step, std=std: gaussian((n,), seed=seed, step=s,
                                                                        std=std))  # fmt: skip
                assert got.dtype == torch.float32 and got.shape == (n,)
                assert same_bits(got.cpu(), want)
    got = gaussian((3, 5), seed=seed, dtype=torch.bfloat16, device=dev)
    want = _reference(lambda: gaussian((15,), seed=seed)).to(torch.bfloat16).view(3, 5)
    assert same_bits(got.cpu(), want)


def test_bernoulli_same_bits_as_reference(backend, gen):
    native(backend)
    dev = device_for(backend)
    seed = fresh_seed("bernoulli seed")
    for n in sizes(backend):
        for p in (1.0, 0.5, 0.013, 2.0**-30):
            got = bernoulli((n,), p, seed=seed, step=3, device=dev)
            want = _reference(lambda n=n, p=p: bernoulli((n,), p, seed=seed, step=3))
            assert got.dtype == torch.bool and torch.equal(got.cpu(), want)
        probs = torch.rand(n, generator=gen).clamp_min(1e-6)
        got = bernoulli((n,), probs.to(dev), seed=seed, step=1)
        want = _reference(lambda n=n, probs=probs: bernoulli((n,), probs, seed=seed, step=1))
        assert torch.equal(got.cpu(), want)


def _oracle_words(n, key):
    """Philox words of entries 0..n-1 from the scalar Philox (independent of the tensor form)."""
    out = []
    for g in range((n + 3) // 4):
        out += philox4x32((g & 0xFFFFFFFF, g >> 32, key[2], key[3]), (key[0], key[1]))
    return np.array(out[:n], dtype=np.uint64)


def test_gaussian_is_box_muller_of_the_philox_words():
    """Against float64 math: u, the angle and R from the words, then R cos / R sin; fedkern's fp32
    log / sin / cos are within a few fp32 ulps of the exact values."""
    seed, step = fresh_seed("box-muller seed"), 11
    n = 4001
    key = draw_key(seed, step, stream=STREAM_GAUSSIAN)
    w = _oracle_words(n + 3, key)[: 4 * ((n + 3) // 4)].reshape(-1, 2, 2)
    a, b = w[..., 0].astype(np.float64), w[..., 1].astype(np.float64)
    u = (np.floor(a / 256) + 1) * 2.0**-24
    theta = 2 * np.pi * np.floor(b / 256) * 2.0**-24
    R = np.sqrt(-2 * np.log(u))
    exact = np.stack([R * np.cos(theta), R * np.sin(theta)], -1).reshape(-1)[:n]
    got = gaussian((n,), seed=seed, step=step).double().numpy()
    err = np.abs(got - exact)
    assert err.max() <= 1e-5 * max(1.0, np.abs(exact).max())
    assert np.median(err / np.maximum(np.abs(exact), 1e-3)) < 2e-7


def test_gaussian_moments_and_tail():
    """N(0, 1) statistics over 400k draws; bounds at > 8 standard errors (failure rate < 1e-12)."""
    n = 400_000
    z = gaussian((n,), seed=fresh_seed("moments seed"), step=0).double()
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 8 * se
    assert abs(float(z.var()) - 1) < 8 * math.sqrt(2) * se
    assert abs(float((z**3).mean())) < 8 * math.sqrt(15) * se
    assert abs(float((z**4).mean()) - 3) < 8 * math.sqrt(96) * se
    # every quantile of the empirical CDF within the Kolmogorov-Smirnov bound for p = 1e-12
    zs = torch.sort(z).values.numpy()
    cdf = 0.5 * (1 + np.vectorize(math.erf)(zs[:: n // 2000] / math.sqrt(2)))
    emp = (np.arange(0, n, n // 2000) + 0.5) / n
    assert np.abs(cdf - emp).max() < math.sqrt(math.log(2 / 1e-12) / (2 * n)) + 1 / n
    assert float(z.abs().max()) <= math.sqrt(48 * math.log(2)) + 1e-6  # the 24-bit radius cap


def test_gaussian_prefix_and_shape_independence():
    seed = fresh_seed()
    long = gaussian((1000,), seed=seed, step=2)
    assert torch.equal(gaussian((13,), seed=seed, step=2), long[:13])
    assert torch.equal(gaussian((10, 100), seed=seed, step=2).reshape(-1), long)
    assert torch.equal(gaussian((7,), seed=seed, step=2, dtype=torch.float64), long[:7].double())
    other = gaussian((1000,), seed=seed, step=3)
    assert not torch.equal(long, other)
    assert float(torch.corrcoef(torch.stack([long, other]))[0, 1]) < 0.2


def test_bernoulli_keep_probability_is_exact_threshold():
    """P(keep) = ceil(p 2^24) / 2^24 from the words (the scalar Philox oracle), entry by entry."""
    seed = fresh_seed()
    n = 5000
    key = draw_key(seed, 4, stream=STREAM_BERNOULLI)
    c = _oracle_words(n, key) >> np.uint64(8)
    for p in (0.3, 1e-3, 1.0):
        T = math.ceil(np.float32(p) * 2**24)
        assert np.array_equal(bernoulli((n,), p, seed=seed, step=4).numpy(), c < T)
    # the rate over many draws: n * 100 coins, 8 standard errors
    hits = sum(int(bernoulli((n,), 0.1, seed=seed, step=s).sum()) for s in range(100))
    N = n * 100
    assert abs(hits / N - 0.1) < 8 * math.sqrt(0.09 / N)


def test_vectorized_keys_match_scalar():
    seeds = torch.tensor([0, 5, 2**62 + 3])
    steps = torch.tensor([9, 0, 2**40])
    K = draw_keys_tensor(seeds, steps, stream=STREAM_GAUSSIAN)
    for r in range(3):
        assert K[r].tolist() == list(draw_key(int(seeds[r]), int(steps[r]),
                                               stream=STREAM_GAUSSIAN))  # fmt: skip


def test_stream_tags_are_distinct():
    """Every feature has its own Philox stream: the tags of fedkern.random, and the coin /
    geometric / participation offsets that fedkern.sampling adds to STREAM_UNIFORM, are all
    different (two features on one tag draw the same words from one seed)."""
    import fedkern.random as frandom

    tags = {n: getattr(frandom, n) for n in frandom.__all__ if n.startswith("STREAM_")}
    tags |= {f"STREAM_UNIFORM + {k}": frandom.STREAM_UNIFORM + k for k in (1, 2)}
    assert len(tags) >= 15 and len(set(tags.values())) == len(tags), tags
    assert all(0 <= t <= 0xFFFFFFFF for t in tags.values())


def test_opcheck():
    out = torch.empty(37)
    torch.library.opcheck(torch.ops.fedkern.gaussian_fill_, (out, 3, 1, 0.5))
    mask = torch.empty(37, dtype=torch.bool)
    torch.library.opcheck(torch.ops.fedkern.bernoulli_fill_, (mask, 0.25, None, 3, 1))
    torch.library.opcheck(torch.ops.fedkern.bernoulli_fill_, (mask, 1.0, torch.rand(37), 3, 1))


def test_empty_and_zero_size():
    assert gaussian((0,), seed=1).shape == (0,)
    assert bernoulli((2, 0), 0.5, seed=1).shape == (2, 0)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: gaussian((3,), seed=-1), ValueError, "seed"),
        (lambda: gaussian((3,), seed=1.5), TypeError, "seed"),
        (lambda: gaussian((3,), seed=1, step=2**63), ValueError, "step"),
        (lambda: gaussian((-1,), seed=1), ValueError, "shape"),
        (lambda: gaussian("ab", seed=1), TypeError, "shape"),
        (lambda: gaussian((3,), seed=1, dtype=torch.int32), TypeError, "dtype"),
        (lambda: gaussian((3,), seed=1, std=math.nan), ValueError, "std"),
        (lambda: bernoulli((3,), 0.0, seed=1), ValueError, "p"),
        (lambda: bernoulli((3,), 1.5, seed=1), ValueError, "p"),
        (lambda: bernoulli((3,), 1e-50, seed=1), ValueError, "p"),
        (lambda: bernoulli((3,), math.nan, seed=1), ValueError, "p"),
        (lambda: bernoulli((3,), torch.tensor([0.5, 0.0, 1.0]), seed=1), ValueError, "p"),
        (lambda: bernoulli((3,), torch.tensor([0.5, 0.5]), seed=1), ValueError, "p"),
        (lambda: bernoulli((2,), torch.tensor([0.5, 0.5], dtype=torch.float64), seed=1),
         TypeError, "p"),
        (lambda: ops.gaussian_fill_(torch.empty(3, dtype=torch.float64), 1), TypeError, "out"),
        (lambda: ops.bernoulli_fill_(torch.empty(3), 0.5, None, 1), TypeError, "out"),
    ],
)  # fmt: skip
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_reference_log_and_sincos_match_float64():
    u = torch.tensor([2.0**-24, 1e-3, 0.3, 0.7071, 0.7072, 0.999, 1.0], dtype=torch.float32)
    got = ref.log_f32(u).double()
    assert torch.allclose(got, torch.log(u.double()), rtol=3e-7, atol=1e-7)
    c = torch.arange(0, 2**24, 4099, dtype=torch.int64)
    cos, sin = ref.sincos_turns(c)
    angle = 2 * math.pi * c.double() / 2**24
    assert float((cos.double() - torch.cos(angle)).abs().max()) < 2e-7
    assert float((sin.double() - torch.sin(angle)).abs().max()) < 2e-7
