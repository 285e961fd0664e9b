"""Benchmarks of the rowops family over a stack X of m client vectors [m, n] (fp32).

  nnm                D = torch.cdist(X, X) ** 2; the m-f nearest per row; W @ X with W the [m, m]
                     averaging matrix of the neighbours (one sgemm), f = k = m // 4 (the record
                     reports the backend of gather_mean)
  geometric_median   a Python Weiszfeld loop: r = (X - z).norm(dim=1); w = 1 / r.clamp_min(nu);
                     z = (w[:, None] * X).sum(0) / w.sum(), k = 8 iterations, nu = 0.1
  centered_clip      a Python loop: u = X - v; s = (tau / u.norm(dim=1)).clamp(max=1);
                     v = v + (s[:, None] * u).mean(0), k = 3 iterations, tau = 1
  clip_rows_         norms = X.norm(dim=1); X.mul_((c / norms).clamp(max=1)[:, None]), c = sqrt(n)/2
                     (about half the rows' norm: every row is scaled); X is restored, untimed

Cases: quick n = 1e6 with m = 16 (the eager loops are slow); full m = 16, 64, 256 for n = 1e5, 1e6.
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
    restore,
    rows_footprint,
    stack_cases,
    stack_of,
)
from fedkern.benchmarks.gram import eager_sqdist


def _setup(case, device, gen):
    x, m, d, k = stack_of(case, device, gen), case.m, case.n, case.k
    tensors = {"x": x}
    rearm_fk = rearm_eg = nothing
    if case.op == "nnm":
        fk = lambda: R.nnm(x, k)  # noqa: E731

        def eg():
            D = eager_sqdist(x).fill_diagonal_(-1.0)
            near = D.topk(m - k, dim=1, largest=False).indices
            W = torch.zeros(m, m, device=device).scatter_(1, near, 1.0 / (m - k))
            return (W @ x.float()).to(x.dtype)

    elif case.op == "geometric_median":
        fk = lambda: R.geometric_median(x, iters=k, nu=0.1)  # noqa: E731

        def eg():
            xf, z = x.float(), torch.zeros(d, device=device)
            for _ in range(k):
                w = 1 / (xf - z).norm(dim=1).clamp_min(0.1)
                z = (w[:, None] * xf).sum(0) / w.sum()
            return z.to(x.dtype)

    elif case.op == "centered_clip":
        fk = lambda: R.centered_clip(x, tau=1.0, iters=k)  # noqa: E731

        def eg():
            xf, v = x.float(), torch.zeros(d, device=device)
            for _ in range(k):
                u = xf - v
                v = v + ((1.0 / u.norm(dim=1)).clamp(max=1)[:, None] * u).mean(0)
            return v.to(x.dtype)

    else:  # clip_rows_
        pristine = x.clone()
        y = x.clone()
        bound = math.sqrt(d) / 2  # about half the rows' norm: every row is scaled
        tensors.update(y=y, pristine=pristine)
        rearm_fk, rearm_eg = restore(x, pristine), restore(y, pristine)
        fk = lambda: R.clip_rows_(x, bound)  # noqa: E731

        def eg():
            y.mul_((bound / y.float().norm(dim=1)).clamp(max=1)[:, None].to(y.dtype))

    return Prepared(
        fedkern=fk,
        eager=eg,
        rearm_fedkern=rearm_fk,
        rearm_eager=rearm_eg,
        nbytes=min_bytes(case),
        tensors=tensors,
    )


def _reg(op, position, eager, nbytes, impl_op=None):
    register(op, family="rowops", setup=_setup, eager=eager, nbytes=nbytes,
             position=position, by_size=False, stacked=True, impl_op=impl_op,
             footprint=rows_footprint)  # fmt: skip


def _stack_bytes(c):
    return c.m * c.n * c.dtype.itemsize


# read the stack, write the mixed one
_reg("nnm", 600, "torch.cdist(X, X)**2 -> neighbours -> W @ X",
     lambda c: 2 * _stack_bytes(c), impl_op="gather_mean")  # fmt: skip
# two reads per iteration
_reg("geometric_median", 610, "Python Weiszfeld loop, 8 iterations",
     lambda c: 2 * c.k * _stack_bytes(c))  # fmt: skip
_reg("centered_clip", 620, "Python centered-clipping loop, 3 iterations",
     lambda c: 2 * c.k * _stack_bytes(c))  # fmt: skip
# read for the norms, read + write to scale
_reg("clip_rows_", 630, "X.mul_((c / X.norm(dim=1)).clamp(max=1)[:, None])",
     lambda c: 3 * _stack_bytes(c))  # fmt: skip


@cases("rowops")
def _cases(suite, device, sizes):
    ks = {"nnm": lambda d, m: m // 4, "geometric_median": lambda d, m: 8,
          "centered_clip": lambda d, m: 3, "clip_rows_": lambda d, m: 0}  # fmt: skip
    return stack_cases(ks, suite, sizes)
