"""sparse_add_ and sparse_add_batched_ against a float64 scatter-add oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPES,
    backend_fixture,
    close64,
    device_for,
    interpreted,
    np_exact,
    np_sparse_add,
    np_values,
    rand,
    same_bits,
)

import fedkern
from fedkern.ops.sparse import IMPLS

# No CUDA C++ kernel for this family: on a GPU its kernels are Triton's.
backend = backend_fixture(IMPLS)


def messages(m, k, n, dtype, gen, dev):
    """m rows of k strictly ascending indices in [0, n) (overlapping across rows) and values."""
    idx = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(m)])
    return rand(m * k, dtype, gen, dev).view(m, k), idx.to(dev)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_add_batched(backend, dtype, gen):
    dev = device_for(backend)
    cases = [(1, 1, 1), (3, 2, 5), (16, 100, 1000), (7, 1000, 1001)]
    if not interpreted(backend):
        cases += [(64, 5000, 100_003)]
    for m, k, n in cases:
        dense = rand(n, dtype, gen, dev)
        values, indices = messages(m, k, n, dtype, gen, dev)
        expect = dense.double().clone()
        for i in range(m):
            expect.index_add_(0, indices[i], values[i].double() * -0.5)
        scale = float(dense.double().abs().max() + m * values.double().abs().max())
        v0, i0 = values.clone(), indices.clone()
        out = fedkern.sparse_add_batched_(dense, values, indices, alpha=-0.5)
        assert out is dense
        close64(dense, expect, dtype, scale)
        assert same_bits(values, v0) and torch.equal(indices, i0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_add_single_and_shapes(backend, dtype, gen):
    dev = device_for(backend)
    dense = rand(6 * 50, dtype, gen, dev).view(6, 50)
    values, indices = messages(1, 40, 300, dtype, gen, dev)
    expect = dense.double().flatten().index_add(0, indices[0], values[0].double())
    fedkern.sparse_add_(dense, values[0], indices[0])
    close64(dense.flatten(), expect, dtype, float(expect.abs().max()))


def test_sparse_add_accumulates_in_fp32_and_rounds_once(backend):
    """Four bf16 messages of 2**-9 onto 1.0: rounded once the sum (1 + 2**-7) is exact in bf16;
    rounding after each message would leave 1.0."""
    dev = device_for(backend)
    dense = torch.ones(3, dtype=torch.bfloat16, device=dev)
    values = torch.full((4, 1), 2.0**-9, dtype=torch.bfloat16, device=dev)
    indices = torch.ones(4, 1, dtype=torch.int64, device=dev)
    fedkern.sparse_add_batched_(dense, values, indices)
    assert dense.float().tolist() == [1.0, 1.0 + 2.0**-7, 1.0]


def test_sparse_add_backends_agree(backend, gen):
    """Every backend (the reference included) equals the NumPy float32 oracle bit for bit."""
    dev = device_for(backend)
    for dtype in DTYPES:
        values, indices = messages(9, 300, 2000, dtype, gen, dev)
        dense = rand(2000, dtype, gen, dev)
        want = np_sparse_add(np_values(dense), np_values(values).reshape(9, 300),
                             indices.cpu().numpy(), 0.3, dtype)  # fmt: skip
        got = fedkern.sparse_add_batched_(dense.clone(), values, indices, alpha=0.3)
        assert np_exact(got, want)


def test_opcheck(backend, gen):
    dev = device_for(backend)
    values, indices = messages(3, 10, 100, torch.float32, gen, dev)
    dense = torch.zeros(100, device=dev)
    torch.library.opcheck(
        torch.ops.fedkern.sparse_add_.default, (dense, values[0], indices[0], 2.0)
    )
    torch.library.opcheck(torch.ops.fedkern.sparse_add_batched_.default, (dense, values, indices))
    torch.library.opcheck(
        torch.ops.fedkern.sparse_add_batched_.default, (dense, values, indices, 1.0, False)
    )


def _bad(kind):
    d, v, i = torch.zeros(10), torch.ones(3), torch.tensor([1, 4, 7])
    return {
        "dtype": ((d, v.bfloat16(), i), TypeError, "values must have dense's dtype"),
        "idx dtype": ((d, v, i.int()), TypeError, "indices must be an int64 tensor"),
        "int dense": ((d.long(), v.long(), i), TypeError, "dense must be a float32 or bfloat16"),
        "shape": ((d, v[:2], i), ValueError, "values and indices must have the same shape"),
        "2d": ((d, v.view(1, 3), i.view(1, 3)), ValueError, r"values must have shape \[k\]"),
        "range": ((d, v, torch.tensor([1, 4, 10])), ValueError, r"indices must be in \[0, dense"),
        "negative": ((d, v, torch.tensor([-1, 4, 7])), ValueError, r"indices must be in \[0,"),
        "unsorted": ((d, v, torch.tensor([4, 1, 7])), ValueError, "strictly ascending"),
        "dup": ((d, v, torch.tensor([1, 1, 7])), ValueError, "strictly ascending"),
        "device": ((d, v.to("meta"), i), ValueError, "values must be on dense's device"),
        "strided": ((torch.zeros(10, 2)[:, 0], v, i), ValueError, "dense is updated in place"),
        "list": ((d, [1.0, 2.0, 3.0], i), TypeError, "values must be a torch.Tensor"),
    }[kind]


@pytest.mark.parametrize("kind", [
    "dtype", "idx dtype", "int dense", "shape", "2d", "range", "negative", "unsorted", "dup",
    "device", "strided", "list",
])  # fmt: skip
def test_sparse_add_bad_input(kind):
    args, exc, msg = _bad(kind)
    before = args[0].clone()
    with pytest.raises(exc, match=msg):
        fedkern.sparse_add_(*args)
    assert torch.equal(args[0], before)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "2"])
def test_sparse_add_bad_alpha(alpha):
    with pytest.raises((TypeError, ValueError), match="alpha must"):
        fedkern.sparse_add_(torch.zeros(4), torch.ones(1), torch.tensor([2]), alpha=alpha)


def test_sparse_add_batched_wants_2d():
    with pytest.raises(ValueError, match=r"values must have shape \[m, k\]"):
        fedkern.sparse_add_batched_(torch.zeros(4), torch.ones(2), torch.tensor([0, 1]))


def test_check_indices_false_reads_no_index_values(backend, gen, monkeypatch, host_reads):
    """check_indices=False skips the value-reading check (no call of check_index_values, no
    host read of any tensor) and gives the default's result bit for bit; the default (the
    negative control, same assertions) does call it and does read."""
    import fedkern.ops.sparse as sparse_ops

    dev = device_for(backend)
    calls = []
    real = sparse_ops.check_index_values
    monkeypatch.setattr(sparse_ops, "check_index_values",
                        lambda *a: calls.append(a) or real(*a))  # fmt: skip
    for dtype in DTYPES:
        values, indices = messages(5, 60, 700, dtype, gen, dev)
        dense = rand(700, dtype, gen, dev)
        runs = {}
        for flag in (True, False):
            del calls[:]
            before = host_reads()
            d1 = fedkern.sparse_add_batched_(dense.clone(), values, indices, alpha=0.7,
                                             check_indices=flag)  # fmt: skip
            d2 = fedkern.sparse_add_(dense.clone(), values[0], indices[0], check_indices=flag)
            runs[flag] = (d1, d2, len(calls), host_reads() - before)
        assert runs[True][2] == 2 and runs[True][3] > 0  # the control reads the indices
        assert runs[False][2] == 0 and runs[False][3] == 0
        assert same_bits(runs[True][0], runs[False][0]) and same_bits(runs[True][1], runs[False][1])


@pytest.mark.parametrize("kind", ["range", "negative", "unsorted", "dup"])
def test_check_indices_default_still_raises(kind):
    """The default checks the index values, and check_indices=True is that default."""
    args, exc, msg = _bad(kind)
    before = args[0].clone()
    for kwargs in ({}, {"check_indices": True}):
        with pytest.raises(exc, match=msg):
            fedkern.sparse_add_(*args, **kwargs)
        with pytest.raises(exc, match=msg):
            fedkern.sparse_add_batched_(args[0], args[1].view(1, -1), args[2].view(1, -1), **kwargs)
    assert torch.equal(args[0], before)


@pytest.mark.parametrize("flag", [1, None, "no", torch.tensor(True)])
def test_check_indices_must_be_bool(flag):
    d = torch.zeros(4)
    with pytest.raises(TypeError, match="check_indices must be a bool"):
        fedkern.sparse_add_(d, torch.ones(1), torch.tensor([2]), check_indices=flag)
    with pytest.raises(TypeError, match="check_indices must be a bool"):
        fedkern.sparse_add_batched_(d, torch.ones(1, 1), torch.tensor([[2]]), check_indices=flag)
    assert not d.any()


def test_unchecked_bad_indices_never_write_out_of_bounds():
    """The C++ core with check_indices=False: negative, too large and out-of-order indices are
    dropped, never written outside dense. The guard zones around dense (a view into a larger
    buffer) stay untouched (before the C++ guard, the -7 of the unsorted row was written at
    dense[-7]); the in-range entries of the ascending row still land."""
    ok, why = fedkern.ops._dispatch.backend_status("cpu")
    if not ok:
        pytest.skip(why)
    for dtype in DTYPES:
        buf = torch.zeros(3 * 40_000, dtype=dtype)
        dense = buf[40_000:80_000]  # contiguous view with guard zones on both sides
        idx = torch.tensor([[-40_000, -1, 3, 39_999, 40_000, 79_999],
                            [5, 2, -7, 45_000, 17, 1]])  # fmt: skip
        vals = torch.ones(idx.shape, dtype=dtype)
        with fedkern.backend("cpu"):
            fedkern.sparse_add_batched_(dense, vals, idx, check_indices=False)
        assert not buf[:40_000].any() and not buf[80_000:].any()
        assert dense[3] == 1 and dense[39_999] == 1
