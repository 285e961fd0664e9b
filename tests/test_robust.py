"""fedkern.robust: per-coordinate robust aggregators against a NumPy/float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    DTYPES,
    backend_fixture,
    close64,
    device_for,
    interpreted,
    np_coordinate_median,
    np_trimmed_mean,
    same_bits,
)

from fedkern.ops.robust import IMPLS
from fedkern.robust import coordinate_median, trimmed_mean

backend = backend_fixture(IMPLS)


def stack(n, d, dtype, gen, kind="normal"):
    """[n, d] test stack: normal, heavy ties and signed zeros, or with inf/NaN entries."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if kind in ("ties", "special"):
        x = torch.randint(-2, 3, (n, d), generator=gen).double()
        x = torch.where(torch.rand(n, d, generator=gen) < 0.2, -0.0, x)
    if kind == "special":
        specials = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
        pick = torch.randint(0, 3, (n, d), generator=gen)
        x = torch.where(torch.rand(n, d, generator=gen) < 0.15, specials[pick], x)
    return x.to(dtype)


def oracle_sorted(x: torch.Tensor) -> np.ndarray:
    """Columns sorted ascending in float64, NaN last, equal values (+-0.0) in row order."""
    return np.sort(x.double().numpy(), axis=0, kind="stable")


def oracle_median(x):
    s, n = oracle_sorted(x), x.shape[0]
    if n % 2:
        return torch.from_numpy(s[(n - 1) // 2])
    with np.errstate(invalid="ignore"):
        return torch.from_numpy((s[n // 2 - 1] + s[n // 2]) * 0.5)


def oracle_trimmed(x, f):
    s, n = oracle_sorted(x), x.shape[0]
    with np.errstate(invalid="ignore"):
        return torch.from_numpy(s[f : n - f].mean(axis=0))


SHAPES = [(1, 1), (2, 3), (3, 7), (16, 100), (17, 33), (64, 130)]


def shapes(backend):
    return [s for s in SHAPES if not interpreted(backend) or s[0] * s[1] <= 3000]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_coordinate_median(backend, dtype, kind, gen):
    dev = device_for(backend)
    for n, d in shapes(backend):
        x = stack(n, d, dtype, gen, kind)
        got = coordinate_median(x.to(dev))
        assert got.dtype == dtype and got.shape == (d,) and got.device.type == dev
        want = oracle_median(x)
        if n % 2:  # a selection: exact
            assert same_bits(got.cpu(), want.to(dtype)), (n, d)
        else:  # one rounding of (lo + hi) * 0.5
            close64(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_trimmed_mean(backend, dtype, kind, gen):
    dev = device_for(backend)
    for n, d in shapes(backend):
        for f in sorted({0, 1, (n - 1) // 2}):
            if 2 * f >= n:
                continue
            x = stack(n, d, dtype, gen, kind)
            got = trimmed_mean(x.to(dev), f)
            assert got.dtype == dtype and got.shape == (d,)
            want = oracle_trimmed(x, f)
            # the float32 sum of n - 2f terms: its error grows with the terms' magnitude
            scale = float(np.nan_to_num(np.abs(x.double().numpy()), posinf=0).max(initial=0))
            close64(got, want, dtype, scale=scale * (n - 2 * f))


def test_backends_agree_bit_for_bit(backend, gen):
    """Every backend (the reference included) equals the NumPy float32 oracle bit for bit: the
    stable column sort and, for the trimmed mean, the float32 sum in row order."""
    dev = device_for(backend)
    n, d = (9, 200) if interpreted(backend) else (64, 5000)
    for dtype in DTYPES:
        for kind in ("normal", "special"):
            x = stack(n, d, dtype, gen, kind)
            xn = x.float().numpy()
            assert same_bits(
                coordinate_median(x.to(dev)).cpu(),
                torch.from_numpy(np_coordinate_median(xn, dtype)).to(dtype),
            )
            assert same_bits(trimmed_mean(x.to(dev), 2).cpu(),
                             torch.from_numpy(np_trimmed_mean(xn, 2, dtype)).to(dtype))  # fmt: skip
            even = x[:-1]
            assert same_bits(coordinate_median(even.to(dev)).cpu(),
                             torch.from_numpy(np_coordinate_median(even.float().numpy(),
                                                                   dtype)).to(dtype))  # fmt: skip


def test_byzantine_rows_do_not_move_the_result(backend, gen):
    """n - f identical honest rows and f arbitrary rows (huge, NaN, inf): the median is the
    honest vector whenever f < n/2, the trimmed mean with that f is too."""
    dev = device_for(backend)
    n, f, d = 11, 4, 50
    honest = torch.randn(d, generator=gen)
    for attack in (1e30, float("nan"), float("inf"), -float("inf")):
        x = honest.repeat(n, 1)
        x[torch.randperm(n, generator=gen)[:f]] = torch.full((d,), attack)
        x = x.to(dev)
        assert torch.equal(coordinate_median(x).cpu(), honest)
        torch.testing.assert_close(trimmed_mean(x, f).cpu(), honest, rtol=4 * 2**-24, atol=0)
        assert not torch.equal(x.float().mean(0).cpu(), honest)  # the plain mean is moved


def test_inputs_untouched_and_any_strides(backend, gen):
    dev = device_for(backend)
    x = stack(7, 40, torch.float32, gen).to(dev)
    before = x.clone()
    t = x.t().contiguous().t()  # column-major view of the same values
    assert torch.equal(coordinate_median(t), coordinate_median(x))
    assert torch.equal(trimmed_mean(t, 2), trimmed_mean(x, 2))
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: coordinate_median(torch.zeros(5)), ValueError, "2-D stack"),
        (lambda: coordinate_median(torch.zeros(0, 4)), ValueError, "n >= 1"),
        (lambda: coordinate_median(torch.zeros(3, 0)), ValueError, "d >= 1"),
        (lambda: coordinate_median(torch.zeros(3, 4, dtype=torch.int32)), TypeError, "float32"),
        (lambda: coordinate_median([[1.0]]), TypeError, "torch.Tensor"),
        (lambda: trimmed_mean(torch.zeros(4, 3), 2), ValueError, r"2\*f < n"),
        (lambda: trimmed_mean(torch.zeros(4, 3), -1), ValueError, "f must be in"),
        (lambda: trimmed_mean(torch.zeros(4, 3), 1.5), TypeError, "f must be an int"),
        (lambda: trimmed_mean(torch.zeros(4, 3), True), TypeError, "f must be an int"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_opcheck(gen):
    x = stack(6, 17, torch.float32, gen)
    torch.library.opcheck(torch.ops.fedkern.coordinate_median.default, (x,))
    torch.library.opcheck(torch.ops.fedkern.trimmed_mean.default, (x, 1))


def test_tall_stacks(backend, gen):
    """More rows than the Triton kernels hold: the C++ core and the reference handle them; a
    forced Triton backend says it cannot."""
    dev = device_for(backend)
    x = stack(1025, 3, torch.float32, gen, "special").to(dev)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="at most 1024 rows"):
            coordinate_median(x)
        return
    close64(coordinate_median(x), oracle_median(x.cpu()), torch.float32)
    close64(trimmed_mean(x, 100), oracle_trimmed(x.cpu(), 100), torch.float32, scale=1e3)
