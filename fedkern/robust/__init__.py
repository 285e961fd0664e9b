"""Robust aggregation of client vectors (Byzantine-robust federated learning).

Per-coordinate aggregators over a stack X of n client vectors, [n, d]. Within a coordinate, values
are ordered with NaN above +inf, so a minority of NaN rows (a Byzantine client's garbage) cannot
poison the result. Exact numerics: ``fedkern.reference.robust``.
"""

from __future__ import annotations

import torch

import fedkern.ops.robust  # noqa: F401  (registers the ops)
from fedkern.ops import _validate as v

Tensor = torch.Tensor


def coordinate_median(X: Tensor) -> Tensor:
    """The median of every coordinate over the n client vectors.

    Args:
        X: [n, d] float32 or bfloat16 tensor (n >= 1 rows, d >= 1), on CPU or CUDA, any strides.
            Not modified.

    Returns:
        [d] tensor in X's dtype on X's device: for odd n the middle value of each column; for even
        n the mean of the two middle values, (lo + hi) * 0.5 in float32 (as NumPy). NaN ranks above
        +inf: with fewer than n/2 NaN entries in a column (n odd; at most n/2 - 1 for even n) the
        result is a number; otherwise NaN.

    Backends: the C++ core on CPU (OpenMP over tiles of coordinates), Triton on CUDA, the
    reference (torch.sort) elsewhere. Deterministic and bit-identical across backends.
    """
    return torch.ops.fedkern.coordinate_median(v.tensor("X", X))


def trimmed_mean(X: Tensor, f: int) -> Tensor:
    """Coordinate-wise trimmed mean: drop the f largest and f smallest values, average the rest.

    Args:
        X: [n, d] float32 or bfloat16 tensor (n >= 1, d >= 1), on CPU or CUDA, any strides. Not
            modified.
        f: values trimmed at each end, an int with 0 <= f and 2f < n.

    Returns:
        [d] tensor in X's dtype: the kept values summed in row order in float32, divided by n - 2f,
        rounded once. NaN ranks above +inf, so up to f NaN entries per column are trimmed away.
    """
    f = v.integer("f", f, 0)  # torch.ops would reject a non-int without naming the argument
    return torch.ops.fedkern.trimmed_mean(v.tensor("X", X), f)
