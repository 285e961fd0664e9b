"""PCA as a Riemannian finite-sum problem split over nodes: the leading eigenvector on the sphere,
the k leading eigenvectors on the Stiefel manifold.

With samples z_j (rows of Z, N of them, owned by nodes: node i has the rows of parts[i]) and
C = Z^T Z / N,

  sphere  (k = 1):  f(x) = -(1/N) sum_j (z_j^T x)^2 = -x^T C x,          ||x|| = 1
  Stiefel (k > 1):  f(X) = -(1/N) sum_j ||X^T z_j||^2 = -tr(X^T C X),     X^T X = I_k
  f_i (node i):     the same mean over node i's samples;  f = sum_i (m_i / N) f_i

The minimizers span the top-k eigenvectors of C; f* = -(lambda_1 + ... + lambda_k). The ambient
gradient of one sample is -2 z (z^T X); the batched gradients of every node (full local data, a
keyed minibatch, or given samples) come from ``fedkern::client_grads`` (the clients family, least
squares kind with y = 0 and no regularization, times -2), so one call serves a whole cohort.
"""

from __future__ import annotations

import math

import torch

from fedkern import validation as v
from fedkern.clients import _samples_tensor, minibatch_keys
from fedkern.manifolds.geometry import Sphere, Stiefel
from fedkern.ops import clients as cops

__all__ = ["PCA"]

F64 = torch.float64
_LEAST_SQUARES = 2
_GD, _SGD, _SAMPLES = 0, 1, 3


class PCA:
    """The leading eigenvector (k = 1, sphere) or the k leading eigenvectors (Stiefel) of
    C = Z^T Z / N, with the samples split over nodes.

    Args:
        Z: [N, n] samples (any float dtype; kept in float64 for the metrics, float32 on
            ``device`` for the kernels). Not centered here.
        parts: a list of index tensors, node i's rows of Z (default one node with all of them);
            every node needs a sample.
        k: the number of eigenvectors, 1 <= k < n.
        seed: keys the nodes' minibatches (``client_seed(seed, node)``; the pooled single-node
            view uses node id 0).
        device: where the float32 data and the iterates live.

    Attributes:
        n (ambient dimension), k, nodes, N, sizes [nodes], manifold (``Sphere(n)`` or
        ``Stiefel(n, k)``), eigenvalues (descending, float64) and the top-k eigenvectors ``top``
        ([n] or [n, k]), gap = lambda_k - lambda_{k+1}, f_star, and the smoothness constants of
        the ambient gradients: L = 2 lambda_1(C), L_nodes [nodes] = 2 lambda_1(C_i),
        L_plus = sqrt(mean_i L_i^2), L_sample = 2 max_j ||z_j||^2, L_avg = sqrt(mean_j
        (2 ||z_j||^2)^2) (the mean-squared smoothness of the per-sample gradients).
    """

    has_optimum = True

    def __init__(self, Z: torch.Tensor, parts=None, *, k: int = 1, seed: int = 0, device="cpu"):
        v.tensor("Z", Z)
        if Z.dim() != 2 or Z.shape[0] < 1 or Z.shape[1] < 2:
            raise ValueError(f"Z must be [N, n] with N >= 1 and n >= 2, got {tuple(Z.shape)}")
        N, n = Z.shape
        self.k = v.integer("k", k, 1, n - 1)
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        if parts is None:
            parts = [torch.arange(N)]
        parts = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in parts]
        if not parts or min(p.numel() for p in parts) < 1:
            raise ValueError("parts must name at least one node, and every node needs a sample")
        order = torch.cat(parts)
        if int(order.min()) < 0 or int(order.max()) >= N:
            raise ValueError(f"parts must index rows of Z in [0, {N})")
        self.Z = Z.to(F64)[order].contiguous()
        self.N, self.n, self.nodes = self.Z.shape[0], n, len(parts)
        self.sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
        self.offsets = torch.zeros(self.nodes + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.sizes, 0)
        self.device = torch.device(device)
        self.A = self.Z.to(self.device, torch.float32).contiguous()
        self.y = torch.zeros(self.N, device=self.device)
        self._offsets = self.offsets.to(self.device)
        self._pooled = torch.tensor([0, self.N], dtype=torch.int64, device=self.device)
        self.manifold = Sphere(n) if self.k == 1 else Stiefel(n, self.k)
        self.C = self.Z.T @ self.Z / self.N
        evals, evecs = torch.linalg.eigh(self.C)
        self.eigenvalues, evecs = evals.flip(0), evecs.flip(1)
        self.top = evecs[:, 0] if self.k == 1 else evecs[:, : self.k]
        self.gap = float(self.eigenvalues[self.k - 1] - self.eigenvalues[self.k])
        self.f_star = -float(self.eigenvalues[: self.k].sum())
        self.L = 2 * float(self.eigenvalues[0])
        self.L_nodes = torch.tensor([
            2 * float(torch.linalg.eigvalsh(self.Z[a:b].T @ self.Z[a:b] / (b - a))[-1])
            for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True)
        ], dtype=F64)  # fmt: skip
        self.L_plus = float(self.L_nodes.pow(2).mean().sqrt())
        sq = 2 * self.Z.pow(2).sum(1)
        self.L_sample, self.L_avg = float(sq.max()), float(sq.pow(2).mean().sqrt())

    # ---- constructors ---------------------------------------------------------------------------

    @classmethod
    def synthetic(cls, n: int, N: int, spectrum, *, nodes: int = 1, k: int = 1, seed: int = 0,
                  device="cpu") -> PCA:  # fmt: skip
        """Samples whose covariance C = Z^T Z / N has exactly the given spectrum (descending, n
        values, so the gap lambda_k - lambda_{k+1} is known): Z = sqrt(N) W diag(sqrt(lambda))
        Q^T with W [N, n] and Q [n, n] orthonormal (QR of counter-based Gaussians keyed by
        ``seed``); the rows are split into ``nodes`` contiguous nodes of near-equal size."""
        from fedkern.manifolds.geometry import gaussian
        from fedkern.reference.manifolds import qf

        lam = torch.as_tensor(spectrum, dtype=F64)
        if lam.shape != (n,) or bool((lam < 0).any()) or bool((lam[1:] > lam[:-1]).any()):
            raise ValueError(f"spectrum must hold {n} descending values >= 0")
        if N < n:
            raise ValueError(f"need N >= n samples, got N = {N}, n = {n}")
        W = qf(gaussian((N, n), seed, step=1, dtype=F64))
        Q = qf(gaussian((n, n), seed, step=2, dtype=F64))
        Z = math.sqrt(N) * (W * lam.sqrt()) @ Q.T
        parts = list(torch.tensor_split(torch.arange(N), nodes))
        return cls(Z, parts, k=k, seed=seed, device=device)

    # ---- float64 metrics -------------------------------------------------------------------------

    def _mat(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", F64)
        return x.reshape(self.n, self.k)

    def loss(self, x: torch.Tensor) -> float:
        """f(x) = -tr(X^T C X) in float64."""
        X = self._mat(x)
        return -float((X * (self.C @ X)).sum())

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """The Riemannian gradient of f at x (float64, x's shape): proj_x(-2 C x)."""
        X = self._mat(x)
        G = -2 * self.C @ X
        G = G - X @ ((X.T @ G + G.T @ X) / 2)
        return G.reshape(x.shape)

    def angle(self, x: torch.Tensor) -> float:
        """The largest principal angle (radians, in [0, pi/2]) between span(x) and the top-k
        eigenvectors: asin ||(I - V V^T) X||_2 for orthonormal X (accurate near 0)."""
        X = self._mat(x)
        V = self.top.reshape(self.n, self.k)
        R = X - V @ (V.T @ X)
        s = float(R.norm()) if self.k == 1 else float(torch.linalg.matrix_norm(R, ord=2))
        return math.asin(min(1.0, s))

    # ---- batched ambient gradients (float32 kernels) ---------------------------------------------

    def egrads(self, X: torch.Tensor, nodes=None, *, mode: str = "gd", batch_size: int = 1,
               step: int = 0, samples=None, pooled: bool = False) -> torch.Tensor:  # fmt: skip
        """Ambient gradients of the nodes' losses at their points, in one kernel call.

        Args:
            X: float32 [c, n] (sphere) or [c, n, k] (Stiefel) on ``device``, one point per node;
                not modified.
            nodes: the node ids of the rows (default 0..nodes-1); with ``pooled`` one row and
                the whole data set as a single node (the finite sum over all N samples).
            mode: "gd" (every sample of the node), or "sgd": min(b, m_i) samples without
                replacement keyed by (seed, node, step) -- two calls with the same step use the
                same samples.
            batch_size, step: the minibatch size and key (sgd).
            samples: instead of mode, a list of index tensors (local indices) per row.

        Returns:
            float32, X's shape: row r = -(2/|B_r|) sum_{j in B_r} z_j (z_j^T X_r).
        """
        c = X.shape[0]
        if pooled:
            ids, offsets = torch.zeros(c, dtype=torch.int64), self._pooled
        else:
            ids = torch.arange(self.nodes) if nodes is None else torch.as_tensor(nodes)
            ids, offsets = ids.to(torch.int64).reshape(-1), self._offsets
        if ids.shape[0] != c:
            raise ValueError(f"X must have one row per node ({ids.shape[0]}), got {c}")
        k = self.k
        if X.shape[1:] != ((self.n,) if k == 1 else (self.n, k)):
            raise ValueError(f"X must be [c, {self.n}{'' if k == 1 else f', {k}'}], got "
                             f"{tuple(X.shape)}")  # fmt: skip
        rows = X if k == 1 else X.transpose(1, 2).reshape(c * k, self.n)
        rid = ids if k == 1 else ids.repeat_interleave(k)
        keys = smp = None
        if samples is not None:
            tag = _SAMPLES
            smp = _samples_tensor(samples, c)
            smp = (smp if k == 1 else smp.repeat_interleave(k, 0)).to(self.device)
        elif mode == "sgd":
            tag = _SGD
            t = v.integer("step", step, 0)
            keys = minibatch_keys(self.seed, rid, t).to(self.device)
        elif mode == "gd":
            tag = _GD
        else:
            raise ValueError(f"mode must be 'gd' or 'sgd', got {mode!r}")
        G = cops.client_grads(rows.contiguous(), rid.to(self.device), self.A, self.y, offsets,
                              _LEAST_SQUARES, 1, 0.0, tag, v.integer("batch_size", batch_size, 1),
                              keys, smp)  # fmt: skip
        G = G * -2.0
        return G if k == 1 else G.reshape(c, k, self.n).transpose(1, 2).contiguous()

    def __repr__(self) -> str:
        return (f"PCA(n={self.n}, k={self.k}, N={self.N}, nodes={self.nodes}, "
                f"gap={self.gap:.4g}, L={self.L:.4g})")  # fmt: skip
