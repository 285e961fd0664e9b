"""Row-wise robust aggregation and clipping in plain PyTorch: the oracle all backends match, the
fallback (gather-mean, smoothed Weiszfeld, centered clipping, row clipping).

X is a stack of n client vectors, [n, d], float32 or bfloat16. Distances and norms are float64
(squares of float32 values are exact in float64); averages of rows are float32 sums in a stated
order (gather_mean), rounded once to X's dtype.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def gather_mean(x: Tensor, idx: Tensor) -> Tensor:
    """out[q] = mean of the rows idx[q, t] (t ascending, -1 entries are trailing padding).

    float32 sum starting from the first row (so one row is copied exactly), IEEE division by the
    count, rounded to x's dtype once. idx: int64 [r, s], at least one valid entry per row.
    """
    xf = x.float()
    valid = idx >= 0
    safe = idx.clamp_min(0)
    acc = xf[safe[:, 0]]
    for t in range(1, idx.shape[1]):
        acc = torch.where(valid[:, t, None], acc + xf[safe[:, t]], acc)
    count = valid.sum(1).to(torch.float32)
    return (acc / count[:, None]).to(x.dtype)


def row_distances(x: Tensor, z: Tensor) -> Tensor:
    """r_i = ||fp32(x_i) - z||, [n] float64: differences rounded to fp32, squares summed in fp64."""
    diff = (x.float() - z).double()
    return (diff * diff).sum(1).sqrt()


def geometric_median(x: Tensor, z0: Tensor, iters: int, nu: float) -> Tensor:
    """Smoothed Weiszfeld from z0 (float32 [d]): iters steps of z = sum_i c_i x_i,
    c_i = w_i / sum w, w_i = 1 / max(||x_i - z||, nu); rows with a non-finite distance get w_i = 0;
    all rows bad: NaN. The weighted sum is float64, rounded to float32 once per step."""
    z = z0.float().clone()
    xd = x.double()
    for _ in range(iters):
        r = row_distances(x, z)
        good = torch.isfinite(r)
        w = torch.where(good, 1.0 / r.clamp_min(nu), 0.0)
        c = w / w.sum()  # 0/0 = NaN when every row is bad
        z = (torch.where(good[:, None], xd, 0.0) * c[:, None]).sum(0).float()
        z = torch.where(good.any(), z, float("nan"))
    return z.to(x.dtype)


def centered_clip(x: Tensor, v0: Tensor, iters: int, tau: float) -> Tensor:
    """Centered clipping from v0 (float32 [d]): iters steps of v = v + (1/n) sum_i s_i (x_i - v),
    s_i = min(1, tau / ||x_i - v||) (1 at distance 0, 0 for a row with a non-finite distance);
    float64 arithmetic, v rounded to float32 once per step."""
    n = x.shape[0]
    v = v0.float().clone()
    xd = x.double()
    for _ in range(iters):
        r = row_distances(x, v)
        good = torch.isfinite(r)
        s = torch.where(r > 0, tau / r, 1.0).clamp(max=1.0)
        s = torch.where(good, s, 0.0) / n
        vd = v.double()
        step = (torch.where(good[:, None], xd - vd, 0.0) * s[:, None]).sum(0)
        v = (vd + step).float()
    return v.to(x.dtype)


def clip_rows_(x: Tensor, max_norm: Tensor) -> Tensor:
    """Scale each row of x in place to norm <= max_norm[i] (float64 [n]); returns the norms
    (float64, before clipping; +inf for a row with an inf/NaN entry). Rows within the bound are
    untouched; a row with a non-finite norm is zeroed; others become round(fp32(max_norm / norm) *
    x)."""
    norms = x.double().pow(2).sum(1).sqrt()
    bad = ~torch.isfinite(norms)
    norms = torch.where(bad, torch.inf, norms)
    over = (norms > max_norm) & ~bad
    scale = (max_norm / norms).float()
    clipped = torch.where(over[:, None], (x.float() * scale[:, None]).to(x.dtype), x)
    x.copy_(torch.where(bad[:, None], torch.zeros((), dtype=x.dtype, device=x.device), clipped))
    return norms
