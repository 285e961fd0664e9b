"""Benchmarks of the robust family (coordinate-wise): a stack X of m client vectors [m, n].

  coordinate_median   torch.median(X, dim=0).values (for even m torch returns the lower middle
                      value; fedkern the mean of both)
  trimmed_mean        X.sort(dim=0).values[f:m-f].mean(0), f = k = m // 4

Cases: quick n = 1e6 with m = 64; full m = 16, 64, 256 for n = 1e5, 1e6 (fp32).
"""

from __future__ import annotations

import torch

import fedkern
from fedkern.benchmarks.core import (
    Prepared,
    cases,
    min_bytes,
    nothing,
    register,
    stack_cases,
    stack_of,
)


def _setup(case, device, gen):
    x = stack_of(case, device, gen)
    m, f = case.m, case.k
    if case.op == "coordinate_median":
        fk = lambda: fedkern.robust.coordinate_median(x)  # noqa: E731
        eg = lambda: torch.median(x, dim=0).values  # noqa: E731
    else:
        fk = lambda: fedkern.robust.trimmed_mean(x, f)  # noqa: E731
        eg = lambda: x.sort(dim=0).values[f : m - f].mean(0)  # noqa: E731
    return Prepared(
        fedkern=fk,
        eager=eg,
        rearm_fedkern=nothing,
        rearm_eager=nothing,
        nbytes=min_bytes(case),
        tensors={"x": x},
    )


def _bytes(case):  # read the stack, write one vector
    return case.m * case.n * case.dtype.itemsize + case.n * case.dtype.itemsize


def _footprint(case):  # X, the sorted copy and its int64 indices, fp32 temporaries
    return case.m * case.n * (2 * case.dtype.itemsize + 8 + 8)


_EAGER = {
    "coordinate_median": (400, "torch.median(X, dim=0).values"),
    "trimmed_mean": (410, "X.sort(dim=0).values[f:m-f].mean(0)"),
}
for _op, (_pos, _eager) in _EAGER.items():
    register(_op, family="robust", setup=_setup, eager=_eager, nbytes=_bytes,
             position=_pos, by_size=False, stacked=True, footprint=_footprint)  # fmt: skip


@cases("robust")
def _cases(suite, device, sizes):
    ks = {"coordinate_median": lambda d, m: 0, "trimmed_mean": lambda d, m: m // 4}
    return stack_cases(ks, suite, sizes, quick_m=64)
