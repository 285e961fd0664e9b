"""Sparse accumulation (decompression, server-side sums of sparse messages).

Ops (namespace ``fedkern``):
  sparse_add_(dense, values, indices, *, alpha=1.0)            one message [k]
  sparse_add_batched_(dense, values, indices, *, alpha=1.0)    m messages [m, k], no Python loop
Both mutate ``dense`` and return it. Numerics in ``fedkern.reference.sparse``.
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

    ``inspect=False`` skips the checks that read index values (fake/meta tensors have none).
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
        rows = indices.view(-1, indices.shape[-1])
        # one comparison pass; then only the first and last column can leave the range
        if rows.shape[1] > 1 and not bool((rows[:, 1:] > rows[:, :-1]).all()):
            raise ValueError("indices must be strictly ascending in every message (row)")
        lo, hi = int(rows[:, 0].min()), int(rows[:, -1].max())
        if lo < 0 or hi >= dense.numel():
            raise ValueError(
                f"indices must be in [0, dense.numel()={dense.numel()}), got values in [{lo}, {hi}]"
            )
    return alpha


def _run(dense, values, indices, alpha):
    if values.numel() == 0:
        return
    fn = pick("sparse_add_batched_", IMPLS["sparse_add_batched_"], dense.device)
    fn(dense.view(-1), values.contiguous(), indices.contiguous(), alpha)


@torch.library.custom_op("fedkern::sparse_add_", mutates_args=("dense",))
def sparse_add_op(dense: Tensor, values: Tensor, indices: Tensor, alpha: float = 1.0) -> None:
    alpha = check(dense, values, indices, alpha, 1)
    _run(dense, values.view(1, -1), indices.view(1, -1), alpha)


@sparse_add_op.register_fake
def _(dense, values, indices, alpha=1.0):
    check(dense, values, indices, alpha, 1, inspect=False)


@torch.library.custom_op("fedkern::sparse_add_batched_", mutates_args=("dense",))
def sparse_add_batched_op(
    dense: Tensor, values: Tensor, indices: Tensor, alpha: float = 1.0
) -> None:
    alpha = check(dense, values, indices, alpha, 2)
    _run(dense, values, indices, alpha)


@sparse_add_batched_op.register_fake
def _(dense, values, indices, alpha=1.0):
    check(dense, values, indices, alpha, 2, inspect=False)


@accepts_dlpack
def sparse_add_(dense: Tensor, values: Tensor, indices: Tensor, *, alpha: float = 1.0) -> Tensor:
    """``dense.flatten()[indices] += alpha * values``, in place (decompression / accumulation).

    Args:
        dense: contiguous float32/bfloat16 tensor of any shape (flattened), CPU or CUDA; mutated.
        values: [k] tensor of dense's dtype and device.
        indices: [k] int64 tensor on dense's device, strictly ascending, in [0, dense.numel()) --
            what ``topk_compress`` and ``randk_compress`` return.
        alpha: finite float (float32).

    Returns:
        ``dense``. The sum is formed in float32 and rounded to dense's dtype once.

    Raises:
        TypeError / ValueError naming the argument (checking the indices costs one reduction, and a
        device synchronisation on CUDA), before anything is modified.
    """
    v.tensor("dense", dense)
    v.tensor("values", values)
    v.tensor("indices", indices)
    v.schema_types(alpha=alpha)
    torch.ops.fedkern.sparse_add_(dense, values, indices, float(alpha))
    return dense


@accepts_dlpack
def sparse_add_batched_(
    dense: Tensor, values: Tensor, indices: Tensor, *, alpha: float = 1.0
) -> Tensor:
    """Add m sparse messages at once: ``dense[indices[i]] += alpha * values[i]`` for every row i.

    Deterministic: each coordinate sums its contributions in float32 in row order and is rounded
    to dense's dtype once, with no float atomics, so the result is the same on every run.

    Args:
        dense: contiguous float32/bfloat16 tensor of any shape (flattened), CPU or CUDA; mutated.
        values: [m, k] tensor of dense's dtype and device.
        indices: [m, k] int64 on dense's device; each row strictly ascending, in [0, dense.numel()).
        alpha: finite float (float32).

    Returns:
        ``dense``.

    Raises:
        TypeError / ValueError naming the argument, before anything is modified.
    """
    v.tensor("dense", dense)
    v.tensor("values", values)
    v.tensor("indices", indices)
    v.schema_types(alpha=alpha)
    torch.ops.fedkern.sparse_add_batched_(dense, values, indices, float(alpha))
    return dense
