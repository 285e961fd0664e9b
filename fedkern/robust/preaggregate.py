"""Pre-aggregators: a stack of n client vectors in, a new (mixed or bucketed) stack out.

``nnm`` (nearest-neighbour mixing) and ``bucketing`` run before a rule of
``fedkern.robust.rules``; ``fedkern.robust.Aggregator`` chains the two.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.interop import accepts_dlpack
from fedkern.ops import rowops as _rowops
from fedkern.random import permutation
from fedkern.robust.rules import _selection, as_stack, pairwise_sqdist

Tensor = torch.Tensor


@accepts_dlpack
def nnm(X: Tensor, f: int) -> Tensor:
    """Nearest-neighbour mixing: every row replaced by the mean of its n - f nearest rows.

    Args:
        X: [n, d] float32 or bfloat16 (CPU or CUDA). Not modified.
        f: an int with 0 <= f < n.

    Returns:
        [n, d] in X's dtype: row i is the mean of row i itself and its n - f - 1 nearest other
        rows (squared distances from ``pairwise_sqdist``; ties to the lower row), summed in float32
        in ascending row order and divided by n - f. A row with an inf/NaN entry is infinitely far
        from every other row, so a finite row mixes it in only when fewer than n - f rows are
        finite; that row's own output is NaN/inf.
    """
    X = as_stack(X)
    n = X.shape[0]
    f = v.integer("f", f, 0, n - 1)
    D = pairwise_sqdist(X)
    D.fill_diagonal_(-1.0)  # itself first
    order = torch.sort(D, dim=1, stable=True).indices[:, : n - f]
    return _selection(X, order)


@accepts_dlpack
def bucketing(X: Tensor, s: int, *, seed: int, step: int = 0) -> Tensor:
    """Bucketing (Karimireddy et al.): shuffle the rows, average groups of s.

    Args:
        X: [n, d] float32 or bfloat16 (CPU or CUDA). Not modified.
        s: bucket size, an int >= 1 (s >= n gives one bucket: the mean).
        seed, step: ints in [0, 2**63) keying the permutation (``fedkern.random.permutation``);
            a new step gives a new shuffle.

    Returns:
        [ceil(n / s), d] in X's dtype: bucket b is the mean of rows perm[b*s : (b+1)*s] (the last
        bucket may be smaller), summed in float32 in permutation order and divided by its size. A
        NaN row makes its bucket NaN (the aggregator after bucketing sees one NaN row).
    """
    X = as_stack(X)
    n = X.shape[0]
    s = v.integer("s", s, 1)
    perm = torch.tensor(permutation(n, seed, step), dtype=torch.int64)
    nb = -(-n // s)
    idx = torch.full((nb * s,), -1, dtype=torch.int64)
    idx[:n] = perm
    # a permutation padded at the end: valid by construction, so no device read of idx
    return _rowops.gather_mean(X, idx.view(nb, s).to(X.device), check_indices=False)
