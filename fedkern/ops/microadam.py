"""MicroAdam's fused step over a list of tensors: schema, validation and dispatch.

Op (namespace ``fedkern``):
  microadam_step_(params, grads, ef, ef_min, ef_scale, idx, val, steps, lr, beta1, beta2, eps,
                  weight_decay, block_size, k, quant_bucket)        mutates params and the state
The math and the exact numerics are in ``fedkern.reference.microadam``. This layer checks every
argument, then turns the hyperparameters into the float32 constants all backends share (computed
in float64, rounded once): the per-age window weights w1/w2, the bias corrections c1/c2 of each
tensor's step and the decay factor.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.reference import microadam as ref

Tensor = torch.Tensor
MAX_BLOCK = 2**15  # block-local indices are int16
STATE = ("ef", "ef_min", "ef_scale", "idx", "val")


def _cpu_step(
    params, grads, ef, ef_min, ef_scale, idx, val, rows, c1, c2, decay, eps, w1, w2,
    block_size, k, quant_bucket,
) -> None:  # fmt: skip
    def ptrs(ts):
        return [t.data_ptr() for t in ts]

    cpu_core().microadam_step(
        ptrs(params), ptrs(grads), [tag(p) for p in params], [p.numel() for p in params],
        ptrs(ef), ptrs(ef_min), ptrs(ef_scale), ptrs(idx), ptrs(val), list(rows), list(c1),
        list(c2), decay, eps, list(w1), list(w2), len(w1), block_size, k, quant_bucket,
    )  # fmt: skip


IMPLS = {
    "microadam_step_": {
        "reference": ref.microadam_step_,
        "cpu": _cpu_step,
        "triton": lazy("fedkern.kernels.microadam", "microadam_step_"),
        "cuda": lazy("fedkern.cuda.microadam", "microadam_step_"),
    }
}


def _pow2(name: str, x, lo: int, hi: int) -> int:
    x = v.integer(name, x, lo, hi)
    if x & (x - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {x}")
    return x


def check_config(block_size, k, quant_bucket, m=1) -> tuple[int, int, int, int]:
    """Validated (block_size, k, quant_bucket, m)."""
    block_size = _pow2("block_size", block_size, 64, MAX_BLOCK)
    k = v.integer("k", k, 1, block_size)
    quant_bucket = _pow2("quant_bucket", quant_bucket, 2, block_size)
    m = v.integer("m", m, 1, 2**20)
    return block_size, k, quant_bucket, m


def check_hyper(lr, beta1, beta2, eps, weight_decay) -> tuple[float, ...]:
    """Validated float hyperparameters (Python floats, not yet rounded)."""
    out = []
    for name, x in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
                    ("weight_decay", weight_decay)):  # fmt: skip
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
        out.append(x)
    lr, beta1, beta2, eps, weight_decay = out
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    if not eps > 0:
        raise ValueError(
            f"eps must be > 0 (entries outside the window have zero moments), got {eps}"
        )
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    v.fp32_scalar("eps", eps)
    v.fp32_scalar("lr", lr)
    return lr, beta1, beta2, eps, weight_decay


def _check_tensors(params, grads, state, steps, block_size, k, quant_bucket) -> int:
    """Every tensor's type, dtype, device, shape and layout; returns the window length m."""
    names = ("params", "grads", *STATE, "steps")
    lists = (params, grads, *state, steps)
    for name, lst in zip(names, lists, strict=True):
        if not isinstance(lst, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(lst).__name__}")
        if len(lst) != len(params):
            raise ValueError(f"{name} must have one entry per parameter ({len(params)}), "
                             f"got {len(lst)}")  # fmt: skip
    if not params:
        return 1
    m = None
    device = v.tensor("params[0]", params[0]).device
    seen = set()
    for i, p in enumerate(params):
        v.float_tensor(f"params[{i}]", p)
        v.writable(f"params[{i}]", p)
        if p.device != device:
            raise ValueError(f"params[{i}] must be on params[0]'s device {device}, got {p.device}")
        g = v.float_tensor(f"grads[{i}]", grads[i])
        v.same_as(f"grads[{i}]", g, f"params[{i}]", p)
        if not isinstance(p, FakeTensor) and p.device.type != "meta":
            if p.data_ptr() in seen:
                raise ValueError(f"params[{i}] appears twice in params")
            seen.add(p.data_ptr())
        shapes = ref.state_shapes(p.numel(), block_size, k, quant_bucket, 1)
        for name, s in zip(STATE, state, strict=True):
            t = v.tensor(f"{name}[{i}]", s[i])
            want_shape, want_dtype = shapes[name]
            if name in ("idx", "val"):
                if t.dim() != 2 or t.shape[0] < 1:
                    raise ValueError(f"{name}[{i}] must have shape [m, {want_shape[1]}], "
                                     f"got {tuple(t.shape)}")  # fmt: skip
                m = t.shape[0] if m is None else m
                want_shape = (m, want_shape[1])
            if t.dtype != want_dtype:
                raise TypeError(f"{name}[{i}] must be {want_dtype}, got {t.dtype}")
            if tuple(t.shape) != want_shape:
                raise ValueError(f"{name}[{i}] must have shape {list(want_shape)} for "
                                 f"{p.numel()} parameters, got {tuple(t.shape)}")  # fmt: skip
            if t.device != device:
                raise ValueError(f"{name}[{i}] must be on {device}, got {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] is updated in place and must be contiguous")
        v.integer(f"steps[{i}]", steps[i], 1, 2**62)
    return m


def _f32(x: float) -> float:
    return float(np.float32(x))


def constants(steps, m, lr, beta1, beta2, eps, weight_decay) -> dict:
    """The float32 constants of one call (computed in float64, rounded once)."""
    return {
        "rows": [(t - 1) % m for t in steps],
        "c1": [_f32(lr / (1.0 - beta1**t)) for t in steps],
        "c2": [_f32(1.0 / math.sqrt(1.0 - beta2**t)) for t in steps],
        "decay": _f32(1.0 - lr * weight_decay),
        "eps": _f32(eps),
        "w1": [_f32((1.0 - beta1) * beta1**a) for a in range(m)],
        "w2": [_f32((1.0 - beta2) * beta2**a) for a in range(m)],
    }


def _run(
    params, grads, ef, ef_min, ef_scale, idx, val, steps, lr, beta1, beta2, eps, weight_decay,
    block_size, k, quant_bucket,
) -> None:  # fmt: skip
    """The op's body: check everything, then one backend call for all tensors."""
    block_size, k, quant_bucket, _ = check_config(block_size, k, quant_bucket)
    hyper = check_hyper(lr, beta1, beta2, eps, weight_decay)
    state = (ef, ef_min, ef_scale, idx, val)
    m = _check_tensors(params, grads, state, steps, block_size, k, quant_bucket)
    if not params:
        return
    c = constants(steps, m, *hyper)
    fn = pick("microadam_step_", IMPLS["microadam_step_"], params[0].device)
    flat = [[t.view(-1) for t in lst] for lst in (params, ef, ef_min, ef_scale)]
    grads = [g.reshape(-1).contiguous() for g in grads]
    fn(flat[0], grads, flat[1], flat[2], flat[3], list(idx), list(val), c["rows"], c["c1"],
       c["c2"], c["decay"], c["eps"], c["w1"], c["w2"], block_size, k, quant_bucket)  # fmt: skip


@torch.library.custom_op(
    "fedkern::microadam_step_", mutates_args=("params", "ef", "ef_min", "ef_scale", "idx", "val")
)
def microadam_step_op(
    params: list[Tensor], grads: list[Tensor], ef: list[Tensor], ef_min: list[Tensor],
    ef_scale: list[Tensor], idx: list[Tensor], val: list[Tensor], steps: list[int], lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, block_size: int, k: int,
    quant_bucket: int,
) -> None:  # fmt: skip
    _run(params, grads, ef, ef_min, ef_scale, idx, val, steps, lr, beta1, beta2, eps,
         weight_decay, block_size, k, quant_bucket)  # fmt: skip


@microadam_step_op.register_fake
def _(params, grads, ef, ef_min, ef_scale, idx, val, steps, lr, beta1, beta2, eps, weight_decay,
      block_size, k, quant_bucket):  # fmt: skip
    check_config(block_size, k, quant_bucket)
    check_hyper(lr, beta1, beta2, eps, weight_decay)
    _check_tensors(params, grads, (ef, ef_min, ef_scale, idx, val), steps, block_size, k,
                   quant_bucket)  # fmt: skip


def microadam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    state: list[dict],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 4096,
    k: int = 41,
    quant_bucket: int = 256,
) -> None:
    """One fused MicroAdam step over several tensors (the kernel layer of ``fedkern.optim``).

    Args:
        params: list of contiguous float32 or bfloat16 tensors (any shapes, numel >= 1), all on one
            device (CPU or CUDA). Updated in place.
        grads: one gradient per parameter, same shape, dtype and device. Not modified (any strides).
        state: one dict per parameter with the tensors of ``fedkern.reference.microadam.new_state``
            (ef uint8, ef_min/ef_scale float32, idx int16 [m, *], val bfloat16 [m, *]); updated in
            place. The same m for every parameter.
        steps: the step number being taken for each parameter (t >= 1; window row (t-1) mod m).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (eps > 0, betas in [0, 1)).
        block_size: elements per selection block, a power of two in [64, 32768]; k: entries kept
            per block, 1 <= k <= block_size; quant_bucket: elements per quantization bucket, a power
            of two in [2, block_size].

    Dispatch: the C++ core on CPU; on CUDA the Triton kernel (or the CUDA C++ kernel when Triton is
    missing, or under ``fedkern.backend("cuda")``: not yet run on a GPU, so ``auto`` keeps Triton
    first, ``fedkern.ops._dispatch.AUTO_ORDER``); the reference elsewhere or when forced. Every
    argument is checked before anything is modified.
    """
    if not isinstance(state, (list, tuple)) or not all(isinstance(s, dict) for s in state):
        raise TypeError("state must be a list of dicts (one per parameter)")
    for i, s in enumerate(state):
        missing = [name for name in STATE if name not in s]
        if missing:
            raise ValueError(f"state[{i}] lacks {', '.join(missing)}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    lr, beta1, beta2, eps, weight_decay = check_hyper(lr, *betas, eps, weight_decay)
    block_size, k, quant_bucket, _ = check_config(block_size, k, quant_bucket)
    if not isinstance(steps, (list, tuple)):
        raise TypeError(f"steps must be a list of ints, got {type(steps).__name__}")
    steps = [v.integer(f"steps[{i}]", t, 1, 2**62) for i, t in enumerate(steps)]
    cols = [[s[name] for s in state] for name in STATE]
    # eager calls skip torch.library's dispatch (a few hundred microseconds for lists of tensors,
    # as much as a whole GPU step); under torch.compile the registered op is traced
    call = torch.ops.fedkern.microadam_step_ if torch.compiler.is_compiling() else _run
    call(
        list(params), list(grads), *cols, steps, lr, beta1, beta2, eps, weight_decay, block_size,
        k, quant_bucket,
    )  # fmt: skip
