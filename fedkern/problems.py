"""Federated convex problems with exact optima, evaluated in float64.

A ``Problem`` holds n clients' samples packed (client i owns rows offsets[i]:offsets[i+1] of A) and
evaluates local losses and gradients at a shared model x or at one model per client, with optional
per-client minibatches, and the exact optimum of the average objective. Everything is float64 plain
PyTorch: these are the metrics and oracles (suboptimality curves need the precision); the fast
batched local training on the same data is ``fedkern.clients.ClientBatch``.

  f_i(x) = (1/m_i) sum_{j in client i} loss(x; a_j, y_j) + (l2/2) ||x||^2
  f(x)   = mean over a set of clients (by default all) of f_i(x)

  kind "logistic" (binary, y in {0, 1}; p = d parameters):  loss = log(1 + exp(-s a.x)), s = 2y - 1
  kind "multinomial" (y in 0..C-1; p = C*d, W [C, d] row-major): loss = logsumexp(W a) - (W a)_y
  kind "least_squares" (real y; p = d):                       loss = (a.x - y)^2 / 2

``Problem(..., nonconvex_reg=lam)`` adds lam * sum_j x_j^2 / (1 + x_j^2) to every f_i (the
non-convex objective of the biased-SGD experiments; then no optimum is claimed: ``has_optimum`` is
False). ``Quartic`` is the (L0, L1)-smooth, not L-smooth, problem f_i(x) = mean ||x - x_j||^4 of the
generalized-smoothness experiments, with its exact optimum and valid constants L0, L1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedkern import validation as v

__all__ = ["KINDS", "LogisticRegression", "Problem", "Quartic"]

F64 = torch.float64
KINDS = ("logistic", "multinomial", "least_squares")


class Problem:
    """An L2-regularized convex problem split over clients (see the module docstring).

    Args:
        A: [N, d] features (converted to float64).
        y: [N] labels (logistic: 0/1; multinomial: 0..classes-1) or targets (least squares).
        parts: a list of n int64 index tensors, each client's sample rows (``fedkern.data.split``).
        kind: "logistic", "multinomial" or "least_squares".
        l2: the regularization strength, a finite float > 0 (strongly convex: a unique optimum).
        classes: multinomial only; default max(y) + 1.
        allow_empty: accept clients with no sample (their f_i is the regularizer alone).
        nonconvex_reg: lam >= 0 (default 0): adds lam * sum_j x_j^2 / (1 + x_j^2) to every f_i
            (then l2 may be 0, ``has_optimum`` is False and ``optimum`` is not meaningful). The
            batched kernels of ``ClientBatch`` do not implement it (it refuses such a problem);
            ``fedkern.algorithms.BiasedSGD`` evaluates it here, in float64.

    Attributes:
        n, d, p: clients, features, parameters. offsets: [n + 1] int64; sizes: [n].
        L: a smoothness constant valid for every f_i (logistic: lambda_max(A_i^T A_i) / (4 m_i);
        multinomial: lambda_max / (2 m_i); least squares: lambda_max / m_i; plus l2; the max over
        clients). mu = l2 (the strong convexity constant).
    """

    def __init__(self, A: torch.Tensor, y: torch.Tensor, parts: Sequence[torch.Tensor],
                 kind: str = "logistic", l2: float = 1e-3, *, classes: int | None = None,
                 allow_empty: bool = False, nonconvex_reg: float = 0.0):  # fmt: skip
        v.tensor("A", A)
        v.tensor("y", y)
        if kind not in KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; available: {', '.join(KINDS)}")
        if A.dim() != 2 or y.shape != (A.shape[0],):
            raise ValueError(f"A must be [N, d] and y [N], got {tuple(A.shape)} and "
                             f"{tuple(y.shape)}")  # fmt: skip
        if len(parts) < 1:
            raise ValueError("parts must name at least one client")
        v.fp32_scalar("l2", l2)  # a finite real number
        self.l2 = float(l2)
        self.nonconvex_reg = v.finite("nonconvex_reg", nonconvex_reg)
        if self.nonconvex_reg < 0:
            raise ValueError(f"nonconvex_reg must be >= 0, got {nonconvex_reg}")
        if self.l2 < 0 or (self.l2 == 0 and self.nonconvex_reg == 0):
            raise ValueError(f"l2 must be > 0 (or >= 0 with nonconvex_reg > 0), got {l2}")
        #: Whether ``optimum()`` is meaningful: not for the non-convex regularizer.
        self.has_optimum = self.nonconvex_reg == 0
        self.kind = kind
        if kind == "logistic" and y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("y must hold binary labels 0 and 1 for kind 'logistic'")
        self.classes = 1
        if kind == "multinomial":
            if y.numel() and (bool((y != y.round()).any()) or float(y.min()) < 0):
                raise ValueError("y must hold class indices 0, 1, ... for kind 'multinomial'")
            top = int(y.max()) + 1 if y.numel() else 1
            self.classes = v.integer("classes", top if classes is None else classes, max(2, top))
        sizes = [int(torch.as_tensor(p).numel()) for p in parts]
        if not allow_empty and min(sizes) < 1:
            raise ValueError(f"every client needs a sample; client {sizes.index(0)} has none "
                             f"(allow_empty=True accepts empty clients)")  # fmt: skip
        order = torch.cat([torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in parts])
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= A.shape[0]):
            raise ValueError(f"parts must index rows of A in [0, {A.shape[0]})")
        self.A = A.to(F64)[order].contiguous()
        self.y = y.to(F64)[order].contiguous()
        self.n, self.d = len(parts), A.shape[1]
        self.p = self.classes * self.d if kind == "multinomial" else self.d
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.offsets = torch.zeros(self.n + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.sizes, 0)
        factor = {"logistic": 0.25, "multinomial": 0.5, "least_squares": 1.0}[kind]
        lmax = [
            float(torch.linalg.eigvalsh(self.A[a:b].T @ self.A[a:b])[-1]) * factor / (b - a)
            for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True)
            if b > a
        ]
        self.L = max(lmax, default=0.0) + self.l2 + 2 * self.nonconvex_reg
        self.mu = self.l2
        self._optimum: dict[tuple, tuple[torch.Tensor, float]] = {}

    # ---- the per-sample math ---------------------------------------------------------------------

    def _residual(self, a: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d loss / d z for samples a [m, d] at x [p]: [m] (logistic, least squares) or [m, C]."""
        if self.kind == "logistic":
            s = 2 * y - 1
            return -s * torch.sigmoid(-s * (a @ x))
        if self.kind == "least_squares":
            return a @ x - y
        z = a @ x.view(self.classes, self.d).T
        P = torch.softmax(z, 1)
        return P - torch.nn.functional.one_hot(y.long(), self.classes).to(F64)

    def _sample_losses(self, a, y, x) -> torch.Tensor:
        if self.kind == "logistic":
            return torch.nn.functional.softplus(-(2 * y - 1) * (a @ x))
        if self.kind == "least_squares":
            return 0.5 * (a @ x - y) ** 2
        z = a @ x.view(self.classes, self.d).T
        return torch.logsumexp(z, 1) - z.gather(1, y.long()[:, None])[:, 0]

    def _grad_sum(self, a, y, x) -> torch.Tensor:
        """sum over the samples of the loss gradient, [p]."""
        r = self._residual(a, y, x)
        return (r.T @ a).reshape(-1) if self.kind == "multinomial" else r @ a

    def _reg_value(self, X: torch.Tensor) -> torch.Tensor:
        """(l2/2)||x||^2 + nonconvex_reg * sum_j x_j^2 / (1 + x_j^2), over the last dimension."""
        sq = X * X
        out = 0.5 * self.l2 * sq.sum(-1)
        if self.nonconvex_reg:
            out = out + self.nonconvex_reg * (sq / (1 + sq)).sum(-1)
        return out

    def _reg_grad(self, X: torch.Tensor) -> torch.Tensor:
        """The regularizers' gradient: l2 x + nonconvex_reg * 2x / (1 + x^2)^2."""
        g = self.l2 * X
        if self.nonconvex_reg:
            g = g + self.nonconvex_reg * 2 * X / (1 + X * X) ** 2
        return g

    # ---- per-sample view (the finite sum over samples of fedkern.estimators) -------------------

    @property
    def samples(self) -> int:
        """N, the number of samples (rows of A)."""
        return self.A.shape[0]

    def sample_smoothness(self) -> torch.Tensor:
        """[N] float64: a smoothness constant L_j of each sample's function
        f_j(x) = loss(x; a_j, y_j) + regularizers: c ||a_j||^2 + l2 + 2 nonconvex_reg, with
        c = 1/4 (logistic), 1/2 (multinomial), 1 (least squares); 2 bounds the non-convex
        regularizer's curvature |(2 - 6 w^2) / (1 + w^2)^3|."""
        c = {"logistic": 0.25, "multinomial": 0.5, "least_squares": 1.0}[self.kind]
        return c * (self.A * self.A).sum(1) + self.l2 + 2 * self.nonconvex_reg

    def sample_smoothness_mean(self) -> float:
        """A smoothness constant of the sample average (1/N) sum_j f_j: lambda_max(A^T A / N) * c
        + l2 + 2 nonconvex_reg (the L of the biased-SGD step sizes)."""
        c = {"logistic": 0.25, "multinomial": 0.5, "least_squares": 1.0}[self.kind]
        N = max(self.samples, 1)
        lmax = float(torch.linalg.eigvalsh(self.A.T @ self.A / N)[-1]) if self.samples else 0.0
        return c * lmax + self.l2 + 2 * self.nonconvex_reg

    def sample_grad_sum(self, x: torch.Tensor, rows, weights) -> torch.Tensor:
        """sum_k weights[k] * grad f_{rows[k]}(x) for per-sample functions f_j (loss plus both
        regularizers), at a shared x [p]: float64 [p] on the CPU.

        Args:
            x: [p], any float dtype and device. rows: int64 sample ids (rows of A, in [0, N)).
            weights: float64 weights, one per row (repeated rows count once per entry).
        """
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        w = torch.as_tensor(weights, dtype=F64).reshape(-1)
        if w.shape != rows.shape:
            raise ValueError(f"weights must have one entry per row ({rows.numel()})")
        x = x.to(F64).cpu()
        if rows.numel() == 0:
            return torch.zeros(self.p, dtype=F64)
        a = self.A[rows]
        r = self._residual(a, self.y[rows], x)
        g = (r * w[:, None]).T @ a if r.dim() == 2 else (r * w) @ a
        return g.reshape(-1) + float(w.sum()) * self._reg_grad(x)

    def mean_loss(self, x: torch.Tensor) -> float:
        """(1/N) sum_j f_j(x), the sample average (equal to ``loss`` when the clients' sizes are
        equal, or with one client)."""
        x = x.to(F64).cpu()
        return float(self._sample_losses(self.A, self.y, x).mean() + self._reg_value(x))

    def mean_grad(self, x: torch.Tensor) -> torch.Tensor:
        """[p] float64: the gradient of (1/N) sum_j f_j at x."""
        x = x.to(F64).cpu()
        r = self._residual(self.A, self.y, x) / max(self.samples, 1)
        g = (r.T @ self.A).reshape(-1) if r.dim() == 2 else r @ self.A
        return g + self._reg_grad(x)

    # ---- evaluation -----------------------------------------------------------------------------

    def _clients(self, clients) -> torch.Tensor:
        if clients is None:
            return torch.arange(self.n)
        c = torch.as_tensor(clients, dtype=torch.int64).reshape(-1)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.n):
            raise ValueError(f"clients must be ids in [0, {self.n})")
        return c

    def _client_rows(self, c: torch.Tensor, samples):
        """Per client in c: its sample rows of A (a view for the full data, else a gather)."""
        spans = zip(self.offsets[c].tolist(), self.offsets[c + 1].tolist(), strict=True)
        if samples is None:
            return [slice(a, b) for a, b in spans]
        if len(samples) != c.numel():
            raise ValueError(f"samples must give one index list per client ({c.numel()})")
        out = []
        for (a, b), t in zip(spans, samples, strict=True):
            t = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
            if t.numel() < 1 or int(t.min()) < 0 or int(t.max()) >= b - a:
                raise ValueError(f"a client's minibatch must hold indices in [0, {b - a}), "
                                 f"at least one")  # fmt: skip
            out.append(t + a)
        return out

    def _models(self, x: torch.Tensor, k: int) -> torch.Tensor:
        x = x.to(F64)
        if x.shape == (self.p,):
            return x.expand(k, -1)
        if x.shape == (k, self.p):
            return x
        raise ValueError(f"x must be [{self.p}] or [{k}, {self.p}], got {tuple(x.shape)}")

    def grads(self, x: torch.Tensor, clients=None, samples=None) -> torch.Tensor:
        """Local gradients, one row per client.

        Args:
            x: [p] (a shared model) or [c, p] (one per client), any float dtype and device.
            clients: client ids (c of them), default all.
            samples: optional list of c index tensors into each client's own samples (a
                minibatch; repeated indices count twice); default the full local data.

        Returns:
            [c, p] float64 on the CPU: row r is grad f_{clients[r]} at its model.
        """
        c = self._clients(clients)
        X = self._models(x.cpu(), c.numel())
        G = torch.zeros(c.numel(), self.p, dtype=F64)
        for r, rows in enumerate(self._client_rows(c, samples)):
            a = self.A[rows]
            if a.shape[0]:
                G[r] = self._grad_sum(a, self.y[rows], X[r]) / a.shape[0]
        return G + self._reg_grad(X)

    def losses(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[c] float64: f_i(x) for each client (x shared [p] or per client [c, p])."""
        c = self._clients(clients)
        X = self._models(x.cpu(), c.numel())
        out = torch.zeros(c.numel(), dtype=F64)
        for r, rows in enumerate(self._client_rows(c, None)):
            if rows.stop > rows.start:
                out[r] = self._sample_losses(self.A[rows], self.y[rows], X[r]).mean()
        return out + self._reg_value(X)

    def _weights(self, c: torch.Tensor):
        """(rows, w): the samples of clients c and each one's weight in f = mean_i f_i."""
        counts = self.sizes[c]
        rows = torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i + 1]))
                          for i in c.tolist()])  # fmt: skip
        w = torch.repeat_interleave(1.0 / counts.clamp_min(1).to(F64), counts) / c.numel()
        return rows, w

    def loss(self, x: torch.Tensor, clients=None) -> float:
        """f(x) = mean over the clients (default all) of f_i(x), for a shared x [p]: a float."""
        rows, w = self._weights(self._clients(clients))
        x = x.to(F64).cpu()
        return float(w @ self._sample_losses(self.A[rows], self.y[rows], x) + self._reg_value(x))

    def grad(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[p] float64: the gradient of f = mean over the clients of f_i, at a shared x."""
        rows, w = self._weights(self._clients(clients))
        x = x.to(F64).cpu()
        r = self._residual(self.A[rows], self.y[rows], x)
        r = r * (w[:, None] if r.dim() == 2 else w)
        g = (r.T @ self.A[rows]).reshape(-1) if self.kind == "multinomial" else r @ self.A[rows]
        return g + self._reg_grad(x)

    def hessian(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[p, p] float64: the Hessian of f at a shared x."""
        rows, w = self._weights(self._clients(clients))
        a, x = self.A[rows], x.to(F64).cpu()
        eye = self.l2 * torch.eye(self.p, dtype=F64)
        if self.nonconvex_reg:
            q = 1 + x * x
            eye = eye + torch.diag(self.nonconvex_reg * (2 - 6 * x * x) / q**3)
        if self.kind == "least_squares":
            return (a * w[:, None]).T @ a + eye
        if self.kind == "logistic":
            q = torch.sigmoid(a @ x)
            return (a * (w * q * (1 - q))[:, None]).T @ a + eye
        P = torch.softmax(a @ x.view(self.classes, self.d).T, 1)  # [m, C]
        C, d = self.classes, self.d
        H = torch.zeros(C, d, C, d, dtype=F64)
        aw = a * w[:, None]
        for c1 in range(C):
            for c2 in range(C):
                coef = P[:, c1] * (float(c1 == c2) - P[:, c2])
                H[c1, :, c2, :] = (aw * coef[:, None]).T @ a
        return H.reshape(self.p, self.p) + eye

    def optimum(self, clients=None, *, tol: float = 1e-12) -> tuple[torch.Tensor, float]:
        """(x*, f*) of f over the clients (default all), by Newton's method in float64.

        Computed once per client set and cached; stops when ||grad f|| <= tol (or after 100
        steps, with a backtracking line search on f).
        """
        c = self._clients(clients)
        key = tuple(c.tolist())
        if key not in self._optimum:
            x = torch.zeros(self.p, dtype=F64)
            fx = self.loss(x, c)
            for _ in range(100):
                g = self.grad(x, c)
                if float(g.norm()) <= tol:
                    break
                step = torch.linalg.solve(self.hessian(x, c), g)
                t = 1.0
                while t > 1e-10:
                    x_new = x - t * step
                    f_new = self.loss(x_new, c)
                    if f_new <= fx + 1e-14 * abs(fx):
                        break
                    t *= 0.5
                x, fx = x_new, f_new
            self._optimum[key] = (x, fx)
        x, f = self._optimum[key]
        return x.clone(), f

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, n={self.n}, d={self.d}, p={self.p}, "
                f"samples={int(self.sizes.sum())}, l2={self.l2:g}, L={self.L:.4g})")  # fmt: skip


class LogisticRegression(Problem):
    """``Problem`` of kind "logistic": L2-regularized binary logistic regression over clients.

    Args:
        A, y, parts, l2: as in ``Problem`` (y in {0, 1}).
    """

    def __init__(self, A, y, parts, l2: float = 1e-3, **kwargs):
        super().__init__(A, y, parts, "logistic", l2, **kwargs)


def _quartic_l0(R: float, V: float, L1: float) -> float:
    """The smallest L0 with 12 (r^2 + V) <= L0 + 4 L1 (r - R)_+^3 for every r >= 0."""
    t = (1 + (1 + 2 * L1 * R) ** 0.5) / L1  # where d/dt [12((t+R)^2+V) - 4 L1 t^3] vanishes
    return max(12 * ((t + R) ** 2 + V) - 4 * L1 * t**3, 12 * (R * R + V))


class Quartic:
    """f(x) = mean over clients of f_i(x), f_i(x) = (1/m_i) sum_{j in client i} ||x - x_j||^4.

    The (L0, L1)-smooth test problem of the generalized-smoothness papers: ||grad^2 f|| grows like
    ||x||^2 while ||grad f|| grows like ||x||^3, so no global L exists, but
    ||grad^2 f(x)|| <= L0 + L1 ||grad f(x)|| does. Everything here is float64 plain PyTorch (the
    metrics); the fused batched local steps are ``ClientBatch(Quartic)`` (op family "quartic").

      grad f_i(x) = (4/m_i) sum_j ||x - x_j||^2 (x - x_j)
      grad^2 f_i(x) = (4/m_i) sum_j (||x - x_j||^2 I + 2 (x - x_j)(x - x_j)^T)

    The constants (``constants``): for points with mean c, R = max_j ||x_j - c||, V = mean_j
    ||x_j - c||^2 and r = ||x - c||: ||grad^2|| <= 12 mean_j ||x - x_j||^2 = 12 (r^2 + V), and for
    r > R every term of <grad f, x - c> is positive, so ||grad f|| >= 4 (r - R)^3. Hence any
    L1 > 0 with L0 = max_r [12 (r^2 + V) - 4 L1 (r - R)_+^3] (closed form) is a valid pair. The
    attributes use L1 = 1/R of all points and the largest L0 over f and every f_i, so (L0, L1)
    hold for each client's function and for f.

    Args:
        points: [N, d] float tensor (converted to float64).
        parts: a list of n int64 index tensors (each client's points, non-empty).

    Attributes:
        n, d, p (= d), sizes [n], offsets [n + 1] int64, A [N, d] float64 (the points packed client
        after client), kind = "quartic", L0, L1, has_optimum = True.
    """

    kind = "quartic"
    classes = 1
    l2 = 0.0
    has_optimum = True

    def __init__(self, points: torch.Tensor, parts: Sequence[torch.Tensor]):
        v.tensor("points", points)
        if points.dim() != 2 or points.shape[0] < 1 or points.shape[1] < 1:
            raise ValueError(f"points must be [N, d] with N, d >= 1, got {tuple(points.shape)}")
        if not points.is_floating_point() or not bool(torch.isfinite(points).all()):
            raise ValueError("points must hold finite floats")
        if len(parts) < 1:
            raise ValueError("parts must name at least one client")
        idx = [torch.as_tensor(q, dtype=torch.int64).reshape(-1) for q in parts]
        sizes = [int(q.numel()) for q in idx]
        if min(sizes) < 1:
            raise ValueError(f"every client needs a point; client {sizes.index(0)} has none")
        order = torch.cat(idx)
        if int(order.min()) < 0 or int(order.max()) >= points.shape[0]:
            raise ValueError(f"parts must index rows of points in [0, {points.shape[0]})")
        self.A = points.detach().to("cpu", F64)[order].contiguous()
        self.n, self.d = len(idx), points.shape[1]
        self.p = self.d
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.offsets = torch.zeros(self.n + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.sizes, 0)
        self.y = torch.zeros(self.A.shape[0], dtype=F64)  # unused (the ClientBatch layout)
        self.L0, self.L1 = self.constants()
        self._optimum: tuple[torch.Tensor, float] | None = None

    # ---- construction ---------------------------------------------------------------------------

    @staticmethod
    def uniform_points(N: int, d: int, *, low: float = -10.0, high: float = 10.0,
                       seed: int = 0) -> torch.Tensor:  # fmt: skip
        """[N, d] float64 points uniform in [low, high]^d from the counter-based stream
        (``fedkern.random.uniforms``, stream STREAM_QUARTIC at (seed, step 0)): the official
        experiments' data law. The data has its own stream, so it is independent of the coins
        (``fedkern.sampling.coin``) that a method draws from the same seed."""
        from fedkern.random import STREAM_QUARTIC, uniforms

        N, d = v.integer("N", N, 1), v.integer("d", d, 1)
        lo, hi = v.finite("low", low), v.finite("high", high)
        if not hi > lo:
            raise ValueError(f"need low < high, got {low}, {high}")
        seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        u = uniforms(N * d, seed=seed, step=0, stream=STREAM_QUARTIC)
        return (lo + (hi - lo) * u).reshape(N, d)

    @classmethod
    def sorted_split(cls, points: torch.Tensor, clients: int) -> Quartic:
        """The heterogeneous split of the official experiments: the points sorted by norm
        (stably) and cut into ``clients`` contiguous near-equal parts (torch.tensor_split)."""
        v.tensor("points", points)
        if points.dim() != 2:
            raise ValueError(f"points must be [N, d], got {tuple(points.shape)}")
        clients = v.integer("clients", clients, 1, max(1, points.shape[0]))
        order = torch.sort(points.double().norm(dim=1), stable=True).indices
        return cls(points, list(torch.tensor_split(order, clients)))

    # ---- constants ------------------------------------------------------------------------------

    @staticmethod
    def _spread(P: torch.Tensor) -> tuple[float, float]:
        r2 = ((P - P.mean(0)) ** 2).sum(1)
        return float(r2.max().sqrt()), float(r2.mean())

    def constants(self, L1: float | None = None) -> tuple[float, float]:
        """(L0, L1) valid for f and for every f_i (see the class docstring).

        Args:
            L1: the L1 to use (a float > 0); default 1/R with R the largest distance of a point
                to the mean of all points (1 when all points coincide).
        """
        if L1 is None:
            R, _ = self._spread(self.A)
            L1 = 1.0 / R if R > 0 else 1.0
        L1 = v.positive("L1", L1)
        sets = [self.A] + [self.A[a:b] for a, b in self._spans(range(self.n))]
        return max(_quartic_l0(*self._spread(P), L1) for P in sets), L1

    def max_sample_grad_norm(self, x: torch.Tensor) -> float:
        """max_j ||grad of ||x - x_j||^4|| = 4 max_j ||x - x_j||^3: a bound on the norm of every
        minibatch gradient at x (a mean of these)."""
        x = x.detach().to("cpu", F64).reshape(-1)
        return float(4 * ((x - self.A) ** 2).sum(1).max() ** 1.5)

    # ---- evaluation -----------------------------------------------------------------------------

    def _clients(self, clients) -> torch.Tensor:
        if clients is None:
            return torch.arange(self.n)
        c = torch.as_tensor(clients, dtype=torch.int64).reshape(-1)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.n):
            raise ValueError(f"clients must be ids in [0, {self.n})")
        return c

    def _spans(self, c):
        return [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in c]

    def _models(self, x: torch.Tensor, k: int) -> torch.Tensor:
        x = x.detach().to("cpu", F64)
        if x.shape == (self.p,):
            return x.expand(k, -1)
        if x.shape == (k, self.p):
            return x
        raise ValueError(f"x must be [{self.p}] or [{k}, {self.p}], got {tuple(x.shape)}")

    def _weights(self, c: torch.Tensor) -> torch.Tensor:
        """[N] weight of each point in the mean over clients c of f_i (0 outside c)."""
        w = torch.zeros(self.A.shape[0], dtype=F64)
        for a, b in self._spans(c.tolist()):
            w[a:b] += 1.0 / ((b - a) * c.numel())
        return w

    def losses(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[c] float64: f_i(x) for each client (x shared [p] or one per client [c, p])."""
        c = self._clients(clients)
        X = self._models(x, c.numel())
        out = torch.zeros(c.numel(), dtype=F64)
        for r, (a, b) in enumerate(self._spans(c.tolist())):
            out[r] = (((X[r] - self.A[a:b]) ** 2).sum(1) ** 2).mean()
        return out

    def grads(self, x: torch.Tensor, clients=None, samples=None) -> torch.Tensor:
        """[c, p] float64: grad f_i at each client's model (x shared [p] or [c, p]); ``samples``
        (one index tensor per client into its own points) gives minibatch gradients."""
        c = self._clients(clients)
        X = self._models(x, c.numel())
        spans = self._spans(c.tolist())
        if samples is not None and len(samples) != c.numel():
            raise ValueError(f"samples must give one index list per client ({c.numel()})")
        G = torch.zeros(c.numel(), self.p, dtype=F64)
        for r, (a, b) in enumerate(spans):
            P = self.A[a:b]
            if samples is not None:
                t = torch.as_tensor(samples[r], dtype=torch.int64).reshape(-1)
                if t.numel() < 1 or int(t.min()) < 0 or int(t.max()) >= b - a:
                    raise ValueError(f"a client's minibatch must hold indices in [0, {b - a})")
                P = P[t]
            D = X[r] - P
            G[r] = 4 * (((D * D).sum(1))[:, None] * D).mean(0)
        return G

    def loss(self, x: torch.Tensor, clients=None) -> float:
        """f(x) = mean over the clients (default all) of f_i(x), at a shared x [p]: a float."""
        x = self._models(x, 1)[0]
        w = self._weights(self._clients(clients))
        return float(w @ (((x - self.A) ** 2).sum(1) ** 2))

    def grad(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[p] float64: grad f at a shared x."""
        x = self._models(x, 1)[0]
        w = self._weights(self._clients(clients))
        D = x - self.A
        return 4 * ((w * (D * D).sum(1)) @ D)

    def hvp(self, x: torch.Tensor, u: torch.Tensor, clients=None) -> torch.Tensor:
        """[p] float64: grad^2 f(x) u, without forming the Hessian."""
        x, u = self._models(x, 1)[0], self._models(u, 1)[0]
        w = self._weights(self._clients(clients))
        D = x - self.A
        return 4 * ((w * (D * D).sum(1)).sum() * u + 2 * ((w * (D @ u)) @ D))

    def hessian(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[p, p] float64: grad^2 f(x)."""
        x = self._models(x, 1)[0]
        w = self._weights(self._clients(clients))
        D = x - self.A
        eye = torch.eye(self.p, dtype=F64)
        return 4 * ((w * (D * D).sum(1)).sum() * eye + 2 * (D * w[:, None]).T @ D)

    def optimum(self) -> tuple[torch.Tensor, float]:
        """(x*, f*) by Newton's method with backtracking from the weighted mean of the points (f
        is strictly convex unless all points coincide); cached. A step is taken when f decreases,
        or, at the rounding level of f, when the gradient norm halves."""
        if self._optimum is None:
            w = self._weights(torch.arange(self.n))
            x = w @ self.A
            fx = self.loss(x)
            for _ in range(200):
                g = self.grad(x)
                gn = float(g.norm())
                if gn == 0.0:
                    break
                step = torch.linalg.lstsq(self.hessian(x), g[:, None]).solution[:, 0]
                t, moved = 1.0, False
                while t > 1e-12:
                    x_new = x - t * step
                    f_new = self.loss(x_new)
                    # near x* the decrease of f drowns in its rounding: accept a step that
                    # leaves f unchanged to rounding when it shrinks the gradient
                    if f_new < fx or (
                        f_new <= fx + 4e-16 * abs(fx) and float(self.grad(x_new).norm()) < 0.5 * gn
                    ):
                        x, fx, moved = x_new, min(f_new, fx), True
                        break
                    t *= 0.5
                if not moved:
                    break
            self._optimum = (x, fx)
        x, f = self._optimum
        return x.clone(), f

    def __repr__(self) -> str:
        return (f"Quartic(n={self.n}, d={self.d}, points={self.A.shape[0]}, L0={self.L0:.4g}, "
                f"L1={self.L1:.4g})")  # fmt: skip
