"""Benchmarks of the topk family: topk_compress, ef14_topk_, ef21_topk_ (1-D, k = 1% of n).

Eager baselines (the indices unsorted as torch returns them):

  topk_compress   i = x.abs().topk(k, sorted=False).indices; v = x[i]
  ef14_topk_      e.add_(g, alpha=lr); i = e.abs().topk(k, sorted=False).indices; v = e[i]; e[i] = 0
  ef21_topk_      d = g - s; i = d.abs().topk(k, sorted=False).indices; v = d[i]; s[i] += v

Cases: quick n = 1e6 and 1e7 fp32, and topk_compress at 1e7 in bf16; full adds bf16 everywhere and,
on CUDA, n = 1e8 and 1e9.
"""

from __future__ import annotations

import torch

import fedkern
from fedkern.benchmarks.core import (
    LR,
    Case,
    Prepared,
    cases,
    dense_cases,
    min_bytes,
    nothing,
    prepare_feedback,
    randn,
    register,
)

OPS = ("topk_compress", "ef14_topk_", "ef21_topk_")


def eager_topk(x: torch.Tensor, k: int):
    """(values, indices) of the k largest |x|, the way eager PyTorch does it."""
    i = x.abs().topk(k, sorted=False).indices
    return x[i], i


def eager_ef14_topk_(g, e, k: int, *, lr: float = 1.0):
    """Classic error feedback with top-k in eager PyTorch; mutates ``e``."""
    e.add_(g, alpha=lr)
    i = e.abs().topk(k, sorted=False).indices
    v = e[i]
    e[i] = 0
    return v, i


def eager_ef21_topk_(g, s, k: int):
    """EF21 with top-k in eager PyTorch; mutates ``s``."""
    d = g - s
    i = d.abs().topk(k, sorted=False).indices
    v = d[i]
    s[i] += v
    return v, i


def _setup_compress(case, device, gen):
    x = randn(case.n, case, device, gen)
    return Prepared(
        fedkern=lambda: fedkern.topk_compress(x, case.k),
        eager=lambda: eager_topk(x, case.k),
        rearm_fedkern=nothing,
        rearm_eager=nothing,
        nbytes=min_bytes(case),
        tensors={"x": x},
    )


def _setup_feedback(case, device, gen):
    k = case.k
    if case.op == "ef14_topk_":
        return prepare_feedback(
            case,
            device,
            gen,
            lambda g, e: fedkern.ef14_topk_(g, e, k, lr=LR),
            lambda g, e: eager_ef14_topk_(g, e, k, lr=LR),
        )
    return prepare_feedback(
        case,
        device,
        gen,
        lambda g, s: fedkern.ef21_topk_(g, s, k),
        lambda g, s: eager_ef21_topk_(g, s, k),
    )


def _out(case):  # values + int64 indices written
    return case.k * (case.dtype.itemsize + 8)


register("topk_compress", family="topk", setup=_setup_compress, position=100,
         full_pass=True, eager="x.abs().topk(k, sorted=False) + x[i]",
         nbytes=lambda c: c.n * c.dtype.itemsize + _out(c))  # fmt: skip
# read g, read + write e
register("ef14_topk_", family="topk", setup=_setup_feedback, position=120,
         full_pass=True,
         eager="e.add_(g, alpha=lr); topk(e.abs()); v = e[i]; e[i] = 0",
         nbytes=lambda c: 3 * c.n * c.dtype.itemsize + _out(c))  # fmt: skip


def _ef21_bytes(c):  # read g, s; write s at k entries
    return 2 * c.n * c.dtype.itemsize + c.k * c.dtype.itemsize + _out(c)


register("ef21_topk_", family="topk", setup=_setup_feedback, position=130,
         full_pass=True, eager="d = g - s; topk(d.abs()); v = d[i]; s[i] += v",
         nbytes=_ef21_bytes)  # fmt: skip


@cases("topk")
def _cases(suite, device, sizes):
    out = dense_cases(OPS, suite, device, sizes)
    if suite == "quick":
        out.append(Case("topk_compress", 10**7, 10**5, torch.bfloat16))
    return out
