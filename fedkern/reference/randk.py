"""Reference rand-k: k distinct uniformly spread indices from a keyed permutation.

perm is a balanced Feistel network on b = 2h bits (2**b >= n) with eight rounds,
F(R, K) = mix32(R ^ K) & mask, mix32 the "lowbias32" integer hash, made a permutation of [0, n) by
cycle walking (re-apply until the value falls below n). The index set is {perm(i) : i < k}, returned
in ascending order; the round keys come from ``fedkern.random.randk_keys(seed, step)``.

values = round(x[I] * scale) with scale = fp32(n / k) for the unbiased form and 1 otherwise.
EF14:  a = round(e + lr*g); e <- a; c = round(a[I]*scale); e[I] <- round(a[I] - c); send c.
EF21:  d = round(g[I] - s[I]); c = round(d*scale); s[I] <- round(s[I] + c); send c.
"""

from __future__ import annotations

import torch

from fedkern.random import feistel, feistel_params


def randk_indices(n: int, k: int, keys, device=None) -> torch.Tensor:
    """Ascending int64 indices {perm(i) : i < k} of the keyed permutation of [0, n)."""
    h, mask = feistel_params(n)
    x = feistel(torch.arange(k, dtype=torch.int64, device=device), keys, h, mask)
    walk = torch.nonzero(x >= n).flatten()
    while walk.numel():  # cycle walking, on the lanes still outside [0, n) only
        x[walk] = feistel(x[walk], keys, h, mask)
        walk = walk[x[walk] >= n]
    return torch.sort(x).values


def _scaled(v: torch.Tensor, scale: float) -> torch.Tensor:
    return (v.float() * scale).to(v.dtype)


def randk_compress(x, k: int, keys, scale: float):
    """values = round(x[I] * scale) (1-D contiguous x)."""
    idx = randk_indices(x.numel(), k, keys, x.device)
    return _scaled(x[idx], scale), idx


def ef14_randk_(grad, error, k: int, keys, lr: float, scale: float):
    """Classic error feedback with rand-k; mutates ``error``."""
    error.copy_((error.float() + grad.float() * lr).to(error.dtype))
    idx = randk_indices(error.numel(), k, keys, error.device)
    a = error[idx]
    c = _scaled(a, scale)
    error[idx] = (a.float() - c.float()).to(error.dtype)
    return c, idx


def ef21_randk_(grad, state, k: int, keys, scale: float):
    """EF21 with rand-k; touches only the k selected coordinates of ``state``."""
    idx = randk_indices(state.numel(), k, keys, state.device)
    s = state[idx]
    c = _scaled((grad[idx].float() - s.float()).to(state.dtype), scale)
    state[idx] = (s.float() + c.float()).to(state.dtype)
    return c, idx
