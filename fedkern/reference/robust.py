"""Per-coordinate robust aggregation in plain PyTorch: the oracle all backends match, the fallback.

X is a stack of n client vectors, [n, d], float32 or bfloat16; both ops return [d] in X's dtype.
The whole-row ops are in ``gram`` (the Gram matrix), ``rowops`` (gather-mean, Weiszfeld, centered
clipping, row clipping) and ``diffclip`` (difference -> compression -> clipping).
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
