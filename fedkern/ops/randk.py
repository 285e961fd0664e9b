"""Rand-k compression and rand-k error feedback: schemas, validation and dispatch.

Ops (namespace ``fedkern``; every tensor is treated as flattened):
  randk_compress(x, k, *, seed, step=0, unbiased=True) -> (values, indices)
  ef14_randk_(grad, error, k, *, seed, step=0, lr=1.0, unbiased=False)   mutates error
  ef21_randk_(grad, state, k, *, seed, step=0, unbiased=False)           mutates state
The index set is a pure function of (seed, step, numel, k): see ``fedkern.random`` and
``fedkern.reference.randk``. The round keys and the fp32 scale are computed here, once per call.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkern import validation as v
from fedkern.interop import accepts_dlpack
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, outputs, tag
from fedkern.ops.topk import check_feedback, check_topk, scatter_backward
from fedkern.random import randk_keys
from fedkern.reference import randk as ref

Tensor = torch.Tensor


def _cpu_randk(x, k, keys, scale):
    val, idx = outputs(k, x)
    cpu_core().randk_compress(
        x.data_ptr(), tag(x), x.numel(), k, list(keys), scale, idx.data_ptr(), val.data_ptr()
    )
    return val, idx


def _cpu_ef14(grad, error, k, keys, lr, scale):
    val, idx = outputs(k, error)
    cpu_core().ef14_randk(
        grad.data_ptr(), error.data_ptr(), tag(error), error.numel(), k, list(keys), lr, scale,
        idx.data_ptr(), val.data_ptr(),
    )  # fmt: skip
    return val, idx


def _cpu_ef21(grad, state, k, keys, scale):
    val, idx = outputs(k, state)
    cpu_core().ef21_randk(
        grad.data_ptr(), state.data_ptr(), tag(state), state.numel(), k, list(keys), scale,
        idx.data_ptr(), val.data_ptr(),
    )  # fmt: skip
    return val, idx


def _impls(name: str, cpu) -> dict:
    return {
        "reference": getattr(ref, name),
        "cpu": cpu,
        "triton": lazy("fedkern.kernels.randk", name),
    }


IMPLS = {
    "randk_compress": _impls("randk_compress", _cpu_randk),
    "ef14_randk_": _impls("ef14_randk_", _cpu_ef14),
    "ef21_randk_": _impls("ef21_randk_", _cpu_ef21),
}


def scale_for(n: int, k: int, unbiased: bool) -> float:
    """The fp32 factor applied to the kept values: n/k (rounded to float32) or 1."""
    return float(np.float32(n / k)) if unbiased else 1.0


def _seed_args(seed, step, unbiased):
    keys = randk_keys(seed, step)
    return keys, v.boolean("unbiased", unbiased)


@torch.library.custom_op("fedkern::randk_compress", mutates_args=())
def randk_compress_op(
    x: Tensor, k: int, seed: int, step: int = 0, unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    k = check_topk(x, k)
    keys, unbiased = _seed_args(seed, step, unbiased)
    fn = pick("randk_compress", IMPLS["randk_compress"], x.device, x.numel())
    return fn(x.reshape(-1).contiguous(), k, keys, scale_for(x.numel(), k, unbiased))


@randk_compress_op.register_fake
def _(x, k, seed, step=0, unbiased=True):
    k = check_topk(x, k)
    return x.new_empty(k), x.new_empty(k, dtype=torch.int64)


def _randk_setup(ctx, inputs, output):
    x, k, unbiased = inputs[0], inputs[1], inputs[4] if len(inputs) > 4 else True
    ctx.indices, ctx.shape, ctx.numel = output[1], x.shape, x.numel()
    ctx.scale, ctx.n_other = scale_for(x.numel(), k, unbiased), len(inputs) - 1


randk_compress_op.register_autograd(scatter_backward, setup_context=_randk_setup)


@torch.library.custom_op("fedkern::ef14_randk_", mutates_args=("error",))
def ef14_randk_op(
    grad: Tensor, error: Tensor, k: int, seed: int, step: int = 0, lr: float = 1.0,
    unbiased: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    k = check_feedback(grad, error, "error", k)
    keys, unbiased = _seed_args(seed, step, unbiased)
    lr = v.fp32_scalar("lr", lr, nonneg=True)
    fn = pick("ef14_randk_", IMPLS["ef14_randk_"], error.device, error.numel())
    scale = scale_for(error.numel(), k, unbiased)
    return fn(grad.reshape(-1).contiguous(), error.view(-1), k, keys, lr, scale)


@ef14_randk_op.register_fake
def _(grad, error, k, seed, step=0, lr=1.0, unbiased=False):
    k = check_feedback(grad, error, "error", k)
    return error.new_empty(k), error.new_empty(k, dtype=torch.int64)


@torch.library.custom_op("fedkern::ef21_randk_", mutates_args=("state",))
def ef21_randk_op(
    grad: Tensor, state: Tensor, k: int, seed: int, step: int = 0, unbiased: bool = False
) -> tuple[Tensor, Tensor]:
    k = check_feedback(grad, state, "state", k)
    keys, unbiased = _seed_args(seed, step, unbiased)
    fn = pick("ef21_randk_", IMPLS["ef21_randk_"], state.device, state.numel())
    scale = scale_for(state.numel(), k, unbiased)
    return fn(grad.reshape(-1).contiguous(), state.view(-1), k, keys, scale)


@ef21_randk_op.register_fake
def _(grad, state, k, seed, step=0, unbiased=False):
    k = check_feedback(grad, state, "state", k)
    return state.new_empty(k), state.new_empty(k, dtype=torch.int64)


@accepts_dlpack
def randk_compress(
    x: Tensor, k: int, *, seed: int, step: int = 0, unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    """Rand-k sparsification: k distinct coordinates drawn from (seed, step), never stored.

    The index set depends only on (seed, step, x.numel(), k): it is the same on every backend and
    device, bit for bit, so a receiver can regenerate it from the seed. It is the image of
    0..k-1 under a keyed pseudo-random permutation of [0, numel) (see ``fedkern.random``), so each
    coordinate is kept with probability k/numel.

    Args:
        x: float32/bfloat16 tensor of any shape (flattened) and strides, CPU or CUDA. Not modified.
        k: 1 <= k <= x.numel().
        seed, step: ints in [0, 2**63).
        unbiased: scale the kept values by numel/k (computed in float32) so E[decompress] = x.

    Returns:
        ``(values, indices)``: int64 indices [k], strictly ascending, and x at those indices
        (times numel/k when unbiased), in x's dtype. New tensors on x's device. ``values`` is
        differentiable with respect to x (the gradient scatters back, times the same scale).

    Raises:
        TypeError / ValueError naming the argument.
    """
    v.tensor("x", x)
    v.schema_types(k=k, seed=seed, step=step, unbiased=unbiased)
    return torch.ops.fedkern.randk_compress(x, int(k), int(seed), int(step), unbiased)


@accepts_dlpack
def ef14_randk_(
    grad: Tensor, error: Tensor, k: int, *, seed: int, step: int = 0, lr: float = 1.0,
    unbiased: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Classic error feedback (EF14) with rand-k.

    ``a = error + lr*grad`` everywhere; ``c = randk(a)`` (scaled by numel/k when unbiased);
    ``error = a - decompress(c)``. The default is the biased (contractive) rand-k that error
    feedback theory assumes, which sends a at k coordinates and zeroes them in error.

    Args:
        grad: float32/bfloat16, same shape/dtype/device as error, any strides. Not modified.
        error: residual buffer, contiguous, updated in place (must not alias grad).
        k: 1 <= k <= error.numel().
        seed, step: ints in [0, 2**63); the mask is that of ``randk_compress`` with the same ones.
        lr: finite number >= 0 (float32).
        unbiased: scale the sent values by numel/k.

    Returns:
        ``(values, indices)`` in error's dtype, ascending int64 indices.
    """
    v.tensor("grad", grad)
    v.tensor("error", error)
    v.schema_types(k=k, seed=seed, step=step, lr=lr, unbiased=unbiased)
    return torch.ops.fedkern.ef14_randk_(
        grad, error, int(k), int(seed), int(step), float(lr), unbiased
    )


@accepts_dlpack
def ef21_randk_(
    grad: Tensor, state: Tensor, k: int, *, seed: int, step: int = 0, unbiased: bool = False
) -> tuple[Tensor, Tensor]:
    """EF21 with rand-k: ``c = randk(grad - state)``, ``state += c``; O(k) work.

    Only the k selected coordinates of grad and state are read or written.

    Args:
        grad: float32/bfloat16, same shape/dtype/device as state, any strides. Not modified.
        state: EF21 estimate, contiguous, updated in place at the selected coordinates.
        k: 1 <= k <= state.numel().
        seed, step: ints in [0, 2**63).
        unbiased: scale the sent values by numel/k.

    Returns:
        ``(values, indices)`` in state's dtype, ascending int64 indices.
    """
    v.tensor("grad", grad)
    v.tensor("state", state)
    v.schema_types(k=k, seed=seed, step=step, unbiased=unbiased)
    return torch.ops.fedkern.ef21_randk_(grad, state, int(k), int(seed), int(step), unbiased)
