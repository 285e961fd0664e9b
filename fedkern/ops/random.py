"""Counter-based Gaussian and Bernoulli fills: schemas, validation and dispatch.

Ops (namespace ``fedkern``):
  gaussian_fill_(out, seed, step=0, std=1.0) -> ()       out (float32/bfloat16) = round(std * z)
  bernoulli_fill_(out, p, p_tensor, seed, step=0) -> ()  out (bool) = keep flags
The draw's four key words are computed here, once per call, from (seed, step) and the stream tag
(``fedkern.random.draw_key``); the math is ``fedkern.reference.random``. The public entry points
are ``fedkern.random.gaussian`` and ``fedkern.random.bernoulli`` (they allocate the output).
"""

from __future__ import annotations

import numbers

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.random import STREAM_BERNOULLI, STREAM_GAUSSIAN, draw_key
from fedkern.reference import random as ref

Tensor = torch.Tensor


def _cpu_gaussian(out, key, std):
    cpu_core().gaussian_fill(out.data_ptr(), tag(out), out.numel(), list(key), std)
    return out


def _cpu_bernoulli(out, p, key):
    per = isinstance(p, Tensor)
    cpu_core().bernoulli_fill(out.data_ptr(), out.numel(), list(key), 1.0 if per else p,
                              p.data_ptr() if per else 0)  # fmt: skip
    return out


IMPLS = {
    "gaussian_fill_": {
        "reference": ref.gaussian_fill_,
        "cpu": _cpu_gaussian,
        "triton": lazy("fedkern.kernels.random", "gaussian_fill_"),
    },
    "bernoulli_fill_": {
        "reference": ref.bernoulli_fill_,
        "cpu": _cpu_bernoulli,
        "triton": lazy("fedkern.kernels.random", "bernoulli_fill_"),
    },
}


def _check_out(out: Tensor, dtypes, what: str) -> None:
    v.tensor("out", out)
    if out.dtype not in dtypes:
        raise TypeError(f"out must be a {what} tensor, got {out.dtype}")
    v.writable("out", out)


def check_probabilities(p: Tensor, numel: int, device) -> Tensor:
    """A float32 tensor of ``numel`` probabilities in (0, 1] on ``device`` (checked on the host
    unless it is a fake tensor)."""
    v.tensor("p", p)
    if p.dtype != torch.float32:
        raise TypeError(f"p must be a float or a float32 tensor, got {p.dtype}")
    if p.numel() != numel:
        raise ValueError(f"p must have one probability per entry ({numel}), got {p.numel()}")
    if p.device != device:
        raise ValueError(f"p must be on {device}, got {p.device}")
    if not isinstance(p, torch._subclasses.fake_tensor.FakeTensor) and p.numel():
        if not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError("p must hold probabilities in (0, 1]")
    return p


def probability32(p) -> float:
    """A Python probability in (0, 1], rounded to fp32 (it must stay > 0)."""
    p = v.probability("p", p)
    r = v.fp32_scalar("p", p)
    if r <= 0:
        raise ValueError(f"p must be > 0 in float32, got {p}")
    return r


@torch.library.custom_op("fedkern::gaussian_fill_", mutates_args=("out",))
def gaussian_fill_(out: Tensor, seed: int, step: int = 0, std: float = 1.0) -> None:
    """out = round(std * z): the Gaussian draw of (seed, step), in place."""
    _check_out(out, (torch.float32, torch.bfloat16), "float32 or bfloat16")
    key = draw_key(seed, step, stream=STREAM_GAUSSIAN)
    std = v.fp32_scalar("std", std)
    if out.numel():
        pick("gaussian_fill_", IMPLS["gaussian_fill_"], out.device)(out, key, std)


@gaussian_fill_.register_fake
def _(out, seed, step=0, std=1.0):
    return None


@torch.library.custom_op("fedkern::bernoulli_fill_", mutates_args=("out",))
def bernoulli_fill_(out: Tensor, p: float, p_tensor: Tensor | None, seed: int,
                    step: int = 0) -> None:  # fmt: skip
    """out = keep flags of the Bernoulli(p) draw of (seed, step) (p_tensor: per entry)."""
    _check_out(out, (torch.bool,), "bool")
    key = draw_key(seed, step, stream=STREAM_BERNOULLI)
    if p_tensor is not None:
        prob = check_probabilities(p_tensor, out.numel(), out.device).contiguous()
    else:
        prob = probability32(p)
    if out.numel():
        pick("bernoulli_fill_", IMPLS["bernoulli_fill_"], out.device)(out, prob, key)


@bernoulli_fill_.register_fake
def _(out, p, p_tensor, seed, step=0):
    return None


def _shape(shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    for s in dims:
        v.integer("shape", s, 0)
    return tuple(int(s) for s in dims)


def gaussian(shape, *, seed: int, step: int = 0, dtype=None, device=None, std: float = 1.0):
    """See ``fedkern.random.gaussian``."""
    shape = _shape(shape)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float64, got "
                        f"{dtype}")  # fmt: skip
    v.schema_types(seed=seed, step=step)
    std = v.fp32_scalar("std", std)
    work = torch.float32 if dtype == torch.float64 else dtype
    out = torch.empty(shape, dtype=work, device=device)
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(out):
        torch.ops.fedkern.gaussian_fill_(out, int(seed), int(step), std)
    elif out.numel():  # plain eager: the same checks and kernel without the op dispatch (~0.1 ms)
        key = draw_key(seed, step, stream=STREAM_GAUSSIAN)
        pick("gaussian_fill_", IMPLS["gaussian_fill_"], out.device)(out, key, std)
    return out.to(dtype) if dtype != work else out


def bernoulli(shape, p, *, seed: int, step: int = 0, device=None):
    """See ``fedkern.random.bernoulli``."""
    shape = _shape(shape)
    v.schema_types(seed=seed, step=step)
    if isinstance(p, Tensor):
        device = p.device if device is None else device
        out = torch.empty(shape, dtype=torch.bool, device=device)
        torch.ops.fedkern.bernoulli_fill_(out, 1.0, p.reshape(-1), int(seed), int(step))
    else:
        p = probability32(p)
        out = torch.empty(shape, dtype=torch.bool, device=device)
        torch.ops.fedkern.bernoulli_fill_(out, p, None, int(seed), int(step))
    return out
