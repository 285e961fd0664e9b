"""Row kernels of robust aggregation: schemas, validation and dispatch.

Ops (namespace ``fedkern``; X is a stack of n client vectors [n, d], float32 or bfloat16):
  gram(X) -> G [n, n] float64                     G = X X^T (Krum, NNM)
  gather_mean(X, idx) -> [r, d]                   out[q] = mean of rows idx[q, :] (-1 = padding)
  weiszfeld(X, z0, iters, nu) -> [d]              smoothed Weiszfeld geometric median
  centered_clip(X, v0, iters, tau) -> [d]         centered clipping
  clip_rows_(X, max_norm) -> norms [n] float64    in place: each row scaled to norm <= max_norm[i]
  diff_topk_clip(G_new, G_old, k, max_norm) -> (values [n, k], indices [n, k], norms [n])
  diff_randk_clip(G_new, G_old, k, keys, scale, max_norm) -> (values, indices, norms)
  diff_clip(G_new, G_old, max_norm) -> (out [n, d], norms [n])
The math and the exact numerics are in ``fedkern.reference.robust``; the public, documented entry
points are in ``fedkern.robust``. Every argument is checked here, before any kernel runs.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.ops.robust import check_stack
from fedkern.reference import robust as ref

Tensor = torch.Tensor
F64 = torch.float64


# ---- CPU (C++ core) ------------------------------------------------------------------------------


def _cpu_gram(x):
    n, d = x.shape
    g = torch.empty(n, n, dtype=F64)
    cpu_core().gram(x.data_ptr(), tag(x), n, d, g.data_ptr())
    return g


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


def _message(g, k):
    n = g.shape[0]
    return (torch.empty(n, k, dtype=g.dtype, device=g.device),
            torch.empty(n, k, dtype=torch.int64, device=g.device),
            torch.empty(n, dtype=F64, device=g.device))  # fmt: skip


def _cpu_diff_topk(g_new, g_old, k, max_norm):
    val, idx, norms = _message(g_new, k)
    cpu_core().diff_topk_clip(g_new.data_ptr(), g_old.data_ptr(), tag(g_new), *g_new.shape, k,
                              max_norm.data_ptr(), idx.data_ptr(), val.data_ptr(),
                              norms.data_ptr())  # fmt: skip
    return val, idx, norms


def _cpu_diff_randk(g_new, g_old, k, keys, scale, max_norm):
    val, idx, norms = _message(g_new, k)
    cpu_core().diff_randk_clip(g_new.data_ptr(), g_old.data_ptr(), tag(g_new), *g_new.shape, k,
                               keys.data_ptr(), scale, max_norm.data_ptr(), idx.data_ptr(),
                               val.data_ptr(), norms.data_ptr())  # fmt: skip
    return val, idx, norms


def _cpu_diff_clip(g_new, g_old, max_norm):
    out = torch.empty_like(g_new)
    norms = torch.empty(g_new.shape[0], dtype=F64)
    cpu_core().diff_clip(g_new.data_ptr(), g_old.data_ptr(), tag(g_new), *g_new.shape,
                         max_norm.data_ptr(), out.data_ptr(), norms.data_ptr())  # fmt: skip
    return out, norms


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


def _tri_diff_topk(g_new, g_old, k, max_norm):
    val, idx, _ = _message(g_new, k)
    norms = lazy("fedkern.kernels.diffclip", "diff_topk_clip")(g_new, g_old, k, max_norm, idx, val)
    return val, idx, norms


def _tri_diff_randk(g_new, g_old, k, keys, scale, max_norm):
    val, idx, _ = _message(g_new, k)
    fn = lazy("fedkern.kernels.diffclip", "diff_randk_clip")
    norms = fn(g_new, g_old, k, keys.to(g_new.device), scale, max_norm, idx, val)
    return val, idx, norms


def _tri_diff_clip(g_new, g_old, max_norm):
    out = torch.empty_like(g_new)
    norms = lazy("fedkern.kernels.diffclip", "diff_clip")(g_new, g_old, max_norm, out)
    return out, norms


def _ref_diff_randk(g_new, g_old, k, keys, scale, max_norm):
    return ref.diff_randk_clip(g_new, g_old, k, [tuple(r) for r in keys.tolist()], scale, max_norm)


IMPLS = {
    "gram": {
        "reference": ref.gram,
        "cpu": _cpu_gram,
        "triton": lazy("fedkern.kernels.gram", "gram"),
    },
    "gather_mean": {
        "reference": ref.gather_mean,
        "cpu": _cpu_gather_mean,
        "triton": _tri_gather_mean,
    },  # fmt: skip
    "weiszfeld": {
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
    "diff_topk_clip": {
        "reference": ref.diff_topk_clip,
        "cpu": _cpu_diff_topk,
        "triton": _tri_diff_topk,
    },  # fmt: skip
    "diff_randk_clip": {
        "reference": _ref_diff_randk,
        "cpu": _cpu_diff_randk,
        "triton": _tri_diff_randk,
    },  # fmt: skip
    "diff_clip": {"reference": ref.diff_clip, "cpu": _cpu_diff_clip, "triton": _tri_diff_clip},
}


# ---- validation ---------------------------------------------------------------------------------


def _vector(name: str, t, x: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """A 1-D tensor of the given length and dtype on x's device."""
    v.tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be a {dtype} tensor, got dtype {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device} (as X), got {t.device}")
    return t


def check_max_norm(max_norm, x: Tensor, name: str = "max_norm") -> Tensor:
    """max_norm: float64 [n] on x's device, every entry finite and > 0."""
    _vector(name, max_norm, x, x.shape[0], F64)
    if not isinstance(max_norm, torch._subclasses.fake_tensor.FakeTensor) and max_norm.numel():
        ok = torch.isfinite(max_norm) & (max_norm > 0)
        if not bool(ok.all()):
            bad = max_norm[~ok][0].item()
            raise ValueError(f"{name} must be finite and > 0 for every row, got {bad}")
    return max_norm


def check_idx(idx, x: Tensor) -> Tensor:
    """idx: int64 [r, s] on x's device, entries in [-1, n), -1 only trailing, >= 1 valid per row."""
    v.tensor("idx", idx)
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must be a non-empty 2-D int64 tensor [r, s], got dtype "
                         f"{idx.dtype} and shape {tuple(idx.shape)}")  # fmt: skip
    if idx.device != x.device:
        raise ValueError(f"idx must be on {x.device} (as X), got {idx.device}")
    if isinstance(idx, torch._subclasses.fake_tensor.FakeTensor):
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
    return _vector(name, start, x, x.shape[1], torch.float32)


def check_pair(g_new, g_old) -> None:
    check_stack(g_new, "G_new")
    v.same_as("G_old", v.tensor("G_old", g_old), "G_new", g_new)


def _iters(iters) -> int:
    return v.integer("iters", iters, 0)


def positive_float(name: str, value) -> float:
    """A finite float > 0 (as a Python float; float64 in the kernels)."""
    out = v.fp32_scalar(name, value)
    if not out > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


# ---- op schemas ---------------------------------------------------------------------------------


def _run(op: str, x: Tensor, *args):
    return pick(op, IMPLS[op], x.device)(*args)


@torch.library.custom_op("fedkern::gram", mutates_args=())
def gram(x: Tensor) -> Tensor:
    """G = X X^T, float64 [n, n] (see the module docstring)."""
    x = check_stack(x).contiguous()
    return _run("gram", x, x)


@gram.register_fake
def _(x):
    check_stack(x)
    return x.new_empty(x.shape[0], x.shape[0], dtype=F64)


@torch.library.custom_op("fedkern::gather_mean", mutates_args=())
def gather_mean(x: Tensor, idx: Tensor) -> Tensor:
    """out[q] = mean of rows idx[q, t] of X, summed in t order in float32; [r, d] in X's dtype."""
    check_idx(idx, check_stack(x))
    return _run("gather_mean", x, x.contiguous(), idx.contiguous())


@gather_mean.register_fake
def _(x, idx):
    check_idx(idx, check_stack(x))
    return x.new_empty(idx.shape[0], x.shape[1])


@torch.library.custom_op("fedkern::weiszfeld", mutates_args=())
def weiszfeld(x: Tensor, z0: Tensor, iters: int, nu: float) -> Tensor:
    """Smoothed Weiszfeld geometric median from z0 (float32 [d]); [d] in X's dtype."""
    check_start("init", z0, check_stack(x))
    iters, nu = _iters(iters), positive_float("nu", nu)
    return _run("weiszfeld", x, x.contiguous(), z0.contiguous(), iters, nu)


@weiszfeld.register_fake
def _(x, z0, iters, nu):
    check_start("init", z0, check_stack(x))
    return x.new_empty(x.shape[1])


@torch.library.custom_op("fedkern::centered_clip", mutates_args=())
def centered_clip(x: Tensor, v0: Tensor, iters: int, tau: float) -> Tensor:
    """Centered clipping from v0 (float32 [d]); [d] in X's dtype."""
    check_start("center", v0, check_stack(x))
    iters, tau = _iters(iters), positive_float("tau", tau)
    return _run("centered_clip", x, x.contiguous(), v0.contiguous(), iters, tau)


@centered_clip.register_fake
def _(x, v0, iters, tau):
    check_start("center", v0, check_stack(x))
    return x.new_empty(x.shape[1])


@torch.library.custom_op("fedkern::clip_rows_", mutates_args=("x",))
def clip_rows_(x: Tensor, max_norm: Tensor) -> Tensor:
    """In place: each row of X scaled to norm <= max_norm[i]; returns the norms before clipping."""
    check_max_norm(max_norm, check_stack(x))
    v.writable("X", x)
    return _run("clip_rows_", x, x, max_norm.contiguous())


@clip_rows_.register_fake
def _(x, max_norm):
    check_max_norm(max_norm, check_stack(x))
    return x.new_empty(x.shape[0], dtype=F64)


@torch.library.custom_op("fedkern::diff_topk_clip", mutates_args=())
def diff_topk_clip(
    g_new: Tensor, g_old: Tensor, k: int, max_norm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: top-k of G_new - G_old, clipped to max_norm[i]: (values, indices, norms)."""
    check_pair(g_new, g_old)
    k = v.k_for(k, g_new.shape[1], "a row of G_new")
    check_max_norm(max_norm, g_new)
    return _run("diff_topk_clip", g_new, g_new.contiguous(), g_old.contiguous(), k, max_norm)


@diff_topk_clip.register_fake
def _(g_new, g_old, k, max_norm):
    return _message(g_new, k)


@torch.library.custom_op("fedkern::diff_randk_clip", mutates_args=())
def diff_randk_clip(
    g_new: Tensor, g_old: Tensor, k: int, keys: Tensor, scale: float, max_norm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: rand-k (round keys keys[i]) of G_new - G_old, scaled, clipped: (values, indices,
    norms)."""
    check_pair(g_new, g_old)
    k = v.k_for(k, g_new.shape[1], "a row of G_new")
    if keys.dtype != torch.int64 or keys.shape != (g_new.shape[0], 8) or keys.device.type != "cpu":
        raise ValueError(f"keys must be a CPU int64 tensor of shape ({g_new.shape[0]}, 8)")
    check_max_norm(max_norm, g_new)
    return _run("diff_randk_clip", g_new, g_new.contiguous(), g_old.contiguous(), k,
                keys.contiguous(), v.fp32_scalar("scale", scale), max_norm)  # fmt: skip


@diff_randk_clip.register_fake
def _(g_new, g_old, k, keys, scale, max_norm):
    return _message(g_new, k)


@torch.library.custom_op("fedkern::diff_clip", mutates_args=())
def diff_clip(g_new: Tensor, g_old: Tensor, max_norm: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: G_new - G_old clipped to max_norm[i]: (out [n, d], norms [n])."""
    check_pair(g_new, g_old)
    check_max_norm(max_norm, g_new)
    return _run("diff_clip", g_new, g_new.contiguous(), g_old.contiguous(), max_norm)


@diff_clip.register_fake
def _(g_new, g_old, max_norm):
    return torch.empty_like(g_new), g_new.new_empty(g_new.shape[0], dtype=F64)
