"""Batched sparse accumulation into a dense vector (Triton), deterministic.

    sparse_add_batched_(dense[n], values[m, k], indices[m, k], alpha):
        for every j: acc = fp32(dense[j]);
                     for i = 0..m-1 with j in indices[i]: acc = acc + (alpha * values[i, pos])
                     dense[j] = round(acc)
        (product, then sum, each rounded to fp32; round() to the dense dtype)

Each row of indices is strictly ascending, so the entries of row i that land in the dense block
[start, start + BLOCK) form one contiguous run [p, q) of at most BLOCK entries.  Each program owns
one dense block, keeps its accumulator in registers, and for every message in order finds the run
with two scalar binary searches (p = first entry >= start, q = first entry >= start + BLOCK,
searched within [p, p + BLOCK)), then locates every dense coordinate inside the run with a
vectorised branchless binary search (ceil(log2(q - p)) probes, skipped when the run is empty).
No atomics, one store per coordinate: the result does not depend on scheduling.  Launched with
enable_fp_fusion=False so acc + alpha * v is never contracted into an FMA.
"""

import torch
import triton
import triton.language as tl

from ._common import block_for, load_f32, round_to, store_f32


@triton.jit
def _lower_bound(row_ptr, lo, hi, target):
    """First position in [lo, hi) of the ascending row whose entry is >= target (hi if none)."""
    while lo < hi:
        mid = lo + (hi - lo) // 2
        right = tl.load(row_ptr + mid) < target
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit(do_not_specialize=["n", "m", "k"])
def _sparse_add_kernel(
    dense_ptr, val_ptr, idx_ptr, n, m, k, alpha, IS_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    acc = load_f32(dense_ptr, offs, mask, IS_BF16)
    zero = start * 0  # int64 scalar 0
    k64 = k.to(tl.int64)
    i = zero
    while i < m:  # messages in order (a while loop: the interpreter cannot range() over m)
        row = idx_ptr + i * k64
        p = _lower_bound(row, zero, k64, start)
        q = _lower_bound(row, p, tl.minimum(p + BLOCK, k64), start + BLOCK)
        length = q - p
        if length > 0:
            # branchless lower bound of each offs in row[p:q]; the answer stays in [base, base+len]
            base = p + tl.zeros([BLOCK], dtype=tl.int64)
            while length > 1:
                half = length // 2
                probe = tl.load(row + base + half, mask=mask, other=0)
                base = tl.where(probe < offs, base + half, base)
                length -= half
            pos = base + (tl.load(row + base, mask=mask, other=0) < offs).to(tl.int64)
            inside = mask & (pos < q)
            hit = inside & (tl.load(row + pos, mask=inside, other=-1) == offs)
            v = load_f32(val_ptr + i * k64, pos, hit, IS_BF16)
            acc = tl.where(hit, acc + alpha * v, acc)
        i += 1
    store_f32(dense_ptr, offs, round_to(acc, IS_BF16), mask, IS_BF16)


def sparse_add_batched_(dense, values, indices, alpha):
    """dense[j] += sum_i alpha * values[i, pos(i, j)] in fp32, in message order, rounded once.

    dense: contiguous 1-D [n] fp32/bf16, modified in place; values: [m, k] dense.dtype; indices:
    [m, k] int64, each row strictly ascending in [0, n); alpha: Python float.  CUDA, or CPU under
    TRITON_INTERPRET=1.  Returns None.
    """
    n = dense.numel()
    m, k = indices.shape
    block = block_for(n, dense.device)
    _sparse_add_kernel[(triton.cdiv(n, block),)](
        dense, values, indices, n, m, k, float(alpha), dense.dtype == torch.bfloat16, block,
        enable_fp_fusion=False,
    )  # fmt: skip
