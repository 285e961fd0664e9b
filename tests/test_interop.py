"""DLPack interop: fedkern ops on NumPy arrays (and CuPy arrays on a GPU), zero-copy, with in-place
updates landing in the caller's array and ``fedkern.interop.wrap`` returning the caller's kind.
The CuPy tests (skipped without CUDA or CuPy) check the round trip shares device memory and that
ops on CuPy arrays give the bits of the same ops on torch CUDA tensors."""

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


@pytest.fixture
def cp():
    """CuPy, on a CUDA machine with CuPy installed (skipped otherwise)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return pytest.importorskip("cupy")


def test_cupy_arrays_stay_on_the_cuda_device(cp):
    x = cp.random.standard_normal(4096, dtype=cp.float32)
    values, indices = interop.wrap(fedkern.topk_compress)(x, 32)
    assert isinstance(values, cp.ndarray) and isinstance(indices, cp.ndarray)
    cp.testing.assert_array_equal(values, x[indices])


def test_cupy_cuda_round_trip_is_zero_copy(cp):
    """CuPy -> torch (``to_torch``) and back (``from_torch``) share the device memory: the same
    pointer, and a write through one is seen through the other."""
    x = cp.arange(1000, dtype=cp.float32)
    t = interop.to_torch(x)
    assert t.device.type == "cuda" and t.device.index == x.device.id
    assert t.data_ptr() == x.data.ptr and t.dtype == torch.float32 and t.shape == (1000,)
    t[3] = -7.0
    assert float(x[3]) == -7.0
    back = interop.from_torch(t, x)
    assert isinstance(back, cp.ndarray) and back.data.ptr == t.data_ptr()
    x[5] = 11.0
    assert float(t[5]) == 11.0 and float(back[5]) == 11.0


def test_cupy_ops_equal_the_torch_cuda_result(cp):
    """Ops called on CuPy arrays give the bits of the same op on torch CUDA tensors holding the
    same data; the in-place ops update the CuPy buffers."""
    rng = np.random.default_rng(fresh_seed("np.random.default_rng"))
    x, g, X = arr(rng, 5000), arr(rng, 5000), arr(rng, 11, 300)

    def both(a):
        return cp.asarray(a), torch.from_numpy(a.copy()).cuda()

    xc, xt = both(x)
    for got, want in [
        (fedkern.topk_compress(xc, 17), fedkern.topk_compress(xt, 17)),
        (fedkern.randk_compress(xc, 9, seed=4, step=2),
         fedkern.randk_compress(xt, 9, seed=4, step=2)),
    ]:  # fmt: skip
        assert all(a.device.type == "cuda" and torch.equal(a, b)
                   for a, b in zip(got, want, strict=True))  # fmt: skip
    Xc, Xt = both(X)
    for name, args in [("coordinate_median", ()), ("trimmed_mean", (2,)), ("krum", (3,)),
                       ("geometric_median", ())]:  # fmt: skip
        fn = getattr(R, name)
        assert torch.equal(fn(Xc, *args), fn(Xt, *args)), name
    (gc, gt), (ec, et) = both(g), both(np.zeros(5000, np.float32))
    vc, ic = fedkern.ef14_topk_(gc, ec, 10)
    vt, it = fedkern.ef14_topk_(gt, et, 10)
    assert torch.equal(vc, vt) and torch.equal(ic, it)
    np.testing.assert_array_equal(cp.asnumpy(ec), et.cpu().numpy())  # the CuPy buffer moved
    (dc, dt) = both(np.zeros(5000, np.float32))
    fedkern.sparse_add_(dc, vc, ic)
    fedkern.sparse_add_(dt, vt, it)
    np.testing.assert_array_equal(cp.asnumpy(dc), dt.cpu().numpy())
    Yc, Yt = both(X * 10)
    R.clip_rows_(Yc, 1.0)
    R.clip_rows_(Yt, 1.0)
    np.testing.assert_array_equal(cp.asnumpy(Yc), Yt.cpu().numpy())
    assert float(np.abs(cp.asnumpy(Yc) - X * 10).max()) > 0  # clipped in place
