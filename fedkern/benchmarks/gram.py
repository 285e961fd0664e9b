"""Benchmarks of the gram family: Krum over a stack X of m client vectors [m, n], f = k = m // 4.

Eager baseline: D = torch.cdist(X, X) ** 2 (diagonal inf); scores = the m - f - 2 smallest per
row summed; X[scores.argmin()]. fedkern's Krum takes its distances from the fp64 Gram matrix (op
``gram``, whose backend the record reports). Cases: quick n = 1e6 with m = 16; full m = 16, 64,
256 for n = 1e5, 1e6 (fp32).
"""

from __future__ import annotations

import math

import torch

from fedkern import robust as R
from fedkern.benchmarks.core import (
    Prepared,
    cases,
    min_bytes,
    nothing,
    register,
    rows_footprint,
    stack_cases,
    stack_of,
)


def eager_sqdist(x: torch.Tensor) -> torch.Tensor:
    """Squared distances between the rows of x by torch.cdist, the diagonal set to inf."""
    D = torch.cdist(x.float(), x.float()) ** 2
    return D.fill_diagonal_(math.inf)


def _setup(case, device, gen):
    x, m, f = stack_of(case, device, gen), case.m, case.k

    def eager():
        scores = eager_sqdist(x).topk(m - f - 2, dim=1, largest=False).values.sum(1)
        return x[scores.argmin()]

    return Prepared(
        fedkern=lambda: R.krum(x, f),
        eager=eager,
        rearm_fedkern=nothing,
        rearm_eager=nothing,
        nbytes=min_bytes(case),
        tensors={"x": x},
    )


# one read (the winner's copy is small)
register("krum", family="gram", setup=_setup, position=500, by_size=False,
         stacked=True, impl_op="gram",
         eager="torch.cdist(X, X)**2 -> scores -> X[argmin]",
         nbytes=lambda c: c.m * c.n * c.dtype.itemsize, footprint=rows_footprint)  # fmt: skip


@cases("gram")
def _cases(suite, device, sizes):
    return stack_cases({"krum": lambda d, m: m // 4}, suite, sizes)
