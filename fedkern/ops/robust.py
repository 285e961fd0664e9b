"""Per-coordinate robust aggregation: schemas, validation and dispatch.

Ops (namespace ``fedkern``; X is a stack of n client vectors [n, d]):
  coordinate_median(X) -> [d]
  trimmed_mean(X, f) -> [d]
The math and the exact numerics are in ``fedkern.reference.robust``.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import current_backend, pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.reference import robust as ref

Tensor = torch.Tensor


def _cpu_median(x):
    out = torch.empty(x.shape[1], dtype=x.dtype)
    cpu_core().coordinate_median(x.data_ptr(), tag(x), x.shape[0], x.shape[1], out.data_ptr())
    return out


def _cpu_trimmed(x, f):
    out = torch.empty(x.shape[1], dtype=x.dtype)
    cpu_core().trimmed_mean(x.data_ptr(), tag(x), x.shape[0], x.shape[1], f, out.data_ptr())
    return out


def _triton(name):
    fn = lazy("fedkern.kernels.robust", name)

    def call(x, *args):
        out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
        fn(x, *args, out)
        return out

    call.__name__ = f"triton_{name}"
    return call


TRITON_MAX_ROWS = 1024  # kernels/robust.py keeps a tile's rows in registers


def _pick(op: str, x: Tensor):
    """The kernel for op on x; stacks taller than the Triton kernels take go to the reference
    under "auto" (forcing "triton" on them is an error, as for any backend that cannot run)."""
    fn = pick(op, IMPLS[op], x.device, x.numel())
    if fn is IMPLS[op]["triton"] and x.shape[0] > TRITON_MAX_ROWS:
        if current_backend() == "triton":
            raise RuntimeError(f"backend 'triton' runs fedkern.{op} on at most "
                               f"{TRITON_MAX_ROWS} rows, got {x.shape[0]}")  # fmt: skip
        fn = IMPLS[op]["reference"]
    return fn


IMPLS = {
    "coordinate_median": {
        "reference": ref.coordinate_median,
        "cpu": _cpu_median,
        "triton": _triton("coordinate_median"),
    },
    "trimmed_mean": {
        "reference": ref.trimmed_mean,
        "cpu": _cpu_trimmed,
        "triton": _triton("trimmed_mean"),
    },
}


def check_trim(x, f) -> int:
    n = v.stack("X", x).shape[0]
    f = v.integer("f", f, 0)
    if 2 * f >= n:
        raise ValueError(f"f must satisfy 2*f < n (n = {n} rows), got f = {f}")
    return f


@torch.library.custom_op("fedkern::coordinate_median", mutates_args=())
def coordinate_median_op(x: Tensor) -> Tensor:
    v.stack("X", x)
    return _pick("coordinate_median", x)(x.contiguous())


@coordinate_median_op.register_fake
def _(x):
    v.stack("X", x)
    return x.new_empty(x.shape[1])


@torch.library.custom_op("fedkern::trimmed_mean", mutates_args=())
def trimmed_mean_op(x: Tensor, f: int) -> Tensor:
    f = check_trim(x, f)
    return _pick("trimmed_mean", x)(x.contiguous(), f)


@trimmed_mean_op.register_fake
def _(x, f):
    check_trim(x, f)
    return x.new_empty(x.shape[1])
