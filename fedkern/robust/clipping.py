"""Clipping of client vectors: ``clip_rows_`` (in place) and ``diff_compress_clip`` (the client
side of Byz-VR-MARINA: difference, compress, clip; batched over clients, one per row)."""

from __future__ import annotations

import math
import numbers

import torch

from fedkern import validation as v
from fedkern.interop import accepts_dlpack
from fedkern.ops import diffclip as _diffclip
from fedkern.ops import rowops as _rowops
from fedkern.ops.randk import scale_for
from fedkern.random import client_seed, randk_keys

Tensor = torch.Tensor


def _max_norm(max_norm, X: Tensor, name: str = "max_norm") -> Tensor:
    """A float or a [n] tensor, each finite and > 0, as float64 [n] on X's device, checked here
    once: a float on the host (the tensor filled from it needs no device read, so no host
    synchronization on CUDA), a tensor by reading its values (one synchronization). The ops are
    then called with check_bounds=False, so nothing is checked twice.
    """
    n = X.shape[0]
    if isinstance(max_norm, torch.Tensor):
        if max_norm.dim() == 0:
            max_norm = max_norm.reshape(1).expand(n)
        if max_norm.shape != (n,):
            raise ValueError(f"{name} must be a float or a tensor of shape ({n},), got shape "
                             f"{tuple(max_norm.shape)}")  # fmt: skip
        out = max_norm.to(device=X.device, dtype=torch.float64).contiguous()
        return v.row_bounds(name, out, X)
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(max_norm).__name__}")
    bound = float(max_norm)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"{name} must be finite and > 0 for every row, got {bound}")
    out = torch.full((n,), bound, dtype=torch.float64, device=X.device)
    return v.row_bounds(name, out, X, inspect=False)


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
        when an argument is invalid. A float max_norm is checked on the host (no synchronization
        on CUDA); a tensor's values are read to check them (a host synchronization on CUDA).
    """
    v.stack("X", X)
    _rowops.clip_rows_(X, _max_norm(max_norm, X), False)
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

    _diffclip.check_pair(G_new, G_old)
    n, d = G_new.shape
    # no bound: the largest float64, which no float32 message norm reaches
    bound = _max_norm(torch.finfo(torch.float64).max if max_norm is None else max_norm, G_new)
    check = False  # _max_norm checked the bounds
    if compressor is None:
        return _diffclip.diff_clip(G_new, G_old, bound, check)[0]
    if isinstance(compressor, TopK):
        k = compressor.k_for(d)
        values, indices, _ = _diffclip.diff_topk_clip(G_new, G_old, k, bound, check)
        return values, indices
    if isinstance(compressor, RandK):
        ids = list(range(n)) if clients is None else [v.integer("clients", c, 0) for c in clients]
        if len(ids) != n:
            raise ValueError(f"clients must name one client per row ({n}), got {len(ids)}")
        step = compressor._next(None if step is None else v.integer("step", step, 0))
        keys = torch.tensor([randk_keys(client_seed(compressor.seed, c), step) for c in ids],
                            dtype=torch.int64)  # fmt: skip
        k = compressor.k_for(d)
        scale = scale_for(d, k, compressor.unbiased)
        values, indices, _ = _diffclip.diff_randk_clip(G_new, G_old, k, keys, scale, bound, check)
        return values, indices
    raise TypeError(f"compressor must be None, a fedkern.compress.TopK or RandK, got "
                    f"{type(compressor).__name__}")  # fmt: skip
