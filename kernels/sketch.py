"""MAST sketches (Triton): w = v + S (x - v) and x -= gamma S^T g for a batch of node sketches.

S_r is diagonal, coordinate j kept with scale s or dropped (``fedkern.reference.sketch``):

    perm kind:      kept = {perm_r(t) : lo_r <= t < hi_r}, perm_r the keyed Feistel permutation of
                    [0, d) with cycle walking (kernels/randk.py) under keys[r, 0:8]; s = scale[r]
    bernoulli kind: kept iff (word_j >> 8) < T_j, word_j the Philox word of entry j of the draw
                    keyed by keys[r, 0:4] (kernels/random.py), T_j = ceil(p_j 2^24), s_j = 2^24/T_j

    apply      kept: w = round(v + round32(s round32(x - v)))  (no v: round(s x));  else w = v (+0)
    grad_step  kept: c = round32(gamma s);  x = round(x - round32(c g));  else x unchanged

Kernels.  The lanes of a launch are flattened (row, position) pairs (each lane loads its row's
keys), so a batch of small sketches is one short grid.  _perm_apply_kernel / _perm_step_kernel:
lane (r, t) evaluates perm_r(lo_r + t) and touches only that coordinate (the dense part of apply,
out = v or 0, is a copy done by torch first).  Within a row the coordinates are distinct, so lanes
never collide; with one shared x the launcher runs the rows one after the other (row order is the
definition).  _bern_apply_kernel / _bern_step_kernel: lane (r, j) draws coordinate j's Philox
word of row r; loads of x, v, g are masked by the keep flags.  With a shared x, _bern_step_kernel's
lanes are coordinates and each walks the rows in order.  Every launch uses
enable_fp_fusion=False; the keep scale 2^24 / T is an IEEE division (div_rn).
"""

import torch
import triton
import triton.language as tl

from ._common import block_for, feistel_perm, half_bits, load_f32, round_to, store_f32
from .random import entry_word, keep_threshold


@triton.jit
def _lane_perm(keys_ptr, r, t, valid, d, h):
    """perm_r(t) for lanes of rows r and positions t (int64 tensors): the Feistel network with
    cycle walking under each lane's row keys."""
    base = keys_ptr + r * 8
    u0 = tl.load(base + 0, mask=valid, other=0).to(tl.uint32)
    u1 = tl.load(base + 1, mask=valid, other=0).to(tl.uint32)
    u2 = tl.load(base + 2, mask=valid, other=0).to(tl.uint32)
    u3 = tl.load(base + 3, mask=valid, other=0).to(tl.uint32)
    u4 = tl.load(base + 4, mask=valid, other=0).to(tl.uint32)
    u5 = tl.load(base + 5, mask=valid, other=0).to(tl.uint32)
    u6 = tl.load(base + 6, mask=valid, other=0).to(tl.uint32)
    u7 = tl.load(base + 7, mask=valid, other=0).to(tl.uint32)
    return feistel_perm(t, valid, d, h, u0, u1, u2, u3, u4, u5, u6, u7)


@triton.jit
def _perm_lanes(range_ptr, lane, total, L, row0):
    """(row, position, valid) of flattened lanes: lane = (row - row0) L + offset."""
    r = lane // L + row0
    inside = lane < total
    lo = tl.load(range_ptr + 2 * r, mask=inside, other=0)
    hi = tl.load(range_ptr + 2 * r + 1, mask=inside, other=0)
    t = lo + lane % L
    return r, t, inside & (t < hi)


@triton.jit(do_not_specialize=["d", "h", "x_stride", "v_stride", "total", "L"])
def _perm_apply_kernel(x_ptr, v_ptr, out_ptr, keys_ptr, range_ptr, scale_ptr, d, h, x_stride,
                       v_stride, total, L, HAS_V: tl.constexpr, IS_BF16: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r, t, valid = _perm_lanes(range_ptr, lane, total, L, 0)
    j = _lane_perm(keys_ptr, r, t, valid, d, h)
    s = tl.load(scale_ptr + r, mask=valid, other=0.0)
    xj = load_f32(x_ptr, r * x_stride + j, valid, IS_BF16)
    if HAS_V:
        vj = load_f32(v_ptr, r * v_stride + j, valid, IS_BF16)
        w = vj + s * (xj - vj)
    else:
        w = s * xj
    store_f32(out_ptr, r * d + j, round_to(w, IS_BF16), valid, IS_BF16)


@triton.jit(do_not_specialize=["d", "h", "x_stride", "total", "L", "row0"])
def _perm_step_kernel(x_ptr, g_ptr, keys_ptr, range_ptr, scale_ptr, gamma, d, h, x_stride, total,
                      L, row0, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r, t, valid = _perm_lanes(range_ptr, lane, total, L, row0)
    j = _lane_perm(keys_ptr, r, t, valid, d, h)
    c = gamma * tl.load(scale_ptr + r, mask=valid, other=0.0)
    xj = load_f32(x_ptr, r * x_stride + j, valid, IS_BF16)
    gj = load_f32(g_ptr, r * d + j, valid, IS_BF16)
    store_f32(x_ptr, r * x_stride + j, round_to(xj - c * gj, IS_BF16), valid, IS_BF16)


@triton.jit
def _bern_lanes(keys_ptr, p_ptr, r, offs, mask, p_scalar, PER_ENTRY: tl.constexpr):
    """(keep flags, scales) of coordinates offs of rows r (per lane) of the Bernoulli sketches."""
    base = keys_ptr + r * 4
    w0 = tl.load(base + 0, mask=mask, other=0).to(tl.uint32)
    w1 = tl.load(base + 1, mask=mask, other=0).to(tl.uint32)
    w2 = tl.load(base + 2, mask=mask, other=0).to(tl.uint32)
    w3 = tl.load(base + 3, mask=mask, other=0).to(tl.uint32)
    word = entry_word(offs.to(tl.uint64), w0, w1, w2, w3)
    if PER_ENTRY:
        t = keep_threshold(tl.load(p_ptr + offs, mask=mask, other=1.0))
    else:
        t = keep_threshold(tl.zeros_like(offs).to(tl.float32) + p_scalar)
    keep = mask & ((word >> 8).to(tl.float32) < t)
    s = tl.math.div_rn(tl.zeros_like(t) + 16777216.0, t)
    return keep, s


@triton.jit(do_not_specialize=["d", "x_stride", "v_stride", "total"])
def _bern_apply_kernel(x_ptr, v_ptr, out_ptr, keys_ptr, p_ptr, p_scalar, d, x_stride, v_stride,
                       total, HAS_V: tl.constexpr, PER_ENTRY: tl.constexpr,
                       IS_BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = lane < total
    r = lane // d
    offs = lane % d
    keep, s = _bern_lanes(keys_ptr, p_ptr, r, offs, mask, p_scalar, PER_ENTRY)
    xj = load_f32(x_ptr, r * x_stride + offs, keep, IS_BF16)
    if HAS_V:
        vj = load_f32(v_ptr, r * v_stride + offs, mask, IS_BF16)
        w = tl.where(keep, vj + s * (xj - vj), vj)
    else:
        w = tl.where(keep, s * xj, 0.0)
    store_f32(out_ptr, lane, round_to(w, IS_BF16), mask, IS_BF16)


@triton.jit(do_not_specialize=["d", "x_stride", "rows", "total"])
def _bern_step_kernel(x_ptr, g_ptr, keys_ptr, p_ptr, p_scalar, gamma, d, x_stride, rows, total,
                      SHARED: tl.constexpr, PER_ENTRY: tl.constexpr, IS_BF16: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if SHARED:  # lanes are coordinates of the one x: every row's step, in row order
        mask = lane < d
        xj = load_f32(x_ptr, lane, mask, IS_BF16)
        r = 0
        while r < rows:
            rr = tl.zeros_like(lane) + r
            keep, s = _bern_lanes(keys_ptr, p_ptr, rr, lane, mask, p_scalar, PER_ENTRY)
            gj = load_f32(g_ptr, r * d + lane, keep, IS_BF16)
            xj = tl.where(keep, round_to(xj - (gamma * s) * gj, IS_BF16), xj)
            r += 1
        store_f32(x_ptr, lane, xj, mask, IS_BF16)
    else:  # lanes are (row, coordinate) pairs
        mask = lane < total
        r = lane // d
        offs = lane % d
        keep, s = _bern_lanes(keys_ptr, p_ptr, r, offs, mask, p_scalar, PER_ENTRY)
        xj = load_f32(x_ptr, r * x_stride + offs, keep, IS_BF16)
        gj = load_f32(g_ptr, r * d + offs, keep, IS_BF16)
        store_f32(x_ptr, r * x_stride + offs, round_to(xj - (gamma * s) * gj, IS_BF16), keep,
                  IS_BF16)  # fmt: skip


def _dense_out(x, v, rows):
    d = x.shape[1]
    if v is None:
        return torch.zeros(rows, d, dtype=x.dtype, device=x.device)
    return v.expand(rows, d).clone(memory_format=torch.contiguous_format)


def perm_apply(x, v, keys, ranges, scale):
    """[R, d] = v + S_r (x - v) (perm kind); x [R or 1, d], v None or [R or 1, d]."""
    R, d = keys.shape[0], x.shape[1]
    out = _dense_out(x, v, R)
    L = int((ranges[:, 1] - ranges[:, 0]).max()) if R else 0
    if L == 0:
        return out
    total = R * L
    block = block_for(total, x.device)
    _perm_apply_kernel[(triton.cdiv(total, block),)](
        x, out if v is None else v, out, keys, ranges, scale, d, half_bits(d),
        d if x.shape[0] > 1 else 0, d if v is not None and v.shape[0] > 1 else 0, total, L,
        v is not None, x.dtype == torch.bfloat16, block, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def perm_grad_step_(x, g, keys, ranges, scale, gamma):
    """In place: x_r -= gamma S_r g_r (perm kind); x [R or 1, d] (1: rows applied in order)."""
    R, d = keys.shape[0], x.shape[1]
    lengths = (ranges[:, 1] - ranges[:, 0]).tolist()
    shared = x.shape[0] == 1 and R > 1
    launches = [(r, 1, lengths[r]) for r in range(R)] if shared else [(0, R, max(lengths))]
    for row0, nrows, L in launches:
        if L == 0:
            continue
        total = nrows * L
        block = block_for(total, x.device)
        _perm_step_kernel[(triton.cdiv(total, block),)](
            x, g, keys, ranges, scale, float(gamma), d, half_bits(d), 0 if shared else d, total,
            L, row0, x.dtype == torch.bfloat16, block, enable_fp_fusion=False,
        )  # fmt: skip
    return x


def _p_args(p, like):
    per = isinstance(p, torch.Tensor)
    return (p if per else like), (0.0 if per else float(p)), per


def bern_apply(x, v, keys, p):
    """[R, d] = v + S_r (x - v) (Bernoulli kind); p a float or a float32 tensor [d]."""
    R, d = keys.shape[0], x.shape[1]
    out = torch.empty(R, d, dtype=x.dtype, device=x.device)
    p_ptr, p_scalar, per = _p_args(p, x)
    total = R * d
    block = block_for(total, x.device)
    _bern_apply_kernel[(triton.cdiv(total, block),)](
        x, x if v is None else v, out, keys, p_ptr, p_scalar, d, d if x.shape[0] > 1 else 0,
        d if v is not None and v.shape[0] > 1 else 0, total, v is not None, per,
        x.dtype == torch.bfloat16, block, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def bern_grad_step_(x, g, keys, p, gamma):
    """In place: x_r -= gamma S_r g_r (Bernoulli kind); x [R or 1, d] (1: rows in order)."""
    R, d = keys.shape[0], x.shape[1]
    shared = x.shape[0] == 1 and R > 1
    p_ptr, p_scalar, per = _p_args(p, x)
    total = d if shared else R * d
    block = block_for(total, x.device)
    _bern_step_kernel[(triton.cdiv(total, block),)](
        x, g, keys, p_ptr, p_scalar, float(gamma), d, 0 if shared else d, R, total, shared, per,
        x.dtype == torch.bfloat16, block, enable_fp_fusion=False,
    )  # fmt: skip
    return x
