"""Batched per-client local training in plain PyTorch: the oracle the kernels are tested against,
and the fallback backend. The losses are those of ``fedkern.problems``; here each cohort client
runs its K local steps in a Python loop, in float32 (the clipping norm in float64), one batch
update at a time:

  for t < K: for each batch B of the step (gd: all samples in order; sgd: the first b entries of
  the permutation perm_t; rr: perm_t cut into batches of b):
      g = mean_{j in B} grad loss(x; a_j, y_j) + l2 x  (+ mu (x - anchor))
      u = g - h (if H);  u = min(1, clip / ||u||) u (if clip > 0);  x = x - gamma u
perm_t is the keyed Feistel permutation of rand-k with the round keys keys[r, t].
"""

from __future__ import annotations

import torch

from fedkern.random import feistel_params
from fedkern.reference.randk import feistel

KIND_TAG = {"logistic": 0, "multinomial": 1, "least_squares": 2}
MODE_TAG = {"gd": 0, "sgd": 1, "rr": 2}


def permutation(n: int, keys) -> torch.Tensor:
    """perm(0..n-1) of the keyed Feistel permutation of [0, n) (rand-k's, not sorted)."""
    h, mask = feistel_params(max(n, 1))
    x = feistel(torch.arange(n, dtype=torch.int64), [int(k) for k in keys], h, mask)
    walk = torch.nonzero(x >= n).flatten()
    while walk.numel():  # cycle walking
        x[walk] = feistel(x[walk], [int(k) for k in keys], h, mask)
        walk = walk[x[walk] >= n]
    return x


def batch_grad(kind: int, classes: int, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor):
    """Mean loss gradient over the samples a [m, d], y [m] at x [p], float32 (0 when m = 0)."""
    if a.shape[0] == 0:
        return torch.zeros_like(x)
    if kind == 0:
        s = 2 * y - 1
        r = -s * torch.sigmoid(-s * (a @ x))
        return (r @ a) / a.shape[0]
    if kind == 2:
        return ((a @ x - y) @ a) / a.shape[0]
    d = a.shape[1]
    P = torch.softmax(a @ x.view(classes, d).T, 1)
    P[torch.arange(a.shape[0]), y.long()] -= 1
    return (P.T @ a).reshape(-1) / a.shape[0]


def step_loop_(X, clients, offsets, K, gamma, H, mode, b, keys, clip, grad) -> torch.Tensor:
    """The local-step loop shared by the batched client ops (this module's and the quartic's), in
    place on X [c, p]: for every cohort row r (client i = clients[r], which owns the data rows
    offsets[i] .. offsets[i+1]), K steps, each a sequence of batches (gd: all m_i rows in order;
    sgd: the first min(b, m_i) of perm_t; rr: perm_t cut into batches of b), each batch
        u = grad(r, x, rows) - H[r] (if H);  u = min(1, clip / ||u||) u (if clip > 0, the norm in
        float64);  x = x - gamma u
    where ``rows`` are the batch's data rows (int64, absolute) and perm_t the keyed permutation of
    [0, m_i) under keys[r, t]. Returns X."""
    off = offsets.tolist()
    for r, i in enumerate(clients.tolist()):
        lo, m = off[i], off[i + 1] - off[i]
        x = X[r].clone()
        for t in range(K):
            if mode == 0 or m == 0:
                batches = [torch.arange(m)]
            else:
                perm = permutation(m, keys[r, t])
                batches = [perm[: min(b, m)]] if mode == 1 else list(torch.split(perm, b))
            for B in batches:
                u = grad(r, x, lo + B)
                if H is not None:
                    u = u - H[r]
                if clip > 0:
                    nrm = float(u.double().norm())
                    if nrm > clip:
                        u = u * torch.tensor(clip / nrm, dtype=torch.float32)
                x = x - gamma * u
        X[r] = x
    return X


def local_steps_(X, clients, A, y, offsets, kind, classes, K, gamma, l2, H, mode, b, keys, clip,
                 mu, anchor):  # fmt: skip
    """In place on X [c, p]: K local steps for every cohort row (see the module docstring)."""

    def grad(r, x, rows):
        g = batch_grad(kind, classes, x, A[rows], y[rows]) + l2 * x
        return g + mu * (x - anchor[r]) if mu else g

    return step_loop_(X, clients, offsets, K, gamma, H, mode, b, keys, clip, grad)


def scaffnew_sync_(X, H, coef: float):
    """xbar = mean of the rows of X; H += coef (xbar - X); X = xbar. Returns xbar [p].

    The rows are added in row order in fp32 (as the C++ and Triton kernels do; torch's sum(0)
    may reorder), then divided by c, so every backend returns the same bits."""
    acc = X[0].clone()
    for r in range(1, X.shape[0]):
        acc = acc + X[r]
    xbar = acc / torch.tensor(float(X.shape[0]), dtype=torch.float32, device=X.device)
    H += coef * (xbar - X)
    X.copy_(xbar.expand_as(X))
    return xbar


def weighted_sum(X, w):
    """sum_r w[r] X[r] in float64, rounded to float32 once: [p]."""
    return (w.double()[:, None] * X.double()).sum(0).float()


GRAD_MODE_TAG = {"gd": 0, "sgd": 1, "samples": 3}


def client_grads(X, clients, A, y, offsets, kind, classes, l2, mode, b, keys, samples):
    """[c, p] float32: row r = client clients[r]'s gradient at X[r] on one batch B_r,

      G[r] = (1/|B_r|) sum_{j in B_r} grad loss(X[r]; a_j, y_j) + l2 X[r]   (0 + l2 X[r] if empty)

    B_r: gd (mode 0) all m_i samples in order; sgd (mode 1) the first min(b, m_i) entries of the
    keyed permutation of [0, m_i) under keys[r] (local_steps_'s sgd batch); samples (mode 3) the
    non-negative entries of samples[r] in order (repeats count, -1 is padding).
    """
    off = offsets.tolist()
    G = torch.empty_like(X)
    for r, i in enumerate(clients.tolist()):
        a_all, y_all = A[off[i] : off[i + 1]], y[off[i] : off[i + 1]]
        m = a_all.shape[0]
        if mode == 0:
            B = torch.arange(m)
        elif mode == 1:
            B = permutation(m, keys[r])[: min(b, m)] if m else torch.arange(0)
        else:
            B = samples[r][samples[r] >= 0].cpu()
        x = X[r].clone()  # an aligned copy, as local_steps_ (BLAS kernels can depend on alignment)
        if B.numel():
            G[r] = batch_grad(kind, classes, x, a_all[B], y_all[B]) + l2 * x
        else:
            G[r] = 0.0 + l2 * x
    return G
