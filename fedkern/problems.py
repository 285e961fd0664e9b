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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedkern import validation as v

__all__ = ["KINDS", "LogisticRegression", "Problem"]

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

    Attributes:
        n, d, p: clients, features, parameters. offsets: [n + 1] int64; sizes: [n].
        L: a smoothness constant valid for every f_i (logistic: lambda_max(A_i^T A_i) / (4 m_i);
        multinomial: lambda_max / (2 m_i); least squares: lambda_max / m_i; plus l2; the max over
        clients). mu = l2 (the strong convexity constant).
    """

    def __init__(self, A: torch.Tensor, y: torch.Tensor, parts: Sequence[torch.Tensor],
                 kind: str = "logistic", l2: float = 1e-3, *, classes: int | None = None,
                 allow_empty: bool = False):  # fmt: skip
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
        if self.l2 <= 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
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
        self.L = max(lmax, default=0.0) + self.l2
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
        return G + self.l2 * X

    def losses(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[c] float64: f_i(x) for each client (x shared [p] or per client [c, p])."""
        c = self._clients(clients)
        X = self._models(x.cpu(), c.numel())
        out = torch.zeros(c.numel(), dtype=F64)
        for r, rows in enumerate(self._client_rows(c, None)):
            if rows.stop > rows.start:
                out[r] = self._sample_losses(self.A[rows], self.y[rows], X[r]).mean()
        return out + 0.5 * self.l2 * (X * X).sum(1)

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
        return float(
            w @ self._sample_losses(self.A[rows], self.y[rows], x) + 0.5 * self.l2 * (x @ x)
        )

    def grad(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[p] float64: the gradient of f = mean over the clients of f_i, at a shared x."""
        rows, w = self._weights(self._clients(clients))
        x = x.to(F64).cpu()
        r = self._residual(self.A[rows], self.y[rows], x)
        r = r * (w[:, None] if r.dim() == 2 else w)
        g = (r.T @ self.A[rows]).reshape(-1) if self.kind == "multinomial" else r @ self.A[rows]
        return g + self.l2 * x

    def hessian(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[p, p] float64: the Hessian of f at a shared x."""
        rows, w = self._weights(self._clients(clients))
        a, x = self.A[rows], x.to(F64).cpu()
        eye = self.l2 * torch.eye(self.p, dtype=F64)
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
