"""Reference MAST sketch ops: w = v + S(x - v) and x -= gamma S^T g over a batch of node sketches.

S_r is diagonal: coordinate j of row r is kept with scale s, or dropped.
  perm kind (Rand-K, partition): kept = {perm_r(t) : lo_r <= t < hi_r}, perm_r the keyed Feistel
      permutation of [0, d) of rand-k (``fedkern.reference.randk``) under keys[r] (8 words),
      s = scale[r] (fp32).
  bernoulli kind: kept iff (word_j >> 8) < T_j, word_j entry j of the Philox draw with key words
      keys[r] (4 words; ``fedkern.reference.random``), T_j = ceil(p_j 2^24), s_j = 2^24 / T_j.
Numerics (fp32, no FMA, one rounding to the dtype on store):
  apply:      kept: w = v + round32(s * round32(x - v))   (v = None: w = s * x);  else w = v (+0)
  grad_step:  kept: c = round32(gamma * s);  x = x - round32(c * g);  else x unchanged
With one shared x [d] and R rows of g, the rows are applied one after the other in row order.
These functions take validated contiguous tensors: x [Rx, d] (Rx = R, or 1 = shared), v None or
[Rv, d] (Rv = R or 1), g [R, d]; keys int64 [R, 8] (perm) or [R, 4] (bernoulli).
"""

from __future__ import annotations

import torch

from fedkern.random import feistel, feistel_params
from fedkern.reference import random as rnd

F32 = torch.float32


def perm_positions(d: int, keys, lo: int, hi: int) -> torch.Tensor:
    """perm(lo .. hi - 1) of the keyed Feistel permutation of [0, d): int64 [hi - lo]."""
    keys = [int(k) for k in keys]
    h, mask = feistel_params(d)
    x = feistel(torch.arange(lo, hi, dtype=torch.int64), keys, h, mask)
    walk = torch.nonzero(x >= d).flatten()
    while walk.numel():  # cycle walking
        x[walk] = feistel(x[walk], keys, h, mask)
        walk = walk[x[walk] >= d]
    return x


def bern_keep(d: int, key, p) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep flags bool [d], scales float32 [d]) of one Bernoulli row; p a float or tensor [d]."""
    c = (rnd.words(d, [int(k) for k in key]) >> 8).to(F32)
    if isinstance(p, torch.Tensor):
        T = rnd.thresholds(p.cpu())
        s = (16777216.0 / T.double()).float()  # IEEE fp32 division (exact in float64, rounded)
    else:
        T = torch.full((d,), float(rnd.threshold(p)), dtype=F32)
        s = torch.full((d,), rnd.keep_scale(p), dtype=F32)
    return c < T, s


def _rows(R: int, t: torch.Tensor | None):
    if t is None:
        return [None] * R
    return [t[0]] * R if t.shape[0] == 1 else list(t)


def _apply_row(x, v, idx, s):
    """The sketched row: dense v (or +0), kept entries idx updated with scales s (fp32 [k])."""
    out = v.clone() if v is not None else torch.zeros_like(x)
    xf = x[idx].float()
    if v is None:
        out[idx] = (s * xf).to(x.dtype)
    else:
        vf = v[idx].float()
        out[idx] = (vf + s * (xf - vf)).to(x.dtype)
    return out


def perm_apply(x, v, keys, ranges, scale):
    """[R, d]: row r = v_r + S_r (x_r - v_r) for the perm kind."""
    R, d = keys.shape[0], x.shape[1]
    xs, vs = _rows(R, x), _rows(R, v)
    out = []
    for r in range(R):
        idx = perm_positions(d, keys[r].tolist(), int(ranges[r, 0]), int(ranges[r, 1]))
        s = torch.full((idx.numel(),), float(scale[r]), dtype=F32)
        out.append(_apply_row(xs[r], vs[r], idx, s))
    return torch.stack(out)


def perm_grad_step_(x, g, keys, ranges, scale, gamma: float):
    """In place on x [R or 1, d]: x_r -= gamma S_r g_r (perm kind); returns x."""
    R, d = keys.shape[0], x.shape[1]
    for r in range(R):
        idx = perm_positions(d, keys[r].tolist(), int(ranges[r, 0]), int(ranges[r, 1]))
        c = torch.tensor(gamma, dtype=F32) * scale[r].float()
        xr = x[r if x.shape[0] > 1 else 0]
        xr[idx] = (xr[idx].float() - c * g[r, idx].float()).to(x.dtype)
    return x


def bern_apply(x, v, keys, p):
    """[R, d]: row r = v_r + S_r (x_r - v_r) for the Bernoulli kind."""
    R, d = keys.shape[0], x.shape[1]
    xs, vs = _rows(R, x), _rows(R, v)
    out = []
    for r in range(R):
        keep, s = bern_keep(d, keys[r].tolist(), p)
        idx = torch.nonzero(keep).flatten()
        out.append(_apply_row(xs[r], vs[r], idx, s[idx]))
    return torch.stack(out)


def bern_grad_step_(x, g, keys, p, gamma: float):
    """In place on x [R or 1, d]: x_r -= gamma S_r g_r (Bernoulli kind); returns x."""
    R, d = keys.shape[0], x.shape[1]
    for r in range(R):
        keep, s = bern_keep(d, keys[r].tolist(), p)
        idx = torch.nonzero(keep).flatten()
        c = torch.tensor(gamma, dtype=F32) * s[idx]
        xr = x[r if x.shape[0] > 1 else 0]
        xr[idx] = (xr[idx].float() - c * g[r, idx].float()).to(x.dtype)
    return x
