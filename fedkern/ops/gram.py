"""The fp64 Gram matrix of a stack of client vectors: schema, validation and dispatch.

Op (namespace ``fedkern``; X is a stack of n client vectors [n, d], float32 or bfloat16):
  gram(X) -> G [n, n] float64       G = X X^T (the distances of Krum, Multi-Krum and NNM)
The exact numerics are in ``fedkern.reference.gram``; the public entry points built on it are
``fedkern.robust.pairwise_sqdist``, ``krum`` and ``nnm``.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy, tag
from fedkern.reference import gram as ref

Tensor = torch.Tensor


def _cpu_gram(x):
    n, d = x.shape
    g = torch.empty(n, n, dtype=torch.float64)
    cpu_core().gram(x.data_ptr(), tag(x), n, d, g.data_ptr())
    return g


IMPLS = {
    "gram": {
        "reference": ref.gram,
        "cpu": _cpu_gram,
        "triton": lazy("fedkern.kernels.gram", "gram"),
    },
}


@torch.library.custom_op("fedkern::gram", mutates_args=())
def gram(x: Tensor) -> Tensor:
    """G = X X^T, float64 [n, n] (see the module docstring)."""
    x = v.stack("X", x).contiguous()
    return pick("gram", IMPLS["gram"], x.device)(x)


@gram.register_fake
def _(x):
    v.stack("X", x)
    return x.new_empty(x.shape[0], x.shape[0], dtype=torch.float64)
