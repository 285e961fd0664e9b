"""Top-k compression and its error-feedback variants: an on-device radix select (Triton).

Selection key of a value v (31 significant bits; -0 == +0, all NaNs tie, above inf):

    u = bits(fp32(v)) & 0x7fffffff;   key = 0x7f800001 if u > 0x7f800000 else u

Top-k keeps the k largest keys; among equal keys the lower index wins; indices come out ascending.

    topk_compress(x, k):      idx = select(key(x)); val = x[idx]
    ef14_topk_(g, e, k, lr):  a = round(e + lr*g) -> e; idx = select(key(a)); val = a[idx];
                              e[idx] = 0
    ef21_topk_(g, s, k):      d = round(g - s) (never stored); idx = select(key(d)); val = d[idx];
                              s[idx] = round(s[idx] + d[idx])

round() rounds fp32 to the tensor dtype (identity for fp32, round-to-nearest-even for bf16); all
arithmetic is fp32 and every kernel is launched with enable_fp_fusion=False, so e + lr*g is a
rounded product followed by a rounded sum, bit-identical to the C++ core and the torch reference.

Select (``select``): a radix select on the key, digits of _LEVELS most significant first, no host
sync, batched over rows: every grid is (tile, row), row r's state (digit prefix, ties still needed,
element counts) sits in [rows] device tensors, so one launch per step serves all rows.  top-k of a
vector is the one-row case; diffclip.py selects in every row of a difference [n, d] this way.
  1. level-1 pass over the data (fused with computing a for EF14): per tile of `tile` elements, a
     histogram of the top digit (_digit_hist_kernel); tiles keep their own rows, so later per-tile
     counts are exact sums.
  2. the digit B of the k-th largest key, per row (_pick_kernel, on the histograms summed over
     tiles): with s[b] = #{digit >= b}, B = max{b : s[b] >= need}; need -= s[B + 1].  The prefix
     (all digits so far) and `need` live on the device; per-tile counts above / at B follow
     (_tile_counts_kernel) when an emission comes next.
  3. candidates: if C = #{key >> shift1 >= B1} fits a buffer of k + n/16 entries (the usual
     case), one ordered compaction pass copies (index, key) of those elements, and the remaining
     digit levels and the final emission run over the candidates only (O(C) work).  Otherwise the
     remaining levels and the emission run over the data.  Both paths are launched; the one not
     taken gets an element count of 0 on the device and its programs do nothing.
  4. ordered emission: with T the full k-th key and `need` the ties to keep, an element is selected
     if key > T, or key == T and fewer than `need` ties precede it.  Its output slot is
     #{greater before it} + min(#{ties before it}, need): the counts of the row's earlier tiles
     (summed by each program) plus a tl.cumsum inside the block, so indices come out ascending
     without sorting.
  5. epilogue over the k indices: values, and error[idx] = 0 (EF14) or state[idx] += d (EF21).

Full passes over the data: 2 (level 1, compaction) when the candidates fit; otherwise one per digit
level plus the emission, len(_LEVELS) + 1 = 4 (all-equal keys, k-th key in a huge bucket).  EF14's
first pass also writes a; EF21 reads grad and state in every pass.

dtype conversions and launch shapes: _common.py (load_f32 / round_to / store_f32, block_for,
row_tiles).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import Tiling, block_for, load_f32, round_to, row_tiles, store_f32

# (shift, bits) of each radix digit of the 31-bit key, most significant first; they tile bits 0..30.
_LEVELS = ((20, 11), (10, 10), (0, 10))
# Launch shapes of the select's passes (_common.row_tiles): on a GPU about 1024 programs per pass,
# each writing a histogram row per level; in Triton's interpreter (CPU tensors), where every
# program and every jit-function call costs milliseconds, 8 tiles per row of large blocks.
TILING = Tiling(programs=1024, tiles_interpreted=8)
_CAND_SLACK = 16  # candidate buffer holds k + n // _CAND_SLACK entries

# SRC: where a pass reads its keys from
_SRC_X = 0  # key(x)
_SRC_DIFF = 1  # key(round(x - y)): EF21 with x = grad, y = state
_SRC_KEYS = 2  # keys stored in x (candidate buffer), original indices in the idx buffer
_SRC_EF14 = 3  # a = round(y + lr * x) written to y, key(a): EF14 first pass, x = grad, y = error


@triton.jit
def _key(v):
    u = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(u > 0x7F800000, 0x7F800001, u)


@triton.jit
def _source_key(x_ptr, y_ptr, offs, mask, lr, SRC: tl.constexpr, IS_BF16: tl.constexpr):
    if SRC == 0:  # _SRC_X
        key = _key(load_f32(x_ptr, offs, mask, IS_BF16))
    elif SRC == 1:  # _SRC_DIFF
        g = load_f32(x_ptr, offs, mask, IS_BF16)
        s = load_f32(y_ptr, offs, mask, IS_BF16)
        key = _key(round_to(g - s, IS_BF16))
    elif SRC == 2:  # _SRC_KEYS
        key = tl.load(x_ptr + offs, mask=mask, other=0)
    else:  # _SRC_EF14
        g = load_f32(x_ptr, offs, mask, IS_BF16)
        e = load_f32(y_ptr, offs, mask, IS_BF16)
        a = round_to(e + lr * g, IS_BF16)
        store_f32(y_ptr, offs, a, mask, IS_BF16)
        key = _key(a)
    return key


@triton.jit(do_not_specialize=["stride", "tile", "shift"])
def _digit_hist_kernel(
    x_ptr, y_ptr, stride, count_ptr, prefix_ptr, hist_ptr, above_ptr, lr, tile, shift,
    SRC: tl.constexpr, IS_BF16: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (tile p, row r): histogram of the digit (key >> shift) & (2^BITS - 1) over the
    elements of row r's tile whose higher bits key >> (shift + BITS) equal prefix[r], and the count
    of those above the prefix."""
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
    while off < end:  # a while loop: the interpreter cannot range() over tensor bounds
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        key = _source_key(x_ptr + base, y_ptr + base, offs, mask, lr, SRC, IS_BF16)
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


@triton.jit(do_not_specialize=["k"])
def _epilogue_kernel(
    idx_ptr,
    x_ptr,
    y_ptr,
    val_ptr,
    k,
    MODE: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """MODE 0: val = x[idx] (bit copy).  1 (EF14, y = error holding a): val = a[idx], y[idx] = 0.
    2 (EF21, x = grad, y = state): d = round(g - s), val = d, y[idx] = round(s + d)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < k
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    if MODE == 0:
        tl.store(val_ptr + offs, tl.load(x_ptr + idx, mask=mask), mask=mask)
    elif MODE == 1:
        tl.store(val_ptr + offs, tl.load(y_ptr + idx, mask=mask), mask=mask)
        store_f32(y_ptr, idx, tl.zeros([BLOCK], dtype=tl.float32), mask, IS_BF16)
    else:
        g = load_f32(x_ptr, idx, mask, IS_BF16)
        s = load_f32(y_ptr, idx, mask, IS_BF16)
        d = round_to(g - s, IS_BF16)
        store_f32(val_ptr, offs, d, mask, IS_BF16)
        store_f32(y_ptr, idx, round_to(s + d, IS_BF16), mask, IS_BF16)


class _Pass(NamedTuple):
    """Where a pass reads its keys, and its launch shape."""

    src: int  # _SRC_*
    x: torch.Tensor  # [rows, stride] (or 1-D, one row)
    y: torch.Tensor
    idx: torch.Tensor  # original indices of the elements (read for _SRC_KEYS only)
    stride: int  # elements from one row to the next
    count: torch.Tensor  # [rows] int64 on the device: elements to visit, 0 on a path not taken
    block: int
    tile: int
    tiles: int  # per row


def _level(p, prefix_in, need_in, level, counts, lr=0.0):
    """One digit level over the pass p: (prefix, need, bucket, gt, eq) per row; gt and eq per
    (row, tile), only when counts is true (an emission follows)."""
    shift, bits = _LEVELS[level]
    rows, dev = p.count.numel(), p.x.device
    hist = torch.empty(rows, p.tiles, 1 << bits, dtype=torch.int32, device=dev)
    above = torch.empty(rows, p.tiles, dtype=torch.int32, device=dev)
    _digit_hist_kernel[(p.tiles, rows)](
        p.x, p.y, p.stride, p.count, prefix_in, hist, above, lr, p.tile, shift, p.src,
        p.x.dtype == torch.bfloat16, bits, p.block, enable_fp_fusion=False,
    )  # fmt: skip
    hsum = hist.sum(1, dtype=torch.int64)
    new = [torch.empty(rows, dtype=torch.int64, device=dev) for _ in range(4)]
    _pick_kernel[(rows,)](hsum, prefix_in, need_in, *new, 1 << bits, enable_fp_fusion=False)
    prefix, need, bucket, digit = new
    gt = eq = None
    if counts:
        gt = torch.empty(rows, p.tiles, dtype=torch.int64, device=dev)
        eq = torch.empty(rows, p.tiles, dtype=torch.int64, device=dev)
        _tile_counts_kernel[(p.tiles, rows)](
            hist, above, digit, gt, eq, 1 << bits, enable_fp_fusion=False
        )
    return prefix, need, bucket, gt, eq


def _emit(p, level, thr, need, gt, eq, out_idx, out_key=None):
    _emit_kernel[(p.tiles, p.count.numel())](
        p.x, p.y, p.idx, p.stride, p.count, thr, need, gt, eq, out_idx,
        out_idx if out_key is None else out_key, out_idx.shape[-1], p.tile, _LEVELS[level][0],
        p.src, out_key is not None, p.x.dtype == torch.bfloat16, p.block,
        triton.next_power_of_2(p.tiles), enable_fp_fusion=False,
    )  # fmt: skip


def _finish(p, prefix, need, out):
    """Digit levels 2.. (_LEVELS has at least two) over the pass, then the ordered emission of each
    row's k winners into out."""
    last = len(_LEVELS) - 1
    for level in range(1, last + 1):
        prefix, need, _, gt, eq = _level(p, prefix, need, level, level == last)
    _emit(p, last, prefix, need, gt, eq, out)


def _capacity(n, k):
    return min(n, k + max(n // _CAND_SLACK, 1024))


def select(src, x, y, k, out, *, lr=0.0, tiling=TILING):
    """out[r] = the ascending indices of the k largest keys of row r of the source; ties to the
    lower index.  On CUDA nothing waits for the device.

    src: _SRC_X (keys of x), _SRC_DIFF (keys of round(x - y)) or _SRC_EF14 (y <- a = round(y + lr
    * x) in the first pass, keys of a).  x, y: contiguous [rows, n] fp32/bf16 (or 1-D: one row), one
    dtype and device (CUDA, or CPU under TRITON_INTERPRET=1); y is written for _SRC_EF14 only.
    1 <= k <= n.  out: int64 [rows, k] (or [k] for one row) on the device, written.  tiling: the
    launch shape of the passes (``_common.Tiling``; row_tiles divides its programs by rows)."""
    rows, n = (1, x.numel()) if x.dim() == 1 else x.shape
    dev = x.device
    i64 = dict(dtype=torch.int64, device=dev)
    zero, full = torch.zeros(rows, **i64), torch.full((rows,), n, **i64)

    data = _Pass(src, x, y, x, n, full, *row_tiles(n, rows, dev, tiling))
    first = _level(data, zero, torch.full((rows,), k, **i64), 0, True, lr)  # EF14: writes a to y
    prefix, need, bucket, gt, eq = first
    if src == _SRC_EF14:  # a now lives in y: later passes read it as topk reads x
        data = data._replace(src=_SRC_X, x=y)

    # candidates: (index, key) of every element whose top digit is >= B1, in index order.  Both
    # paths are launched, with a row's element count 0 where it is not taken, so that nothing waits
    # for the device.  On CPU tensors (Triton's interpreter, where every launch costs milliseconds)
    # reading the flags is free, and a path that no row takes is skipped.
    cap = _capacity(n, k)
    n_cand = (k - need) + bucket  # >= k
    use_cand = n_cand <= cap
    host = dev.type == "cpu"
    if not host or bool(use_cand.any()):
        cand_idx = torch.empty(rows, cap, **i64)
        cand_key = torch.empty(rows, cap, dtype=torch.int32, device=dev)
        _emit(data._replace(count=torch.where(use_cand, full, zero)), 0, prefix, bucket, gt, eq,
              cand_idx, cand_key)  # fmt: skip
        cand_count = torch.where(use_cand, n_cand, zero)
        tiles = row_tiles(cap, rows, dev, tiling)
        _finish(_Pass(_SRC_KEYS, cand_key, cand_key, cand_idx, cap, cand_count, *tiles),
                prefix, need, out)  # fmt: skip
    if cap < n and (not host or not bool(use_cand.all())):  # rows whose candidates did not fit
        _finish(data._replace(count=torch.where(use_cand, zero, full)), prefix, need, out)
    return out


def _epilogue(mode, idx, x, y, k):
    block = block_for(k, x.device)
    val = torch.empty(k, dtype=x.dtype, device=x.device)
    _epilogue_kernel[(triton.cdiv(k, block),)](
        idx, x, y, val, k, mode, x.dtype == torch.bfloat16, block, enable_fp_fusion=False
    )
    return val


def _select(src, x, y, k, lr):
    return select(src, x, y, k, torch.empty(k, dtype=torch.int64, device=x.device), lr=lr)


def topk_compress(x, k):
    """Top-k of key(x).  x: contiguous 1-D fp32/bf16 (CUDA, or CPU under TRITON_INTERPRET=1),
    1 <= k <= n.  Returns (values [k] x.dtype, exact copies; indices [k] int64 ascending).
    x is not modified."""
    idx = _select(_SRC_X, x, x, k, 0.0)
    return _epilogue(0, idx, x, x, k), idx


def ef14_topk_(grad, error, k, lr):
    """EF14 step: error <- a = round(error + lr*grad); (values, indices) = top-k of a;
    error[indices] = 0.  grad, error: contiguous 1-D, same dtype/device; error is modified in
    place, grad is not.  lr: Python float.
    Returns (values [k] dtype, indices [k] int64 ascending)."""
    idx = _select(_SRC_EF14, grad, error, k, float(lr))
    return _epilogue(1, idx, grad, error, k), idx


def ef21_topk_(grad, state, k):
    """EF21 step: d = round(grad - state) (never stored); (values, indices) = top-k of d;
    state[indices] = round(state + d).  state is modified in place, grad is not.
    Returns (values = d[indices] [k] dtype, indices [k] int64 ascending)."""
    idx = _select(_SRC_DIFF, grad, state, k, 0.0)
    return _epilogue(2, idx, grad, state, k), idx
