"""Batched local steps on the quartic problem (op family "quartic"): schema, validation, dispatch.

Op (namespace ``fedkern``):
  quartic_local_steps_(X, clients, points, offsets, K, gamma, H, schedule, b, keys, clip,
                       check)
      -> None: K local steps of gd / sgd / rr for every cohort row of X [c, d], in place
``check=False`` skips the two checks that read tensor values (offsets rising from 0 to N, client
ids in range), which are host synchronizations on CUDA: for callers that built those tensors
themselves (``ClientBatch`` validates its offsets once and its cohorts on the host).
The math is in ``fedkern.reference.quartic``; the public entry point is
``fedkern.clients.ClientBatch(Quartic).local_steps_``, which builds every argument (this module
only checks them, before any kernel runs).
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy
from fedkern.reference import quartic as ref

Tensor = torch.Tensor
F32 = torch.float32


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpu_local_steps(X, clients, points, offsets, K, gamma, H, mode, b, keys, clip):
    cpu_core().quartic_local_steps(
        _ptr(X), _ptr(clients), X.shape[0], X.shape[1], _ptr(points), _ptr(offsets), K, gamma,
        _ptr(H), mode, b, _ptr(keys), clip,
    )  # fmt: skip
    return X


IMPLS = {
    "quartic_local_steps_": {
        "reference": ref.local_steps_,
        "cpu": _cpu_local_steps,
        "triton": lazy("fedkern.kernels.quartic", "local_steps_"),
    },
}


def check_local_steps(X, clients, points, offsets, K, gamma, H, mode, b, keys, clip,
                      check=True) -> None:  # fmt: skip
    """Every argument of quartic_local_steps_; raises before anything is modified."""
    v.tensor("points", points)
    if points.dtype != F32 or points.dim() != 2 or points.shape[1] < 1:
        raise TypeError(f"points must be a 2-D float32 tensor [N, d], got {points.dtype} "
                        f"{tuple(points.shape)}")  # fmt: skip
    dev, d = points.device, points.shape[1]
    v.tensor("X", X)
    if X.dtype != F32 or X.dim() != 2 or X.shape[1] != d or X.device != dev:
        raise ValueError(f"X must be a float32 [c, {d}] tensor on {dev}, got {X.dtype} "
                         f"{tuple(X.shape)} on {X.device}")  # fmt: skip
    v.writable("X", X)
    c = X.shape[0]
    v.cohort_layout(clients, offsets, c=c, rows=points.shape[0], rows_name="points", device=dev,
                    check=check)  # fmt: skip
    v.integer("K", K, 0)
    v.fp32_scalar("gamma", gamma)
    v.fp32_scalar("clip", clip, nonneg=True)
    if H is not None:
        v.tensor("H", H)
        if H.dtype != F32 or H.shape != X.shape or H.device != dev:
            raise ValueError(f"H must be a float32 tensor of X's shape {tuple(X.shape)} on {dev}")
        v.disjoint("H", H, "X", X)
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (gd), 1 (sgd) or 2 (rr), got {mode}")
    v.integer("b", b, 1)
    if mode != 0 and K > 0:
        v.step_keys(keys, c=c, K=K, device=dev)


@torch.library.custom_op("fedkern::quartic_local_steps_", mutates_args=("X",))
def local_steps_(
    X: Tensor, clients: Tensor, points: Tensor, offsets: Tensor, K: int, gamma: float,
    H: Tensor | None, schedule: int, b: int, keys: Tensor | None, clip: float, check: bool = True,
) -> None:  # fmt: skip
    """K local steps on the quartic for every cohort row of X, in place
    (see fedkern.reference.quartic; ``check`` in the module docstring). ``schedule``: 0 gd,
    1 sgd, 2 rr (not named "mode": that name is taken inside torch's dispatcher)."""
    args = (X, clients, points, offsets, K, gamma, H, schedule, b, keys, clip)
    check_local_steps(*args, check=v.boolean("check", check))
    if X.shape[0] == 0 or K == 0:
        return
    contiguous = [a.contiguous() if isinstance(a, Tensor) else a for a in args[1:]]
    pick("quartic_local_steps_", IMPLS["quartic_local_steps_"], X.device)(X, *contiguous)


@local_steps_.register_fake
def _(X, clients, points, offsets, K, gamma, H, schedule, b, keys, clip, check=True):
    return None
