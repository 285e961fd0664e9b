"""Sparse accumulation (decompression, server-side sums of sparse messages).

Ops (namespace ``fedkern``):
  sparse_add_(dense, values, indices, *, alpha=1.0, check_indices=True)          one message [k]
  sparse_add_batched_(dense, values, indices, *, alpha=1.0, check_indices=True)  m messages [m, k]
Both mutate ``dense`` and return it. Numerics in ``fedkern.reference.sparse``.

Checking modes. Everything that needs only the tensors' metadata (dtypes, devices, shapes,
contiguity, aliasing, alpha) is always checked. The index values (strictly ascending per row,
inside ``dense``) are checked by :func:`check_index_values`, which reads them: one reduction pass,
and on CUDA a host synchronization that stalls the launch queue. ``check_indices=True`` (the
default) runs it; ``check_indices=False`` skips it, for callers that build valid indices
themselves (the DDP hooks: indices straight from the fused top-k / rand-k ops). With
``check_indices=False`` invalid indices are the caller's responsibility and the result is
undefined, but no kernel writes outside ``dense``: the C++ core drops a term whose index lies below
the chunk it is accumulating (negative, or out of order) and never reaches one >= dense.numel();
the Triton kernel reads ``indices`` only at positions inside its rows and each program writes only
the dense block it owns. The reference (plain PyTorch indexing) raises IndexError on CPU for an
index outside [-n, n) and wraps a negative one in range; on CUDA an out-of-range index trips
PyTorch's device-side assert ("auto" runs Triton there, never the reference).
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.interop import accepts_dlpack
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.reference import sparse as ref

Tensor = torch.Tensor


def _cpu_batched(dense, values, indices, alpha):
    m, k = values.shape
    cpu_core().sparse_add_batched(
        dense.data_ptr(), tag(dense), dense.numel(), values.data_ptr(), indices.data_ptr(), m, k,
        alpha,
    )  # fmt: skip


IMPLS = {
    "sparse_add_batched_": {
        "reference": ref.sparse_add_batched_,
        "cpu": _cpu_batched,
        "triton": lazy("fedkern.kernels.sparse", "sparse_add_batched_"),
    }
}


def check(dense, values, indices, alpha, ndim: int, *, inspect: bool = True) -> float:
    """Validate a sparse add; indices must be strictly ascending per row and inside dense.

    ``inspect=False`` skips :func:`check_index_values`, the check that reads index values (fake
    and meta tensors have none; ``check_indices=False`` callers vouch for them).
    """
    v.float_tensor("dense", dense)
    v.writable("dense", dense)
    v.tensor("values", values)
    v.tensor("indices", indices)
    if values.dtype != dense.dtype:
        raise TypeError(f"values must have dense's dtype {dense.dtype}, got {values.dtype}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor, got dtype {indices.dtype}")
    for name, t in (("values", values), ("indices", indices)):
        if t.device != dense.device:
            raise ValueError(f"{name} must be on dense's device {dense.device}, got {t.device}")
        if t.dim() != ndim:
            shape = "[k]" if ndim == 1 else "[m, k]"
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if values.shape != indices.shape:
        raise ValueError(
            f"values and indices must have the same shape, got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    v.disjoint("values", values, "dense", dense)
    alpha = v.fp32_scalar("alpha", alpha)
    if inspect and indices.numel():
        check_index_values(indices, dense.numel())
    return alpha


def check_index_values(indices: Tensor, n: int) -> None:
    """Raise ValueError unless every row of ``indices`` ([k] or [m, k] int64) is strictly
    ascending and inside [0, n). Reads the values: on CUDA a host synchronization."""
    rows = indices.view(-1, indices.shape[-1])
    # one comparison pass; then only the first and last column can leave the range
    if rows.shape[1] > 1 and not bool((rows[:, 1:] > rows[:, :-1]).all()):
        raise ValueError("indices must be strictly ascending in every message (row)")
    lo, hi = int(rows[:, 0].min()), int(rows[:, -1].max())
    if lo < 0 or hi >= n:
        raise ValueError(f"indices must be in [0, dense.numel()={n}), got values in [{lo}, {hi}]")


def _run(dense, values, indices, alpha):
    if values.numel() == 0:
        return
    fn = pick("sparse_add_batched_", IMPLS["sparse_add_batched_"], dense.device, dense.numel())
    fn(dense.view(-1), values.contiguous(), indices.contiguous(), alpha)


@torch.library.custom_op("fedkern::sparse_add_", mutates_args=("dense",))
def sparse_add_op(
    dense: Tensor, values: Tensor, indices: Tensor, alpha: float = 1.0, check_indices: bool = True
) -> None:
    alpha = check(dense, values, indices, alpha, 1, inspect=bool(check_indices))
    _run(dense, values.view(1, -1), indices.view(1, -1), alpha)


@sparse_add_op.register_fake
def _(dense, values, indices, alpha=1.0, check_indices=True):
    check(dense, values, indices, alpha, 1, inspect=False)


@torch.library.custom_op("fedkern::sparse_add_batched_", mutates_args=("dense",))
def sparse_add_batched_op(
    dense: Tensor, values: Tensor, indices: Tensor, alpha: float = 1.0, check_indices: bool = True
) -> None:
    alpha = check(dense, values, indices, alpha, 2, inspect=bool(check_indices))
    _run(dense, values, indices, alpha)


@sparse_add_batched_op.register_fake
def _(dense, values, indices, alpha=1.0, check_indices=True):
    check(dense, values, indices, alpha, 2, inspect=False)


def _flag(check_indices) -> bool:
    if not isinstance(check_indices, bool):
        raise TypeError(f"check_indices must be a bool, got {type(check_indices).__name__}")
    return check_indices


@accepts_dlpack
def sparse_add_(
    dense: Tensor,
    values: Tensor,
    indices: Tensor,
    *,
    alpha: float = 1.0,
    check_indices: bool = True,
) -> Tensor:
    """``dense.flatten()[indices] += alpha * values``, in place (decompression / accumulation).

    Args:
        dense: contiguous float32/bfloat16 tensor of any shape (flattened), CPU or CUDA; mutated.
        values: [k] tensor of dense's dtype and device.
        indices: [k] int64 tensor on dense's device, strictly ascending, in [0, dense.numel()) --
            what ``topk_compress`` and ``randk_compress`` return.
        alpha: finite float (float32).
        check_indices: True (default, safe): check that the indices are ascending and in range,
            which reads them (one reduction; on CUDA a host synchronization). False: skip that
            check, for callers that build valid indices themselves; invalid indices then give an
            undefined result (never a write outside ``dense``; see the module docstring).

    Returns:
        ``dense``. The sum is formed in float32 and rounded to dense's dtype once.

    Raises:
        TypeError / ValueError naming the argument, before anything is modified.
    """
    v.tensor("dense", dense)
    v.tensor("values", values)
    v.tensor("indices", indices)
    v.schema_types(alpha=alpha)
    torch.ops.fedkern.sparse_add_(dense, values, indices, float(alpha), _flag(check_indices))
    return dense


@accepts_dlpack
def sparse_add_batched_(
    dense: Tensor,
    values: Tensor,
    indices: Tensor,
    *,
    alpha: float = 1.0,
    check_indices: bool = True,
) -> Tensor:
    """Add m sparse messages at once: ``dense[indices[i]] += alpha * values[i]`` for every row i.

    Deterministic: each coordinate sums its contributions in float32 in row order and is rounded
    to dense's dtype once, with no float atomics, so the result is the same on every run.

    Args:
        dense: contiguous float32/bfloat16 tensor of any shape (flattened), CPU or CUDA; mutated.
        values: [m, k] tensor of dense's dtype and device.
        indices: [m, k] int64 on dense's device; each row strictly ascending, in [0, dense.numel()).
        alpha: finite float (float32).
        check_indices: True (default, safe): check every row's indices (ascending, in range) by
            reading them, on CUDA a host synchronization; False: skip it (the caller vouches for
            the indices; invalid ones give an undefined result, never a write outside ``dense``).

    Returns:
        ``dense``.

    Raises:
        TypeError / ValueError naming the argument, before anything is modified.
    """
    v.tensor("dense", dense)
    v.tensor("values", values)
    v.tensor("indices", indices)
    v.schema_types(alpha=alpha)
    torch.ops.fedkern.sparse_add_batched_(
        dense, values, indices, float(alpha), _flag(check_indices)
    )
    return dense
