"""Row-wise robust aggregation (Triton): gather-mean, geometric median, centered and row clipping.

X [n, d] is a stack of n client vectors (row-major, fp32 or bf16).

    gather_mean:  out[q, :] = round( (sum over t = 0..s-1 with idx[q, t] >= 0, in t order, of
                  fp32(X[idx[q, t], :])) / count_q );  idx int64 [r, s] (-1 = trailing padding),
                  out [r, d] in X's dtype.  The fp32 sum starts from the first valid term (one
                  term is copied exactly, -0.0 kept); one IEEE division (tl.math.div_rn), skipped
                  for count_q == 1; count_q == 0 (outside the contract) gives NaN.  One program per
                  (output row, block of columns).

Distance of row i to an fp32 point z (difference rounded in fp32, squares and sums in fp64):

    r_i(z) = sqrt(sum_k double(fp32(X[i,k]) - z_k)^2);   row i is "bad" when r_i is not finite

    geometric_median (smoothed Weiszfeld), z = z0, iters times:
        w_i = 1 / max(r_i(z), nu) (bad rows: 0);  W = sum_i w_i;  W == 0: z = NaN;
        z_k = float(sum over rows with w_i > 0, in row order, from 0.0, of (w_i / W) * X[i,k])
    centered_clip, v = v0, iters times:
        s_i = min(1, tau / r_i(v)) (r_i == 0: 1; bad rows: 0);
        v_k = float(double(v_k) + sum over rows with s_i > 0, in row order, from 0.0, of
                    (s_i / n) * (double(X[i,k]) - double(v_k)))
    clip_rows_ (in place): norm_i = r_i(0);  bad: row := +0.0, norm reported as +inf;
        norm_i <= max_norm[i]: untouched;  else X[i,k] = round(float(max_norm[i] / norm_i) * X[i,k])

Kernels: _sumsq writes the partial sums of squares part[i, t] of column chunk t (programs over
(chunk, block of ROWS rows); a [ROWS, BLOCK_D] fp64 accumulator walks the chunk, then tl.sum over
BLOCK_D); _weights (one program) adds each row's partials and turns them into the per-row
coefficients (c_i = w_i / W or s_i / n; 0 = row skipped); _update (programs over column blocks)
walks the rows in order and writes the new point and its rounding to `out`.  One iteration is
3 launches and 2 passes over X; the host never waits on the device (W == 0 is a flag read by
_update).  clip_rows_: _sumsq, _clip_stats (norms, per-row fp32 scale), _scale (only the rows that
change are read and written again).

Summation orders (fixed for a given shape and launch configuration, so repeated runs give the same
bits; they differ from the C++ core's, which the spec allows for fp64 sums): r_i^2 = tl.sum over
the TB lanes of a [RB, TB] accumulator of the chunk partials, each partial a tl.sum over BLOCK_D
lanes of sequential per-lane sums; W = tl.sum of per-lane sums over row blocks.  The weighted sums
over rows are in row order as specified, identical to the C++ core given the same coefficients.
fp64 division and sqrt are IEEE (PTX has no approximate fp64 forms); every launch passes
enable_fp_fusion=False, so no FMA anywhere.  nu, tau and max_norm stay fp64 (device tensors).
"""

import torch
import triton
import triton.language as tl

from ._common import load_f32, round_to, store_f32

# GPU launch shapes (not yet timed on a GPU): _sumsq works on [ROWS, BLOCK_D] slabs and its grid
# aims at >= TARGET_PROGRAMS programs; _update uses BLOCK_D columns per program.
TUNING = {
    "rows": 4,
    "sumsq_block": 512,
    "target_programs": 1024,
    "update_block": 512,
    "update_block_small": 256,
    "unroll": 4,
    "warps": 4,
    "stats_rows": 64,
    "stats_tiles": 64,
    "gm_block": 1024,  # gather-mean: columns per program
    "gm_warps": 4,
}
# Interpreter (CPU tensors; tests): small blocks, so that the test sizes run every loop of every
# kernel more than once (several chunks, steps per chunk, row and tile blocks).
INTERPRETED = {"rows": 8, "sumsq_block": 64, "chunk_steps": 2, "update_block": 256,
               "stats_rows": 8, "stats_tiles": 2, "gm_block": 4096}  # fmt: skip

_GM, _CC, _CLIP = 0, 1, 2


@triton.jit(do_not_specialize=["n", "d", "r", "s"])
def _gather_mean_kernel(
    x_ptr, idx_ptr, out_ptr, n, d, r, s, IS_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    # Output rows vary fastest, so the programs that read one column tile run together (L2).
    pid = tl.program_id(0)
    q = (pid % r).to(tl.int64)
    cols = (pid // r).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < d
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = s * 0
    t = s * 0
    while t < s:
        i = tl.load(idx_ptr + q * s + t)
        ok = (i >= 0) & (i < n)
        v = load_f32(x_ptr, tl.where(ok, i, 0) * d + cols, cm & ok, IS_BF16)
        acc = tl.where(ok, tl.where(cnt == 0, v, acc + v), acc)
        cnt += ok.to(tl.int32)
        t += 1
    den = tl.full([BLOCK], 1.0, tl.float32) * cnt.to(tl.float32)
    mean = tl.where(cnt == 1, acc, tl.math.div_rn(acc, den))  # cnt == 0: 0 / 0 = NaN
    store_f32(out_ptr, q * d + cols, round_to(mean, IS_BF16), cm, IS_BF16)


@triton.jit(do_not_specialize=["n", "d", "chunk", "ntiles"])
def _sumsq_kernel(
    x_ptr,
    z_ptr,
    part_ptr,
    n,
    d,
    chunk,
    ntiles,
    HAS_Z: tl.constexpr,
    IS_BF16: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """part[i, t] = sum over the columns of chunk t of double(fp32(x[i, k]) - z[k])^2.
    Program p: chunk t = p % ntiles of rows block p // ntiles (a 1-D grid: no 65535 limit)."""
    pid = tl.program_id(0)
    t = pid % ntiles
    rows = (pid // ntiles) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n
    roff = rows.to(tl.int64)[:, None] * d
    k = t.to(tl.int64) * chunk
    end = tl.minimum(k + chunk, d)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float64)
    while k < end:  # a while loop: the interpreter cannot range() with numpy 2.4
        cols = k + tl.arange(0, BLOCK_D)
        cmask = cols < end
        v = load_f32(x_ptr, roff + cols[None, :], rmask[:, None] & cmask[None, :], IS_BF16)
        if HAS_Z:
            v = v - tl.load(z_ptr + cols, mask=cmask, other=0.0)[None, :]
        v64 = v.to(tl.float64)  # masked entries are 0 - 0 = 0: adding +0.0 changes nothing
        acc += v64 * v64
        k += BLOCK_D
    tl.store(part_ptr + rows.to(tl.int64) * ntiles + t, tl.sum(acc, 1), mask=rmask)


@triton.jit
def _row_norms(part_ptr, rows, rmask, ntiles, RB: tl.constexpr, TB: tl.constexpr):
    """sqrt of the sum of each row's partials (fp64)."""
    acc = tl.zeros([RB, TB], tl.float64)
    t = ntiles * 0
    while t < ntiles:
        tiles = t + tl.arange(0, TB)
        m = rmask[:, None] & (tiles < ntiles)[None, :]
        acc += tl.load(
            part_ptr + rows.to(tl.int64)[:, None] * ntiles + tiles[None, :], m, other=0.0
        )
        t += TB
    return tl.sqrt(tl.sum(acc, 1))


@triton.jit(do_not_specialize=["n", "ntiles"])
def _weights_kernel(
    part_ptr, hyper_ptr, coef_ptr, wsum_ptr, n, ntiles, MODE: tl.constexpr, RB: tl.constexpr,
    TB: tl.constexpr,
):  # fmt: skip
    """One program. coef[i] = w_i / W (Weiszfeld; wsum = W) or s_i / n (centered clipping)."""
    hyper = tl.load(hyper_ptr)
    wacc = tl.zeros([RB], tl.float64)
    i = n * 0
    while i < n:
        rows = i + tl.arange(0, RB)
        rmask = rows < n
        r = _row_norms(part_ptr, rows, rmask, ntiles, RB, TB)
        good = r < tl.full([RB], 0x7FF0000000000000, tl.int64).to(tl.float64, bitcast=True)
        if MODE == 0:  # _GM
            c = tl.where(good, 1.0 / tl.maximum(r, hyper), 0.0)
            wacc += tl.where(rmask, c, 0.0)
        else:
            s = tl.where(r == 0.0, 1.0, tl.minimum(hyper / tl.where(r == 0.0, 1.0, r), 1.0))
            c = tl.where(good, s, 0.0) / n.to(tl.float64)
        tl.store(coef_ptr + rows, c, mask=rmask)
        i += RB
    if MODE == 0:
        W = tl.sum(wacc, 0)
        tl.store(wsum_ptr, W)
        i = n * 0
        while i < n:  # the same program wrote these entries: no other program reads them yet
            rows = i + tl.arange(0, RB)
            rmask = rows < n
            w = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
            tl.store(coef_ptr + rows, w / tl.where(W == 0.0, 1.0, W), mask=rmask)  # W = 0: flag
            i += RB


@triton.jit(do_not_specialize=["n", "d"])
def _update_kernel(
    x_ptr,
    z_ptr,
    coef_ptr,
    wsum_ptr,
    out_ptr,
    n,
    d,
    MODE: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """New point on BLOCK_D columns: rows in order, skipping coef == 0 (bad rows are not read)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    z = tl.load(z_ptr + cols, mask=cmask, other=0.0)
    vd = z.to(tl.float64)
    acc = tl.zeros([BLOCK_D], tl.float64)
    i = n * 0
    while i < n:
        for u in tl.static_range(UNROLL):
            row = i + u
            c = tl.load(coef_ptr + row, mask=row < n, other=0.0)
            use = c != 0.0  # a NaN coefficient (w_i = inf when nu = 0) counts as used
            xv = load_f32(x_ptr, row.to(tl.int64) * d + cols, tl.where(use, cmask, False), IS_BF16)
            if MODE == 0:  # _GM
                term = c * xv.to(tl.float64)
            else:
                term = c * (xv.to(tl.float64) - vd)
            acc += tl.where(use, term, 0.0)  # acc is never -0.0, so + 0.0 is the identity
        i += UNROLL
    if MODE == 0:
        nan = tl.full([BLOCK_D], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
        znew = tl.where(tl.load(wsum_ptr) == 0.0, nan, acc.to(tl.float32))
    else:
        znew = (vd + acc).to(tl.float32)
    tl.store(z_ptr + cols, znew, mask=cmask)
    store_f32(out_ptr, cols, round_to(znew, IS_BF16), cmask, IS_BF16)


@triton.jit(do_not_specialize=["d"])
def _round_kernel(z_ptr, out_ptr, d, IS_BF16: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    z = tl.load(z_ptr + cols, mask=cmask, other=0.0)
    store_f32(out_ptr, cols, round_to(z, IS_BF16), cmask, IS_BF16)


@triton.jit(do_not_specialize=["n", "ntiles"])
def _clip_stats_kernel(
    part_ptr, max_norm_ptr, norms_ptr, scale_ptr, n, ntiles, RB: tl.constexpr, TB: tl.constexpr
):
    """norms[i] (inf for bad rows); scale[i] = fp32 factor: 1.0 leaves the row, NaN zeroes it."""
    rows = tl.program_id(0) * RB + tl.arange(0, RB)
    rmask = rows < n
    norm = _row_norms(part_ptr, rows, rmask, ntiles, RB, TB)
    inf = tl.full([RB], 0x7FF0000000000000, tl.int64).to(tl.float64, bitcast=True)
    good = norm < inf  # finite: norm >= 0 or NaN
    mx = tl.load(max_norm_ptr + rows, mask=rmask, other=1.0)
    s = tl.where(norm <= mx, 1.0, tl.minimum(mx / tl.where(norm > 0.0, norm, 1.0), 1.0))
    s = s.to(tl.float32)
    nan = tl.full([RB], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    tl.store(norms_ptr + rows, tl.where(good, norm, inf), mask=rmask)
    tl.store(scale_ptr + rows, tl.where(good, s, nan), mask=rmask)


@triton.jit(do_not_specialize=["d", "nblocks"])
def _scale_kernel(x_ptr, scale_ptr, d, nblocks, IS_BF16: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # row pid // nblocks, column block pid % nblocks
    row = pid // nblocks
    cols = (pid % nblocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.load(scale_ptr + row)
    m = tl.where(s != 1.0, cols < d, False)  # rows within the bound are neither read nor written
    offs = row.to(tl.int64) * d + cols
    v = load_f32(x_ptr, offs, m, IS_BF16)
    y = tl.where(s != s, 0.0, round_to(s * v, IS_BF16))
    store_f32(x_ptr, offs, y, m, IS_BF16)


# ---- launchers ---------------------------------------------------------------------------------


def _sumsq_shape(n, d, device):
    """(ROWS, BLOCK_D, chunk, ntiles, row programs) of _sumsq for an [n, d] stack."""
    if device.type == "cpu":
        rows, block = INTERPRETED["rows"], INTERPRETED["sumsq_block"]
        chunk = block * INTERPRETED["chunk_steps"]
    else:
        rows, block = TUNING["rows"], TUNING["sumsq_block"]
        tiles_wanted = triton.cdiv(TUNING["target_programs"], triton.cdiv(n, rows))
        chunk = max(block, triton.next_power_of_2(triton.cdiv(d, tiles_wanted)))
    return rows, block, chunk, triton.cdiv(d, chunk), triton.cdiv(n, rows)


def _update_block(d, device):
    if device.type == "cpu":
        return INTERPRETED["update_block"]
    big = TUNING["update_block"]
    return big if triton.cdiv(d, big) >= 256 else TUNING["update_block_small"]


def _stats_blocks(n, ntiles, device):
    if device.type == "cpu":
        return INTERPRETED["stats_rows"], INTERPRETED["stats_tiles"]
    return TUNING["stats_rows"], TUNING["stats_tiles"]


def _launch_opts(device):
    return {"enable_fp_fusion": False} | (
        {} if device.type == "cpu" else {"num_warps": TUNING["warps"]}
    )


def _iterate(x, p0, iters, hyper, out, mode):
    n, d = x.shape
    dev, bf16 = x.device, x.dtype == torch.bfloat16
    opts = _launch_opts(dev)
    z = p0.to(device=dev, dtype=torch.float32).clone()
    block_u = _update_block(d, dev)
    if iters == 0:
        _round_kernel[(triton.cdiv(d, block_u),)](z, out, d, bf16, block_u, **opts)
        return out
    rows, block, chunk, ntiles, rprogs = _sumsq_shape(n, d, dev)
    rb, tb = _stats_blocks(n, ntiles, dev)
    part = torch.empty(n, ntiles, dtype=torch.float64, device=dev)
    coef = torch.empty(n, dtype=torch.float64, device=dev)
    wsum = torch.ones(1, dtype=torch.float64, device=dev)
    hyper_t = torch.full((1,), float(hyper), dtype=torch.float64, device=dev)
    for _ in range(iters):
        _sumsq_kernel[(ntiles * rprogs,)](x, z, part, n, d, chunk, ntiles, True, bf16, rows, block,
                                        **opts)  # fmt: skip
        _weights_kernel[(1,)](part, hyper_t, coef, wsum, n, ntiles, mode, rb, tb, **opts)
        _update_kernel[(triton.cdiv(d, block_u),)](x, z, coef, wsum, out, n, d, mode, bf16, block_u,
                                                   TUNING["unroll"], **opts)  # fmt: skip
    return out


def gather_mean(x, idx, out):
    """out[q] = mean of the rows idx[q, t] >= 0 of x, summed in t order in fp32 (see above).

    x: contiguous [n, d] fp32/bf16; idx: contiguous int64 [r, s] on x's device (-1 = padding);
    out: [r, d], x's dtype, written in place and returned.  x and idx are not modified.
    """
    n, d = x.shape
    r, s = idx.shape
    block = INTERPRETED["gm_block"] if x.device.type == "cpu" else TUNING["gm_block"]
    block = min(block, triton.next_power_of_2(d))
    grid = (r * triton.cdiv(d, block),)
    _gather_mean_kernel[grid](
        x, idx, out, n, d, r, s, x.dtype == torch.bfloat16, block,
        num_warps=TUNING["gm_warps"], enable_fp_fusion=False, enable_reflect_ftz=False,
    )  # fmt: skip
    return out


def geometric_median(x, z0, iters, nu, out):
    """Smoothed Weiszfeld geometric median of the rows of x [n, d] from z0, `iters` steps.

    x: contiguous fp32/bf16 (CUDA, or CPU under TRITON_INTERPRET=1); z0: float32 [d] on x's
    device (not modified); iters: int >= 0; nu: float > 0 (kept fp64); out: [d], x's dtype, written
    in place and returned.  All rows bad (inf/NaN): out is NaN.  No host synchronisation.
    """
    return _iterate(x, z0, int(iters), nu, out, _GM)


def centered_clip(x, v0, iters, tau, out):
    """Centered clipping of the rows of x [n, d] around v0, `iters` steps (see the module doc).

    x: contiguous fp32/bf16 (CUDA, or CPU under TRITON_INTERPRET=1); v0: float32 [d] on x's device
    (not modified); iters: int >= 0; tau: float (kept fp64); out: [d], x's dtype, written in place
    and returned.  No host synchronisation.
    """
    return _iterate(x, v0, int(iters), tau, out, _CC)


def clip_rows_(x, max_norm):
    """Clips every row of x [n, d] in place to norm <= max_norm[i]; returns the pre-clip norms.

    x: contiguous fp32/bf16 (CUDA, or CPU under TRITON_INTERPRET=1), modified in place; max_norm:
    float64 [n] on x's device, each > 0 and finite.  Returns float64 [n] (inf for rows holding an
    inf/NaN, which are set to +0.0).  Rows within their bound are left untouched, bit for bit.
    """
    n, d = x.shape
    dev, bf16 = x.device, x.dtype == torch.bfloat16
    opts = _launch_opts(dev)
    rows, block, chunk, ntiles, rprogs = _sumsq_shape(n, d, dev)
    rb, tb = _stats_blocks(n, ntiles, dev)
    part = torch.empty(n, ntiles, dtype=torch.float64, device=dev)
    norms = torch.empty(n, dtype=torch.float64, device=dev)
    scale = torch.empty(n, dtype=torch.float32, device=dev)
    _sumsq_kernel[(ntiles * rprogs,)](x, x, part, n, d, chunk, ntiles, False, bf16, rows, block,
                                    **opts)  # fmt: skip
    _clip_stats_kernel[(triton.cdiv(n, rb),)](part, max_norm, norms, scale, n, ntiles, rb, tb,
                                              **opts)  # fmt: skip
    block_u = _update_block(d, dev)
    nblocks = triton.cdiv(d, block_u)
    _scale_kernel[(n * nblocks,)](x, scale, d, nblocks, bf16, block_u, **opts)
    return norms
