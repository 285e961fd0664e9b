"""The fused clipped server jump (Triton): pseudo-gradient, norm and clipped step on the device.

Inputs Y float32 [c, p], x float32 [p], w float64 [c], scalars s > 0, c0 > 0, c1 >= 0, G (None or
a float64 [1] norm):

  ybar  = float(sum over rows r in row order of w[r] * double(Y[r]))     d = x - ybar  (fp32)
  gnorm = s * sqrt(sum_k double(d_k)^2)        theta = 1 / (c0 + c1 * (G or gnorm))   (fp64)
  out   = x - float(theta * s) * d             stats = [gnorm, theta]

Kernels.  _diff_kernel: one program per block of BLOCK columns walks the rows in order (fp64
accumulation), writes d into `out` and the block's sum of squares into partial[pid].  _step_kernel:
every program sums all the partials in the same fixed order (chunks of PB in program order, each
chunk by tl.sum), so every program computes the same theta; it turns out into x - coef * d, and
program 0 writes stats.  Two launches, no host synchronization.

Numerics: fp64 row sums in row order (the ybar and d bits equal the C++ core's and the reference's);
the norm's summation order differs between backends (its last bits may differ, and with them, when
c1 > 0, the rounding of float(theta * s)).  enable_fp_fusion=False (no FMA).
"""

import torch
import triton
import triton.language as tl

TUNING = {"block": 1024, "partials": 1024}
INTERPRETED = {"block": 16, "partials": 4}


@triton.jit(do_not_specialize=["c", "p"])
def _diff_kernel(y_ptr, x_ptr, w_ptr, out_ptr, part_ptr, c, p, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < p
    acc = tl.zeros([BLOCK], tl.float64)
    r = c.to(tl.int64) * 0
    while r < c:
        wr = tl.load(w_ptr + r)
        yv = tl.load(y_ptr + r * p + cols, mask=cmask, other=0.0)
        acc = acc + wr * yv.to(tl.float64)
        r += 1
    xv = tl.load(x_ptr + cols, mask=cmask, other=0.0)
    dv = tl.where(cmask, xv - acc.to(tl.float32), 0.0)
    tl.store(out_ptr + cols, dv, mask=cmask)
    d64 = dv.to(tl.float64)
    tl.store(part_ptr + pid, tl.sum(d64 * d64, 0))


@triton.jit(do_not_specialize=["p", "nparts", "has_g"])
def _step_kernel(x_ptr, out_ptr, part_ptr, g_ptr, stats_ptr, p, nparts, s, c0, c1, has_g,
                 BLOCK: tl.constexpr, PB: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    sq = tl.zeros([], tl.float64)
    i = nparts * 0
    while i < nparts:
        idx = i + tl.arange(0, PB)
        sq += tl.sum(tl.load(part_ptr + idx, mask=idx < nparts, other=0.0), 0)
        i += PB
    s64 = tl.full([], s, tl.float64)
    gnorm = s64 * tl.sqrt(sq)
    nrm = gnorm
    if has_g != 0:
        nrm = tl.load(g_ptr)
    theta = 1.0 / (c0 + c1 * nrm)
    coef = (theta * s64).to(tl.float32)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < p
    xv = tl.load(x_ptr + cols, mask=cmask, other=0.0)
    dv = tl.load(out_ptr + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + cols, xv - coef * dv, mask=cmask)
    if pid == 0:
        tl.store(stats_ptr, gnorm)
        tl.store(stats_ptr + 1, theta)


def clip_jump(Y, x, w, s, c0, c1, G):
    """The module docstring's pass. Y float32 [c, p], x float32 [p], w float64 [c], G None or
    float64 [1], contiguous on one device (CUDA, or CPU under TRITON_INTERPRET=1), validated by
    fedkern.ops.clipjump. Returns (out float32 [p], stats float64 [2]), new tensors."""
    c, p = Y.shape
    dev = x.device
    sh = INTERPRETED if dev.type == "cpu" else TUNING
    block = sh["block"]
    nprog = triton.cdiv(p, block)
    out = torch.empty_like(x)
    part = torch.empty(nprog, dtype=torch.float64, device=dev)
    stats = torch.empty(2, dtype=torch.float64, device=dev)
    opts = {"enable_fp_fusion": False}
    _diff_kernel[(nprog,)](Y, x, w, out, part, c, p, block, **opts)
    _step_kernel[(nprog,)](
        x, out, part, part if G is None else G, stats, p, nprog, float(s), float(c0), float(c1),
        0 if G is None else 1, block, sh["partials"], **opts,
    )  # fmt: skip
    return out, stats
