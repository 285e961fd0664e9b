"""Federated convex problems with exact optima: L2-regularized binary logistic regression.

``LogisticRegression`` holds n clients' samples packed (client i owns rows offsets[i]:offsets[i+1]
of A) and evaluates, for a set of clients at once, the local losses and gradients at a shared model
x or at one model per client, with optional per-client minibatches. Everything is float64 plain
PyTorch (these problems are small; the loss gap curves need the precision).

f_i(x) = (1/m_i) sum_{j in client i} log(1 + exp(-s_j a_j.x)) + (l2/2) ||x||^2, s_j = 2 y_j - 1.
f(x) = mean over a set of clients (by default all) of f_i(x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedkern.ops import _validate as v

__all__ = ["LogisticRegression"]

F64 = torch.float64


class LogisticRegression:
    """L2-regularized binary logistic regression split over clients.

    Args:
        A: [N, d] features (converted to float64).
        y: [N] labels in {0, 1} (int or bool).
        parts: a list of n int64 index tensors, each client's sample rows (``fedkern.data.split``);
            every client needs at least one sample.
        l2: the regularization strength, a finite float > 0 (the problem is then l2-strongly
            convex with a unique optimum).

    Attributes:
        n, d: clients and dimension. offsets: [n + 1] int64. sizes: [n] samples per client.
        L: the smoothness constant of every f_i: max_i lambda_max(A_i^T A_i) / (4 m_i) + l2.
    """

    def __init__(self, A: torch.Tensor, y: torch.Tensor, parts: Sequence[torch.Tensor],
                 l2: float = 1e-3):  # fmt: skip
        v.tensor("A", A)
        v.tensor("y", y)
        if A.dim() != 2 or y.shape != (A.shape[0],):
            raise ValueError(f"A must be [N, d] and y [N], got {tuple(A.shape)} and "
                             f"{tuple(y.shape)}")  # fmt: skip
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("y must hold binary labels 0 and 1")
        if len(parts) < 1:
            raise ValueError("parts must name at least one client")
        v.fp32_scalar("l2", l2)  # a finite real number
        self.l2 = float(l2)
        if self.l2 <= 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        sizes = [int(p.numel()) for p in parts]
        if min(sizes) < 1:
            raise ValueError(f"every client needs a sample; client {sizes.index(0)} has none")
        order = torch.cat([torch.as_tensor(p, dtype=torch.int64) for p in parts])
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= A.shape[0]):
            raise ValueError(f"parts must index rows of A in [0, {A.shape[0]})")
        self.A = A.to(F64)[order].contiguous()
        self.s = (y.to(F64)[order] * 2 - 1).contiguous()
        self.n, self.d = len(parts), A.shape[1]
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.offsets = torch.zeros(self.n + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.sizes, 0)
        lmax = [
            float(torch.linalg.eigvalsh(self.A[a:b].T @ self.A[a:b])[-1]) / (4 * (b - a))
            for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True)
        ]
        self.L = max(lmax) + self.l2
        self._optimum: dict[tuple, tuple[torch.Tensor, float]] = {}

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
        if x.shape == (self.d,):
            return x.expand(k, -1)
        if x.shape == (k, self.d):
            return x
        raise ValueError(f"x must be [{self.d}] or [{k}, {self.d}], got {tuple(x.shape)}")

    def grads(self, x: torch.Tensor, clients=None, samples=None) -> torch.Tensor:
        """Local gradients, one row per client.

        Args:
            x: [d] (a shared model) or [c, d] (one per client), any float dtype.
            clients: client ids (c of them), default all.
            samples: optional list of c index tensors into each client's own samples (a
                minibatch; repeated indices count twice); default the full local data.

        Returns:
            [c, d] float64: row r is grad f_{clients[r]} at its model over its samples.
        """
        c = self._clients(clients)
        X = self._models(x, c.numel())
        G = torch.empty(c.numel(), self.d, dtype=F64)
        for r, rows in enumerate(self._client_rows(c, samples)):
            a, s = self.A[rows], self.s[rows]
            coef = -s * torch.sigmoid(-s * (a @ X[r]))
            G[r] = (coef @ a) / a.shape[0]
        return G + self.l2 * X

    def losses(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[c] float64: f_i(x) for each client (x shared [d] or per client [c, d])."""
        c = self._clients(clients)
        X = self._models(x, c.numel())
        out = torch.empty(c.numel(), dtype=F64)
        for r, rows in enumerate(self._client_rows(c, None)):
            margin = self.s[rows] * (self.A[rows] @ X[r])
            out[r] = torch.nn.functional.softplus(-margin).mean()
        return out + 0.5 * self.l2 * (X * X).sum(1)

    def loss(self, x: torch.Tensor, clients=None) -> float:
        """f(x) = mean over the clients (default all) of f_i(x), a float."""
        return float(self.losses(x, clients).mean())

    def grad(self, x: torch.Tensor, clients=None) -> torch.Tensor:
        """[d] float64: the gradient of f = mean over the clients of f_i, at a shared x."""
        return self.grads(x, clients).mean(0)

    def optimum(self, clients=None, *, tol: float = 1e-13) -> tuple[torch.Tensor, float]:
        """(x*, f*) of f over the clients (default all), by Newton's method in float64.

        Computed once per client set and cached. Stops when the gradient norm is below tol.
        """
        c = self._clients(clients)
        key = tuple(c.tolist())
        if key not in self._optimum:
            counts = self.sizes[c]
            rows = torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i + 1]))
                              for i in c.tolist()])  # fmt: skip
            w = torch.repeat_interleave(1.0 / counts.to(F64), counts) / c.numel()  # weight in f
            a, s = self.A[rows], self.s[rows]
            x = torch.zeros(self.d, dtype=F64)
            for _ in range(100):
                g = self.grad(x, c)
                if float(g.norm()) <= tol:
                    break
                p = torch.sigmoid(s * (a @ x))
                H = (a * (w * p * (1 - p))[:, None]).T @ a + self.l2 * torch.eye(self.d, dtype=F64)
                x = x - torch.linalg.solve(H, g)
            self._optimum[key] = (x, self.loss(x, c))
        x, f = self._optimum[key]
        return x.clone(), f

    def __repr__(self) -> str:
        return (f"LogisticRegression(n={self.n}, d={self.d}, samples={int(self.sizes.sum())}, "
                f"l2={self.l2:g}, L={self.L:.4g})")  # fmt: skip
