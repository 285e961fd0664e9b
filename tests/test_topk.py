"""topk_compress, ef14_topk_, ef21_topk_ on every backend against the float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    DTYPES,
    close64,
    device_for,
    interpreted,
    np_ef14_topk,
    np_ef21_topk,
    np_exact,
    np_topk,
    np_values,
    oracle_topk,
    rand,
    same_bits,
)

import fedkern

SIZES = [1, 2, 7, 1000, 4099, 100_003]
KINDS = ["normal", "ties", "special", "equal"]


def sizes(backend):
    return [n for n in SIZES if not interpreted(backend) or n <= 5000]


def ks(n):
    return sorted({1, max(1, n // 100), max(1, n // 3), n})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_compress_matches_oracle(backend, dtype, kind, gen):
    dev = device_for(backend)
    for n in sizes(backend):
        x = rand(n, dtype, gen, dev, kind)
        x_before = x.clone()
        for k in ks(n):
            values, indices = fedkern.topk_compress(x, k)
            assert indices.dtype == torch.int64 and values.dtype == dtype
            assert values.device == x.device and indices.shape == (k,)
            assert torch.equal(indices.cpu(), oracle_topk(x, k)), (n, k, kind)
            assert same_bits(values, x[indices])
        assert same_bits(x, x_before)


def test_topk_compress_large(backend, gen):
    if interpreted(backend):
        pytest.skip("1e6 elements is too slow in Triton's interpreter")
    x = rand(1_000_000, torch.float32, gen, device_for(backend))
    for k in (1, 10_000, 999_999):
        values, indices = fedkern.topk_compress(x, k)
        assert torch.equal(indices.cpu(), oracle_topk(x, k))


def test_topk_compress_shapes_and_strides(backend, gen):
    dev = device_for(backend)
    base = rand(60 * 7, torch.float32, gen, dev).view(60, 7)
    for x in (base.t(), base[::2, 1:], base.view(3, 20, 7)[:, ::3]):
        values, indices = fedkern.topk_compress(x, 9)
        flat = x.reshape(-1)
        assert torch.equal(indices.cpu(), oracle_topk(flat, 9))
        assert same_bits(values, flat[indices])


def test_topk_ties_go_to_lower_index(backend):
    dev = device_for(backend)
    x = torch.tensor([1.0, -2.0, 2.0, -0.0, 0.0, 2.0, -2.0, 1.0], device=dev)
    assert fedkern.topk_compress(x, 3)[1].tolist() == [1, 2, 5]
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-nan"), 3.0], device=dev)
    assert fedkern.topk_compress(x, 2)[1].tolist() == [2, 4]
    assert fedkern.topk_compress(x, 4)[1].tolist() == [2, 3, 4, 5]
    assert fedkern.topk_compress(x, 5)[1].tolist() == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr", [1.0, 0.1, 0.0])
def test_ef14_topk_matches_oracle(backend, dtype, lr, gen):
    dev = device_for(backend)
    for n in sizes(backend):
        g, e = rand(n, dtype, gen, dev), rand(n, dtype, gen, dev)
        g0, e0 = g.clone(), e.clone()
        k = max(1, n // 10)
        values, indices = fedkern.ef14_topk_(g, e, k, lr=lr)
        a64 = e0.double() + lr * g0.double()
        scale = float(e0.double().abs().max() + lr * g0.double().abs().max())
        assert same_bits(g, g0), "grad must not be modified"
        assert indices.shape == (k,) and bool((indices.diff() > 0).all())
        close64(values, a64[indices], dtype, scale)
        assert bool((e[indices] == 0).all())
        rest = torch.ones(n, dtype=torch.bool, device=dev)
        rest[indices] = False
        close64(e[rest], a64[rest], dtype, scale)
        # the kept entries are the largest of a (as stored), ties to the lower index
        a_stored = e.clone()
        a_stored[indices] = values
        assert torch.equal(indices.cpu(), oracle_topk(a_stored, k))
        # invariant: error_new + decompress(c) == error_old + lr*grad
        with fedkern.backend("auto"):  # any backend that has sparse_add_ (CUDA C++ has none)
            recon = fedkern.sparse_add_(e.clone(), values, indices)
        close64(recon, a64, dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ef21_topk_matches_oracle(backend, dtype, gen):
    dev = device_for(backend)
    for n in sizes(backend):
        g, s = rand(n, dtype, gen, dev), rand(n, dtype, gen, dev)
        g0, s0 = g.clone(), s.clone()
        k = max(1, n // 7)
        values, indices = fedkern.ef21_topk_(g, s, k)
        d64 = g0.double() - s0.double()
        scale = float(g0.double().abs().max() + s0.double().abs().max())
        assert same_bits(g, g0)
        close64(values, d64[indices], dtype, scale)
        close64(s[indices], g0.double()[indices], dtype, scale)  # s + (g - s) = g
        rest = torch.ones(n, dtype=torch.bool, device=dev)
        rest[indices] = False
        assert same_bits(s[rest], s0[rest])
        d = (g0.float() - s0.float()).to(dtype)
        assert torch.equal(indices.cpu(), oracle_topk(d, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "special"])
def test_backends_agree_bit_for_bit(backend, dtype, kind, gen):
    """Every backend (the reference included) returns exactly what the NumPy float32 oracle
    computes, so all backends agree bit for bit."""
    dev = device_for(backend)
    n = 3001 if interpreted(backend) else 50_001
    x, g, e = (rand(n, dtype, gen, dev, kind) for _ in range(3))
    xn, gn, en = np_values(x), np_values(g), np_values(e)
    e1, s1 = e.clone(), e.clone()
    v, i = fedkern.topk_compress(x, 37)
    assert np.array_equal(i.cpu().numpy(), np_topk(xn, 37)) and np_exact(v, xn[i.cpu().numpy()])
    v, i = fedkern.ef14_topk_(g, e1, 37, lr=0.3)
    wv, wi, we = np_ef14_topk(gn, en, 37, 0.3, dtype)
    assert np.array_equal(i.cpu().numpy(), wi) and np_exact(v, wv) and np_exact(e1, we)
    v, i = fedkern.ef21_topk_(g, s1, 37)
    wv, wi, ws = np_ef21_topk(gn, en, 37, dtype)
    assert np.array_equal(i.cpu().numpy(), wi) and np_exact(v, wv) and np_exact(s1, ws)


def test_opcheck(backend, gen):
    dev = device_for(backend)
    x = rand(257, torch.float32, gen, dev)
    torch.library.opcheck(torch.ops.fedkern.topk_compress.default, (x, 5))
    torch.library.opcheck(torch.ops.fedkern.ef14_topk_.default, (x, x.clone(), 5, 0.5))
    torch.library.opcheck(torch.ops.fedkern.ef21_topk_.default, (x, x.clone(), 5))


# ---- bad input: a clear error naming the argument, raised before anything is modified ----

BAD_TOPK = [
    (lambda x: (x.long(), 1), TypeError, "x must be a float32 or bfloat16"),
    (lambda x: (x.to(torch.complex64), 1), TypeError, "x must be a float32 or bfloat16"),
    (lambda x: (x.double(), 1), TypeError, "x must be a float32 or bfloat16"),
    (lambda x: (x.tolist(), 1), TypeError, "x must be a torch.Tensor"),
    (lambda x: (x, 0), ValueError, r"k must be in \[1, x.numel\(\)=10\]"),
    (lambda x: (x, 11), ValueError, r"k must be in \[1, x.numel\(\)=10\]"),
    (lambda x: (x, 2.0), TypeError, "k must be an int"),
    (lambda x: (x, True), TypeError, "k must be an int"),
    (lambda x: (x[:0], 1), ValueError, "x must have at least one element"),
]


@pytest.mark.parametrize("make,exc,msg", BAD_TOPK)
def test_topk_compress_bad_input(make, exc, msg):
    with pytest.raises(exc, match=msg):
        fedkern.topk_compress(*make(torch.randn(10)))


def _ef_bad_cases():
    g = torch.randn(10)
    return [
        ({"grad": g.long()}, TypeError, "grad must be a float32 or bfloat16"),
        ({"grad": g.bfloat16()}, TypeError, "buf must have grad's dtype"),
        ({"grad": torch.randn(11)}, ValueError, "buf must have grad's shape"),
        ({"grad": torch.randn(10, device="meta")}, ValueError, "buf must be on grad's device"),
        ({"grad": "g"}, TypeError, "grad must be a torch.Tensor"),
        ({"k": 0}, ValueError, "k must be in"),
        ({"k": 11}, ValueError, "k must be in"),
        ({"buf_t": True}, ValueError, "buf is updated in place and must be contiguous"),
        ({"alias": True}, ValueError, "grad and buf must not share memory"),
    ]


@pytest.mark.parametrize("op,buf", [(fedkern.ef14_topk_, "error"), (fedkern.ef21_topk_, "state")])
@pytest.mark.parametrize("case", range(9))
def test_feedback_bad_input(op, buf, case):
    change, exc, msg = _ef_bad_cases()[case]
    b = torch.randn(10)
    b0 = b.clone()
    if change.get("buf_t"):
        b = torch.randn(5, 2).t()
        b0 = b.clone()
    grad = b if change.get("alias") else change.get("grad", torch.randn(b.shape))
    with pytest.raises(exc, match=msg.replace("buf", buf)):
        op(grad, b, change.get("k", 3))
    assert same_bits(b, b0), "nothing may be modified when an error is raised"


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), 1e39, "1", None])
def test_ef14_bad_lr(lr):
    e = torch.randn(10)
    e0 = e.clone()
    with pytest.raises((TypeError, ValueError), match="lr must"):
        fedkern.ef14_topk_(torch.randn(10), e, 3, lr=lr)
    assert same_bits(e, e0)


def test_topk_compress_backward(backend, gen):
    """d values / d x scatters the incoming gradient to the kept positions; zero elsewhere."""
    dev = device_for(backend)
    x = rand(6 * 7, torch.float32, gen, dev).view(6, 7).requires_grad_()
    values, indices = fedkern.topk_compress(x, 9)
    w = torch.randn(9, generator=gen).to(dev)
    (values * w).sum().backward()
    expect = torch.zeros(42, dtype=torch.float64)
    expect[oracle_topk(x, 9)] = w.double().cpu()
    close64(x.grad.flatten(), expect, torch.float32)
    torch.library.opcheck(torch.ops.fedkern.topk_compress.default, (x, 4))
