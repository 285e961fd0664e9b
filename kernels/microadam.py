"""MicroAdam's fused optimizer step over a list of tensors (Triton); the exact numerics are those of
fedkern/reference/microadam.py, which also documents the state layout.

Per tensor (n elements, blocks of D, K kept per block, buckets of Q, window of m rows), per block:

    a    = fp32(g) + (ef_min[q] + code * ef_scale[q])          code: 4-bit error feedback
    key  = bits(|a|) (int32, NaN above inf); the K_b = min(K, block length) largest keys, ties to
           the lower index, go to window row `row` (ascending local indices as int16, a as bf16,
           then -1 / 0 in unused slots)
    r    = a with the selected entries set to 0; per bucket lo = min r, hi = max r,
           scale = (hi - lo) / 15, code = clamp(floor((r - lo) / scale + 0.5), 0, 15) (0 when
           scale is not > 0) -> ef, ef_min, ef_scale
    mom1 = sum_age w1[age] * v, mom2 = sum_age w2[age] * v^2 over the window entries (i, v)
    p    = round(p * decay - (c1 * mom1) / (sqrt(mom2) * c2 + eps))

Every sum and product is rounded to fp32 on its own (launches pass enable_fp_fusion=False; division
and sqrt are IEEE: div_rn, sqrt_rn); bf16 is rounded with the integer helpers of _common.py.

Kernels (each launched once per parameter dtype present; one program per block of D elements of
any tensor of the call; per-tensor pointers, sizes and constants come from an int64 table):
  _select_quantize_kernel  steps 1-3: the block is held in registers; the K_b-th largest key T is
      found by a bitwise search from the top bit (31 block-wide counts; TUNING["bits"] = 2 packs
      three counts per reduction, 8 is a radix select by 8-bit histograms); selected = key > T,
      or key == T and fewer than K_b - #{key > T} ties before it (exclusive tl.cumsum);
      slot = cumsum(selected) - 1 (scatter store, indices come out ascending); bucket min/max on
      a [D/Q, Q] view.
  _window_scratch_kernel   steps 4-5: persistent programs, each with a 2*D fp32 scratch (see its
      docstring): the window rows are added into the scratch newest first, one row at a time
      (a row's indices are distinct; a barrier orders the rows, so the moments equal the
      reference's bit for bit), then one streaming pass updates the block.  (A first design that
      looked every entry up in every row by binary search ran 1.6x slower on the H200.)
The second launch sees the window row written by the first (kernel boundary).

Launcher, per parameter dtype: an int64 table (per tensor: the 7 data pointers, n, its first block,
its window row, c1 and c2 as float32 bits; then w1 and w2), one pinned host-to-device copy per call;
a cached int32 block -> tensor map; grid = all blocks of the dtype's tensors.
"""

import contextlib

import torch
import triton
import triton.language as tl

from fedkern.reference.microadam import TABLE_COLS, block_owners, launch_tables

from ._common import load_f32, round_to, store_f32

# Columns of the per-tensor table (int64); floats are stored as their float32 bits.
_P = tl.constexpr(0)
_G = tl.constexpr(1)
_EF = tl.constexpr(2)
_EF_MIN = tl.constexpr(3)
_EF_SCALE = tl.constexpr(4)
_IDX = tl.constexpr(5)
_VAL = tl.constexpr(6)
_N = tl.constexpr(7)
_FIRST = tl.constexpr(8)  # index of the tensor's first block in the launch
_ROW = tl.constexpr(9)
_C1 = tl.constexpr(10)
_C2 = tl.constexpr(11)
_NF = tl.constexpr(12)
_LEVELS = tl.constexpr(15.0)


@triton.jit
def _ptr(row_ptr, col: tl.constexpr, ty: tl.constexpr):
    return tl.load(row_ptr + col).to(tl.pointer_type(ty), bitcast=True)


@triton.jit
def _f32_at(ptr):
    return tl.load(ptr).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["k"])
def _select_quantize_kernel(
    tab_ptr,
    owner_ptr,
    k,
    IS_BF16: tl.constexpr,
    D: tl.constexpr,
    Q: tl.constexpr,
    BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    row_ptr = tab_ptr + tl.load(owner_ptr + pid).to(tl.int64) * _NF
    if IS_BF16:
        g_ptr = _ptr(row_ptr, _G, tl.bfloat16)
    else:
        g_ptr = _ptr(row_ptr, _G, tl.float32)
    ef_ptr = _ptr(row_ptr, _EF, tl.uint8)
    min_ptr = _ptr(row_ptr, _EF_MIN, tl.float32)
    scale_ptr = _ptr(row_ptr, _EF_SCALE, tl.float32)
    n = tl.load(row_ptr + _N)
    b = pid - tl.load(row_ptr + _FIRST)
    k64 = k.to(tl.int64)
    ncols = tl.cdiv(n, D) * k64
    col0 = tl.load(row_ptr + _ROW) * ncols + b * k64  # window row `row`, block b's first column
    idx_ptr = _ptr(row_ptr, _IDX, tl.int16) + col0
    val_ptr = _ptr(row_ptr, _VAL, tl.bfloat16) + col0
    start = b * D
    length = tl.minimum(n - start, D)
    kb = tl.minimum(k64, length).to(tl.int32)
    offs = tl.arange(0, D)
    mask = offs < length

    # 1. a = g + dequantized error feedback
    byte = tl.load(ef_ptr + start // 2 + offs // 2).to(tl.int32)
    code = ((byte >> ((offs & 1) * 4)) & 15).to(tl.float32)
    bucket = start // Q + offs // Q
    e = tl.load(min_ptr + bucket) + code * tl.load(scale_ptr + bucket)
    a = tl.where(mask, load_f32(g_ptr + start, offs, mask, IS_BF16) + e, 0.0)

    # 2. threshold T = the kb-th largest key, built from the top bit down; padding has key -1
    key = tl.where(mask, a.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)
    thr = kb * 0
    bit = kb * 0 + 30
    if BITS == 8:  # radix select: 4 histograms of 8, 8, 8 and 7 bits among the keys left
        bins = tl.arange(0, 256)
        cand = mask
        total = length.to(tl.int32)  # keys matching the threshold's bits found so far
        need = kb  # of those, how many the top-K still takes
        shift = 23
        while shift >= 0:
            digit = (key >> shift) & 255
            hist = tl.histogram(digit, 256, mask=cand)
            cum = tl.cumsum(hist, 0)
            # the threshold's digit d: cum[d - 1] <= total - need < cum[d]
            d = tl.sum((cum <= total - need).to(tl.int32))
            at = tl.sum(tl.where(bins == d, (cum.to(tl.int64) << 20) | hist, 0))
            need -= total - (at >> 20).to(tl.int32)  # minus the keys with a larger digit
            total = (at & 0xFFFFF).to(tl.int32)
            thr = thr | (d << shift)
            cand = cand & (digit == d)
            if shift == 7:  # the last 7 bits (bit 7, already fixed, rides along in the digit)
                shift = 0
            else:
                shift -= 8
    elif BITS == 2:  # bit 30 alone, then bits 29..0 two at a time: 16 block-wide counts, not 31
        thr = tl.where(tl.sum((key >= (1 << 30)).to(tl.int32)) >= kb, 1 << 30, 0)
        bit -= 2
        while bit >= 0:  # counts of key >= thr | j << bit for j = 1, 2, 3 in one int64 sum
            c1_ = (key >= (thr | (1 << bit))).to(tl.int64)
            c2_ = (key >= (thr | (2 << bit))).to(tl.int64)
            c3_ = (key >= (thr | (3 << bit))).to(tl.int64)
            packed = tl.sum(c1_ | (c2_ << 16) | (c3_ << 32))  # counts <= D <= 2**15
            j = ((packed & 0xFFFF) >= kb).to(tl.int32)
            j += (((packed >> 16) & 0xFFFF) >= kb).to(tl.int32)
            j += (((packed >> 32) & 0xFFFF) >= kb).to(tl.int32)
            thr = thr | (j << bit)
            bit -= 2
    else:
        while bit >= 0:  # a while loop: the interpreter cannot range() here
            cand = thr | (1 << bit)
            thr = tl.where(tl.sum((key >= cand).to(tl.int32)) >= kb, cand, thr)
            bit -= 1
    gt = (key > thr).to(tl.int32)
    eq = (key == thr).to(tl.int32)
    need = kb - tl.sum(gt)
    sel = (gt > 0) | ((eq > 0) & (tl.cumsum(eq, 0) - eq < need))
    slot = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(idx_ptr + slot, offs.to(tl.int16), mask=sel)
    store_f32(val_ptr, slot, round_to(a, True), sel, True)
    pad = (offs >= kb) & (offs < k)  # unused slots (only when the block is shorter than k)
    tl.store(idx_ptr + offs, tl.full([D], -1, tl.int16), mask=pad)
    store_f32(val_ptr, offs, tl.zeros([D], dtype=tl.float32), pad, True)

    # 3. 4-bit quantization of the residual, per bucket of Q elements of the tensor
    r = tl.reshape(tl.where(sel, 0.0, a), [D // Q, Q])
    inside = tl.reshape(mask, [D // Q, Q])
    lo = tl.min(tl.where(inside, r, float("inf")), axis=1)
    hi = tl.max(tl.where(inside, r, float("-inf")), axis=1)
    empty = tl.arange(0, D // Q) * Q >= length
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    scale = tl.math.div_rn(hi - lo, tl.full([D // Q], _LEVELS, tl.float32))
    sc = tl.broadcast_to(scale[:, None], [D // Q, Q])
    ok = (sc > 0.0) & inside  # scale > 0 is false for NaN
    c = tl.floor(tl.math.div_rn(r - lo[:, None], tl.where(ok, sc, 1.0)) + 0.5)
    c = tl.minimum(tl.maximum(tl.where(c != c, 0.0, c), 0.0), _LEVELS)
    c = tl.where(ok, c, 0.0).to(tl.int32)
    pair = tl.reshape(c, [D // 2, 2]) << (tl.arange(0, 2) * 4)[None, :]
    tl.store(ef_ptr + start // 2 + tl.arange(0, D // 2), tl.sum(pair, axis=1).to(tl.uint8))
    qoffs = start // Q + tl.arange(0, D // Q)
    tl.store(min_ptr + qoffs, lo)
    tl.store(scale_ptr + qoffs, scale)


@triton.jit
def _window_rows(
    idx_ptr, val_ptr, s1, s2, w_ptr, row, ncols, m, k, KP: tl.constexpr, CLEAR: tl.constexpr
):
    """The block's window rows, newest first: add w1[age] * v to s1[i] and w2[age] * v^2 to s2[i]
    for every entry (i, v), with a barrier after each row; CLEAR: set the touched entries to 0."""
    j = tl.arange(0, KP)
    age = 0
    while age < m:
        rp = (row - age + m) % m * ncols
        c0 = 0
        while c0 < k:
            x = tl.load(idx_ptr + rp + c0 + j, mask=c0 + j < k, other=-1).to(tl.int32)
            ok = x >= 0
            if CLEAR:
                tl.store(s1 + x, tl.zeros([KP], dtype=tl.float32), mask=ok)
                tl.store(s2 + x, tl.zeros([KP], dtype=tl.float32), mask=ok)
            else:
                v = load_f32(val_ptr + rp + c0, j, ok, True)
                a1 = tl.load(s1 + x, mask=ok, other=0.0)
                a2 = tl.load(s2 + x, mask=ok, other=0.0)
                tl.store(s1 + x, a1 + _f32_at(w_ptr + age) * v, mask=ok)
                tl.store(s2 + x, a2 + _f32_at(w_ptr + m + age) * (v * v), mask=ok)
            c0 += KP
        if not CLEAR:
            tl.debug_barrier()  # this row's sums are visible to the whole program
        age += 1


@triton.jit(do_not_specialize=["total_blocks", "k", "m", "w_off", "decay", "eps"])
def _window_scratch_kernel(
    tab_ptr,
    owner_ptr,
    scratch_ptr,
    total_blocks,
    k,
    m,
    w_off,
    decay,
    eps,
    IS_BF16: tl.constexpr,
    D: tl.constexpr,
    KP: tl.constexpr,
    CH: tl.constexpr,
):
    """Steps 4-5 with a per-program scratch of 2*D fp32 (zero on entry, zero again on exit):
    persistent programs take blocks pid, pid + P, ...; each adds the window rows into its scratch
    one row at a time, newest first (a row's indices are distinct, so a row's scatter has no
    conflicts; a barrier orders the rows; the sums are in the reference's order), then streams
    the block once: p = p * decay - (c1 * mom1) / (sqrt(mom2) * c2 + eps) everywhere (exactly
    p * decay where the moments are 0), then clears the touched scratch entries."""
    pid = tl.program_id(0)
    s1 = scratch_ptr + pid.to(tl.int64) * (2 * D)
    s2 = s1 + D
    blk = pid
    while blk < total_blocks:
        row_ptr = tab_ptr + tl.load(owner_ptr + blk).to(tl.int64) * _NF
        if IS_BF16:
            p_ptr = _ptr(row_ptr, _P, tl.bfloat16)
        else:
            p_ptr = _ptr(row_ptr, _P, tl.float32)
        n = tl.load(row_ptr + _N)
        b = blk - tl.load(row_ptr + _FIRST)
        row = tl.load(row_ptr + _ROW).to(tl.int32)
        c1 = _f32_at(row_ptr + _C1)
        c2 = _f32_at(row_ptr + _C2)
        k64 = k.to(tl.int64)
        ncols = tl.cdiv(n, D) * k64
        idx_ptr = _ptr(row_ptr, _IDX, tl.int16) + b * k64  # block b's columns of row 0
        val_ptr = _ptr(row_ptr, _VAL, tl.bfloat16) + b * k64
        start = b * D
        length = tl.minimum(n - start, D)
        _window_rows(idx_ptr, val_ptr, s1, s2, tab_ptr + w_off, row, ncols, m, k, KP, False)
        o0 = 0
        while o0 < length:
            offs = o0 + tl.arange(0, CH)
            inb = offs < length
            m1 = tl.load(s1 + offs, mask=inb, other=0.0)
            m2 = tl.load(s2 + offs, mask=inb, other=0.0)
            p = load_f32(p_ptr + start, offs, inb, IS_BF16)
            u = tl.math.div_rn(c1 * m1, tl.sqrt_rn(m2) * c2 + eps)
            store_f32(p_ptr + start, offs, round_to(p * decay - u, IS_BF16), inb, IS_BF16)
            o0 += CH
        tl.debug_barrier()  # every read of the scratch is done
        _window_rows(idx_ptr, val_ptr, s1, s2, tab_ptr + w_off, row, ncols, m, k, KP, True)
        tl.debug_barrier()  # the scratch is clear before the next block
        blk += tl.num_programs(0)


#: Launch choices (bench/microadam_sweep.py times the alternatives on a GPU):
#: bits: threshold bits found per block-wide count in the selection (1 or 2), or 8 for a radix
#: select by histograms of 8 bits; warps_select: warps of the selection kernel (None: by D);
#: warps_window: warps of the window kernel; programs_per_sm: its resident programs per SM.
#: On the H200 (bench/results/logs/microadam-sweep-*): 1 bit and 8 warps (by D) were fastest.
TUNING = {"bits": 1, "warps_select": None, "warps_window": 4, "programs_per_sm": 4}


def _programs(device) -> int:
    if device.type != "cuda":
        return 3  # interpreter: a few programs, so that each takes several blocks in tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return sms * TUNING["programs_per_sm"]


def _num_warps(d):
    return min(32, max(4, d // 512))


def microadam_step_(
    params, grads, ef, ef_min, ef_scale, idx, val, rows, c1, c2, decay, eps, w1, w2,
    block_size, k, quant_bucket,
) -> None:  # fmt: skip
    """One MicroAdam step over lists of tensors, in place; arguments as in
    ``fedkern.reference.microadam.microadam_step_`` (validated by ``fedkern.ops.microadam``).

    params/grads: contiguous 1-D fp32/bf16 (dtypes may differ between tensors, grads[i] has
    params[i]'s dtype); ef uint8 [nb*D/2], ef_min/ef_scale fp32 [nb*D/Q], idx int16 [m, nb*K],
    val bf16 [m, nb*K]; all on one device (CUDA, or CPU under TRITON_INTERPRET=1).  rows, c1, c2:
    per tensor; w1, w2: per age (length m); decay, eps: floats.  params and the state are updated.
    Two launches per parameter dtype present.
    """
    device = params[0].device
    D, Q, m = block_size, quant_bucket, len(w1)
    tables = launch_tables(params, grads, ef, ef_min, ef_scale, idx, val, rows, c1, c2, w1, w2, D)
    for dtype, nbs, host in tables:
        tab = torch.from_numpy(host)
        grid = (int(sum(nbs)),)
        bf16 = dtype == torch.bfloat16
        ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            if device.type == "cuda":  # pinned + non_blocking: no host sync with queued work
                tab = tab.pin_memory().to(device, non_blocking=True)
            owners = block_owners(nbs, device)
            _select_quantize_kernel[grid](
                tab, owners, k, bf16, D, Q, TUNING["bits"],
                num_warps=TUNING["warps_select"] or _num_warps(D), enable_fp_fusion=False,
            )  # fmt: skip
            programs = min(grid[0], _programs(device))
            scratch = torch.zeros(programs * 2 * D, dtype=torch.float32, device=device)
            _window_scratch_kernel[(programs,)](
                tab, owners, scratch, grid[0], k, m, len(nbs) * TABLE_COLS, float(decay),
                float(eps), bf16, D, min(64, triton.next_power_of_2(k)), min(D, 1024),
                num_warps=TUNING["warps_window"], enable_fp_fusion=False,
            )  # fmt: skip
