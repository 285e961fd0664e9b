"""Rand-k compression and its error-feedback variants: keyed Feistel permutation (Triton).

The selected coordinates are {perm(i) : 0 <= i < k}, sorted ascending, where perm is a keyed
permutation of [0, n) built from a balanced Feistel network on b-bit integers:

    b = max(bit_length(n - 1), 2), rounded up to even;  h = b / 2;  mask = 2^h - 1;  2^b >= n
    mix32(x): x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16 (mod 2^32)
    feistel(x): L = x >> h, R = x & mask; 8 rounds (L, R) = (R, L ^ (mix32(R ^ keys[r]) & mask));
                return (L << h) | R
    perm(i) = first of feistel(i), feistel(feistel(i)), ... that is < n         (cycle walking)

Cycle walking terminates: feistel is a bijection of [0, 2^b), so the orbit of i < n is a cycle
that returns to i; the walk stops at the first element of it below n, after at most 2^b - n + 1
steps (2^b <= 4n, so about 2^b / n <= 4 evaluations are expected).  Walking the cycles this way
is itself a permutation of [0, n), so the k indices are distinct.

    randk_compress(x, k, keys, scale):      val = round(x[idx] * scale)
    ef14_randk_(g, e, k, keys, lr, scale):  a = round(e + lr*g) -> e (all n);
                                            c = round(a[idx] * scale); e[idx] = round(a[idx] - c)
    ef21_randk_(g, s, k, keys, scale):      d = round(g[idx] - s[idx]); c = round(d * scale);
                                            s[idx] = round(s[idx] + c)            (O(k) work)
    (the EF variants return val = c)

keys are 8 uint32 values (Philox of (seed, step), computed by the caller).  They are passed to the
kernel as int32 bit patterns, so every call has the same argument types (no recompilation per key),
and reinterpreted as uint32 inside; all mix32 arithmetic is uint32 and wraps.  Work: one kernel
evaluates perm for the k positions, torch.sort orders the k indices (radix sort on CUDA), one kernel
gathers/scales/updates the k coordinates.  EF14 adds one elementwise pass over all n.
"""

import torch
import triton
import triton.language as tl

from ._common import block_for, feistel_perm, half_bits, load_f32, round_to, store_f32


@triton.jit(do_not_specialize=["n", "k", "h", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"])
def _perm_kernel(out_ptr, n, k, h, k0, k1, k2, k3, k4, k5, k6, k7, BLOCK: tl.constexpr):
    """out[i] = perm(i) for i < k (unsorted)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < k
    u0, u1, u2, u3 = k0.to(tl.uint32), k1.to(tl.uint32), k2.to(tl.uint32), k3.to(tl.uint32)
    u4, u5, u6, u7 = k4.to(tl.uint32), k5.to(tl.uint32), k6.to(tl.uint32), k7.to(tl.uint32)
    x = feistel_perm(i, valid, n, h, u0, u1, u2, u3, u4, u5, u6, u7)
    tl.store(out_ptr + i, x, mask=valid)


@triton.jit(do_not_specialize=["n"])
def _accumulate_kernel(g_ptr, e_ptr, n, lr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """e = round(e + lr * g) over all n (EF14)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = load_f32(g_ptr, offs, mask, IS_BF16)
    e = load_f32(e_ptr, offs, mask, IS_BF16)
    store_f32(e_ptr, offs, round_to(e + lr * g, IS_BF16), mask, IS_BF16)


@triton.jit(do_not_specialize=["k"])
def _gather_kernel(
    idx_ptr,
    x_ptr,
    y_ptr,
    val_ptr,
    k,
    scale,
    MODE: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """MODE 0: val = round(x[idx] * scale).
    MODE 1 (EF14, y = error holding a): c = round(a[idx] * scale), y[idx] = round(a[idx] - c).
    MODE 2 (EF21, x = grad, y = state): d = round(g - s), c = round(d * scale),
    y[idx] = round(s + c).  Modes 1 and 2 return val = c."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < k
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    if MODE == 0:
        c = round_to(load_f32(x_ptr, idx, mask, IS_BF16) * scale, IS_BF16)
    elif MODE == 1:
        a = load_f32(y_ptr, idx, mask, IS_BF16)
        c = round_to(a * scale, IS_BF16)
        store_f32(y_ptr, idx, round_to(a - c, IS_BF16), mask, IS_BF16)
    else:
        s = load_f32(y_ptr, idx, mask, IS_BF16)
        d = round_to(load_f32(x_ptr, idx, mask, IS_BF16) - s, IS_BF16)
        c = round_to(d * scale, IS_BF16)
        store_f32(y_ptr, idx, round_to(s + c, IS_BF16), mask, IS_BF16)
    store_f32(val_ptr, offs, c, mask, IS_BF16)


def _as_int32(key):
    key = int(key) & 0xFFFFFFFF
    return key - (1 << 32) if key >= 1 << 31 else key


def randk_indices(n, k, keys, device):
    """The k indices {perm(i) : i < k} of the keyed permutation of [0, n), int64 [k], ascending.
    keys: 8 ints in [0, 2^32); device: CUDA, or CPU under TRITON_INTERPRET=1."""
    out = torch.empty(k, dtype=torch.int64, device=device)
    block = block_for(k, out.device)
    _perm_kernel[(triton.cdiv(k, block),)](
        out, n, k, half_bits(n), *(_as_int32(key) for key in keys), block, enable_fp_fusion=False
    )
    return torch.sort(out).values


def _gather(mode, idx, x, y, scale):
    k = idx.numel()
    block = block_for(k, x.device)
    val = torch.empty(k, dtype=x.dtype, device=x.device)
    _gather_kernel[(triton.cdiv(k, block),)](
        idx, x, y, val, k, float(scale), mode, x.dtype == torch.bfloat16, block,
        enable_fp_fusion=False,
    )  # fmt: skip
    return val


def randk_compress(x, k, keys, scale):
    """Rand-k of x: (values = round(x[idx] * scale) [k] x.dtype, idx int64 [k] ascending).
    x: contiguous 1-D fp32/bf16, not modified; scale: Python float (1.0: exact copies)."""
    idx = randk_indices(x.numel(), k, keys, x.device)
    return _gather(0, idx, x, x, scale), idx


def ef14_randk_(grad, error, k, keys, lr, scale):
    """EF14 rand-k step: error <- a = round(error + lr*grad) over all n;
    c = round(a[idx] * scale); error[idx] = round(a[idx] - c).
    Returns (c [k] dtype, idx int64 [k] ascending); error is modified in place, grad is not."""
    n = grad.numel()
    block = block_for(n, grad.device)
    _accumulate_kernel[(triton.cdiv(n, block),)](
        grad, error, n, float(lr), grad.dtype == torch.bfloat16, block, enable_fp_fusion=False
    )
    idx = randk_indices(n, k, keys, grad.device)
    return _gather(1, idx, grad, error, scale), idx


def ef21_randk_(grad, state, k, keys, scale):
    """EF21 rand-k step, O(k): d = round(grad[idx] - state[idx]); c = round(d * scale);
    state[idx] = round(state[idx] + c).  Returns (c [k] dtype, idx int64 [k] ascending)."""
    idx = randk_indices(grad.numel(), k, keys, grad.device)
    return _gather(2, idx, grad, state, scale), idx
