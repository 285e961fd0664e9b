"""DLPack interop: fedkern ops on NumPy arrays (and CuPy arrays on a GPU), zero-copy, with in-place
updates landing in the caller's array and ``fedkern.interop.wrap`` returning the caller's kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fresh_seed

import fedkern
from fedkern import interop
from fedkern import robust as R


def arr(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_ops_take_numpy_and_match_torch():
    rng = np.random.default_rng(fresh_seed("np.random.default_rng"))
    x = arr(rng, 1000)
    t = torch.from_numpy(x.copy())
    for got, want in [
        (fedkern.topk_compress(x, 17), fedkern.topk_compress(t, 17)),
        (
            fedkern.randk_compress(x, 9, seed=4, step=2),
            fedkern.randk_compress(t, 9, seed=4, step=2),
        ),
    ]:
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    X = arr(rng, 11, 300)
    T = torch.from_numpy(X.copy())
    assert torch.equal(R.coordinate_median(X), R.coordinate_median(T))
    assert torch.equal(R.trimmed_mean(X, 2), R.trimmed_mean(T, 2))
    assert torch.equal(R.krum(X, 3), R.krum(T, 3))
    assert torch.equal(R.geometric_median(X), R.geometric_median(T))
    assert torch.equal(R.coordinate_median(list(X)), R.coordinate_median(T))  # a list of rows


def test_in_place_ops_update_the_numpy_buffer():
    rng = np.random.default_rng(0)
    g, e = arr(rng, 500), np.zeros(500, np.float32)
    values, indices = fedkern.ef14_topk_(g, e, 10)
    expect = g.copy()
    expect[indices.numpy()] = 0  # e = g with the sent entries removed
    np.testing.assert_array_equal(e, expect)
    dense = np.zeros(500, np.float32)
    fedkern.sparse_add_(dense, values, indices)
    np.testing.assert_array_equal(dense[indices.numpy()], values.numpy())
    X = arr(rng, 6, 40) * 10
    R.clip_rows_(X, 1.0)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)


def test_wrap_returns_the_callers_kind():
    rng = np.random.default_rng(1)
    x = arr(rng, 300)
    values, indices = interop.wrap(fedkern.topk_compress)(x, 5)
    assert isinstance(values, np.ndarray) and isinstance(indices, np.ndarray)
    assert indices.dtype == np.int64 and values.dtype == np.float32
    np.testing.assert_array_equal(values, x[indices])
    out = interop.wrap(R.krum)(arr(rng, 9, 20), 2)
    assert isinstance(out, np.ndarray) and out.shape == (20,)
    bf = interop.wrap(R.coordinate_median)(torch.randn(5, 8, dtype=torch.bfloat16))
    assert isinstance(bf, torch.Tensor)  # torch in, torch out
    assert interop.from_torch(torch.ones(2, dtype=torch.bfloat16), x).dtype == torch.bfloat16


def test_read_only_and_bad_arrays():
    rng = np.random.default_rng(2)
    x = arr(rng, 100)
    x.setflags(write=False)
    assert torch.equal(fedkern.topk_compress(x, 3)[1], fedkern.topk_compress(x.copy(), 3)[1])
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        fedkern.topk_compress(x.astype(np.float64), 3)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fedkern.topk_compress([1.0, 2.0], 1)  # a list is not an array


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cupy_arrays_stay_on_the_gpu():
    cp = pytest.importorskip("cupy")
    x = cp.random.standard_normal(4096, dtype=cp.float32)
    values, indices = interop.wrap(fedkern.topk_compress)(x, 32)
    assert isinstance(values, cp.ndarray) and isinstance(indices, cp.ndarray)
    cp.testing.assert_array_equal(values, x[indices])
