"""The unit sphere and the Stiefel manifold, batched, with their fused steps.

Both take batches: a sphere point is the last dimension of x [..., n] (||x|| = 1), a Stiefel point
the last two of X [..., n, p] (X^T X = I_p). The metric is the Euclidean one of the ambient space
(the embedded metric), tangent vectors live in ambient coordinates, and every method works on
float32 and float64 tensors on any device (plain PyTorch), except ``step``, the hot one, which is
the fused op of ``fedkern.ops.manifolds`` (C++ on CPU, Triton on CUDA, the reference elsewhere).
"""

from __future__ import annotations

import abc
import math

import torch

from fedkern import random as frandom
from fedkern import validation as v
from fedkern.ops import manifolds as ops
from fedkern.reference.manifolds import TRANSPORT_TAG, qf

__all__ = ["Manifold", "Sphere", "Stiefel", "gaussian"]

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.float64)


def gaussian(shape, seed: int, *, step: int = 0, dtype=torch.float32, device="cpu") -> Tensor:
    """Standard normal draws of the given shape from the counter-based stream (Box-Muller on the
    Philox uniforms of ``fedkern.random.uniforms``, stream STREAM_MANIFOLD at (seed, step)).

    Computed in float64 on the CPU, then cast: the same (seed, step, shape) gives the same values
    on every device.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    u = frandom.uniforms(2 * ((n + 1) // 2), seed=seed, step=step, stream=frandom.STREAM_MANIFOLD)
    u1, u2 = 1.0 - u[0::2], u[1::2]  # u1 in (0, 1]
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)], 1)
    return z.reshape(-1)[:n].reshape(shape).to(device=device, dtype=dtype)


def _check_dtype(name: str, x: Tensor) -> Tensor:
    v.tensor(name, x)
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    return x


class Manifold(abc.ABC):
    """Common interface of ``Sphere`` and ``Stiefel`` (every argument batched over leading dims).

    proj(x, u): the orthogonal projection of an ambient u onto T_x (Riemannian gradient of an
    ambient gradient); retr(x, u): a retraction; exp(x, u) / log(x, y): the exponential map and
    its inverse; dist(x, y): the geodesic distance; transport(x, y, v): a tangent vector at x moved
    to y ("parallel" along the minimal geodesic, or "projection" onto T_y); inner / norm: the
    metric; random(batch, seed) / random_tangent(x, seed): counter-based draws; off_manifold(x):
    the distance of x from the manifold's equation; check(x): raises when it exceeds a tolerance;
    step(x, u, eta, v): the fused in-place step x <- R_x(-eta proj_x(u)), v <- T(v).
    """

    #: trailing dimensions of one point (1: a vector, 2: a matrix)
    point_dims = 1

    def _point(self, name: str, x: Tensor) -> Tensor:
        _check_dtype(name, x)
        if x.dim() < self.point_dims or tuple(x.shape[x.dim() - self.point_dims :]) != self.shape:
            raise ValueError(f"{name} must have trailing shape {self.shape}, got "
                             f"{tuple(x.shape)}")  # fmt: skip
        return x

    def _pair(self, xn: str, x: Tensor, un: str, u: Tensor) -> None:
        self._point(xn, x)
        _check_dtype(un, u)
        if u.shape != x.shape or u.dtype != x.dtype or u.device != x.device:
            raise ValueError(
                f"{un} must match {xn} (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                f"{tuple(u.shape)}, {u.dtype}, {u.device}"
            )

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The shape of one point."""

    def inner(self, x: Tensor, u: Tensor, w: Tensor) -> Tensor:
        """<u, w> at x (the embedded metric): [...]."""
        dims = tuple(range(-self.point_dims, 0))
        return (u * w).sum(dims)

    def norm(self, x: Tensor, u: Tensor) -> Tensor:
        """||u|| at x: [...]."""
        return self.inner(x, u, u).sqrt()

    @abc.abstractmethod
    def proj(self, x: Tensor, u: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def retr(self, x: Tensor, u: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def exp(self, x: Tensor, u: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def log(self, x: Tensor, y: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def transport(self, x: Tensor, y: Tensor, w: Tensor, kind: str = "parallel") -> Tensor: ...

    @abc.abstractmethod
    def off_manifold(self, x: Tensor) -> Tensor:
        """[...]: how far each point is from satisfying the manifold's equation (max abs)."""

    @abc.abstractmethod
    def random(self, batch=(), seed: int = 0, *, step: int = 0, dtype=torch.float32,
               device="cpu") -> Tensor: ...  # fmt: skip

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """The geodesic distance ||log_x(y)||: [...]."""
        return self.norm(x, self.log(x, y))

    def random_tangent(self, x: Tensor, seed: int = 0, *, step: int = 0) -> Tensor:
        """proj_x of a standard normal ambient vector (counter-based, per (seed, step))."""
        g = gaussian(x.shape, seed, step=step, dtype=x.dtype, device=x.device)
        return self.proj(x, g)

    def check(self, x: Tensor, tol: float | None = None, name: str = "x") -> Tensor:
        """x itself, after checking that every point is on the manifold to ``tol`` (default 1e-5
        for float32, 1e-10 for float64): ValueError naming ``name`` otherwise."""
        self._point(name, x)
        if tol is None:
            tol = 1e-5 if x.dtype == torch.float32 else 1e-10
        err = float(self.off_manifold(x).max()) if x.numel() else 0.0
        if not err <= tol:  # NaN fails too
            raise ValueError(f"{name} is not on the {self!r} manifold: off by {err:.3g} > "
                             f"{tol:.3g}")  # fmt: skip
        return x


class Sphere(Manifold):
    """The unit sphere S^{n-1} = {x in R^n : ||x|| = 1}, points on the last dimension.

    Args:
        n: the ambient dimension (None: any, taken from the tensors).
    """

    point_dims = 1

    def __init__(self, n: int | None = None):
        self.n = None if n is None else v.integer("n", n, 1)

    @property
    def shape(self):
        return (self.n,) if self.n is not None else None

    def _point(self, name, x):
        _check_dtype(name, x)
        if x.dim() < 1 or (self.n is not None and x.shape[-1] != self.n):
            raise ValueError(f"{name} must have last dimension {self.n}, got {tuple(x.shape)}")
        return x

    @staticmethod
    def _dot(a, b):
        return (a * b).sum(-1, keepdim=True)

    def proj(self, x, u):
        """u - <x, u> x."""
        self._pair("x", x, "u", u)
        return u - self._dot(x, u) * x

    def retr(self, x, u):
        """(x + u) / ||x + u||."""
        self._pair("x", x, "u", u)
        y = x + u
        return y / y.norm(dim=-1, keepdim=True)

    def exp(self, x, u):
        """cos(||u||) x + sin(||u||) u / ||u|| (x where u = 0), renormalized to unit norm."""
        self._pair("x", x, "u", u)
        t = u.norm(dim=-1, keepdim=True)
        s = torch.where(t > 0, torch.sin(t) / torch.where(t > 0, t, 1), 1)
        y = torch.cos(t) * x + s * u
        return y / y.norm(dim=-1, keepdim=True)

    def log(self, x, y):
        """theta w / ||w|| with w = y - <x, y> x and theta = atan2(||w||, <x, y>) (0 at y = x;
        antipodal points have no unique logarithm: the result is 0 there)."""
        self._pair("x", x, "y", y)
        w = y - self._dot(x, y) * x
        nw = w.norm(dim=-1, keepdim=True)
        theta = torch.atan2(nw, self._dot(x, y))
        return torch.where(nw > 0, theta / torch.where(nw > 0, nw, 1), 0) * w

    def dist(self, x, y):
        """The angle between x and y, 2 asin(||x - y|| / 2) (accurate near 0): [...]."""
        self._pair("x", x, "y", y)
        return 2 * torch.asin(((x - y).norm(dim=-1) / 2).clamp(max=1))

    def transport(self, x, y, w, kind="parallel"):
        """w (tangent at x) moved to y: "parallel" along the minimal geodesic,
        w - <w, y> / (1 + <x, y>) (x + y) (undefined for antipodal x, y: NaN or inf), or
        "projection": w - <y, w> y."""
        self._pair("x", x, "y", y)
        self._pair("x", x, "w", w)
        if kind == "projection":
            return w - self._dot(y, w) * y
        if kind != "parallel":
            raise ValueError(f"kind must be 'parallel' or 'projection', got {kind!r}")
        return w - (self._dot(w, y) / (1 + self._dot(x, y))) * (x + y)

    def off_manifold(self, x):
        """| ||x|| - 1 | per point (float64 norm)."""
        return (x.double().norm(dim=-1) - 1).abs()

    def random(self, batch=(), seed=0, *, step=0, dtype=torch.float32, device="cpu"):
        """Uniform points: normalized Gaussians of shape (*batch, n) (n must be set)."""
        if self.n is None:
            raise ValueError("Sphere(n) needs n to draw random points")
        batch = (batch,) if isinstance(batch, int) else tuple(batch)
        g = gaussian((*batch, self.n), seed, step=step, dtype=torch.float64)
        return (g / g.norm(dim=-1, keepdim=True)).to(device=device, dtype=dtype)

    def step(self, x, u, eta, w=None, *, exp=False, transport="parallel", check=False):
        """The fused step, in place: x <- R_x(-eta proj_x(u)) (``exp=True``: Exp_x), renormalized;
        w (tangent at x, optional) <- its transport to the new x ("parallel" or "projection").

        Args:
            x: float32/float64 [..., n] contiguous points; modified in place.
            u: the ambient direction (e.g. a Euclidean gradient or an estimator), x's shape.
            eta: the step size (finite float).
            w: None or a tangent vector per point, x's shape; modified in place.
            check: verify first that x is on the sphere (``check``; a host sync on CUDA).

        Returns x. Errors (before anything is modified): dtype, shape, device, aliasing, eta.
        """
        self._pair("x", x, "u", u)
        if w is not None:
            self._pair("x", x, "w", w)
        if transport not in TRANSPORT_TAG:
            raise ValueError(f"transport must be 'parallel' or 'projection', got {transport!r}")
        if check:
            self.check(x)
        n = x.shape[-1]
        X = x.view(-1, n) if x.is_contiguous() else x
        W = None if w is None else (w.view(-1, n) if w.is_contiguous() else w)
        ops.sphere_step_(
            X, u.reshape(-1, n).contiguous(), W, float(eta), bool(exp), TRANSPORT_TAG[transport]
        )
        return x

    def __repr__(self):
        return f"Sphere({'' if self.n is None else self.n})"


class Stiefel(Manifold):
    """The Stiefel manifold St(n, p) = {X in R^{n x p} : X^T X = I_p}, p <= n, with the embedded
    (Euclidean) metric; points on the last two dimensions.

    Args:
        n, p: 1 <= p <= n.
        log_iters: iterations of the shooting method of ``log`` (default 100).
        transport_steps: RK4 steps of the parallel transport (default 64).
    """

    point_dims = 2

    def __init__(self, n: int, p: int, *, log_iters: int = 100, transport_steps: int = 64):
        self.n = v.integer("n", n, 1)
        self.p = v.integer("p", p, 1, self.n)
        self.log_iters = v.integer("log_iters", log_iters, 1)
        self.transport_steps = v.integer("transport_steps", transport_steps, 1)

    @property
    def shape(self):
        return (self.n, self.p)

    @staticmethod
    def _sym(a):
        return (a + a.transpose(-1, -2)) / 2

    @staticmethod
    def _t(a):
        return a.transpose(-1, -2)

    def proj(self, x, u):
        """U - X sym(X^T U)."""
        self._pair("x", x, "u", u)
        return u - x @ self._sym(self._t(x) @ u)

    def retr(self, x, u, kind: str = "qr"):
        """The QR ("qr") or polar retraction. "qr": the Q factor of X + U with diag(R) > 0;
        "polar": (X + U)((X + U)^T (X + U))^-1/2 (the closest point of the manifold in Frobenius
        norm)."""
        self._pair("x", x, "u", u)
        y = x + u
        if kind == "qr":
            return qf(y)
        if kind != "polar":
            raise ValueError(f"kind must be 'qr' or 'polar', got {kind!r}")
        evals, evecs = torch.linalg.eigh(self._t(y) @ y)
        return y @ (evecs * evals.rsqrt()[..., None, :]) @ self._t(evecs)

    def exp(self, x, u):
        """The geodesic of the embedded metric (Edelman, Arias and Smith 1998):
        Exp_X(U) = [X, U] expm([[A, -S], [I, A]])[:, :p] expm(-A), A = X^T U, S = U^T U
        (matrix exponentials in float64), then re-orthonormalized by the polar factor."""
        self._pair("x", x, "u", u)
        dt, p = x.dtype, self.p
        X, U = x.double(), u.double()
        A, S = self._t(X) @ U, self._t(U) @ U
        eye = torch.eye(p, dtype=torch.float64, device=x.device).expand_as(A)
        M = torch.cat([torch.cat([A, -S], -1), torch.cat([eye, A], -1)], -2)
        E = torch.linalg.matrix_exp(M)[..., :, :p]
        Y = torch.cat([X, U], -1) @ E @ torch.linalg.matrix_exp(-A)
        return self.retr(Y, torch.zeros_like(Y), "polar").to(dt)

    def log(self, x, y):
        """The tangent U at X with Exp_X(U) = Y, by shooting: U <- U + proj_X(Y - Exp_X(U)) from
        U = proj_X(Y - X), in float64, ``log_iters`` times at most (stops below 1e-13 relative
        residual). Converges for Y near X (the Jacobian of Exp is close to the identity there);
        points where it did not converge (residual > 1e-6) get NaN."""
        self._pair("x", x, "y", y)
        X, Y = x.double(), y.double()
        U = self.proj(X, Y - X)
        for _ in range(self.log_iters):
            R = Y - self.exp(X, U)
            U = U + self.proj(X, R)
            res = R.flatten(-2).norm(dim=-1)
            if float(res.max()) < 1e-13:
                break
        bad = (Y - self.exp(X, U)).flatten(-2).norm(dim=-1) > 1e-6
        U = torch.where(bad[..., None, None], torch.nan, U)
        return U.to(x.dtype)

    def transport(self, x, y, w, kind="projection"):
        """w (tangent at x) moved to y. "projection" (the default, and the fused step's): w -
        Y sym(Y^T w). "parallel": the Levi-Civita transport of the embedded metric along the
        geodesic from x to y (U = log_x(y)), by integrating Z'' = -Z (Z'^T Z'),
        W' = -Z sym(Z'^T W) with ``transport_steps`` RK4 steps in float64, then projected onto
        T_y (p = 1 gives the sphere's closed form)."""
        self._pair("x", x, "y", y)
        self._pair("x", x, "w", w)
        if kind == "projection":
            return w - y @ self._sym(self._t(y) @ w)
        if kind != "parallel":
            raise ValueError(f"kind must be 'parallel' or 'projection', got {kind!r}")
        U = self.log(x, y).double()
        Z, Zd, W = x.double(), U, w.double()
        h = 1.0 / self.transport_steps

        def f(Z, Zd, W):
            return Zd, -Z @ (self._t(Zd) @ Zd), -Z @ self._sym(self._t(Zd) @ W)

        for _ in range(self.transport_steps):
            k1 = f(Z, Zd, W)
            k2 = f(*(s + (h / 2) * k for s, k in zip((Z, Zd, W), k1, strict=True)))
            k3 = f(*(s + (h / 2) * k for s, k in zip((Z, Zd, W), k2, strict=True)))
            k4 = f(*(s + h * k for s, k in zip((Z, Zd, W), k3, strict=True)))
            Z, Zd, W = (
                s + (h / 6) * (a + 2 * b + 2 * c + d)
                for s, a, b, c, d in zip((Z, Zd, W), k1, k2, k3, k4, strict=True)
            )
        Yd = y.double()
        return (W - Yd @ self._sym(self._t(Yd) @ W)).to(w.dtype)

    def off_manifold(self, x):
        """max |X^T X - I| per point (float64)."""
        X = x.double()
        eye = torch.eye(self.p, dtype=torch.float64, device=x.device)
        return (self._t(X) @ X - eye).abs().flatten(-2).amax(-1)

    def random(self, batch=(), seed=0, *, step=0, dtype=torch.float32, device="cpu"):
        """Points qf(G) of Gaussian G of shape (*batch, n, p) (Haar-distributed)."""
        batch = (batch,) if isinstance(batch, int) else tuple(batch)
        g = gaussian((*batch, self.n, self.p), seed, step=step, dtype=torch.float64)
        return qf(g).to(device=device, dtype=dtype).contiguous()

    def step(self, x, u, eta, w=None, *, check=False):
        """The fused step, in place: X <- qf(X - eta proj_X(U)) (the QR retraction by two-pass
        Gram-Schmidt), w (optional, tangent at X) <- its projection onto T_{X+}.

        Args:
            x: float32/float64 [..., n, p] contiguous points; modified in place.
            u: the ambient direction, x's shape.
            eta: the step size (finite float).
            w: None or a tangent vector per point, x's shape; modified in place.
            check: verify first that x is on the manifold.

        Returns x.
        """
        self._pair("x", x, "u", u)
        if w is not None:
            self._pair("x", x, "w", w)
        if check:
            self.check(x)
        n, p = self.n, self.p
        X = x.view(-1, n, p) if x.is_contiguous() else x
        W = None if w is None else (w.view(-1, n, p) if w.is_contiguous() else w)
        ops.stiefel_step_(X, u.reshape(-1, n, p).contiguous(), W, float(eta))
        return x

    def __repr__(self):
        return f"Stiefel({self.n}, {self.p})"
