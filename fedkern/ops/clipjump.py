"""The fused clipped server jump (op family "clipjump"): schema, validation, dispatch.

Op (namespace ``fedkern``):
  clip_jump(Y, x, w, s, c0, c1, G) -> (x_new, stats)
      the pseudo-gradient g = s (x - sum_r w_r Y_r), its norm and the step
      x_new = x - g / (c0 + c1 ||g||) (or the norm G given) in one pass on the device
The math is in ``fedkern.reference.clipjump``. No host synchronization: the norm and the step size
stay on the device (``stats``), so a round of Clip-LocalGDJ / CLERR / Clipped RR-CLI never waits
for the GPU.
"""

from __future__ import annotations

import math

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy
from fedkern.reference import clipjump as ref

Tensor = torch.Tensor
F32, F64 = torch.float32, torch.float64


def _cpu_clip_jump(Y, x, w, s, c0, c1, G):
    out = torch.empty_like(x)
    stats = torch.empty(2, dtype=F64)
    cpu_core().clip_jump(
        Y.data_ptr(), Y.shape[0], Y.shape[1], x.data_ptr(), w.data_ptr(), s, c0, c1,
        0 if G is None else G.data_ptr(), out.data_ptr(), stats.data_ptr(),
    )  # fmt: skip
    return out, stats


IMPLS = {
    "clip_jump": {
        "reference": ref.clip_jump,
        "cpu": _cpu_clip_jump,
        "triton": lazy("fedkern.kernels.clipjump", "clip_jump"),
    },
}


def check_clip_jump(Y, x, w, s, c0, c1, G) -> None:
    """Every argument of clip_jump; raises before any kernel runs."""
    v.tensor("Y", Y)
    if Y.dtype != F32 or Y.dim() != 2 or Y.shape[0] < 1 or Y.shape[1] < 1:
        raise ValueError(f"Y must be a non-empty float32 [c, p] tensor, got {Y.dtype} "
                         f"{tuple(Y.shape)}")  # fmt: skip
    v.tensor("x", x)
    if x.dtype != F32 or x.shape != (Y.shape[1],) or x.device != Y.device:
        raise ValueError(f"x must be a float32 tensor of shape ({Y.shape[1]},) on {Y.device}")
    v.tensor("w", w)
    if w.dtype != F64 or w.shape != (Y.shape[0],) or w.device != Y.device:
        raise ValueError(f"w must be a float64 tensor of shape ({Y.shape[0]},) on {Y.device}")
    for name, val in (("s", s), ("c0", c0), ("c1", c1)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise ValueError(f"{name} must be a finite real number, got {val!r}")
    if not s > 0:
        raise ValueError(f"s must be > 0, got {s}")
    if not c0 > 0:
        raise ValueError(f"c0 must be > 0, got {c0}")
    if c1 < 0:
        raise ValueError(f"c1 must be >= 0, got {c1}")
    if G is not None:
        v.tensor("G", G)
        if G.dtype != F64 or G.numel() != 1 or G.device != Y.device:
            raise ValueError(f"G must be a float64 tensor with one element on {Y.device}")


@torch.library.custom_op("fedkern::clip_jump", mutates_args=())
def clip_jump(
    Y: Tensor, x: Tensor, w: Tensor, s: float, c0: float, c1: float, G: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The clipped server jump (fedkern.reference.clipjump): (x_new [p] float32, stats [2]
    float64 = [||g||, theta]), new tensors on x's device; the inputs are not modified.

    Args:
        Y: float32 [c, p], the cohort's end points. x: float32 [p], the server point.
        w: float64 [c], averaging weights (1/c for the plain mean). s: the pseudo-gradient scale
            (> 0). c0 > 0, c1 >= 0: theta = 1 / (c0 + c1 ||g||). G: None, or a float64 tensor of
            one element used as the norm in theta instead of ||g|| (the full-gradient variant).
    """
    check_clip_jump(Y, x, w, s, c0, c1, G)
    fn = pick("clip_jump", IMPLS["clip_jump"], x.device)
    G = None if G is None else G.reshape(1).contiguous()
    return fn(Y.contiguous(), x.contiguous(), w.contiguous(), float(s), float(c0), float(c1), G)


@clip_jump.register_fake
def _(Y, x, w, s, c0, c1, G):
    return torch.empty_like(x), x.new_empty(2, dtype=F64)
