"""The fp64 Gram matrix of a stack of client vectors in plain PyTorch: the oracle, the fallback.

X is a stack of n client vectors, [n, d], float32 or bfloat16. The product of two float32 values is
exact in float64, so G = X X^T (G[i, j] = sum_k x_ik x_jk) is accurate to float64 rounding of the
sums, whatever the order; backends may sum in different orders (last-bit differences in G).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def gram(x: Tensor) -> Tensor:
    """G = X X^T in float64, [n, n], exactly symmetric (the upper triangle mirrored)."""
    xd = x.double()
    g = xd @ xd.T
    upper = torch.triu(g)
    return upper + torch.triu(g, 1).T
