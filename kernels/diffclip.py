"""Difference -> compression -> norm clipping, batched over rows (Triton).

G_new, G_old: [n, d] contiguous, float32 or bfloat16, one client per row.  Per row i:

    diff_j = round(fp32(G_new[i, j]) - fp32(G_old[i, j]))      (never stored as a whole [n, d])
    c      = top-k of diff | round(diff[idx] * scale) at the rand-k indices | the dense diff row
    norm_i = sqrt(sum over c of double(c)^2)                     (fp64)
    c      = c if norm_i <= max_norm_i;  +0.0 if norm_i is not finite;
             round(float(min(1, max_norm_i / norm_i)) * c) otherwise
    norms_out[i] = norm_i (before clipping)

Top-k: topk.select, the radix select of top-k compression run on every row at once (its grids
are (tile, row) and its per-row state lives on the device), with the key of an element computed
from G_new and G_old in every pass (topk.py's _SRC_DIFF source, as EF21): the indices are those of
fedkern.topk_compress on the difference row (ties to the lower index, NaN above inf, ascending),
and nothing syncs with the host.

Rand-k: _perm_kernel (row axis; keys [n, 8] per row) evaluates randk.py's keyed permutation
(feistel_perm), a torch row sort orders the k indices, then only the values at them are read.

The message (k values, or the d dense values) is written by _message_kernel, which also writes
one fp64 partial sum of squares per (row, tile); _clip_kernel adds a row's partials in a fixed
tree order (every program of the row computes the same norm) and rewrites the row only when it
must be scaled or zeroed.  fp64 sums: fixed order, so results are deterministic; their order
differs from the C++ core's (allowed: fp64 sums may differ across backends).  All launches use
enable_fp_fusion=False; dtype conversions use _common.py's load_f32 / round_to / store_f32.
"""

import torch
import triton
import triton.language as tl

from . import topk as _topk
from ._common import (
    Tiling,
    block_for,
    feistel_perm,
    half_bits,
    load_f32,
    load_round_keys,
    round_to,
    row_tiles,
    store_f32,
)

# Launch shapes (_common.row_tiles) of the select's passes and of the message / clip kernels: on a
# GPU about TILING.programs programs per pass over all rows (and at least min_tile_blocks blocks per
# tile); in the interpreter large blocks, 2 tiles per row (every program costs milliseconds there).
# Tests shrink these.
TILING = Tiling(programs=2048, tiles_interpreted=2)


@triton.jit(do_not_specialize=["n", "k", "h"])
def _perm_kernel(out_ptr, keys_ptr, n, k, h, BLOCK: tl.constexpr):
    """out[r, i] = perm_r(i) for i < k (unsorted); row r's 8 round keys at keys[r, :] (int64
    holding uint32 values).  The permutation is randk.py's (feistel_perm)."""
    r = tl.program_id(1)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < k
    u0, u1, u2, u3, u4, u5, u6, u7 = load_round_keys(keys_ptr + r.to(tl.int64) * 8)
    x = feistel_perm(i, valid, n, h, u0, u1, u2, u3, u4, u5, u6, u7)
    tl.store(out_ptr + r.to(tl.int64) * k + i, x, mask=valid)


@triton.jit(do_not_specialize=["d", "m", "tile", "scale"])
def _message_kernel(
    a_ptr, b_ptr, idx_ptr, val_ptr, part_ptr, d, m, tile, scale,
    MODE: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (tile p, row r) of a message of m values per row.  MODE 0 (dense, m = d):
    c_j = round(a[r, j] - b[r, j]).  MODE 1 (top-k): the same at column idx[r, j].  MODE 2
    (rand-k): c_j = round(round(a - b) * scale) at column idx[r, j].  val[r, j] = c_j;
    part[r, p] = sum of double(c)^2 over the tile (fp64)."""
    p = tl.program_id(0)
    r = tl.program_id(1)
    rbase = r.to(tl.int64) * d
    mbase = r.to(tl.int64) * m
    start = p.to(tl.int64) * tile
    end = tl.minimum(start + tile, m)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    off = start
    while off < end:
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        if MODE == 0:
            cols = offs
        else:
            cols = tl.load(idx_ptr + mbase + offs, mask=mask, other=0)
        c = round_to(
            load_f32(a_ptr + rbase, cols, mask, IS_BF16)
            - load_f32(b_ptr + rbase, cols, mask, IS_BF16),
            IS_BF16,
        )
        if MODE == 2:
            c = round_to(c * scale, IS_BF16)
        store_f32(val_ptr + mbase, offs, c, mask, IS_BF16)
        c64 = c.to(tl.float64)
        acc += c64 * c64  # masked lanes hold 0
        off += BLOCK
    tl.store(part_ptr + r.to(tl.int64) * tl.num_programs(0) + p, tl.sum(acc, 0))


@triton.jit(do_not_specialize=["m", "tile"])
def _clip_kernel(
    val_ptr, part_ptr, max_norm_ptr, norms_ptr, m, tile,
    IS_BF16: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """Program (tile p, row r): norm = sqrt(sum of row r's partials) (fixed tree order, the same in
    every program of the row); the tile of val[r] is left as it is when norm <= max_norm[r], zeroed
    when norm is not finite, else multiplied by float(min(1, max_norm / norm)) and rounded."""
    p = tl.program_id(0)
    r = tl.program_id(1)
    q = tl.arange(0, TILES)
    row = r.to(tl.int64) * tl.num_programs(0)
    norm = tl.sqrt(tl.sum(tl.load(part_ptr + row + q, mask=q < tl.num_programs(0), other=0.0), 0))
    if p == 0:
        tl.store(norms_ptr + r, norm)
    mx = tl.load(max_norm_ptr + r)
    if (norm > mx) | (norm != norm):
        # bad: zeros (s = 0 times x = +0, without forming 0 * inf)
        bad = (norm != norm) | (norm == float("inf"))
        s = tl.where(bad, 0.0, tl.minimum(mx / norm, 1.0)).to(tl.float32)
        mbase = r.to(tl.int64) * m
        start = p.to(tl.int64) * tile
        end = tl.minimum(start + tile, m)
        off = start
        while off < end:
            offs = off + tl.arange(0, BLOCK)
            mask = offs < end
            x = tl.where(bad, 0.0, load_f32(val_ptr + mbase, offs, mask, IS_BF16))
            store_f32(val_ptr + mbase, offs, round_to(s * x, IS_BF16), mask, IS_BF16)
            off += BLOCK


def _select(g_new, g_old, k, out):
    """out[r] = ascending indices of the k largest keys of round(g_new[r] - g_old[r])."""
    _topk.select(_topk._SRC_DIFF, g_new, g_old, k, out, tiling=TILING)


def _message_and_clip(mode, g_new, g_old, idx, val, max_norm, scale):
    rows, d = g_new.shape
    m = val.shape[1]
    block, tile, tiles = row_tiles(m, rows, g_new.device, TILING)
    part = torch.empty(rows, tiles, dtype=torch.float64, device=g_new.device)
    norms = torch.empty(rows, dtype=torch.float64, device=g_new.device)
    bf16 = g_new.dtype == torch.bfloat16
    _message_kernel[(tiles, rows)](
        g_new, g_old, idx, val, part, d, m, tile, float(scale), mode, bf16, block,
        enable_fp_fusion=False,
    )  # fmt: skip
    _clip_kernel[(tiles, rows)](
        val, part, max_norm, norms, m, tile, bf16, block, triton.next_power_of_2(tiles),
        enable_fp_fusion=False,
    )  # fmt: skip
    return norms


def diff_topk_clip(g_new, g_old, k, max_norm, idx, val):
    """Per row: top-k of round(g_new - g_old), clipped to norm max_norm.

    g_new, g_old: contiguous [n, d] float32/bfloat16, same dtype and device (CUDA, or CPU under
    TRITON_INTERPRET=1); not modified.  k: 1 <= k <= d.  max_norm: float64 [n] on the device,
    each > 0 and finite.  idx: int64 [n, k] output (row i ascending: the indices of
    fedkern.topk_compress(diff row, k)); val: [n, k] output in the inputs' dtype (the diff values,
    clipped).  Returns norms: float64 [n], each row's message norm before clipping."""
    _select(g_new, g_old, k, idx)
    return _message_and_clip(1, g_new, g_old, idx, val, max_norm, 1.0)


def diff_randk_clip(g_new, g_old, k, keys, scale, max_norm, idx, val):
    """Per row: rand-k of round(g_new - g_old) (times scale), clipped to norm max_norm.

    keys: int64 [n, 8] on the device, uint32 values: row i's round keys
    (fedkern.random.randk_keys(seed_i, step)).  scale: Python float, used as fp32 (1.0: biased).
    idx: int64 [n, k] output (ascending {perm_i(j) : j < k}); val: [n, k] output,
    round(scale * diff[idx]) clipped.  Only the k chosen entries of a row are read.  Other
    arguments and the return value as in diff_topk_clip."""
    rows, d = g_new.shape
    perm = torch.empty(rows, k, dtype=torch.int64, device=g_new.device)
    block = block_for(k, g_new.device)
    _perm_kernel[(triton.cdiv(k, block), rows)](
        perm, keys, d, k, half_bits(d), block, enable_fp_fusion=False
    )
    idx.copy_(torch.sort(perm, dim=1).values)
    return _message_and_clip(2, g_new, g_old, idx, val, max_norm, scale)


def diff_clip(g_new, g_old, max_norm, out):
    """out = round(g_new - g_old) with each row clipped to norm max_norm[row] ([n, d], the inputs'
    dtype; written, not read).  Returns norms: float64 [n] before clipping.  Other arguments as in
    diff_topk_clip."""
    return _message_and_clip(0, g_new, g_old, g_new, out, max_norm, 1.0)
