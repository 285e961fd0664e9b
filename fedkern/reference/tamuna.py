"""TAMUNA's server step, in plain PyTorch (the oracle and the fallback of ``tamuna_aggregate_``).

The round's compression pattern q (d x c, binary) is never stored: coordinate r is held by the
cohort slots (s*r + j) mod c for j = 0..s-1, and slot j belongs to cohort row perm[j] (perm: a
permutation of 0..c-1, fresh each round). Every coordinate has exactly s holders; a row holds about
s*p/c coordinates (none when s*p < c and its slot is never reached).

  xbar[r] = (X[h_0, r] + X[h_1, r] + ... + X[h_{s-1}, r]) / s      h_j = perm[(s*r + j) mod c]
  H[h_j, r] += coef * (xbar[r] - X[h_j, r])                         for each holder (H optional)

Numerics (every backend): the s held values are added in fp32 in slot order j = 0, 1, ..., s-1,
the sum is divided by s (IEEE division), and each H update is one fp32 subtraction, one fp32
multiply and one fp32 add (no fused multiply-add), so all backends agree bit for bit.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def holders(p: int, c: int, s: int, perm: Tensor) -> Tensor:
    """int64 [s, p]: entry [j, r] is the cohort row of coordinate r's j-th holder,
    perm[(s*r + j) % c]."""
    r = torch.arange(p, dtype=torch.int64, device=perm.device)
    j = torch.arange(s, dtype=torch.int64, device=perm.device)
    return perm[(s * r[None, :] + j[:, None]) % c]


def tamuna_aggregate_(X: Tensor, H: Tensor | None, perm: Tensor, s: int, coef: float) -> Tensor:
    """xbar [p] float32 from the s holders of every coordinate; H's held entries updated in
    place (X is not modified)."""
    c, p = X.shape
    rows = holders(p, c, s, perm)
    cols = torch.arange(p, device=X.device)
    acc = X[rows[0], cols].clone()
    for j in range(1, s):
        acc = acc + X[rows[j], cols]
    xbar = acc / torch.tensor(float(s), dtype=torch.float32, device=X.device)
    if H is not None:
        for j in range(s):
            held = X[rows[j], cols]
            H[rows[j], cols] = H[rows[j], cols] + coef * (xbar - held)
    return xbar


def pattern_mask(p: int, c: int, s: int, perm: Tensor) -> Tensor:
    """The materialized pattern q as a bool [c, p] tensor (q[i, r]: row i holds coordinate r).

    For tests and the eager baseline only: the op never builds it."""
    q = torch.zeros(c, p, dtype=torch.bool, device=perm.device)
    rows = holders(p, c, s, perm)
    cols = torch.arange(p, device=perm.device).expand(s, -1)
    q[rows.reshape(-1), cols.reshape(-1)] = True
    return q


def held_by_slot(p: int, c: int, s: int, slot: int) -> Tensor:
    """bool [p]: the coordinates that cohort slot ``slot`` holds ((slot - s*r) mod c < s)."""
    r = torch.arange(p, dtype=torch.int64)
    return torch.remainder(slot - s * r, c) < s
