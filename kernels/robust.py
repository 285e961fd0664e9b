"""Per-coordinate robust aggregation (Triton): coordinate-wise median and trimmed mean.

X [n, d] is a stack of n client vectors (row-major, fp32 or bf16); out [d] has X's dtype.  Within a
column, values are ordered by the int32 key

    u = bits(fp32(v));  m = u & 0x7fffffff
    key = 0x7f800001 if m > 0x7f800000 else (-m if u < 0 else m)

(order-preserving: -0 == +0, all NaNs equal and above +inf); among equal keys the lower row ranks
lower.  rank r = the r-th smallest (0-based).

    coordinate_median: n odd: the value of rank (n-1)/2; n even: round((lo + hi) * 0.5) with lo, hi
        the values of ranks n/2 - 1 and n/2 (fp32 arithmetic).
    trimmed_mean(f):   s = +0.0; for i = 0..n-1 (row order): if f <= rank(i) <= n-f-1: s = s + x[i];
                       out = round(s / (n - 2f))  (IEEE division, no flush of subnormals)

One program per tile of BLOCK_D columns holds the [N_PAD, BLOCK_D] key slab in registers (N_PAD =
next power of two >= n; padding rows get the key 0x7fffffff, above every real key, so they rank
last and are never selected).  The key of rank r in each column is found by a bitwise search:
t = the largest key with #{key < t} <= r, decided bit by bit from the sign bit down (32 counting
passes over the slab, each a compare and a sum along axis 0).  The median then picks the element
itself -- the (r - #{key < t})-th entry with key t in row order, by a tl.cumsum along axis 0 --
and reloads it, so -0.0 / +0.0 come out as stored.  The trimmed mean finds the threshold keys
t_lo, t_hi of ranks f and n-f-1, then streams the rows in order: row i is kept if its key lies
strictly between the thresholds, or equals one and its rank #{key < t} + #{earlier ties} is in
range; adding +-0.0 never changes s (s starts at +0.0 and can never become -0.0), so excluded rows
add 0.0.  f = 0 skips the search.  All arithmetic fp32, launched with enable_fp_fusion=False and
without libdevice's flush-to-zero, so the results are bit-identical to the C++ core and the
reference (NaN payloads aside).  n > MAX_ROWS (1024) raises ValueError: fedkern.ops.robust routes
such stacks elsewhere.
"""

import torch
import triton
import triton.language as tl

from ._common import load_f32, round_to, store_f32

MAX_ROWS = 1024
# GPU launch shapes: keys per program (N_PAD * BLOCK_D; fewer from N_PAD = 128 up) and warps.
# Chosen from ptxas register counts for sm_90 (no spills; one column per thread up to N_PAD = 64),
# not yet timed on a GPU.
TUNING = {"elems": 8192, "elems_large": 4096, "warps": 4, "max_block_d": 1024}
_ELEMS_INTERPRETED = 1 << 16  # the interpreter pays per program: few, large programs
_UNROLL = 4  # rows loaded together in the trimmed mean's row-order sum


@triton.jit
def _key(v):
    """Order-preserving int32 key of fp32 values (-0 == +0; NaN = 0x7f800001, above +inf)."""
    u = v.to(tl.int32, bitcast=True)
    m = u & 0x7FFFFFFF
    return tl.where(m > 0x7F800000, 0x7F800001, tl.where(u < 0, -m, m))


@triton.jit
def _load_keys(x_ptr, rows, cols, n, d, cmask, IS_BF16: tl.constexpr):
    """Key slab [N_PAD, BLOCK_D] of the tile; padding rows (and columns) get 0x7fffffff."""
    rmask = rows < n
    offs = rows[:, None].to(tl.int64) * d + cols[None, :]
    v = load_f32(x_ptr, offs, rmask[:, None] & cmask[None, :], IS_BF16)
    return tl.where(rmask[:, None], _key(v), 0x7FFFFFFF)


@triton.jit
def _count_below(key, t):
    return tl.sum((key < t[None, :]).to(tl.int32), 0)


@triton.jit
def _rank_key(key, r):
    """Per column, the key of rank r: the largest t with #{key < t} <= r, sign bit first."""
    t = tl.where(tl.sum((key < 0).to(tl.int32), 0) <= r, 0, -2147483648)
    bit = r * 0 + (1 << 30)
    while bit > 0:  # a while loop: the interpreter cannot range() with numpy 2.4
        c = t | bit
        t = tl.where(_count_below(key, c) <= r, c, t)
        bit = bit >> 1
    return t


@triton.jit
def _tie_row(key, rows, t, m):
    """Per column, the row of the m-th (0-based, in row order) entry whose key equals t."""
    eq = (key == t[None, :]).to(tl.int32)
    sel = (eq > 0) & ((tl.cumsum(eq, 0) - eq) == m[None, :])
    return tl.sum(tl.where(sel, rows[:, None], 0), 0)


@triton.jit(do_not_specialize=["n", "d"])
def _median_kernel(
    x_ptr, out_ptr, n, d, IS_BF16: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    rows = tl.arange(0, N_PAD)
    key = _load_keys(x_ptr, rows, cols, n, d, cmask, IS_BF16)
    r_lo = (n - 1) // 2
    r_hi = n // 2  # == r_lo for odd n: hi is then the same element as lo
    t = _rank_key(key, r_lo)
    less = _count_below(key, t)
    n_le = less + tl.sum((key == t[None, :]).to(tl.int32), 0)
    # rank r_hi: another tie of t, or else the smallest key above t (a real row: r_hi < n)
    nxt = tl.min(tl.where(key > t[None, :], key, 0x7FFFFFFF), 0)
    same = n_le > r_hi
    t_hi = tl.where(same, t, nxt)
    m_hi = tl.where(same, r_hi - less, 0)
    row_lo = _tie_row(key, rows, t, r_lo - less)
    row_hi = _tie_row(key, rows, t_hi, m_hi)
    lo = load_f32(x_ptr, row_lo.to(tl.int64) * d + cols, cmask, IS_BF16)
    hi = load_f32(x_ptr, row_hi.to(tl.int64) * d + cols, cmask, IS_BF16)
    out = tl.where(r_lo == r_hi, lo, round_to((lo + hi) * 0.5, IS_BF16))
    store_f32(out_ptr, cols, out, cmask, IS_BF16)


@triton.jit(do_not_specialize=["n", "d", "f"])
def _trimmed_mean_kernel(
    x_ptr,
    out_ptr,
    n,
    d,
    f,
    IS_BF16: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    top = n - 1 - f  # highest kept rank
    # f = 0 keeps every row: thresholds outside the range of real keys
    t_lo = tl.full([BLOCK_D], -2147483648, tl.int32)
    t_hi = tl.full([BLOCK_D], 2147483647, tl.int32)
    less_lo = tl.zeros([BLOCK_D], tl.int32)
    less_hi = tl.zeros([BLOCK_D], tl.int32)
    if f > 0:
        key = _load_keys(x_ptr, tl.arange(0, N_PAD), cols, n, d, cmask, IS_BF16)
        t_lo = _rank_key(key, f)
        t_hi = _rank_key(key, top)
        less_lo = _count_below(key, t_lo)
        less_hi = _count_below(key, t_hi)
    s = tl.zeros([BLOCK_D], tl.float32)
    ties_lo = tl.zeros([BLOCK_D], tl.int32)  # entries with key t_lo in earlier rows
    ties_hi = tl.zeros([BLOCK_D], tl.int32)
    i = n * 0
    while i < n:  # rows in order, UNROLL loads in flight; rows >= n are masked out
        for u in tl.static_range(UNROLL):
            ok = cmask & (i + u < n)
            v = load_f32(x_ptr, (i + u).to(tl.int64) * d + cols, ok, IS_BF16)
            k = _key(v)
            at_lo = ok & (k == t_lo)
            at_hi = ok & (k == t_hi)
            keep = (k > t_lo) | (at_lo & (less_lo + ties_lo >= f))
            keep = keep & ((k < t_hi) | (at_hi & (less_hi + ties_hi <= top)))
            s = s + tl.where(ok & keep, v, 0.0)
            ties_lo += at_lo.to(tl.int32)
            ties_hi += at_hi.to(tl.int32)
        i += UNROLL
    mean = tl.math.div_rn(s, tl.full([BLOCK_D], 1.0, tl.float32) * (n - 2 * f).to(tl.float32))
    store_f32(out_ptr, cols, round_to(mean, IS_BF16), cmask, IS_BF16)


def _launch_shape(n, d, device):
    """(N_PAD, BLOCK_D, programs) for an [n, d] stack."""
    if n > MAX_ROWS:
        raise ValueError(f"x must have at most {MAX_ROWS} rows for the Triton kernels, got n = {n}")
    n_pad = triton.next_power_of_2(n)
    if device.type == "cpu":
        elems = _ELEMS_INTERPRETED
    else:
        elems = TUNING["elems"] if n_pad <= 64 else TUNING["elems_large"]
    block_d = max(1, min(elems // n_pad, TUNING["max_block_d"], triton.next_power_of_2(d)))
    return n_pad, block_d, triton.cdiv(d, block_d)


def coordinate_median(x, out):
    """Median of every column of x [n, d] (n <= 1024; mean of the two middle values for even n).

    x: contiguous fp32/bf16 (CUDA, or CPU under TRITON_INTERPRET=1); out: [d], x's dtype, written
    in place; x is not modified.  Raises ValueError for n > 1024.
    """
    n, d = x.shape
    n_pad, block_d, grid = _launch_shape(n, d, x.device)
    _median_kernel[(grid,)](
        x, out, n, d, x.dtype == torch.bfloat16, n_pad, block_d,
        num_warps=TUNING["warps"], enable_fp_fusion=False, enable_reflect_ftz=False,
    )  # fmt: skip
    return out


def trimmed_mean(x, f, out):
    """Mean of every column of x [n, d] without its f lowest and f highest values (0 <= 2f < n,
    n <= 1024), the kept values summed in row order.

    x: contiguous fp32/bf16 (CUDA, or CPU under TRITON_INTERPRET=1); f: int; out: [d], x's dtype,
    written in place; x is not modified.  Raises ValueError for n > 1024.
    """
    n, d = x.shape
    n_pad, block_d, grid = _launch_shape(n, d, x.device)
    _trimmed_mean_kernel[(grid,)](
        x, out, n, d, int(f), x.dtype == torch.bfloat16, n_pad, block_d, _UNROLL,
        num_warps=TUNING["warps"], enable_fp_fusion=False, enable_reflect_ftz=False,
    )  # fmt: skip
    return out
