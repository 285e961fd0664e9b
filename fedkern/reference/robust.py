"""Per-coordinate robust aggregation in plain PyTorch: the oracle all backends match, the fallback.

X is a stack of n client vectors, [n, d], float32 or bfloat16. The per-coordinate ops return [d]
in X's dtype; the row ops (Gram matrix, gather-mean, Weiszfeld, centered clipping, row clipping,
difference-compress-clip) are defined in the second half of this file.
Within a coordinate (a column of X) values are ordered by value with NaN above +inf (all NaNs
equal) and -0.0 equal to +0.0; among equal values the lower row ranks lower. Arithmetic is float32,
each operation rounded on its own, and the result is rounded to X's dtype once.

  coordinate_median(X): n odd: the value of rank (n-1)/2; n even: (lo + hi) * 0.5 with lo, hi the
      values of ranks n/2 - 1 and n/2 (as NumPy; NaN if either is NaN).
  trimmed_mean(X, f): drop the f lowest and f highest ranks (2f < n), then sum the kept values in
      row order, starting from +0.0, and divide by n - 2f. With at most f NaN entries in a column
      the NaNs rank above every number and are dropped.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _sorted(x: Tensor) -> Tensor:
    """float32 values per column, ascending, NaN last, ties (and +-0.0) in row order."""
    return torch.sort(x.float(), dim=0, stable=True)


def coordinate_median(x: Tensor) -> Tensor:
    """Median of every column of x [n, d] (mean of the two middle values for even n)."""
    n = x.shape[0]
    s = _sorted(x).values
    if n % 2:
        out = s[(n - 1) // 2]
    else:
        out = (s[n // 2 - 1] + s[n // 2]) * 0.5
    return out.to(x.dtype)


def trimmed_mean(x: Tensor, f: int) -> Tensor:
    """Mean of every column of x [n, d] without its f lowest and f highest values (2f < n)."""
    n = x.shape[0]
    order = _sorted(x).indices  # order[r, j]: the row of rank r in column j
    keep = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    keep.scatter_(0, order[f : n - f], True)
    xf = x.float()
    total = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for i in range(n):  # row order, so the sum does not depend on how the ranks were found
        total = torch.where(keep[i], total + xf[i], total)
    # a tensor divisor: torch's CUDA division by a Python number multiplies by its reciprocal
    return (total / torch.full_like(total, n - 2 * f)).to(x.dtype)


# ---- aggregators over whole rows (Krum, NNM, bucketing, Weiszfeld, centered clipping) ----------
#
# Distances and norms are float64: the product of two float32 values is exact in float64, so the
# Gram matrix G = X X^T (G[i, j] = sum_k x_ik x_jk) is accurate to float64 rounding of the sums,
# whatever the order; backends may sum in different orders (last-bit differences in G). Averages
# of rows are float32 sums in a stated order (gather_mean), rounded once to X's dtype.


def gram(x: Tensor) -> Tensor:
    """G = X X^T in float64, [n, n], exactly symmetric (the upper triangle mirrored)."""
    xd = x.double()
    g = xd @ xd.T
    upper = torch.triu(g)
    return upper + torch.triu(g, 1).T


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


def _clip_message(values: Tensor, max_norm: Tensor) -> tuple[Tensor, Tensor]:
    """clip_rows_ on a copy of a [n, k] message; returns (clipped values, norms)."""
    out = values.clone()
    norms = clip_rows_(out, max_norm)
    return out, norms


def _row_diff(g_new: Tensor, g_old: Tensor) -> Tensor:
    return (g_new.float() - g_old.float()).to(g_new.dtype)


def diff_topk_clip(g_new: Tensor, g_old: Tensor, k: int, max_norm: Tensor):
    """Per row: top-k of round(g_new - g_old) (as topk_compress), then the message clipped.
    Returns (values [n, k], indices [n, k] int64, norms [n] float64)."""
    from fedkern.reference.topk import topk_compress

    diff = _row_diff(g_new, g_old)
    vals, idxs = zip(*(topk_compress(row, k) for row in diff), strict=True)
    values, norms = _clip_message(torch.stack(vals), max_norm)
    return values, torch.stack(idxs), norms


def diff_randk_clip(g_new: Tensor, g_old: Tensor, k: int, keys, scale: float, max_norm: Tensor):
    """Per row i: rand-k of round(g_new - g_old) with round keys keys[i] (8 ints) and the fp32
    scale (as randk_compress), then the message clipped. Returns (values, indices, norms)."""
    from fedkern.reference.randk import randk_compress

    diff = _row_diff(g_new, g_old)
    msgs = [randk_compress(row, k, kr, scale) for row, kr in zip(diff, keys, strict=True)]
    vals, idxs = zip(*msgs, strict=True)
    values, norms = _clip_message(torch.stack(vals), max_norm)
    return values, torch.stack(idxs), norms


def diff_clip(g_new: Tensor, g_old: Tensor, max_norm: Tensor):
    """Per row: round(g_new - g_old), clipped as clip_rows_. Returns (out [n, d], norms)."""
    return _clip_message(_row_diff(g_new, g_old), max_norm)
