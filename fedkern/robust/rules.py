"""Byzantine-robust aggregation of client vectors.

Aggregators over a stack X of n client vectors [n, d] (float32 or bfloat16, CPU or CUDA; or a list
of n 1-D tensors of one shape, dtype and device, see ``as_stack``) return [d] in X's dtype:
``coordinate_median``, ``trimmed_mean``, ``krum`` (and Multi-Krum), ``geometric_median``
(smoothed Weiszfeld) and ``centered_clip``. Pre-aggregators return a new stack:
``bucketing`` and ``nnm``. Clipping: ``clip_rows_`` (in place) and ``diff_compress_clip`` (the
client side of Byz-VR-MARINA: difference, compress, clip). ``Aggregator`` chains a pre-aggregator
and an aggregator; ``fedkern.robust.attacks`` builds Byzantine messages for tests and benchmarks.

NaN rows (a Byzantine client's garbage) are data, not errors; each function says what they do.
Per-coordinate values are ordered with NaN above +inf, so a minority of NaN rows cannot poison
the median or the trimmed mean; Krum gives a row with a non-finite entry an infinite score.
Exact numerics: ``fedkern.reference.robust``.
"""

from __future__ import annotations

import math
import numbers

import torch

import fedkern.ops.randk
import fedkern.ops.robust  # noqa: F401  (registers the ops)
from fedkern import validation as v
from fedkern.interop import accepts_dlpack, to_torch
from fedkern.ops import robust_rows as rows
from fedkern.ops.robust import check_stack
from fedkern.random import client_seed, permutation, randk_keys

__all__ = [
    "Aggregator",
    "as_stack",
    "bucketing",
    "centered_clip",
    "clip_rows_",
    "coordinate_median",
    "diff_compress_clip",
    "geometric_median",
    "krum",
    "nnm",
    "pairwise_sqdist",
    "trimmed_mean",
]

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
    return check_stack(X)


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
    G = rows.gram(X)
    sq = G.diagonal()
    D = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_min_(0.0)
    D = torch.where(torch.isfinite(D), D, math.inf)
    return D.fill_diagonal_(0.0)


def _selection(X: Tensor, idx: Tensor) -> Tensor:
    """Mean of chosen rows, summed in ascending row order (rows of idx sorted ascending)."""
    return rows.gather_mean(X, torch.sort(idx, dim=-1).values)


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
    return rows.gather_mean(X, idx.view(nb, s).to(X.device))


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
    return rows.weiszfeld(X, _start("init", X, init), iters, nu)


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
    return rows.centered_clip(X, _start("center", X, center), iters, tau)


def _max_norm(max_norm, X: Tensor, name: str = "max_norm") -> Tensor:
    """A float or a [n] tensor, each finite and > 0, as float64 [n] on X's device."""
    n = X.shape[0]
    if isinstance(max_norm, torch.Tensor):
        if max_norm.dim() == 0:
            max_norm = max_norm.reshape(1).expand(n)
        if max_norm.shape != (n,):
            raise ValueError(f"{name} must be a float or a tensor of shape ({n},), got shape "
                             f"{tuple(max_norm.shape)}")  # fmt: skip
        out = max_norm.to(device=X.device, dtype=torch.float64).contiguous()
    else:
        if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
            raise TypeError(f"{name} must be a float or a tensor, got {type(max_norm).__name__}")
        out = torch.full((n,), float(max_norm), dtype=torch.float64, device=X.device)
    return rows.check_max_norm(out, X, name)


@accepts_dlpack
def clip_rows_(X: Tensor, max_norm) -> Tensor:
    """Clip every row of X to a maximum Euclidean norm, in place: x_i <- min(1, c_i/||x_i||) x_i.

    Args:
        X: [n, d] float32 or bfloat16, contiguous, on CPU or CUDA; modified in place.
        max_norm: a finite float > 0, or a [n] tensor of them (one bound per row).

    Returns:
        X. Norms are float64; a row within its bound is untouched (bit for bit); a longer row
        becomes round(fp32(c_i / ||x_i||) * x_i); a row with an inf/NaN entry is set to zero (the
        clipped vector of a Byzantine client must be bounded, and zero is). Nothing is modified
        when an argument is invalid.
    """
    check_stack(X)
    rows.clip_rows_(X, _max_norm(max_norm, X))
    return X


@accepts_dlpack
def diff_compress_clip(G_new: Tensor, G_old: Tensor, compressor=None, max_norm=None, *,
                       clients=None, step: int | None = None):  # fmt: skip
    """The client side of clipped gradient differences, batched over clients (one per row).

    Row i: c_i = clip_{max_norm_i}(C(G_new[i] - G_old[i])), the difference rounded to the dtype,
    compressed, and the message clipped (norm in float64; rule of ``clip_rows_``). The difference
    is fused into the compression: the [n, d] difference is never materialized for top-k and
    rand-k, and rand-k reads only the k chosen entries of each row.

    Args:
        G_new, G_old: [n, d] float32 or bfloat16, same shape, dtype and device. Not modified.
        compressor: None (dense), a ``fedkern.compress.TopK`` (per row, as ``topk_compress``) or a
            ``fedkern.compress.RandK`` (row i draws its mask from
            ``randk_keys(client_seed(compressor.seed, clients[i]), step)``, so a client's mask does
            not depend on its row; scaled by d/k when unbiased). k comes from the compressor for d.
        max_norm: a finite float > 0 or a [n] tensor of them (one bound per row); None (the
            default) skips clipping.
        clients: the client ids of the rows (a sequence of ints), default 0..n-1. RandK only.
        step: the rand-k step; default the compressor's counter, which then advances by one.

    Returns:
        None compressor: the clipped differences [n, d]. Otherwise ``(values, indices)``: [n, k]
        in the dtype and int64 (indices ascending per row), the message format of the
        compressors. Use ``fedkern.sparse_add_batched_`` or a scatter to densify.
    """
    from fedkern.compress import RandK, TopK

    rows.check_pair(G_new, G_old)
    n, d = G_new.shape
    # no bound: the largest float64, which no float32 message norm reaches
    bound = _max_norm(torch.finfo(torch.float64).max if max_norm is None else max_norm, G_new)
    if compressor is None:
        return rows.diff_clip(G_new, G_old, bound)[0]
    if isinstance(compressor, TopK):
        values, indices, _ = rows.diff_topk_clip(G_new, G_old, compressor.k_for(d), bound)
        return values, indices
    if isinstance(compressor, RandK):
        ids = list(range(n)) if clients is None else [v.integer("clients", c, 0) for c in clients]
        if len(ids) != n:
            raise ValueError(f"clients must name one client per row ({n}), got {len(ids)}")
        step = compressor._next(None if step is None else v.integer("step", step, 0))
        keys = torch.tensor([randk_keys(client_seed(compressor.seed, c), step) for c in ids],
                            dtype=torch.int64)  # fmt: skip
        k = compressor.k_for(d)
        scale = fedkern.ops.randk.scale_for(d, k, compressor.unbiased)
        values, indices, _ = rows.diff_randk_clip(G_new, G_old, k, keys, scale, bound)
        return values, indices
    raise TypeError(f"compressor must be None, a fedkern.compress.TopK or RandK, got "
                    f"{type(compressor).__name__}")  # fmt: skip


from fedkern.robust.aggregator import Aggregator  # noqa: E402  (uses the functions above)
