"""MAST sketch ops: schemas, validation and dispatch.

Ops (namespace ``fedkern``), over R node sketches at once (``fedkern.reference.sketch`` has the
math; ``fedkern.sketch`` builds the arguments from a sketch object and (seed, step, node)):
  sketch_perm_apply(x, v, keys, ranges, scale) -> [R, d]          Rand-K / partition sketches
  sketch_perm_grad_step_(x, g, keys, ranges, scale, gamma)        mutates x
  sketch_bern_apply(x, v, keys, p, p_tensor) -> [R, d]            Bernoulli sketches
  sketch_bern_grad_step_(x, g, keys, p, p_tensor, gamma)          mutates x
x is [R, d] (one row per sketch) or [1, d] (one x shared by every row), v is None or [R or 1, d],
g is [R, d]; keys int64 [R, 8] (perm) or [R, 4] (bernoulli), ranges int64 [R, 2], scale float32
[R]. Every tensor is on x's device; float32 or bfloat16 data.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.ops.random import check_probabilities, probability32
from fedkern.reference import sketch as ref

Tensor = torch.Tensor


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stride(t):
    return 0 if t is None or t.shape[0] == 1 else t.shape[1]


def _cpu_perm_apply(x, v_, keys, ranges, scale):
    R, d = keys.shape[0], x.shape[1]
    out = torch.empty(R, d, dtype=x.dtype)
    cpu_core().sketch_perm_apply(_ptr(x), _stride(x), _ptr(v_), _stride(v_), _ptr(out), tag(x), R,
                                 d, _ptr(keys), _ptr(ranges), _ptr(scale))  # fmt: skip
    return out


def _cpu_perm_step(x, g, keys, ranges, scale, gamma):
    cpu_core().sketch_perm_grad_step(_ptr(x), _stride(x), _ptr(g), tag(x), keys.shape[0],
                                     x.shape[1], _ptr(keys), _ptr(ranges), _ptr(scale),
                                     gamma)  # fmt: skip
    return x


def _cpu_bern_apply(x, v_, keys, p):
    R, d = keys.shape[0], x.shape[1]
    out = torch.empty(R, d, dtype=x.dtype)
    per = isinstance(p, Tensor)
    cpu_core().sketch_bern_apply(_ptr(x), _stride(x), _ptr(v_), _stride(v_), _ptr(out), tag(x), R,
                                 d, _ptr(keys), 1.0 if per else p,
                                 p.data_ptr() if per else 0)  # fmt: skip
    return out


def _cpu_bern_step(x, g, keys, p, gamma):
    per = isinstance(p, Tensor)
    cpu_core().sketch_bern_grad_step(_ptr(x), _stride(x), _ptr(g), tag(x), keys.shape[0],
                                     x.shape[1], _ptr(keys), 1.0 if per else p,
                                     p.data_ptr() if per else 0, gamma)  # fmt: skip
    return x


def _impls(name, cpu):
    return {"reference": getattr(ref, name), "cpu": cpu,
            "triton": lazy("fedkern.kernels.sketch", name)}  # fmt: skip


IMPLS = {
    "perm_apply": _impls("perm_apply", _cpu_perm_apply),
    "perm_grad_step_": _impls("perm_grad_step_", _cpu_perm_step),
    "bern_apply": _impls("bern_apply", _cpu_bern_apply),
    "bern_grad_step_": _impls("bern_grad_step_", _cpu_bern_step),
}


# ---- validation ---------------------------------------------------------------------------------


def _fake(t) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta"


def _matrix(name: str, t, like: Tensor | None = None) -> Tensor:
    v.float_tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, d], got shape {tuple(t.shape)}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} must have x's dtype {like.dtype}, got {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} must be on x's device {like.device}, got {t.device}")
        if t.shape[1] != like.shape[1]:
            raise ValueError(f"{name} must have x's {like.shape[1]} columns, got {t.shape[1]}")
    return t


def _index_tensor(name: str, t, shape, device) -> Tensor:
    v.tensor(name, t)
    if t.dtype != torch.int64 or tuple(t.shape) != shape or t.device != device:
        raise ValueError(f"{name} must be an int64 tensor of shape {list(shape)} on {device}, got "
                         f"{t.dtype} {list(t.shape)} on {t.device}")  # fmt: skip
    return t


def check_common(x, v_, keys, words: int, rows_of_x_ok=(1,)) -> int:
    """Checks shared by the four ops; returns R (the number of sketches)."""
    _matrix("x", x)
    v.tensor("keys", keys)
    if keys.dim() != 2 or keys.shape[1] != words:
        raise ValueError(f"keys must be an int64 tensor [R, {words}], got {list(keys.shape)}")
    R = keys.shape[0]
    if R < 1:
        raise ValueError("keys must hold at least one sketch (R >= 1)")
    _index_tensor("keys", keys, (R, words), x.device)
    if x.shape[0] not in (1, R):
        raise ValueError(f"x must have 1 or R = {R} rows, got {x.shape[0]}")
    if v_ is not None:
        _matrix("v", v_, x)
        if v_.shape[0] not in (1, R):
            raise ValueError(f"v must have 1 or R = {R} rows, got {v_.shape[0]}")
    return R


def check_perm(x, keys, ranges, scale, R: int) -> None:
    d = x.shape[1]
    _index_tensor("ranges", ranges, (R, 2), x.device)
    v.tensor("scale", scale)
    if scale.dtype != torch.float32 or tuple(scale.shape) != (R,) or scale.device != x.device:
        raise ValueError(f"scale must be a float32 tensor [{R}] on {x.device}")
    if not _fake(ranges):
        r = ranges.cpu()
        if bool((r[:, 0] < 0).any() | (r[:, 1] < r[:, 0]).any() | (r[:, 1] > d).any()):
            raise ValueError(f"ranges must hold 0 <= lo <= hi <= d = {d} per row")
        s = scale.cpu()
        if not bool(torch.isfinite(s).all()):
            raise ValueError("scale must be finite")


def _check_step(x, g, R: int, gamma) -> float:
    _matrix("g", g, x)
    if g.shape[0] != R:
        raise ValueError(f"g must have R = {R} rows, got {g.shape[0]}")
    v.writable("x", x)
    v.disjoint("x", x, "g", g)
    return v.fp32_scalar("gamma", gamma)


def _p(p: float, p_tensor, x) -> float | Tensor:
    if p_tensor is not None:
        return check_probabilities(p_tensor, x.shape[1], x.device).contiguous()
    return probability32(p)


def _c(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op("fedkern::sketch_perm_apply", mutates_args=())
def sketch_perm_apply(x: Tensor, v: Tensor | None, keys: Tensor, ranges: Tensor,
                      scale: Tensor) -> Tensor:  # fmt: skip
    """[R, d]: row r = v + S_r (x - v), S_r keeping perm_r(lo_r .. hi_r - 1) scaled by scale[r]."""
    R = check_common(x, v, keys, 8)
    check_perm(x, keys, ranges, scale, R)
    fn = pick("sketch_perm_apply", IMPLS["perm_apply"], x.device)
    return fn(x.contiguous(), _c(v), keys.contiguous(), ranges.contiguous(), scale.contiguous())


@sketch_perm_apply.register_fake
def _(x, v, keys, ranges, scale):
    return x.new_empty(keys.shape[0], x.shape[1])


@torch.library.custom_op("fedkern::sketch_perm_grad_step_", mutates_args=("x",))
def sketch_perm_grad_step_(x: Tensor, g: Tensor, keys: Tensor, ranges: Tensor, scale: Tensor,
                           gamma: float) -> None:  # fmt: skip
    """In place: x_r -= gamma S_r g_r (x with one row: the rows applied in row order)."""
    R = check_common(x, None, keys, 8)
    check_perm(x, keys, ranges, scale, R)
    gamma = _check_step(x, g, R, gamma)
    fn = pick("sketch_perm_grad_step_", IMPLS["perm_grad_step_"], x.device)
    fn(x, g.contiguous(), keys.contiguous(), ranges.contiguous(), scale.contiguous(), gamma)


@sketch_perm_grad_step_.register_fake
def _(x, g, keys, ranges, scale, gamma):
    return None


@torch.library.custom_op("fedkern::sketch_bern_apply", mutates_args=())
def sketch_bern_apply(x: Tensor, v: Tensor | None, keys: Tensor, p: float,
                      p_tensor: Tensor | None) -> Tensor:  # fmt: skip
    """[R, d]: row r = v + S_r (x - v), S_r Bernoulli(p) with draw key words keys[r]."""
    check_common(x, v, keys, 4)
    prob = _p(p, p_tensor, x)
    fn = pick("sketch_bern_apply", IMPLS["bern_apply"], x.device)
    return fn(x.contiguous(), _c(v), keys.contiguous(), prob)


@sketch_bern_apply.register_fake
def _(x, v, keys, p, p_tensor):
    return x.new_empty(keys.shape[0], x.shape[1])


@torch.library.custom_op("fedkern::sketch_bern_grad_step_", mutates_args=("x",))
def sketch_bern_grad_step_(x: Tensor, g: Tensor, keys: Tensor, p: float, p_tensor: Tensor | None,
                           gamma: float) -> None:  # fmt: skip
    """In place: x_r -= gamma S_r g_r, S_r Bernoulli(p) (x with one row: rows in order)."""
    R = check_common(x, None, keys, 4)
    prob = _p(p, p_tensor, x)
    gamma = _check_step(x, g, R, gamma)
    fn = pick("sketch_bern_grad_step_", IMPLS["bern_grad_step_"], x.device)
    fn(x, g.contiguous(), keys.contiguous(), prob, gamma)


@sketch_bern_grad_step_.register_fake
def _(x, g, keys, p, p_tensor, gamma):
    return None
