"""Kernel-level tests of the gram family: the fp64 Gram matrix.

The C++ core (fedkern._C) and the Triton kernels (fedkern.kernels.gram; the interpreter on CPU
tensors without a GPU) are called directly, below the op layer, against NumPy brute force:
- Gram, C++: bit for bit against a NumPy transcription of the summation order stated in
  fedkern/gram.h (column chunks, sequential fp64 sums via cumsum, chunks in order);
  Triton: within the fp64 rounding bound d * 2^-53 * sum_k |x_ik x_jk| (its order is tl.dot's).
Plus symmetry, non-finite rows, -0.0, bf16, and determinism (two runs; 1 / 2 / 3 OpenMP threads
in subprocesses; the AVX2 and baseline-ISA builds).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA

import fedkern

_C = getattr(fedkern, "_C", None)
if _C is None:
    try:
        import fedkern._C as _C  # noqa: N814
    except ImportError:
        _C = None

try:
    from fedkern.kernels import gram as tk
except Exception:  # noqa: BLE001 -- no triton: the Triton cases are skipped
    tk = None

# NumPy / the interpreter's matmul warn on inf - inf and NaN: expected in the special-value cases.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEV = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            _C is None or not hasattr(_C, "gram"), reason="fedkern._C not built"
        ),
    ),
    pytest.param("triton", marks=pytest.mark.skipif(tk is None, reason="triton not available")),
]
DTYPES = [torch.float32, torch.bfloat16]


def _tag(x):
    return 1 if x.dtype == torch.bfloat16 else 0


def gram(backend, x):
    x = x.contiguous()
    n, d = x.shape
    if backend == "cpu":
        g = torch.empty(n, n, dtype=torch.float64)
        _C.gram(x.data_ptr(), _tag(x), n, d, g.data_ptr())
        return g
    return tk.gram(x.to(DEV)).cpu()


def same_bits64(a, b):
    """Bit-for-bit equality of two float64 tensors (NaN payloads aside)."""
    a, b = a.contiguous(), b.contiguous()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return a.shape == b.shape and bool(
        ((a.view(torch.int64) == b.view(torch.int64)) | both_nan).all()
    )


def small(backend):
    """Triton in its interpreter is slow: keep its cases small (n <= 16, d <= 300)."""
    return backend == "triton" and not HAS_CUDA


# ---- brute force ------------------------------------------------------------------------------


def gram_cpp_order(x):
    """NumPy transcription of fedkern/gram.h's order: chunks of L columns, sequential fp64
    sums from +0.0 within a chunk (cumsum is sequential), chunk partials added in order."""
    xd = x.double().numpy()
    n, d = xd.shape
    n4 = (n + 3) // 4 * 4
    chunks = min(-(-d // 4096), 64, max(1, (1 << 23) // (n4 * n4)))
    length = -(-d // chunks)
    total = None
    for k0 in range(0, d, length):
        prod = xd[:, None, k0 : k0 + length] * xd[None, :, k0 : k0 + length]
        part = 0.0 + np.cumsum(prod, axis=2)[:, :, -1]  # 0.0 + p0: +0.0 for a -0.0 product
        total = part if total is None else total + part
    iu = np.triu_indices(n)
    g = np.zeros((n, n))
    g[iu] = total[iu]
    g.T[iu] = total[iu]
    return torch.from_numpy(g)


def gram_bound(x):
    """|fp64 sum - exact| <= d * 2^-53 * sum_k |x_ik x_jk| (any order), plus the exact value."""
    xd = x.double().numpy()
    exact = xd @ xd.T
    bound = x.shape[1] * 2.0**-53 * (np.abs(xd) @ np.abs(xd).T)
    return torch.from_numpy(exact), torch.from_numpy(bound)


def special_rows(x, gen):
    """Some rows of x: +inf, -inf, NaN entries, all zeros, all -0.0."""
    n, d = x.shape
    x = x.clone()
    for i, v in zip(
        range(0, n, 3), [float("inf"), float("nan"), float("-inf"), 0.0, -0.0], strict=False
    ):
        j = torch.randint(0, d, (max(1, d // 7),), generator=gen)
        if v == 0.0:
            x[i] = v
        else:
            x[i, j] = v
    return x


# ---- Gram -------------------------------------------------------------------------------------

GRAM_SIZES = [(1, 1), (1, 7), (2, 3), (3, 5), (4, 64), (5, 33), (8, 129), (12, 300), (13, 17),
              (16, 300), (37, 700), (9, 4097), (21, 9001), (6, 70000), (130, 600)]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", GRAM_SIZES)
def test_gram(backend, dtype, n, d):
    if small(backend) and (n > 16 or d > 300):
        pytest.skip("interpreter: small sizes only")
    gen = torch.Generator().manual_seed(1000 * n + d)
    x = torch.randn(n, d, generator=gen).to(dtype)
    g = gram(backend, x)
    assert g.dtype == torch.float64 and g.shape == (n, n)
    assert same_bits64(g, g.T)
    if backend == "cpu":
        assert torch.equal(g, gram_cpp_order(x))  # the stated order, exactly
    exact, bound = gram_bound(x)
    assert bool(((g - exact).abs() <= bound).all())
    assert same_bits64(g, gram(backend, x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_nonfinite_and_zeros(backend, dtype):
    n, d = (11, 200) if small(backend) else (23, 5000)
    gen = torch.Generator().manual_seed(7)
    x = special_rows(torch.randn(n, d, generator=gen), gen).to(dtype)
    g = gram(backend, x)
    exact = x.double() @ x.double().T  # NaN / inf pattern: order-independent
    assert torch.equal(torch.isnan(g), torch.isnan(exact))
    fin = torch.isfinite(exact)
    assert torch.equal(g[~fin & ~torch.isnan(exact)], exact[~fin & ~torch.isnan(exact)])
    _, bound = gram_bound(torch.where(torch.isfinite(x), x, 0.0))
    assert bool(((g[fin] - exact[fin]).abs() <= bound[fin]).all())
    assert same_bits64(g, g.T)
    if backend == "cpu":
        ref = gram_cpp_order(x)
        assert same_bits64(g, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_exact_small_integers(backend):
    """Integer data: every partial sum is exact, so any order gives the exact Gram matrix."""
    gen = torch.Generator().manual_seed(3)
    n, d = (16, 300) if small(backend) else (70, 20000)
    x = torch.randint(-8, 9, (n, d), generator=gen).float()
    assert torch.equal(gram(backend, x), x.double() @ x.double().T)


# ---- determinism across thread counts (C++) ---------------------------------------------------

_THREAD_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, torch, fedkern._C as C
    C._force_baseline(os.environ.get("FEDKERN_TEST_BASELINE") == "1")
    h = hashlib.sha256()
    gen = torch.Generator().manual_seed(123)
    cases = [(40, 50000, torch.float32), (300, 5000, torch.bfloat16), (7, 9000, torch.float32)]
    for n, d, dt in cases:
        x = torch.randn(n, d, generator=gen).to(dt)
        g = torch.empty(n, n, dtype=torch.float64)
        C.gram(x.data_ptr(), int(dt == torch.bfloat16), n, d, g.data_ptr())
        h.update(g.numpy().tobytes())
    print(h.hexdigest())
    """
)


@pytest.mark.skipif(_C is None or not hasattr(_C, "gram"), reason="fedkern._C not built")
def test_cpu_thread_count_and_isa_do_not_change_bytes():
    """1 / 2 / 3 OpenMP threads, and the baseline-ISA build (fedkern._C._force_baseline) against the
    AVX2 one: the same bytes."""
    digests = set()
    for threads, baseline in (("1", "0"), ("2", "0"), ("3", "0"), ("2", "1")):
        env = dict(os.environ, OMP_NUM_THREADS=threads, FEDKERN_TEST_BASELINE=baseline)
        res = subprocess.run(
            [sys.executable, "-c", _THREAD_SCRIPT], env=env, capture_output=True, text=True,
            check=True, timeout=300,
        )  # fmt: skip
        digests.add(res.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests
    assert all(len(h) == len(hashlib.sha256().hexdigest()) for h in digests)
