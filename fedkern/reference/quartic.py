"""Batched local steps on the quartic f_i(x) = (1/m_i) sum_j ||x - x_j||^4 in plain PyTorch: the
oracle of the "quartic" op family, its fallback backend and the eager baseline.

Each cohort row r (client i = clients[r], its points P = points[offsets[i]:offsets[i+1]]) runs K
local steps in float32 (the clipping norm in float64), one batch update at a time:

  for t < K: for each batch B of the step (gd: all m_i points in order; sgd: the first min(b, m_i)
  entries of perm_t; rr: perm_t cut into consecutive batches of b, the last may be short):
      D_j = x - x_j;  s_j = ||D_j||^2;  g = fp32(4 / |B|) * sum_{j in B} s_j D_j  (0 if m_i = 0)
      u = g - h (if H);  u = min(1, clip / ||u||) u (if clip > 0);  x = x - gamma u
perm_t is the keyed Feistel permutation of rand-k at the round keys keys[r, t] (the permutation of
``fedkern.reference.clients``, so the quartic and the convex problems draw the same minibatches).
"""

from __future__ import annotations

import torch

from fedkern.reference.clients import step_loop_

MODE_TAG = {"gd": 0, "sgd": 1, "rr": 2}


def batch_grad(x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """(4/|B|) sum_j ||x - p_j||^2 (x - p_j) over the points P [m, d], float32 (0 when m = 0)."""
    if P.shape[0] == 0:
        return torch.zeros_like(x)
    D = x - P
    s = (D * D).sum(1)
    return torch.tensor(4.0 / P.shape[0], dtype=torch.float32) * (s[:, None] * D).sum(0)


def local_steps_(X, clients, points, offsets, K, gamma, H, mode, b, keys, clip):
    """In place on X [c, d]: K local steps of every cohort row (module docstring); returns X."""
    return step_loop_(X, clients, offsets, K, gamma, H, mode, b, keys, clip,
                      lambda r, x, rows: batch_grad(x, points[rows]))  # fmt: skip
