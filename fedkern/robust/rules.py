"""The robust aggregation rules: a stack of n client vectors in, one vector out.

``coordinate_median``, ``trimmed_mean``, ``krum`` (and Multi-Krum), ``bulyan`` (over Krum),
``geometric_median`` (smoothed Weiszfeld) and ``centered_clip`` take X [n, d] (float32 or
bfloat16, CPU or CUDA; or a list of n 1-D rows, see ``as_stack``) and return [d] in X's dtype;
``pairwise_sqdist`` gives the squared distances Krum, Bulyan and NNM rank by. NaN rows are data,
not errors; each function says what they do.
Exact numerics: ``fedkern.reference.robust``, ``gram`` and ``rowops``.
"""

from __future__ import annotations

import math

import torch

import fedkern.ops.robust  # noqa: F401  (registers coordinate_median, trimmed_mean)
from fedkern import validation as v
from fedkern.interop import accepts_dlpack, to_torch
from fedkern.ops import gram as _gram
from fedkern.ops import rowops as _rowops

Tensor = torch.Tensor


def as_stack(X) -> Tensor:
    """The [n, d] stack of client vectors that every aggregator takes.

    Args:
        X: a [n, d] float32/bfloat16 tensor (returned as it is, after the checks), or a list or
            tuple of n 1-D tensors of one shape, dtype and device (stacked into a new tensor).

    Raises:
        TypeError / ValueError naming ``X`` or the offending ``X[i]``: no rows, empty vectors,
        rows of different shapes, dtypes or devices, a dtype other than float32/bfloat16.
    """
    if isinstance(X, (list, tuple)):
        X = [to_torch(row) for row in X]
        if not X:
            raise ValueError("X must have at least one row (n >= 1), got an empty sequence")
        first = v.tensor("X[0]", X[0])
        if first.dim() != 1:
            raise ValueError(f"X[0] must be a 1-D client vector, got shape {tuple(first.shape)}")
        for i, row in enumerate(X[1:], 1):
            v.same_as(f"X[{i}]", v.tensor(f"X[{i}]", row), "X[0]", first)
        X = torch.stack(list(X))
    return v.stack("X", X)


@accepts_dlpack
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
    return torch.ops.fedkern.coordinate_median(as_stack(X))


@accepts_dlpack
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
    return torch.ops.fedkern.trimmed_mean(as_stack(X), f)


@accepts_dlpack
def pairwise_sqdist(X: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of X, through the Gram matrix.

    Args:
        X: [n, d] float32 or bfloat16 (CPU or CUDA, any strides). Not modified.

    Returns:
        [n, n] float64 on X's device: D[i, j] = max(G[i, i] + G[j, j] - 2 G[i, j], 0) with
        G = X X^T summed in float64 (each product of two float32 values is exact in float64), and
        D[i, i] = 0. An entry involving a row with an inf/NaN entry is +inf (such a row is "far
        from everything"); D is exactly symmetric.
    """
    G = _gram.gram(X)
    sq = G.diagonal()
    D = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_min_(0.0)
    D = torch.where(torch.isfinite(D), D, math.inf)
    return D.fill_diagonal_(0.0)


def _selection(X: Tensor, idx: Tensor) -> Tensor:
    """Mean of chosen rows, summed in ascending row order (rows of idx sorted ascending)."""
    # rows of distinct row numbers chosen by the rule itself: valid, so no device read of idx
    return _rowops.gather_mean(X, torch.sort(idx, dim=-1).values, check_indices=False)


@accepts_dlpack
def krum(X: Tensor, f: int, m: int = 1) -> Tensor:
    """Krum (m = 1) and Multi-Krum (m > 1).

    score_i = sum of the n - f - 2 smallest squared distances from row i to the other rows
    (``pairwise_sqdist``: float64 through the Gram matrix, not torch.cdist); the m rows with the
    lowest scores win (ties to the lower row) and their mean is returned.

    Args:
        X: [n, d] float32 or bfloat16 (CPU or CUDA). Not modified.
        f: the number of Byzantine rows tolerated, an int with n > 2f + 2.
        m: rows averaged, 1 <= m <= n.

    Returns:
        [d] in X's dtype. m = 1: a copy of the winning row, bit for bit. m > 1: the float32 sum of
        the chosen rows in ascending row order divided by m, rounded once. A row with an inf/NaN
        entry has an infinite score, so with at most f such rows (and m <= n - f) the result is
        never poisoned. On every backend the scores come from the same float64 Gram matrix up to
        the summation order of its entries, so the choice agrees unless two scores tie to within
        float64 rounding (identical rows: then either choice is the same vector).
    """
    X = as_stack(X)
    n = X.shape[0]
    f = v.integer("f", f, 0)
    if n <= 2 * f + 2:
        raise ValueError(f"krum needs n > 2*f + 2 rows (n = {n}), got f = {f}")
    m = v.integer("m", m, 1, n)
    D = pairwise_sqdist(X)
    D.fill_diagonal_(math.inf)  # never one's own neighbour
    near = torch.sort(D, dim=1).values[:, : n - f - 2]
    scores = near.sum(1)
    best = torch.sort(scores, stable=True).indices[:m]
    return _selection(X, best[None, :])[0]


def _start(name: str, X: Tensor, start) -> Tensor:
    """The float32 [d] starting point of an iterative aggregator."""
    d = X.shape[1]
    if start is None:
        return torch.zeros(d, dtype=torch.float32, device=X.device)
    if isinstance(start, str):
        if start == "mean":
            return X.float().mean(0)
        if start == "median":
            return coordinate_median(X).float()
        raise ValueError(f"{name} must be None, 'mean', 'median' or a tensor, got {start!r}")
    v.tensor(name, start)
    if start.shape != (d,):
        raise ValueError(f"{name} must have shape ({d},), got {tuple(start.shape)}")
    if start.device != X.device:
        raise ValueError(f"{name} must be on {X.device} (as X), got {start.device}")
    if not start.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {start.dtype}")
    return start.float()


@accepts_dlpack
def geometric_median(X: Tensor, *, iters: int = 8, nu: float = 0.1, init=None) -> Tensor:
    """Geometric median by smoothed Weiszfeld iterations (Pillutla et al., RFA).

    z <- sum_i w_i x_i / sum_i w_i with w_i = 1 / max(||x_i - z||, nu), ``iters`` times.

    Args:
        X: [n, d] float32 or bfloat16 (CPU or CUDA). Not modified.
        iters: int >= 0 (0 returns the start point).
        nu: the distance floor, a finite float > 0.
        init: None (the zero vector, as in the papers' code), "mean", "median" (coordinate-wise),
            or a [d] floating tensor on X's device.

    Returns:
        [d] in X's dtype. Distances and the weighted sums are float64; z is rounded to float32
        after every iteration and to X's dtype at the end. A row with an inf/NaN entry gets weight
        0 (it is ignored); if every row has one, the result is NaN.
    """
    X = as_stack(X)
    return _rowops.geometric_median(X, _start("init", X, init), iters, nu)


@accepts_dlpack
def centered_clip(X: Tensor, *, tau: float, iters: int = 3, center=None) -> Tensor:
    """Centered clipping (Karimireddy et al. 2021): v <- v + mean_i clip_tau(x_i - v), iters times.

    clip_tau(u) = min(1, tau / ||u||) u (0 at u = 0).

    Args:
        X: [n, d] float32 or bfloat16 (CPU or CUDA). Not modified.
        tau: the clipping radius, a finite float > 0.
        iters: int >= 0.
        center: the start v: None (zero vector), "mean", "median", or a [d] floating tensor on X's
            device (warm start from the previous round's aggregate, as in the paper).

    Returns:
        [d] in X's dtype. float64 arithmetic, v rounded to float32 after every iteration. A row
        with an inf/NaN entry contributes 0 (it is clipped away entirely; the mean still divides
        by n), so the output is always finite for a finite center.
    """
    X = as_stack(X)
    return _rowops.centered_clip(X, _start("center", X, center), iters, tau)


def _iterated_krum(D: Tensor, f: int, theta: int) -> Tensor:
    """Bulyan's selection: theta row indices (int64, on D's device) in the order they were picked.

    D: [n, n] float64 squared distances with an infinite diagonal. Step t has n' = n - t rows left;
    each scores the sum of its max(1, n' - f - 2) smallest distances to the other remaining rows
    (at most n' - 1 of them) and the lowest score is picked (ties to the lower row) and removed.
    The counts are known on the host, so the loop (over rows, never coordinates) never syncs.
    """
    n = D.shape[0]
    alive = torch.ones(n, dtype=torch.bool, device=D.device)
    picked = torch.empty(theta, dtype=torch.int64, device=D.device)
    for t in range(theta):
        left = n - t
        k = min(max(1, left - f - 2), left - 1)
        Dt = D.masked_fill(~alive[None, :], math.inf)  # removed rows are nobody's neighbour
        scores = torch.sort(Dt, dim=1).values[:, :k].sum(1)
        scores.masked_fill_(~alive, math.nan)  # torch.sort ranks NaN last: removed never win
        best = torch.sort(scores, stable=True).indices[:1]
        picked[t : t + 1] = best
        alive.index_fill_(0, best, False)
    return picked


@accepts_dlpack
def bulyan(X: Tensor, f: int) -> Tensor:
    """Bulyan (El Mhamdi, Guerraoui and Rouault 2018) over Krum.

    1. Selection: theta = n - 2f rows by iterated Krum. Each step scores the rows still left
       (n' of them) by the sum of their max(1, n' - f - 2) smallest squared distances to the other
       rows left, moves the lowest score (ties to the lower row index) into the selected set and
       removes it; f stays the same throughout. The distances come once from ``pairwise_sqdist``
       (float64 through the Gram matrix), not recomputed per step.
    2. Aggregation: per coordinate, the mean of the beta = theta - 2f selected values closest to
       the coordinate median of the selected set (``coordinate_median``'s definition: for even
       theta the float32 mean of the two middle values).

    These are the choices of Flower's ``aggregate_bulyan`` (flwr.server.strategy.aggregate, 1.42)
    where the paper leaves them open: f is not decreased as rows are removed, a step with
    n' - f - 2 < 1 still counts one neighbour, Krum's ties go to the first row, and "closest" is
    the absolute difference |x - median| per coordinate. Flower breaks exact distance ties between
    a value below and a value above the median arbitrarily (np.argpartition); fedkern keeps the
    lower value. The beta closest values are a contiguous run of the sorted selected column that
    contains the median: it starts at the number s in [0, 2f] of positions j < 2f whose value is
    strictly farther below the median than value j + beta is above it (compared exactly, in
    float64).

    Args:
        X: [n, d] float32 or bfloat16 (CPU or CUDA; or a list of n 1-D rows, see ``as_stack``).
            Not modified.
        f: the number of Byzantine rows tolerated, an int with f >= 0 and n >= 4f + 3.

    Returns:
        [d] in X's dtype on X's device: the beta chosen values of each coordinate summed in
        float64, divided by beta and rounded once. f = 0 gives the mean of all rows (summed in
        float64). A row with an inf/NaN entry has an infinite Krum score, so with at most f such
        rows none is selected and the result is finite.

    Cost: one Gram matrix (n^2 d), theta sorts of [n, n] on host-known counts (no device sync),
    then about ten elementwise passes over the float32 [theta, d] selected stack and two fused
    ``coordinate_median`` calls (the median, and the beta-th smallest distance), without sorting
    it; only the columns whose choice float32 distances cannot settle (a distance tie between a
    value below and one above the median, or distances closer than float32 resolves) are sorted
    (one host sync to find them). Memory: a few [theta, d] float32 temporaries.
    """
    X = as_stack(X)
    n = X.shape[0]
    f = v.integer("f", f, 0)
    if n < 4 * f + 3:
        raise ValueError(f"bulyan needs n >= 4*f + 3 rows (n = {n}), got f = {f}")
    theta = n - 2 * f
    beta = theta - 2 * f
    D = pairwise_sqdist(X)
    D.fill_diagonal_(math.inf)  # never one's own neighbour
    sel = X.index_select(0, _iterated_krum(D, f, theta)).float()  # [theta, d]
    med = coordinate_median(sel)  # float32: for even theta the float32 mean of the middle two
    return (_closest_sum(sel, med, beta) / beta).to(X.dtype)


def _closest_sum_sorted(S: Tensor, med: Tensor, beta: int) -> Tensor:
    """float64 [d]: per column of the sorted float32 S [theta, d], the sum of the beta values
    closest to med (float32 [d]), exact distances, a tie keeping the lower value. The run starts
    at the number of j < theta - beta with med - S[j] > S[j + beta] - med (in float64)."""
    theta = S.shape[0]
    lo, hi = S[: theta - beta].double(), S[beta:].double()
    start = ((med.double() - lo) > (hi - med.double())).sum(0)
    rows = start[None, :] + torch.arange(beta, device=S.device)[:, None]
    return S.gather(0, rows).sum(0, dtype=torch.float64)


def _closest_sum(x: Tensor, med: Tensor, beta: int) -> Tensor:
    """float64 [d]: per column of x (float32 [theta, d]) the sum of the beta values closest to med.

    Fast path, without sorting: the float32 distances Y = |x - med| are the exact distances
    rounded (rounding is monotone), so the beta-th smallest of Y, tau (``coordinate_median`` of
    Y padded with +-inf rows so that this rank is the middle), splits each column into values
    surely kept (Y < tau), surely dropped (Y > tau) and a band (Y == tau). A column whose band
    holds exactly the values still needed, or only equal values, is summed directly; the rest
    (exact distances closer than float32 can tell apart, or a distance tie between a value below
    and one above the median) go to ``_closest_sum_sorted``.
    """
    theta, d = x.shape
    if beta == theta:
        return x.sum(0, dtype=torch.float64)
    Y = (x - med).abs_()
    gap = 2 * (beta - 1) + 1 - theta  # +inf rows (>= 0) or -inf rows (< 0) centring rank beta-1
    pad = Y.new_full((abs(gap), d), math.inf if gap >= 0 else -math.inf)
    tau = coordinate_median(torch.cat([Y, pad]))
    keep, band = Y < tau, Y == tau
    need = beta - keep.sum(0)
    nband = band.sum(0)
    total = torch.where(keep, x, 0.0).sum(0, dtype=torch.float64)
    bmax = torch.where(band, x, -math.inf).amax(0)
    bmin = torch.where(band, x, math.inf).amin(0)
    exact = nband == need
    total += torch.where(exact, torch.where(band, x, 0.0).sum(0, dtype=torch.float64),
                         need.double() * bmax.double())  # fmt: skip
    hard = (~exact & (bmax != bmin)).nonzero().flatten()
    if hard.numel():
        S = torch.sort(x.index_select(1, hard), dim=0).values
        total[hard] = _closest_sum_sorted(S, med[hard], beta)
    return total
