"""The fp64 Gram matrix of n client vectors (Triton): the distances of Krum, Multi-Krum and NNM.

X [n, d] is a stack of n client vectors (row-major, fp32 or bf16).

    gram:         G[i, j] = sum_k double(X[i, k]) * double(X[j, k]);  G [n, n] float64, symmetric
                  bit for bit (entries i <= j are computed, G[j, i] is a copy).

Gram: the columns are split into S consecutive chunks of K_PER columns (S, K_PER functions of
(n, d) only, never of the device).  One program per (tile ti <= tj of BLOCK_N x BLOCK_N rows,
chunk) accumulates tl.dot(a, b^T) over BLOCK_K-column steps in fp64 (fp64 operands: DMMA on sm_80 /
sm_90, numpy's matmul in the interpreter) into a partial [S, N_PAD, N_PAD]; a second kernel adds
the S partials in chunk order and writes the tile and its mirror.  Every product of two fp32 values
is exact in fp64, so only the order of the additions is implementation-defined: within a chunk it
is the tl.dot accumulation order (fixed for a given GPU and block shape), across chunks it is
chunk order.  Results are deterministic (no atomics) but may differ from the C++ core's in the last
bits.  Non-finite inputs propagate (padding rows and columns load as 0.0 and are never stored).

All launches use enable_fp_fusion=False; bf16 is widened exactly (load_f32).
"""

import torch
import triton
import triton.language as tl

from ._common import load_f32

# GPU launch shapes (not yet timed on a GPU): Gram tiles of BLOCK_N rows (<= 64; at least 16,
# the smallest tl.dot), BLOCK_K columns per tl.dot step.
TUNING = {
    "block_n": 64,
    "block_k": 32,
    "gram_warps": 4,
    "min_chunk": 2048,  # columns per Gram chunk at least
    "max_chunks": 512,
    "partial_elems": 1 << 24,  # fp64 elements of all chunk partials together (128 MiB)
}
_INTERPRETED_BLOCK_K = 64


@triton.jit(do_not_specialize=["n", "d", "k_per"])
def _gram_partial_kernel(
    x_ptr,
    part_ptr,
    n,
    d,
    k_per,
    IS_BF16: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    c = tl.program_id(2)
    if ti <= tj:  # tiles on or above the diagonal only
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        mi = ri < n
        mj = rj < n
        base_i = ri.to(tl.int64)[:, None] * d
        base_jt = rj.to(tl.int64)[None, :] * d
        k_lo = c.to(tl.int64) * k_per
        k_hi = tl.minimum(k_lo + k_per, d)
        acc = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float64)
        k = k_lo
        while k < k_hi:  # a while loop: the interpreter cannot range() with numpy 2.4
            cols = k + tl.arange(0, BLOCK_K)
            mk = (cols < k_hi)[None, :]
            mkt = (cols < k_hi)[:, None]
            a = load_f32(x_ptr, base_i + cols[None, :], mi[:, None] & mk, IS_BF16)
            # b^T loaded as [BLOCK_K, BLOCK_N] directly
            bt = load_f32(x_ptr, base_jt + cols[:, None], mj[None, :] & mkt, IS_BF16)
            if IS_BF16:
                # bf16: Triton 3.6 sizes the MMA operands from the bit width of the
                # loads (16: "largeK"), which its fp64 MMA does not support; a reduction over a
                # size-1 axis (exact) hides the 16-bit origin.
                a = tl.sum(tl.reshape(a, [BLOCK_N, BLOCK_K, 1]), axis=2)
                bt = tl.sum(tl.reshape(bt, [BLOCK_K, BLOCK_N, 1]), axis=2)
            a64 = a.to(tl.float64)
            b64 = bt.to(tl.float64)
            acc = tl.dot(a64, b64, acc, input_precision="ieee", out_dtype=tl.float64)
            k += BLOCK_K
        offs = c.to(tl.int64) * N_PAD * N_PAD + ri[:, None] * N_PAD + rj[None, :]
        tl.store(part_ptr + offs, acc)


@triton.jit(do_not_specialize=["n", "chunks"])
def _gram_reduce_kernel(part_ptr, g_ptr, n, chunks, N_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti <= tj:
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = ri[:, None] * N_PAD + rj[None, :]
        acc = tl.load(part_ptr + offs)
        c = chunks * 0 + 1
        while c < chunks:  # chunk order
            acc = acc + tl.load(part_ptr + c.to(tl.int64) * N_PAD * N_PAD + offs)
            c += 1
        m = (ri[:, None] < n) & (rj[None, :] < n) & (ri[:, None] <= rj[None, :])
        tl.store(g_ptr + ri.to(tl.int64)[:, None] * n + rj[None, :], acc, mask=m)
        tl.store(g_ptr + rj.to(tl.int64)[None, :] * n + ri[:, None], acc, mask=m)


def _gram_plan(n, d, device):
    """(BLOCK_N, BLOCK_K, N_PAD, tiles, chunks, K_PER) for an [n, d] stack."""
    block_n = max(16, min(TUNING["block_n"], triton.next_power_of_2(n)))
    block_k = _INTERPRETED_BLOCK_K if device.type == "cpu" else TUNING["block_k"]
    tiles = triton.cdiv(n, block_n)
    n_pad = tiles * block_n
    by_mem = max(1, TUNING["partial_elems"] // (n_pad * n_pad))
    chunks = max(1, min(triton.cdiv(d, TUNING["min_chunk"]), TUNING["max_chunks"], by_mem))
    k_per = triton.cdiv(triton.cdiv(d, chunks), block_k) * block_k
    return block_n, block_k, n_pad, tiles, triton.cdiv(d, k_per), k_per


def gram(x):
    """G = x x^T in float64: [n, n], symmetric bit for bit (see the module docstring).

    x: contiguous [n, d] fp32/bf16 (CUDA, or CPU under TRITON_INTERPRET=1); not modified.
    """
    n, d = x.shape
    block_n, block_k, n_pad, tiles, chunks, k_per = _gram_plan(n, d, x.device)
    part = torch.empty(chunks, n_pad, n_pad, dtype=torch.float64, device=x.device)
    g = torch.empty(n, n, dtype=torch.float64, device=x.device)
    _gram_partial_kernel[(tiles, tiles, chunks)](
        x, part, n, d, k_per, x.dtype == torch.bfloat16, n_pad, block_n, block_k,
        num_warps=TUNING["gram_warps"], enable_fp_fusion=False,
    )  # fmt: skip
    _gram_reduce_kernel[(tiles, tiles)](
        part, g, n, chunks, n_pad, block_n, num_warps=TUNING["gram_warps"], enable_fp_fusion=False
    )
    return g
