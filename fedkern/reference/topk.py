"""Reference top-k selection and the error-feedback updates built on it.

key(v) = bits(fp32(v)) & 0x7fffffff, with every NaN mapped to 0x7f800001: the order of |v| with
-0 == +0 and NaN above +inf. top-k keeps the k largest keys, equal keys resolved toward the lower
index, and returns the indices in ascending order.

EF14:  a = round(e + lr*g); e <- a; I = topk(key(a)); values = a[I]; e[I] <- 0.
EF21:  d = round(g - s); I = topk(key(d)); values = d[I]; s[I] <- round(s[I] + d[I]).
"""

from __future__ import annotations

import torch

_NAN_KEY = 0x7F800001


def keys(x: torch.Tensor) -> torch.Tensor:
    """int64 selection keys of a float32/bfloat16 tensor (see module docstring)."""
    bits = x.float().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    return torch.where(bits > 0x7F800000, torch.full_like(bits, _NAN_KEY), bits)


def select(key: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending int64 indices of the k largest keys, ties toward the lower index."""
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def topk_compress(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values = x[I], I = the k entries of largest |x| (1-D contiguous x)."""
    idx = select(keys(x), k)
    return x[idx], idx


def ef14_topk_(grad, error, k: int, lr: float):
    """Classic error feedback with top-k; mutates ``error`` (lr is an fp32-exact float)."""
    a = (error.float() + grad.float() * lr).to(error.dtype)
    idx = select(keys(a), k)
    values = a[idx]
    a[idx] = 0
    error.copy_(a)
    return values, idx


def ef21_topk_(grad, state, k: int):
    """EF21 with top-k; mutates ``state`` at the selected coordinates only."""
    d = (grad.float() - state.float()).to(state.dtype)
    idx = select(keys(d), k)
    values = d[idx]
    state[idx] = (state[idx].float() + values.float()).to(state.dtype)
    return values, idx
