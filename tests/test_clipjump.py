"""The fused clipped server jump (op family "clipjump") on every backend, against a float64 oracle
written from the math; bit equality across backends where the design promises it (the fp64 row
sums: with c1 = 0 the step does not depend on the norm)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_fixture, fresh_seed, interpreted, same_bits

import fedkern
from fedkern.ops import clipjump as cj

backend = backend_fixture(cj.IMPLS)


def oracle(Y, x, w, s, c0, c1, G=None):
    ybar = (w[:, None] * Y.double()).sum(0)
    d = x.double() - ybar
    g = s * d
    nrm = float(g.norm()) if G is None else float(G)
    theta = 1.0 / (c0 + c1 * nrm)
    return x.double() - theta * g, float(g.norm()), theta


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 37), (4, 1030)])
@pytest.mark.parametrize("full", [False, True])
def test_matches_float64(backend, shape, full):
    c, p = shape
    if interpreted(backend) and p > 100:
        p = 40
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(p, generator=g) * 3
    Y = x + 0.1 * torch.randn(c, p, generator=g)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    w = w / w.sum()
    s, c0, c1 = 7.5, 0.3, 2.0
    G = torch.tensor([4.0], dtype=torch.float64) if full else None
    out, stats = cj.clip_jump(Y, x, w, s, c0, c1, G)
    want, gn, theta = oracle(Y, x, w, s, c0, c1, G)
    # d = x - ybar loses up to ||x|| eps to cancellation: the tolerance scales with ||x||
    torch.testing.assert_close(
        out.double(), want, rtol=0, atol=4e-7 * (1 + float(x.abs().max())) * (1 + s / (c0 + 1))
    )
    assert math.isclose(float(stats[0]), gn, rel_tol=1e-4)
    assert math.isclose(float(stats[1]), theta, rel_tol=1e-4)
    assert stats.dtype == torch.float64 and out.dtype == torch.float32


def test_unclipped_step_is_bit_identical_across_backends(backend):
    g = torch.Generator().manual_seed(fresh_seed())
    Y, x = torch.randn(6, 33, generator=g), torch.randn(33, generator=g)
    w = torch.full((6,), 1 / 6, dtype=torch.float64)
    out, _ = cj.clip_jump(Y, x, w, 2.0, 0.5, 0.0, None)
    with fedkern.backend("reference"):
        ref, _ = cj.clip_jump(Y, x, w, 2.0, 0.5, 0.0, None)
    assert same_bits(out, ref)


def test_fedavg_step_bit_for_bit():
    """c0 = s, c1 = 0: x - (x - ybar) equals FedAvg's x + (mean(Y) - x) exactly."""
    from fedkern.ops.clients import weighted_sum

    g = torch.Generator().manual_seed(fresh_seed())
    Y, x = torch.randn(10, 50, generator=g), torch.randn(50, generator=g)
    w = torch.full((10,), 0.1, dtype=torch.float64)
    s = 1 / (3e-3 * 7)
    out, _ = cj.clip_jump(Y, x, w, s, s, 0.0, None)
    assert same_bits(out, x + 1.0 * (weighted_sum(Y, w) - x))


def test_inputs_not_modified_and_opcheck(backend):
    g = torch.Generator().manual_seed(fresh_seed())
    Y, x = torch.randn(3, 9, generator=g), torch.randn(9, generator=g)
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    Y0, x0 = Y.clone(), x.clone()
    cj.clip_jump(Y, x, w, 1.0, 1.0, 1.0, None)
    assert torch.equal(Y, Y0) and torch.equal(x, x0)
    torch.library.opcheck(torch.ops.fedkern.clip_jump, (Y, x, w, 1.0, 1.0, 1.0, None))
    G = torch.tensor([2.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fedkern.clip_jump, (Y, x, w, 1.0, 1.0, 1.0, G))


def test_non_finite_input_gives_non_finite_output():
    Y = torch.tensor([[math.inf, 0.0]])
    out, stats = cj.clip_jump(Y, torch.zeros(2), torch.ones(1, dtype=torch.float64), 1.0, 1.0,
                              1.0, None)  # fmt: skip
    assert not bool(torch.isfinite(out).all())


def test_bad_input():
    Y, x = torch.zeros(2, 3), torch.zeros(3)
    w = torch.full((2,), 0.5, dtype=torch.float64)
    f = cj.clip_jump
    with pytest.raises(ValueError, match="c0 must be > 0"):
        f(Y, x, w, 1.0, 0.0, 1.0, None)
    with pytest.raises(ValueError, match="c1 must be >= 0"):
        f(Y, x, w, 1.0, 1.0, -1.0, None)
    with pytest.raises(ValueError, match="s must be"):
        f(Y, x, w, math.inf, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="x must be"):
        f(Y, torch.zeros(4), w, 1.0, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="w must be"):
        f(Y, x, w.float(), 1.0, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="Y must be"):
        f(Y.double(), x, w, 1.0, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="G must be"):
        f(Y, x, w, 1.0, 1.0, 1.0, torch.zeros(2, dtype=torch.float64))
