"""The fused RAC-LoRA merge: schema, validation and dispatch.

Op (namespace ``fedkern``):
  lora_merge_(W, B, A, seed, step, std, scale) -> ()    W += scale * B A, in place
B [m, r] or A [r, n] may be None: that factor is the frozen one, generated from the Gaussian draw
of (seed, step) (``fedkern.random.gaussian``, entries round32(std * z) in the factor's row-major
order) instead of being read. The math is ``fedkern.reference.lora``; the public entry point is
``fedkern.lora`` (``RACLoRALinear.merge_``). float32 W runs on every backend; a float64 W (the
exact-arithmetic tests) always runs the reference.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy
from fedkern.random import STREAM_GAUSSIAN, draw_key
from fedkern.reference import lora as ref

Tensor = torch.Tensor


def _cpu_merge(W, B, A, key, std, scale):
    m, n = W.shape
    r = B.shape[1] if B is not None else A.shape[0]
    cpu_core().lora_merge(W.data_ptr(), m, n, r, 0 if B is None else B.data_ptr(),
                          0 if A is None else A.data_ptr(), list(key), std, scale)  # fmt: skip
    return W


IMPLS = {
    "lora_merge_": {
        "reference": ref.lora_merge_,
        "cpu": _cpu_merge,
        "triton": lazy("fedkern.kernels.lora", "lora_merge_"),
    }
}


def check_merge(W, B, A) -> int:
    """Shapes, dtypes and devices of W, B, A; returns r. Raises before anything is modified."""
    v.tensor("W", W)
    if W.dtype not in (torch.float32, torch.float64) or W.dim() != 2 or W.numel() == 0:
        raise TypeError(f"W must be a non-empty 2-D float32 or float64 tensor, got {W.dtype} "
                        f"{list(W.shape)}")  # fmt: skip
    v.writable("W", W)
    if B is None and A is None:
        raise ValueError("at most one of B and A may be None (the generated, frozen factor)")
    m, n = W.shape
    r = None
    for name, t, dim in (("B", B, 0), ("A", A, 1)):
        if t is None:
            continue
        v.tensor(name, t)
        if t.dtype != W.dtype or t.device != W.device or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D tensor of W's dtype {W.dtype} on {W.device}")
        want = (m, n)[dim]
        if t.shape[dim] != want:
            raise ValueError(f"{name} must have {want} {'rows' if dim == 0 else 'columns'} "
                             f"(W is {m} x {n}), got {list(t.shape)}")  # fmt: skip
        rank = t.shape[1 - dim]
        if r is not None and rank != r:
            raise ValueError(f"B and A must share the rank: B {list(B.shape)}, A {list(A.shape)}")
        r = rank
        v.disjoint(name, t, "W", W)
    if not 1 <= r <= min(m, n):
        raise ValueError(f"the rank must be in [1, min(m, n) = {min(m, n)}], got {r}")
    return r


@torch.library.custom_op("fedkern::lora_merge_", mutates_args=("W",))
def lora_merge_(W: Tensor, B: Tensor | None, A: Tensor | None, seed: int, step: int = 0,
                std: float = 1.0, scale: float = 1.0) -> None:  # fmt: skip
    """W += scale * B A in place; a None factor is generated from (seed, step) with ``std``."""
    check_merge(W, B, A)
    key = draw_key(seed, step, stream=STREAM_GAUSSIAN)
    std = v.fp32_scalar("std", std)
    scale = v.fp32_scalar("scale", scale)
    B = None if B is None else B.contiguous()
    A = None if A is None else A.contiguous()
    if W.dtype == torch.float64:
        ref.lora_merge_(W, B, A, key, std, scale)
        return
    pick("lora_merge_", IMPLS["lora_merge_"], W.device)(W, B, A, key, std, scale)


@lora_merge_.register_fake
def _(W, B, A, seed, step=0, std=1.0, scale=1.0):
    return None
