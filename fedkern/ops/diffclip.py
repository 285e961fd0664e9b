"""Difference -> compression -> norm clipping, batched over clients: schemas, validation, dispatch.

Ops (namespace ``fedkern``; G_new, G_old are stacks of n client vectors [n, d], float32 or
bfloat16, one client per row):
  diff_topk_clip(G_new, G_old, k, max_norm) -> (values [n, k], indices [n, k], norms [n])
  diff_randk_clip(G_new, G_old, k, keys, scale, max_norm) -> (values, indices, norms)
  diff_clip(G_new, G_old, max_norm) -> (out [n, d], norms [n])
each with a trailing ``check_bounds=True``: False skips the finite-and-positive check of the
max_norm values (a host synchronization on CUDA), for callers that filled max_norm from a float
they checked on the host (``fedkern.robust.diff_compress_clip``).
The math and the exact numerics are in ``fedkern.reference.diffclip``; the public, documented
entry point is ``fedkern.robust.diff_compress_clip``. Every argument is checked here, before any
kernel runs.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.reference import diffclip as ref

Tensor = torch.Tensor
F64 = torch.float64


def _message(g, k):
    n = g.shape[0]
    return (torch.empty(n, k, dtype=g.dtype, device=g.device),
            torch.empty(n, k, dtype=torch.int64, device=g.device),
            torch.empty(n, dtype=F64, device=g.device))  # fmt: skip


# ---- CPU (C++ core) ------------------------------------------------------------------------------


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


def check_pair(g_new, g_old) -> None:
    """G_new: a stack [n, d]; G_old: the same shape, dtype and device."""
    v.stack("G_new", g_new)
    v.same_as("G_old", v.tensor("G_old", g_old), "G_new", g_new)


# ---- op schemas ---------------------------------------------------------------------------------


def _run(op: str, x: Tensor, *args):
    return pick(op, IMPLS[op], x.device)(*args)


@torch.library.custom_op("fedkern::diff_topk_clip", mutates_args=())
def diff_topk_clip(
    g_new: Tensor, g_old: Tensor, k: int, max_norm: Tensor, check_bounds: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: top-k of G_new - G_old, clipped to max_norm[i]: (values, indices, norms)."""
    check_pair(g_new, g_old)
    k = v.k_for(k, g_new.shape[1], "a row of G_new")
    v.row_bounds("max_norm", max_norm, g_new, v.boolean("check_bounds", check_bounds))
    return _run("diff_topk_clip", g_new, g_new.contiguous(), g_old.contiguous(), k, max_norm)


@diff_topk_clip.register_fake
def _(g_new, g_old, k, max_norm, check_bounds=True):
    return _message(g_new, k)


@torch.library.custom_op("fedkern::diff_randk_clip", mutates_args=())
def diff_randk_clip(
    g_new: Tensor, g_old: Tensor, k: int, keys: Tensor, scale: float, max_norm: Tensor,
    check_bounds: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Per row: rand-k (round keys keys[i]) of G_new - G_old, scaled, clipped: (values, indices,
    norms)."""
    check_pair(g_new, g_old)
    k = v.k_for(k, g_new.shape[1], "a row of G_new")
    if keys.dtype != torch.int64 or keys.shape != (g_new.shape[0], 8) or keys.device.type != "cpu":
        raise ValueError(f"keys must be a CPU int64 tensor of shape ({g_new.shape[0]}, 8)")
    v.row_bounds("max_norm", max_norm, g_new, v.boolean("check_bounds", check_bounds))
    return _run("diff_randk_clip", g_new, g_new.contiguous(), g_old.contiguous(), k,
                keys.contiguous(), v.fp32_scalar("scale", scale), max_norm)  # fmt: skip


@diff_randk_clip.register_fake
def _(g_new, g_old, k, keys, scale, max_norm, check_bounds=True):
    return _message(g_new, k)


@torch.library.custom_op("fedkern::diff_clip", mutates_args=())
def diff_clip(
    g_new: Tensor, g_old: Tensor, max_norm: Tensor, check_bounds: bool = True
) -> tuple[Tensor, Tensor]:
    """Per row: G_new - G_old clipped to max_norm[i]: (out [n, d], norms [n])."""
    check_pair(g_new, g_old)
    v.row_bounds("max_norm", max_norm, g_new, v.boolean("check_bounds", check_bounds))
    return _run("diff_clip", g_new, g_new.contiguous(), g_old.contiguous(), max_norm)


@diff_clip.register_fake
def _(g_new, g_old, max_norm, check_bounds=True):
    return torch.empty_like(g_new), g_new.new_empty(g_new.shape[0], dtype=F64)
