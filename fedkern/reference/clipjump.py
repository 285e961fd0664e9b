"""The fused clipped server jump of the (L0, L1) local methods in plain PyTorch: the oracle of the
"clipjump" op family, its fallback backend and the eager baseline.

Given the cohort's end points Y [c, p] (float32), the server point x [p], averaging weights w [c]
(float64, usually 1/c), the pseudo-gradient scale s (e.g. 1 / (gamma * tau)), c0 > 0, c1 >= 0 and
optionally an externally computed norm G (a float64 [1] tensor: the full gradient norm):

  ybar  = float(sum_r w[r] * double(Y[r]))      (fp64 accumulation in row order, one rounding)
  d     = x - ybar                               (fp32; the pseudo-gradient is g = s * d)
  gnorm = s * sqrt(sum_k double(d_k)^2)          (fp64: ||g||)
  theta = 1 / (c0 + c1 * (G if given else gnorm))    (fp64)
  x_new = x - float(theta * s) * d               (fp32)

Returns x_new [p] float32 and stats = [gnorm, theta] float64 [2], both on x's device; nothing is
read back to the host. With c1 = 0, x_new does not depend on the norm at all (the unclipped jump);
with c0 = s / server_lr, the step is FedAvg's x + server_lr (ybar - x) bit for bit when
float(theta * s) rounds to server_lr.
"""

from __future__ import annotations

import torch


def clip_jump(Y, x, w, s: float, c0: float, c1: float, G):
    """The module docstring's pass: (x_new [p] float32, stats [2] float64)."""
    ybar = (w.double()[:, None] * Y.double()).sum(0).float()
    d = x - ybar
    gnorm = s * d.double().pow(2).sum().sqrt()
    nrm = G.double().reshape(()) if G is not None else gnorm
    theta = 1.0 / (c0 + c1 * nrm)
    coef = (theta * s).float()
    return x - coef * d, torch.stack([gnorm, theta])
