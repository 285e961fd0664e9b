"""Benchmarks of the randk family: randk_compress, ef14_randk_, ef21_randk_ (1-D, k = 1% of n).

Eager baselines (indices from torch.randperm, as a user draws a fresh mask; every fedkern call
advances ``step``, as training does):

  randk_compress   i = torch.randperm(n)[:k]; v = x[i] * (n/k)
  ef14_randk_      e.add_(g, alpha=lr); i = torch.randperm(n)[:k]; v = e[i]; e[i] = 0
  ef21_randk_      i = torch.randperm(n)[:k]; v = g[i] - s[i]; s[i] += v

Cases: quick n = 1e6 and 1e7 fp32; full adds bf16 everywhere and, on CUDA, n = 1e8 and 1e9.
"""

from __future__ import annotations

import itertools

import torch

import fedkern
from fedkern.benchmarks.core import (
    LR,
    SEED,
    Prepared,
    cases,
    dense_cases,
    min_bytes,
    nothing,
    prepare_feedback,
    randn,
    register,
)

OPS = ("randk_compress", "ef14_randk_", "ef21_randk_")


def _perm(n: int, k: int, device) -> torch.Tensor:
    return torch.randperm(n, device=device)[:k]


def eager_randk(x: torch.Tensor, k: int, *, unbiased: bool = True, indices=None):
    """Rand-k through randperm; ``indices`` replaces the draw (tests compare like with like)."""
    n = x.numel()
    i = _perm(n, k, x.device) if indices is None else indices
    v = x[i]
    return (v * (n / k) if unbiased else v), i


def eager_ef14_randk_(g, e, k: int, *, lr: float = 1.0, unbiased: bool = False, indices=None):
    """Classic error feedback with rand-k (randperm) in eager PyTorch; mutates ``e``."""
    n = e.numel()
    e.add_(g, alpha=lr)
    i = _perm(n, k, e.device) if indices is None else indices
    if unbiased:
        v = e[i] * (n / k)
        e[i] -= v
    else:
        v = e[i]
        e[i] = 0
    return v, i


def eager_ef21_randk_(g, s, k: int, *, unbiased: bool = False, indices=None):
    """EF21 with rand-k (randperm) in eager PyTorch; mutates ``s``."""
    n = s.numel()
    i = _perm(n, k, s.device) if indices is None else indices
    v = g[i] - s[i]
    if unbiased:
        v = v * (n / k)
    s[i] += v
    return v, i


def _setup_compress(case, device, gen):
    x = randn(case.n, case, device, gen)
    step = itertools.count()
    return Prepared(
        fedkern=lambda: fedkern.randk_compress(x, case.k, seed=SEED, step=next(step)),
        eager=lambda: eager_randk(x, case.k, unbiased=True),
        rearm_fedkern=nothing,
        rearm_eager=nothing,
        nbytes=min_bytes(case),
        tensors={"x": x},
    )


def _setup_feedback(case, device, gen):
    k, step = case.k, itertools.count()
    if case.op == "ef14_randk_":
        return prepare_feedback(
            case,
            device,
            gen,
            lambda g, e: fedkern.ef14_randk_(g, e, k, seed=SEED, step=next(step), lr=LR),
            lambda g, e: eager_ef14_randk_(g, e, k, lr=LR),
        )
    return prepare_feedback(
        case,
        device,
        gen,
        lambda g, s: fedkern.ef21_randk_(g, s, k, seed=SEED, step=next(step)),
        lambda g, s: eager_ef21_randk_(g, s, k),
    )


def _out(case):  # values + int64 indices written
    return case.k * (case.dtype.itemsize + 8)


# gathers k entries
register("randk_compress", family="randk", setup=_setup_compress, position=110,
         eager="x[randperm(n)[:k]] * (n/k)",
         nbytes=lambda c: c.k * c.dtype.itemsize + _out(c))  # fmt: skip
register("ef14_randk_", family="randk", setup=_setup_feedback, position=140,
         full_pass=True,
         eager="e.add_(g, alpha=lr); i = randperm(n)[:k]; v = e[i]; e[i] = 0",
         nbytes=lambda c: 3 * c.n * c.dtype.itemsize + _out(c))  # fmt: skip
# g[I], s[I] read, s[I] written
register("ef21_randk_", family="randk", setup=_setup_feedback, position=150,
         eager="i = randperm(n)[:k]; v = g[i] - s[i]; s[i] += v",
         nbytes=lambda c: 3 * c.k * c.dtype.itemsize + _out(c))  # fmt: skip


@cases("randk")
def _cases(suite, device, sizes):
    return dense_cases(OPS, suite, device, sizes)
