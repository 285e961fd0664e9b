"""Top-k compression and top-k error feedback: schemas, validation and dispatch.

Ops (namespace ``fedkern``; every tensor is treated as flattened):
  topk_compress(x, k) -> (values, indices)
  ef14_topk_(grad, error, k, *, lr=1.0) -> (values, indices)       mutates error
  ef21_topk_(grad, state, k) -> (values, indices)                  mutates state
The math and the exact numerics are in ``fedkern.reference.topk``.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.interop import accepts_dlpack
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, outputs, tag
from fedkern.reference import topk as ref

Tensor = torch.Tensor


def _cpu_topk(x, k):
    val, idx = outputs(k, x)
    cpu_core().topk_compress(x.data_ptr(), tag(x), x.numel(), k, idx.data_ptr(), val.data_ptr())
    return val, idx


def _cpu_ef14(grad, error, k, lr):
    val, idx = outputs(k, error)
    cpu_core().ef14_topk(
        grad.data_ptr(), error.data_ptr(), tag(error), error.numel(), k, lr,
        idx.data_ptr(), val.data_ptr(),
    )  # fmt: skip
    return val, idx


def _cpu_ef21(grad, state, k):
    val, idx = outputs(k, state)
    cpu_core().ef21_topk(
        grad.data_ptr(), state.data_ptr(), tag(state), state.numel(), k,
        idx.data_ptr(), val.data_ptr(),
    )  # fmt: skip
    return val, idx


def _impls(name: str, cpu) -> dict:
    return {
        "reference": getattr(ref, name),
        "cpu": cpu,
        "triton": lazy("fedkern.kernels.topk", name),
        "cuda": lazy("fedkern.cuda.topk", name),
    }


IMPLS = {
    "topk_compress": _impls("topk_compress", _cpu_topk),
    "ef14_topk_": _impls("ef14_topk_", _cpu_ef14),
    "ef21_topk_": _impls("ef21_topk_", _cpu_ef21),
}


def check_topk(x, k) -> int:
    v.float_tensor("x", x)
    return v.k_for(k, x.numel())


def check_feedback(grad, buf, buf_name: str, k) -> int:
    v.float_tensor("grad", grad)
    v.float_tensor(buf_name, buf)
    v.same_as(buf_name, buf, "grad", grad)
    v.writable(buf_name, buf)
    v.disjoint("grad", grad, buf_name, buf)
    return v.k_for(k, buf.numel(), buf_name)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1).contiguous()


@torch.library.custom_op("fedkern::topk_compress", mutates_args=())
def topk_compress_op(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    k = check_topk(x, k)
    return pick("topk_compress", IMPLS["topk_compress"], x.device, x.numel())(_flat(x), k)


@topk_compress_op.register_fake
def _(x, k):
    k = check_topk(x, k)
    return x.new_empty(k), x.new_empty(k, dtype=torch.int64)


def scatter_backward(ctx, grad_values, grad_indices):
    """d values / d x: the incoming gradient scattered to the kept positions (times the scale)."""
    grad = grad_values.new_zeros(ctx.numel)
    grad[ctx.indices] = grad_values * ctx.scale if ctx.scale != 1.0 else grad_values
    return (grad.view(ctx.shape),) + (None,) * ctx.n_other


def _topk_setup(ctx, inputs, output):
    ctx.indices, ctx.shape, ctx.numel = output[1], inputs[0].shape, inputs[0].numel()
    ctx.scale, ctx.n_other = 1.0, len(inputs) - 1


topk_compress_op.register_autograd(scatter_backward, setup_context=_topk_setup)


@torch.library.custom_op("fedkern::ef14_topk_", mutates_args=("error",))
def ef14_topk_op(grad: Tensor, error: Tensor, k: int, lr: float = 1.0) -> tuple[Tensor, Tensor]:
    k = check_feedback(grad, error, "error", k)
    lr = v.fp32_scalar("lr", lr, nonneg=True)
    fn = pick("ef14_topk_", IMPLS["ef14_topk_"], error.device, error.numel())
    return fn(_flat(grad), error.view(-1), k, lr)


@ef14_topk_op.register_fake
def _(grad, error, k, lr=1.0):
    k = check_feedback(grad, error, "error", k)
    return error.new_empty(k), error.new_empty(k, dtype=torch.int64)


@torch.library.custom_op("fedkern::ef21_topk_", mutates_args=("state",))
def ef21_topk_op(grad: Tensor, state: Tensor, k: int) -> tuple[Tensor, Tensor]:
    k = check_feedback(grad, state, "state", k)
    fn = pick("ef21_topk_", IMPLS["ef21_topk_"], state.device, state.numel())
    return fn(_flat(grad), state.view(-1), k)


@ef21_topk_op.register_fake
def _(grad, state, k):
    k = check_feedback(grad, state, "state", k)
    return state.new_empty(k), state.new_empty(k, dtype=torch.int64)


@accepts_dlpack
def topk_compress(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k sparsification by magnitude over the flattened tensor.

    Args:
        x: float32 or bfloat16 tensor of any shape (treated as flattened, numel n >= 1), on CPU or
            CUDA; any strides. Not modified.
        k: number of entries to keep, 1 <= k <= n.

    Returns:
        ``(values, indices)``: ``indices`` int64 [k], strictly ascending, the k entries of largest
        |x| (ties toward the lower index; -0 == +0; NaN counts as larger than +inf, as in
        torch.topk); ``values = x.flatten()[indices]``, x's dtype, bit-exact. New tensors on
        x's device. ``values`` is differentiable with respect to x: the gradient scatters back
        to the kept positions.

    Raises:
        TypeError: x is not a float32/bfloat16 tensor, or k is not an int.
        ValueError: k outside [1, n], x empty.
    """
    v.tensor("x", x)
    v.schema_types(k=k)
    return torch.ops.fedkern.topk_compress(x, int(k))


@accepts_dlpack
def ef14_topk_(grad: Tensor, error: Tensor, k: int, *, lr: float = 1.0) -> tuple[Tensor, Tensor]:
    """Classic error feedback (EF14) with top-k, fused: one arithmetic pass plus the selection.

    ``a = error + lr*grad`` (fp32, rounded to error's dtype); the k entries of largest |a| are sent
    and zeroed in ``error``; the rest of ``a`` stays in ``error`` as the new residual, so
    ``error_new + decompress(values, indices) == error_old + lr*grad``.

    Args:
        grad: float32/bfloat16 tensor, any strides, same shape/dtype/device as error. Not modified.
        error: the residual buffer, contiguous, updated in place (must not alias grad).
        k: 1 <= k <= error.numel().
        lr: finite number >= 0, applied in float32.

    Returns:
        ``(values, indices)``: int64 ascending indices into the flattened tensor and ``a`` at those
        indices, in error's dtype. New tensors on error's device.

    Raises:
        TypeError / ValueError naming the argument, before anything is modified.
    """
    v.tensor("grad", grad)
    v.tensor("error", error)
    v.schema_types(k=k, lr=lr)
    return torch.ops.fedkern.ef14_topk_(grad, error, int(k), float(lr))


@accepts_dlpack
def ef21_topk_(grad: Tensor, state: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """EF21 with top-k: ``c = topk(grad - state)``, ``state += c``; returns c.

    ``grad - state`` is never stored in full: it is recomputed in the selection passes.

    Args:
        grad: float32/bfloat16 tensor, any strides, same shape/dtype/device as state. Not modified.
        state: the client's EF21 estimate, contiguous, updated in place at the k selected entries.
        k: 1 <= k <= state.numel().

    Returns:
        ``(values, indices)``: ascending int64 indices and ``round(grad - state)`` there, in
        state's dtype; state[indices] becomes ``round(state + values)``.

    Raises:
        TypeError / ValueError naming the argument, before anything is modified.
    """
    v.tensor("grad", grad)
    v.tensor("state", state)
    v.schema_types(k=k)
    return torch.ops.fedkern.ef21_topk_(grad, state, int(k))
