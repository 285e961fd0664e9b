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

Select: a radix select on the key, digits of _LEVELS most significant first, no host sync.
  1. level-1 pass over the data (fused with computing a for EF14): per tile of `tile` elements, a
     histogram of the top digit; tiles keep their own rows, so later per-tile counts are exact sums.
  2. small torch ops pick the digit B of the k-th largest key: with s[b] = #{digit >= b},
     B = max{b : s[b] >= need}; need -= s[B + 1].  The prefix (all digits so far) and `need` live on
     the device.
  3. candidates: if C = #{key >> shift1 >= B1} fits a buffer of k + n/16 entries (the usual
     case), one ordered compaction pass copies (index, key) of those elements, and the remaining
     digit levels and the final emission run over the candidates only (O(C) work).  Otherwise the
     remaining levels and the emission run over the data.  Both paths are launched; the one not
     taken gets an element count of 0 on the device and its programs do nothing.
  4. ordered emission: with T the full k-th key and `need` the ties to keep, an element is selected
     if key > T, or key == T and fewer than `need` ties precede it.  Its output slot is
     #{greater before it} + min(#{ties before it}, need): exclusive cumsums of per-tile counts plus
     a tl.cumsum inside the block, so indices come out ascending without sorting.
  5. epilogue over the k indices: values, and error[idx] = 0 (EF14) or state[idx] += d (EF21).

Full passes over the data: 2 (level 1, compaction) when the candidates fit; otherwise one per digit
level plus the emission, len(_LEVELS) + 1 = 4 (all-equal keys, k-th key in a huge bucket).  EF14's
first pass also writes a; EF21 reads grad and state in every pass.

dtype conversions and block sizes: _common.py (load_f32 / round_to / store_f32, block_for).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import block_for, load_f32, round_to, store_f32

# (shift, bits) of each radix digit of the 31-bit key, most significant first; they tile bits 0..30.
_LEVELS = ((20, 11), (10, 10), (0, 10))
# Launch shapes.  On CPU tensors the kernels run in Triton's interpreter, where every program and
# every jit-function call costs milliseconds: few programs, large blocks.
_MAX_PROGRAMS = 1024  # programs of a full pass (GPU); each writes a histogram row per level
_MIN_TILE_BLOCKS = 4  # keeps the histogram rows small next to the data for mid-sized n
_MAX_PROGRAMS_INTERPRETED = 8
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


@triton.jit(do_not_specialize=["tile", "shift"])
def _digit_hist_kernel(
    x_ptr,
    y_ptr,
    count_ptr,
    prefix_ptr,
    hist_ptr,
    above_ptr,
    lr,
    tile,
    shift,
    SRC: tl.constexpr,
    IS_BF16: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per tile: histogram of the digit (key >> shift) & (2^BITS - 1) over the elements whose
    higher bits key >> (shift + BITS) equal the prefix, and the count of those above the prefix."""
    NB: tl.constexpr = 1 << BITS
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * tile
    end = tl.minimum(start + tile, tl.load(count_ptr))
    prefix = tl.load(prefix_ptr)
    hist = tl.zeros([NB], dtype=tl.int32)
    above = tl.zeros([BLOCK], dtype=tl.int32)
    off = start
    while off < end:  # a while loop: the interpreter cannot range() over tensor bounds
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        key = _source_key(x_ptr, y_ptr, offs, mask, lr, SRC, IS_BF16)
        high = key >> (shift + BITS)
        digit = (key >> shift) & (NB - 1)
        hist += tl.histogram(digit, NB, mask=mask & (high == prefix))
        above += (mask & (high > prefix)).to(tl.int32)
        off += BLOCK
    tl.store(hist_ptr + pid.to(tl.int64) * NB + tl.arange(0, NB), hist)
    tl.store(above_ptr + pid, tl.sum(above))


@triton.jit(do_not_specialize=["tile", "shift"])
def _emit_kernel(
    x_ptr,
    y_ptr,
    src_idx_ptr,
    count_ptr,
    thr_ptr,
    need_ptr,
    gt_off_ptr,
    eq_off_ptr,
    out_idx_ptr,
    out_key_ptr,
    tile,
    shift,
    SRC: tl.constexpr,
    WRITE_KEYS: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Ordered compaction: write the (index[, key]) of every element with key >> shift > thr, and of
    the first `need` elements (in index order) with key >> shift == thr, at consecutive slots."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * tile
    end = tl.minimum(start + tile, tl.load(count_ptr))
    thr = tl.load(thr_ptr)
    need = tl.load(need_ptr)
    n_gt = tl.load(gt_off_ptr + pid)  # selected-above-threshold elements in earlier tiles
    n_eq = tl.load(eq_off_ptr + pid)  # threshold ties in earlier tiles
    off = start
    while off < end:
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        key = _source_key(x_ptr, y_ptr, offs, mask, 0.0, SRC, IS_BF16)
        high = key >> shift
        gt = (mask & (high > thr)).to(tl.int32)
        eq = (mask & (high == thr)).to(tl.int32)
        gt_before = n_gt + (tl.cumsum(gt, 0) - gt)
        eq_before = n_eq + (tl.cumsum(eq, 0) - eq)
        take = (gt > 0) | ((eq > 0) & (eq_before < need))
        slot = gt_before + tl.minimum(eq_before, need)
        if SRC == 2:  # _SRC_KEYS
            idx = tl.load(src_idx_ptr + offs, mask=mask, other=0)
        else:
            idx = offs
        tl.store(out_idx_ptr + slot, idx, mask=take)
        if WRITE_KEYS:
            tl.store(out_key_ptr + slot, key, mask=take)
        n_gt += tl.sum(gt)
        n_eq += tl.sum(eq)
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


def _shape(n, device):
    """(BLOCK, tile, programs) of a pass over n elements: a bounded number of whole-block tiles."""
    block = block_for(n, device)
    blocks = triton.cdiv(n, block)
    if device.type == "cpu":
        per_tile = triton.cdiv(blocks, _MAX_PROGRAMS_INTERPRETED)
    else:
        per_tile = max(_MIN_TILE_BLOCKS, triton.cdiv(blocks, _MAX_PROGRAMS))
    tile = block * per_tile
    return block, tile, triton.cdiv(n, tile)


def _pick(hist, above, prefix, need):
    """Choose the digit B of the need-th largest key among the elements matching prefix.

    hist [P, NB] int32, above [P] int32: per-tile digit histograms and counts of higher prefixes.
    Returns (prefix*NB + B, ties still needed within B, bucket size, per-tile #greater,
    per-tile #equal), all on the device; B is clamped to 0 when the histograms are empty (a path
    that is not taken).
    """
    nb = hist.shape[1]
    h = hist.sum(0, dtype=torch.int64)
    s = h.flip(0).cumsum(0).flip(0)  # s[b] = #{digit >= b}
    b = ((s >= need).sum(0, keepdim=True) - 1).clamp_(min=0)
    bucket = h.gather(0, b)
    need = need - (s.gather(0, b) - bucket)
    bins = torch.arange(nb, device=hist.device)
    gt = above.to(torch.int64) + (hist * (bins > b)).sum(1, dtype=torch.int64)
    eq = hist.gather(1, b.expand(hist.shape[0], 1)).squeeze(1).to(torch.int64)
    return prefix * nb + b, need, bucket, gt, eq


class _Pass(NamedTuple):
    """Where a pass reads its keys, and its launch shape."""

    src: int  # _SRC_*
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # original indices of the elements (read for _SRC_KEYS only)
    count: torch.Tensor  # [1] int64 on the device: elements to visit, 0 on a path not taken
    block: int
    tile: int
    grid: int


def _hist(p, prefix, level, lr=0.0):
    shift, bits = _LEVELS[level]
    hist = torch.empty(p.grid, 1 << bits, dtype=torch.int32, device=p.x.device)
    above = torch.empty(p.grid, dtype=torch.int32, device=p.x.device)
    _digit_hist_kernel[(p.grid,)](
        p.x, p.y, p.count, prefix, hist, above, lr, p.tile, shift,
        p.src, p.x.dtype == torch.bfloat16, bits, p.block, enable_fp_fusion=False,
    )  # fmt: skip
    return hist, above


def _emit(p, level, thr, need, gt, eq, out_idx, out_key=None):
    gt_off, eq_off = torch.cumsum(gt, 0) - gt, torch.cumsum(eq, 0) - eq  # exclusive
    _emit_kernel[(p.grid,)](
        p.x, p.y, p.idx, p.count, thr, need, gt_off, eq_off,
        out_idx, out_idx if out_key is None else out_key, p.tile, _LEVELS[level][0],
        p.src, out_key is not None, p.x.dtype == torch.bfloat16, p.block, enable_fp_fusion=False,
    )  # fmt: skip


def _finish(p, prefix, need, out):
    """Digit levels 2.. (_LEVELS has at least two) over the pass, then the ordered emission of the
    k winners into out."""
    for level in range(1, len(_LEVELS)):
        hist, above = _hist(p, prefix, level)
        prefix, need, _, gt, eq = _pick(hist, above, prefix, need)
    _emit(p, len(_LEVELS) - 1, prefix, need, gt, eq, out)


def _capacity(n, k):
    return min(n, k + max(n // _CAND_SLACK, 1024))


def _select(src, x, y, k, lr):
    """Indices (int64 [k], ascending) of the k largest keys of the source; ties -> lower index."""
    n, dev = x.numel(), x.device
    i64 = dict(dtype=torch.int64, device=dev)
    zero, n_dev = torch.zeros(1, **i64), torch.full((1,), n, **i64)

    data = _Pass(src, x, y, x, n_dev, *_shape(n, dev))
    hist, above = _hist(data, zero, 0, lr)  # EF14: also writes a into y
    prefix, need, bucket, gt, eq = _pick(hist, above, zero, torch.full((1,), k, **i64))
    if src == _SRC_EF14:  # a now lives in y: later passes read it as topk reads x
        data = data._replace(src=_SRC_X, x=y)

    # candidates: (index, key) of every element whose top digit is >= B1, in index order
    cap = _capacity(n, k)
    n_cand = (k - need) + bucket  # >= k
    use_cand = n_cand <= cap
    cand_idx = torch.empty(cap, **i64)
    cand_key = torch.empty(cap, dtype=torch.int32, device=dev)
    live = torch.where(use_cand, n_dev, zero)
    _emit(data._replace(count=live), 0, prefix, bucket, gt, eq, cand_idx, cand_key)

    out = torch.empty(k, **i64)
    cand = _Pass(_SRC_KEYS, cand_key, cand_key, cand_idx, n_cand, *_shape(cap, dev))
    _finish(cand._replace(count=torch.where(use_cand, n_cand, zero)), prefix, need, out)
    if cap < n:  # the same over the data, live only when the candidates did not fit
        _finish(data._replace(count=torch.where(use_cand, zero, n_dev)), prefix, need, out)
    return out


def _epilogue(mode, idx, x, y, k):
    block = block_for(k, x.device)
    val = torch.empty(k, dtype=x.dtype, device=x.device)
    _epilogue_kernel[(triton.cdiv(k, block),)](
        idx, x, y, val, k, mode, x.dtype == torch.bfloat16, block, enable_fp_fusion=False
    )
    return val


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
