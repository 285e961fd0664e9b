"""Difference -> compression -> norm clipping, batched over rows (Triton).

G_new, G_old: [n, d] contiguous, float32 or bfloat16, one client per row.  Per row i:

    diff_j = round(fp32(G_new[i, j]) - fp32(G_old[i, j]))      (never stored as a whole [n, d])
    c      = top-k of diff | round(diff[idx] * scale) at the rand-k indices | the dense diff row
    norm_i = sqrt(sum over c of double(c)^2)                     (fp64)
    c      = c if norm_i <= max_norm_i;  +0.0 if norm_i is not finite;
             round(float(min(1, max_norm_i / norm_i)) * c) otherwise
    norms_out[i] = norm_i (before clipping)

Top-k: the radix select of topk.py (same keys, digits, candidate buffer and ordered emission, so
the same indices: ties to the lower index, NaN above inf, ascending), with a row axis on every
grid -- programs (tile, row) -- and the per-row state (digit prefix, ties still needed, counts) in
[n] device tensors, so one launch per step serves all rows and nothing syncs with the host.  Steps
per digit level: per-tile histograms (_hist_kernel), their sum over tiles (torch), the digit of
the need-th key per row (_pick_kernel), per-tile counts above / at that digit (_tile_counts_kernel)
when an emission follows.  The key of a data element is computed from G_new and G_old in every
pass (topk.py's _SRC_DIFF source).  Rows whose candidates do not fit the buffer take the path over
the data; both paths are launched with per-row element counts of 0 where not taken.

Rand-k: _perm_kernel (row axis; keys [n, 8] per row) reusing randk.py's Feistel network, a torch
row sort, then the values at the k indices only.

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
from ._common import block_for, load_f32, round_to, store_f32
from .randk import _feistel, _half_bits
from .topk import _LEVELS, _SRC_DIFF, _SRC_KEYS, _source_key

# Launch shapes.  GPU: BLOCK elements per inner iteration, at most about _MAX_PROGRAMS programs
# over all rows for a pass (and at least _MIN_TILE_BLOCKS blocks per tile).  Interpreter: large
# blocks, few programs (every program costs milliseconds there).  Tests shrink these.
_BLOCK = 1024
_MAX_PROGRAMS = 2048
_MIN_TILE_BLOCKS = 4
_BLOCK_INTERPRETED = 16384
_TILES_INTERPRETED = 2

# Candidate buffer length per row (a module global so tests can shrink it).
_capacity = _topk._capacity


def _row_shape(m, rows, device):
    """(BLOCK, tile, tiles per row) of a pass over m elements in each of `rows` rows."""
    if device.type == "cpu":
        block = min(_BLOCK_INTERPRETED, triton.next_power_of_2(max(m, 16)))
        per_tile = triton.cdiv(triton.cdiv(m, block), _TILES_INTERPRETED)
    else:
        block = min(_BLOCK, triton.next_power_of_2(max(m, 16)))
        per_tile = max(
            _MIN_TILE_BLOCKS, triton.cdiv(triton.cdiv(m, block), max(1, _MAX_PROGRAMS // rows))
        )
    tile = block * per_tile
    return block, tile, triton.cdiv(m, tile)


@triton.jit(do_not_specialize=["stride", "tile", "shift"])
def _hist_kernel(
    x_ptr, y_ptr, stride, count_ptr, prefix_ptr, hist_ptr, above_ptr, tile, shift,
    SRC: tl.constexpr, IS_BF16: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (tile p, row r): histogram of the digit (key >> shift) & (2^BITS - 1) over the
    elements of row r's tile whose higher bits equal prefix[r], and the count above the prefix."""
    NB: tl.constexpr = 1 << BITS
    p = tl.program_id(0)
    r = tl.program_id(1)
    slot = r.to(tl.int64) * tl.num_programs(0) + p
    base = r.to(tl.int64) * stride
    start = p.to(tl.int64) * tile
    end = tl.minimum(start + tile, tl.load(count_ptr + r))
    prefix = tl.load(prefix_ptr + r)
    hist = tl.zeros([NB], dtype=tl.int32)
    above = tl.zeros([BLOCK], dtype=tl.int32)
    off = start
    while off < end:
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        key = _source_key(x_ptr + base, y_ptr + base, offs, mask, 0.0, SRC, IS_BF16)
        high = key >> (shift + BITS)
        hist += tl.histogram((key >> shift) & (NB - 1), NB, mask=mask & (high == prefix))
        above += (mask & (high > prefix)).to(tl.int32)
        off += BLOCK
    tl.store(hist_ptr + slot * NB + tl.arange(0, NB), hist)
    tl.store(above_ptr + slot, tl.sum(above))


@triton.jit
def _pick_kernel(
    hsum_ptr, prefix_ptr, need_ptr, prefix_out, need_out, bucket_out, digit_out,
    NB: tl.constexpr,
):  # fmt: skip
    """Row r: with s[b] = #{digit >= b}, the digit B = max{b : s[b] >= need} (0 if none: a path
    not taken); prefix <- prefix * NB + B; need <- need - s[B + 1]; bucket = #{digit == B}."""
    r = tl.program_id(0)
    bins = tl.arange(0, NB)
    h = tl.load(hsum_ptr + r.to(tl.int64) * NB + bins)
    s = tl.sum(h, 0) - (tl.cumsum(h, 0) - h)
    need = tl.load(need_ptr + r)
    b = tl.maximum(tl.sum((s >= need).to(tl.int32), 0) - 1, 0)
    bucket = tl.sum(tl.where(bins == b, h, 0), 0)
    s_b = tl.sum(tl.where(bins == b, s, 0), 0)
    tl.store(prefix_out + r, tl.load(prefix_ptr + r) * NB + b)
    tl.store(need_out + r, need - (s_b - bucket))
    tl.store(bucket_out + r, bucket)
    tl.store(digit_out + r, b)


@triton.jit
def _tile_counts_kernel(hist_ptr, above_ptr, digit_ptr, gt_ptr, eq_ptr, NB: tl.constexpr):
    """Program (tile p, row r): gt = #{above the prefix} + #{digit > B}, eq = #{digit == B}."""
    p = tl.program_id(0)
    r = tl.program_id(1)
    slot = r.to(tl.int64) * tl.num_programs(0) + p
    bins = tl.arange(0, NB)
    h = tl.load(hist_ptr + slot * NB + bins)
    b = tl.load(digit_ptr + r)
    gt = tl.load(above_ptr + slot).to(tl.int64) + tl.sum(tl.where(bins > b, h, 0).to(tl.int64), 0)
    tl.store(gt_ptr + slot, gt)
    tl.store(eq_ptr + slot, tl.sum(tl.where(bins == b, h, 0).to(tl.int64), 0))


@triton.jit(do_not_specialize=["stride", "out_stride", "tile", "shift"])
def _emit_kernel(
    x_ptr, y_ptr, src_idx_ptr, stride, count_ptr, thr_ptr, need_ptr, gt_ptr, eq_ptr,
    out_idx_ptr, out_key_ptr, out_stride, tile, shift,
    SRC: tl.constexpr, WRITE_KEYS: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):  # fmt: skip
    """Ordered compaction of row r: the (index[, key]) of every element with key >> shift > thr[r]
    and of the first need[r] (in index order) with key >> shift == thr[r], at consecutive slots of
    the output row.  A tile's first slot comes from the counts of the earlier tiles of its row."""
    p = tl.program_id(0)
    r = tl.program_id(1)
    start = p.to(tl.int64) * tile
    end = tl.minimum(start + tile, tl.load(count_ptr + r))
    if start < end:
        base = r.to(tl.int64) * stride
        obase = r.to(tl.int64) * out_stride
        thr = tl.load(thr_ptr + r)
        need = tl.load(need_ptr + r)
        q = tl.arange(0, TILES)
        row = r.to(tl.int64) * tl.num_programs(0)
        n_gt = tl.sum(tl.load(gt_ptr + row + q, mask=q < p, other=0), 0)
        n_eq = tl.sum(tl.load(eq_ptr + row + q, mask=q < p, other=0), 0)
        off = start
        while off < end:
            offs = off + tl.arange(0, BLOCK)
            mask = offs < end
            key = _source_key(x_ptr + base, y_ptr + base, offs, mask, 0.0, SRC, IS_BF16)
            high = key >> shift
            gt = (mask & (high > thr)).to(tl.int32)
            eq = (mask & (high == thr)).to(tl.int32)
            gt_before = n_gt + (tl.cumsum(gt, 0) - gt)
            eq_before = n_eq + (tl.cumsum(eq, 0) - eq)
            take = (gt > 0) | ((eq > 0) & (eq_before < need))
            slot = obase + gt_before + tl.minimum(eq_before, need)
            if SRC == 2:  # _SRC_KEYS: original indices stored next to the keys
                idx = tl.load(src_idx_ptr + base + offs, mask=mask, other=0)
            else:
                idx = offs
            tl.store(out_idx_ptr + slot, idx, mask=take)
            if WRITE_KEYS:
                tl.store(out_key_ptr + slot, key, mask=take)
            n_gt += tl.sum(gt, 0)
            n_eq += tl.sum(eq, 0)
            off += BLOCK


@triton.jit(do_not_specialize=["n", "k", "h"])
def _perm_kernel(out_ptr, keys_ptr, n, k, h, BLOCK: tl.constexpr):
    """out[r, i] = perm_r(i) for i < k (unsorted); row r's 8 round keys at keys[r, :] (int64
    holding uint32 values).  The network and cycle walk are randk.py's."""
    r = tl.program_id(1)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < k
    kp = keys_ptr + r.to(tl.int64) * 8
    u0, u1 = tl.load(kp).to(tl.uint32), tl.load(kp + 1).to(tl.uint32)
    u2, u3 = tl.load(kp + 2).to(tl.uint32), tl.load(kp + 3).to(tl.uint32)
    u4, u5 = tl.load(kp + 4).to(tl.uint32), tl.load(kp + 5).to(tl.uint32)
    u6, u7 = tl.load(kp + 6).to(tl.uint32), tl.load(kp + 7).to(tl.uint32)
    mask = tl.full([BLOCK], 0xFFFFFFFF, tl.uint32) >> (32 - h)
    limit = n.to(tl.uint64)
    x = _feistel(i.to(tl.uint64), h, mask, u0, u1, u2, u3, u4, u5, u6, u7)
    walking = valid & (x >= limit)
    while tl.max(walking.to(tl.int32), 0) > 0:  # every lane's walk ends (randk.py's docstring)
        y = _feistel(x, h, mask, u0, u1, u2, u3, u4, u5, u6, u7)
        x = tl.where(walking, y, x)
        walking = walking & (x >= limit)
    tl.store(out_ptr + r.to(tl.int64) * k + i, x.to(tl.int64), mask=valid)


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


def _emit(p, level, thr, need, gt, eq, out_idx, out_key=None):
    x, y, src_idx, stride, count, block, tile, tiles, src = p
    _emit_kernel[(tiles, count.numel())](
        x, y, src_idx, stride, count, thr, need, gt, eq, out_idx,
        out_idx if out_key is None else out_key, out_idx.shape[1], tile, _LEVELS[level][0],
        src, out_key is not None, x.dtype == torch.bfloat16, block,
        triton.next_power_of_2(tiles), enable_fp_fusion=False,
    )  # fmt: skip


def _level(p, prefix, need, level, counts):
    """One digit level over the pass p: returns (prefix, need, bucket, gt, eq) per row (gt and eq
    per (row, tile), only when counts is true)."""
    x, y, _, stride, count, block, tile, tiles, src = p
    shift, bits = _LEVELS[level]
    rows, dev = count.numel(), x.device
    hist = torch.empty(rows, tiles, 1 << bits, dtype=torch.int32, device=dev)
    above = torch.empty(rows, tiles, dtype=torch.int32, device=dev)
    _hist_kernel[(tiles, rows)](
        x, y, stride, count, prefix, hist, above, tile, shift, src, x.dtype == torch.bfloat16,
        bits, block, enable_fp_fusion=False,
    )  # fmt: skip
    hsum = hist.sum(1, dtype=torch.int64)
    new = [torch.empty(rows, dtype=torch.int64, device=dev) for _ in range(4)]
    _pick_kernel[(rows,)](hsum, prefix, need, *new, 1 << bits, enable_fp_fusion=False)
    prefix, need, bucket, digit = new
    gt = eq = None
    if counts:
        gt = torch.empty(rows, tiles, dtype=torch.int64, device=dev)
        eq = torch.empty(rows, tiles, dtype=torch.int64, device=dev)
        _tile_counts_kernel[(tiles, rows)](
            hist, above, digit, gt, eq, 1 << bits, enable_fp_fusion=False
        )
    return prefix, need, bucket, gt, eq


def _finish(p, prefix, need, out):
    """Digit levels 2.. over the pass, then the ordered emission of each row's k winners."""
    last = len(_LEVELS) - 1
    for level in range(1, last + 1):
        prefix, need, _, gt, eq = _level(p, prefix, need, level, level == last)
    _emit(p, last, prefix, need, gt, eq, out)


def _select(g_new, g_old, k, out):
    """out[r] = ascending indices of the k largest keys of round(g_new[r] - g_old[r])."""
    rows, d = g_new.shape
    dev = g_new.device
    i64 = dict(dtype=torch.int64, device=dev)
    zero, full = torch.zeros(rows, **i64), torch.full((rows,), d, **i64)
    data = (g_new, g_old, g_new, d, full, *_row_shape(d, rows, dev), _SRC_DIFF)
    prefix, need, bucket, gt, eq = _level(data, zero, torch.full((rows,), k, **i64), 0, True)

    cap = _capacity(d, k)
    n_cand = (k - need) + bucket  # >= k
    use_cand = n_cand <= cap
    cand_idx = torch.empty(rows, cap, **i64)
    cand_key = torch.empty(rows, cap, dtype=torch.int32, device=dev)
    live = data[:4] + (torch.where(use_cand, full, zero),) + data[5:]
    _emit(live, 0, prefix, bucket, gt, eq, cand_idx, cand_key)
    cand_count = torch.where(use_cand, n_cand, zero)
    cand = (cand_key, cand_key, cand_idx, cap, cand_count, *_row_shape(cap, rows, dev), _SRC_KEYS)
    _finish(cand, prefix, need, out)
    if cap < d:  # rows whose candidates did not fit: the same levels over the data
        _finish(data[:4] + (torch.where(use_cand, zero, full),) + data[5:], prefix, need, out)


def _message_and_clip(mode, g_new, g_old, idx, val, max_norm, scale):
    rows, d = g_new.shape
    m = val.shape[1]
    block, tile, tiles = _row_shape(m, rows, g_new.device)
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
        perm, keys, d, k, _half_bits(d), block, enable_fp_fusion=False
    )
    idx.copy_(torch.sort(perm, dim=1).values)
    return _message_and_clip(2, g_new, g_old, idx, val, max_norm, scale)


def diff_clip(g_new, g_old, max_norm, out):
    """out = round(g_new - g_old) with each row clipped to norm max_norm[row] ([n, d], the inputs'
    dtype; written, not read).  Returns norms: float64 [n] before clipping.  Other arguments as in
    diff_topk_clip."""
    return _message_and_clip(0, g_new, g_old, g_new, out, max_norm, 1.0)
