"""The fused manifold steps in plain PyTorch: the oracle's twin, the fallback backend and the eager
baseline of the benchmarks. Every row (sphere) or matrix (Stiefel) of the batch is independent.

sphere_step_ (X, U, V [b, n]; in place on X and V):
    a = <x, u>;  g = u - a x                                   (the tangent projection of u)
    retraction: y = x - eta g
    exp:        t = eta ||g||;  y = cos(t) x - (sin(t) / ||g||) g   (y = x when t = 0)
    x+ = y / ||y||                                             (renormalized: stays on the sphere)
    V (tangent at x) -> T_{x -> x+} v:
        projection: v - <x+, v> x+
        parallel:   v - <v, x+> / (1 + <x, x+>) (x + x+)       (along the minimal geodesic)
stiefel_step_ (X, U, V [b, n, p]; in place on X and V):
    G = U - X sym(X^T U);  Y = X - eta G;  x+ = qf(Y)           (Q of the QR of Y with diag(R) > 0)
    V -> V - X+ sym(X+^T V)                                    (the projection transport)
sym(A) = (A + A^T) / 2. Sums accumulate in the input's dtype (fp32 or fp64).
"""

from __future__ import annotations

import torch

TRANSPORT_TAG = {"projection": 0, "parallel": 1}


def _dot(a, b):
    return (a * b).sum(-1, keepdim=True)


def sphere_step_(X, U, V, eta: float, use_exp: bool, transport: int):
    """In place on X [b, n] and V [b, n] (or None): see the module docstring. Returns None."""
    a = _dot(X, U)
    G = U - a * X
    if use_exp:
        gn = G.norm(dim=-1, keepdim=True)
        t = eta * gn
        s = torch.where(t > 0, torch.sin(t) / torch.where(gn > 0, gn, 1), 0)
        Y = torch.cos(t) * X - s * G
    else:
        Y = X - eta * G
    Xn = Y / Y.norm(dim=-1, keepdim=True)
    if V is not None:
        if transport == 0:
            V -= _dot(Xn, V) * Xn
        else:
            V -= (_dot(V, Xn) / (1 + _dot(X, Xn))) * (X + Xn)
    X.copy_(Xn)


def _sym(A):
    return (A + A.transpose(-1, -2)) / 2


def qf(Y):
    """Q of the QR decomposition of Y [..., n, p] with the signs that make diag(R) positive."""
    Q, R = torch.linalg.qr(Y)
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, 1, sign)
    return Q * sign[..., None, :]


def stiefel_step_(X, U, V, eta: float):
    """In place on X [b, n, p] and V [b, n, p] (or None): see the module docstring."""
    G = U - X @ _sym(X.transpose(-1, -2) @ U)
    Xn = qf(X - eta * G)
    if V is not None:
        V -= Xn @ _sym(Xn.transpose(-1, -2) @ V)
    X.copy_(Xn)
