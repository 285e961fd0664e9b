"""TAMUNA's fused server step: schema, validation, dispatch.

Op (namespace ``fedkern``):
  tamuna_aggregate_(X, H, perm, s, coef, check_perm) -> xbar
      X [c, p] float32: the cohort's local models (not modified);
      H [c, p] float32 or None: their control variates, the held entries updated in place;
      perm [c] int64: the round's slot -> cohort-row permutation;
      s: holders per coordinate, 1 <= s <= c; coef: eta / gamma (a finite float);
      check_perm: verify that perm is a permutation of 0..c-1 (reads its values: on CUDA a host
          synchronization; callers that build perm themselves pass False).
      Returns xbar [p] float32 on X's device.
The math and the summation order are in ``fedkern.reference.tamuna``. Backends (IMPLS): the
reference, the C++ core (csrc/cpu/tamuna.cpp, CPU) and Triton (kernels/tamuna.py, CUDA; CPU under
TRITON_INTERPRET=1), bit-identical.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy
from fedkern.reference import tamuna as ref

Tensor = torch.Tensor
F32 = torch.float32


def _cpu_aggregate(X: Tensor, H: Tensor | None, perm: Tensor, s: int, coef: float) -> Tensor:
    """The C++ core (csrc/cpu/tamuna.cpp) on validated CPU tensors; returns xbar [p] float32."""
    c, p = X.shape
    xbar = torch.empty(p, dtype=F32)
    h = 0 if H is None else H.data_ptr()
    cpu_core().tamuna_aggregate(X.data_ptr(), h, perm.data_ptr(), c, p, s, coef, xbar.data_ptr())
    return xbar


IMPLS = {
    "tamuna_aggregate_": {
        "reference": ref.tamuna_aggregate_,
        "cpu": _cpu_aggregate,
        "triton": lazy("fedkern.kernels.tamuna", "tamuna_aggregate_"),
    },
}


def check_aggregate(X, H, perm, s, coef, check_perm: bool = True) -> tuple[int, float]:
    """Validate every argument of ``tamuna_aggregate_`` (raises before anything is modified)."""
    v.tensor("X", X)
    if X.dtype != F32 or X.dim() != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must be a non-empty float32 [c, p] tensor, got {X.dtype} "
                         f"{tuple(X.shape)}")  # fmt: skip
    if not X.is_contiguous():
        raise ValueError("X must be contiguous")
    c, p = X.shape
    if H is not None:
        v.tensor("H", H)
        if H.dtype != F32 or H.shape != X.shape or H.device != X.device:
            raise ValueError(f"H must be a float32 [{c}, {p}] tensor on {X.device}, got "
                             f"{H.dtype} {tuple(H.shape)} on {H.device}")  # fmt: skip
        if not H.is_contiguous():
            raise ValueError("H must be contiguous")
        v.writable("H", H)
        v.disjoint("H", H, "X", X)
    v.tensor("perm", perm)
    if perm.dtype != torch.int64 or perm.shape != (c,) or perm.device != X.device:
        raise ValueError(f"perm must be an int64 tensor of shape ({c},) on {X.device}, got "
                         f"{perm.dtype} {tuple(perm.shape)} on {perm.device}")  # fmt: skip
    if not perm.is_contiguous():
        raise ValueError("perm must be contiguous")
    s = v.integer("s", s, 1, c)
    coef = v.fp32_scalar("coef", coef)
    if check_perm:
        seen = torch.zeros(c, dtype=torch.bool)
        q = perm.cpu()
        if bool(((q < 0) | (q >= c)).any()):
            raise ValueError(f"perm must hold the cohort rows 0..{c - 1}, got values outside")
        seen[q] = True
        if not bool(seen.all()):
            raise ValueError("perm must be a permutation of 0..c-1 (a row appears twice)")
    return s, coef


@torch.library.custom_op("fedkern::tamuna_aggregate_", mutates_args=("H",))
def tamuna_aggregate_(X: Tensor, H: Tensor | None, perm: Tensor, s: int, coef: float,
                      check_perm: bool = True) -> Tensor:  # fmt: skip
    """TAMUNA's server step over the cohort's [c, p] stack (see the module docstring)."""
    s, coef = check_aggregate(X, H, perm, s, coef, check_perm)
    return pick("tamuna_aggregate_", IMPLS["tamuna_aggregate_"], X.device)(X, H, perm, s, coef)


@tamuna_aggregate_.register_fake
def _(X, H, perm, s, coef, check_perm=True):
    return X.new_empty(X.shape[1])
