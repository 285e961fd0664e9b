"""Row-wise robust aggregation and clipping: schemas, validation and dispatch.

Ops (namespace ``fedkern``; X is a stack of n client vectors [n, d], float32 or bfloat16):
  gather_mean(X, idx, check_indices=True) -> [r, d]   out[q] = mean of rows idx[q, :] (-1 pads)
  geometric_median(X, z0, iters, nu) -> [d]       smoothed Weiszfeld geometric median
  centered_clip(X, v0, iters, tau) -> [d]         centered clipping
  clip_rows_(X, max_norm, check_bounds=True) -> norms [n] float64
                                                  in place: each row scaled to norm <= max_norm[i]
The math and the exact numerics are in ``fedkern.reference.rowops``; the public, documented entry
points are in ``fedkern.robust``. Every argument is checked here, before any kernel runs.

Checks that read tensor values (a host synchronization on CUDA) can be turned off by callers that
built those tensors themselves: ``check_indices=False`` skips the range / padding check of
``idx`` (``fedkern.robust`` builds it from a permutation or a sorted selection; invalid rows would
be read out of bounds), ``check_bounds=False`` the finite-and-positive check of ``max_norm``
(``fedkern.robust`` fills it from a float it checked on the host).
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.reference import rowops as ref

Tensor = torch.Tensor
F64 = torch.float64


# ---- CPU (C++ core) ------------------------------------------------------------------------------


def _cpu_gather_mean(x, idx):
    out = torch.empty(idx.shape[0], x.shape[1], dtype=x.dtype)
    cpu_core().gather_mean(x.data_ptr(), tag(x), *x.shape, idx.data_ptr(), *idx.shape,
                           out.data_ptr())  # fmt: skip
    return out


def _cpu_iterative(name):
    def call(x, start, iters, param):
        out = torch.empty(x.shape[1], dtype=x.dtype)
        getattr(cpu_core(), name)(x.data_ptr(), tag(x), *x.shape, start.data_ptr(), iters, param,
                                  out.data_ptr())  # fmt: skip
        return out

    call.__name__ = f"cpu_{name}"
    return call


def _cpu_clip_rows(x, max_norm):
    norms = torch.empty(x.shape[0], dtype=F64)
    cpu_core().clip_rows(x.data_ptr(), tag(x), *x.shape, max_norm.data_ptr(), norms.data_ptr())
    return norms


# ---- Triton -------------------------------------------------------------------------------------


def _tri_gather_mean(x, idx):
    out = torch.empty(idx.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    lazy("fedkern.kernels.rowops", "gather_mean")(x, idx, out)
    return out


def _tri_iterative(name):
    fn = lazy("fedkern.kernels.rowops", name)

    def call(x, start, iters, param):
        out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
        fn(x, start, iters, param, out)
        return out

    call.__name__ = f"triton_{name}"
    return call


IMPLS = {
    "gather_mean": {
        "reference": ref.gather_mean,
        "cpu": _cpu_gather_mean,
        "triton": _tri_gather_mean,
    },  # fmt: skip
    "geometric_median": {
        "reference": ref.geometric_median,
        "cpu": _cpu_iterative("geometric_median"),
        "triton": _tri_iterative("geometric_median"),
    },
    "centered_clip": {
        "reference": ref.centered_clip,
        "cpu": _cpu_iterative("centered_clip"),
        "triton": _tri_iterative("centered_clip"),
    },
    "clip_rows_": {
        "reference": ref.clip_rows_,
        "cpu": _cpu_clip_rows,
        "triton": lazy("fedkern.kernels.rowops", "clip_rows_"),
    },
}


# ---- validation ---------------------------------------------------------------------------------


def check_idx(idx, x: Tensor, inspect: bool = True) -> Tensor:
    """idx: int64 [r, s] on x's device, entries in [-1, n), -1 only trailing, >= 1 valid per row.

    ``inspect=False`` checks only dtype, shape and device (not the values: no host read)."""
    v.tensor("idx", idx)
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must be a non-empty 2-D int64 tensor [r, s], got dtype "
                         f"{idx.dtype} and shape {tuple(idx.shape)}")  # fmt: skip
    if idx.device != x.device:
        raise ValueError(f"idx must be on {x.device} (as X), got {idx.device}")
    if not inspect or isinstance(idx, torch._subclasses.fake_tensor.FakeTensor):
        return idx
    n = x.shape[0]
    if bool(((idx < -1) | (idx >= n)).any()):
        raise ValueError(f"idx entries must be row numbers in [0, {n}) or -1 (padding)")
    valid = idx >= 0
    if not bool(valid[:, 0].all()) or bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("idx rows must start with a row number; -1 padding may only trail")
    return idx


def check_start(name: str, start, x: Tensor) -> Tensor:
    """The float32 [d] starting point of an iterative aggregator, on x's device."""
    return v.vector(name, start, x, x.shape[1], torch.float32)


def _iters(iters) -> int:
    return v.integer("iters", iters, 0)


# ---- op schemas ---------------------------------------------------------------------------------


def _run(op: str, x: Tensor, *args):
    return pick(op, IMPLS[op], x.device)(*args)


@torch.library.custom_op("fedkern::gather_mean", mutates_args=())
def gather_mean(x: Tensor, idx: Tensor, check_indices: bool = True) -> Tensor:
    """out[q] = mean of rows idx[q, t] of X, summed in t order in float32; [r, d] in X's dtype."""
    check_idx(idx, v.stack("X", x), v.boolean("check_indices", check_indices))
    return _run("gather_mean", x, x.contiguous(), idx.contiguous())


@gather_mean.register_fake
def _(x, idx, check_indices=True):
    check_idx(idx, v.stack("X", x))
    return x.new_empty(idx.shape[0], x.shape[1])


@torch.library.custom_op("fedkern::geometric_median", mutates_args=())
def geometric_median(x: Tensor, z0: Tensor, iters: int, nu: float) -> Tensor:
    """Smoothed Weiszfeld geometric median from z0 (float32 [d]); [d] in X's dtype."""
    check_start("init", z0, v.stack("X", x))
    iters, nu = _iters(iters), v.positive("nu", nu)
    return _run("geometric_median", x, x.contiguous(), z0.contiguous(), iters, nu)


@geometric_median.register_fake
def _(x, z0, iters, nu):
    check_start("init", z0, v.stack("X", x))
    return x.new_empty(x.shape[1])


@torch.library.custom_op("fedkern::centered_clip", mutates_args=())
def centered_clip(x: Tensor, v0: Tensor, iters: int, tau: float) -> Tensor:
    """Centered clipping from v0 (float32 [d]); [d] in X's dtype."""
    check_start("center", v0, v.stack("X", x))
    iters, tau = _iters(iters), v.positive("tau", tau)
    return _run("centered_clip", x, x.contiguous(), v0.contiguous(), iters, tau)


@centered_clip.register_fake
def _(x, v0, iters, tau):
    check_start("center", v0, v.stack("X", x))
    return x.new_empty(x.shape[1])


@torch.library.custom_op("fedkern::clip_rows_", mutates_args=("x",))
def clip_rows_(x: Tensor, max_norm: Tensor, check_bounds: bool = True) -> Tensor:
    """In place: each row of X scaled to norm <= max_norm[i]; returns the norms before clipping."""
    v.row_bounds("max_norm", max_norm, v.stack("X", x), v.boolean("check_bounds", check_bounds))
    v.writable("X", x)
    return _run("clip_rows_", x, x, max_norm.contiguous())


@clip_rows_.register_fake
def _(x, max_norm, check_bounds=True):
    v.row_bounds("max_norm", max_norm, v.stack("X", x))
    return x.new_empty(x.shape[0], dtype=F64)
