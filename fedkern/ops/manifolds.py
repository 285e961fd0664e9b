"""Fused Riemannian steps on batches of points: schemas, validation and dispatch.

Ops (namespace ``fedkern``; float32 or float64; in place on X and V):
  sphere_step_(X, U, V, eta, use_exp, transport)   X, U, V [b, n]: x+ = R_x(-eta P_x(u)) (or
                                                   Exp), renormalized; V transported to x+
                                                   (transport 0 projection, 1 parallel)
  stiefel_step_(X, U, V, eta)                      X, U, V [b, n, p]: X+ = qf(X - eta P_X(U)); V
                                                   transported to X+ by projection
The math is in ``fedkern.reference.manifolds``; the public entry points are ``Sphere.step`` and
``Stiefel.step`` of ``fedkern.manifolds``, which also check (optionally) that X is on the manifold.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy
from fedkern.reference import manifolds as ref

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.float64)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpu_sphere(X, U, V, eta, use_exp, transport):
    b, n = X.shape
    cpu_core().sphere_step(_ptr(X), _ptr(U), _ptr(V), b, n, eta, use_exp, transport,
                           X.dtype == torch.float64)  # fmt: skip


def _cpu_stiefel(X, U, V, eta):
    b, n, p = X.shape
    cpu_core().stiefel_step(_ptr(X), _ptr(U), _ptr(V), b, n, p, eta, X.dtype == torch.float64)


IMPLS = {
    "sphere_step_": {
        "reference": ref.sphere_step_,
        "cpu": _cpu_sphere,
        "triton": lazy("fedkern.kernels.manifolds", "sphere_step_"),
    },
    "stiefel_step_": {
        "reference": ref.stiefel_step_,
        "cpu": _cpu_stiefel,
        "triton": lazy("fedkern.kernels.manifolds", "stiefel_step_"),
    },
}


def check_step(X, U, V, eta, dims: int) -> float:
    """Shapes, dtypes, devices, contiguity, aliasing and eta of a fused step; returns eta."""
    v.tensor("X", X)
    if X.dtype not in DTYPES:
        raise TypeError(f"X must be float32 or float64, got {X.dtype}")
    if X.dim() != dims or min(X.shape) < 1:
        shape = "[b, n]" if dims == 2 else "[b, n, p]"
        raise ValueError(f"X must be a non-empty {shape} tensor, got {tuple(X.shape)}")
    if dims == 3 and X.shape[2] > X.shape[1]:
        raise ValueError(f"a Stiefel point [n, p] needs p <= n, got {tuple(X.shape[1:])}")
    v.writable("X", X)
    v.same_as("U", U, "X", X)
    v.disjoint("U", U, "X", X)
    if V is not None:
        v.same_as("V", V, "X", X)
        v.writable("V", V)
        v.disjoint("V", V, "X", X)
        v.disjoint("V", V, "U", U)
    return v.finite("eta", eta)


@torch.library.custom_op("fedkern::sphere_step_", mutates_args=("X", "V"))
def sphere_step_(X: Tensor, U: Tensor, V: Tensor | None, eta: float, use_exp: bool,
                 transport: int) -> None:  # fmt: skip
    """In place: X <- R_X(-eta P_X(U)) (Exp with use_exp), V <- T_{X -> X+} V (see
    fedkern.reference.manifolds). X, U, V float32/float64 [b, n] on one device; V may be None."""
    eta = check_step(X, U, V, eta, 2)
    v.boolean("use_exp", use_exp)
    if transport not in (0, 1):
        raise ValueError(f"transport must be 0 (projection) or 1 (parallel), got {transport}")
    if not (X.is_contiguous() and U.is_contiguous() and (V is None or V.is_contiguous())):
        raise ValueError("X, U and V must be contiguous")
    pick("sphere_step_", IMPLS["sphere_step_"], X.device)(X, U, V, eta, use_exp, transport)


@sphere_step_.register_fake
def _(X, U, V, eta, use_exp, transport):
    return None


@torch.library.custom_op("fedkern::stiefel_step_", mutates_args=("X", "V"))
def stiefel_step_(X: Tensor, U: Tensor, V: Tensor | None, eta: float) -> None:
    """In place: X <- qf(X - eta P_X(U)), V <- V - X+ sym(X+^T V) (see
    fedkern.reference.manifolds). X, U, V float32/float64 [b, n, p], p <= n; V may be None."""
    eta = check_step(X, U, V, eta, 3)
    if not (X.is_contiguous() and U.is_contiguous() and (V is None or V.is_contiguous())):
        raise ValueError("X, U and V must be contiguous")
    pick("stiefel_step_", IMPLS["stiefel_step_"], X.device)(X, U, V, eta)


@stiefel_step_.register_fake
def _(X, U, V, eta):
    return None
