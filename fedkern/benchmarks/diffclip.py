"""Benchmarks of the diffclip family: diff_compress_clip with top-k over stacks G_new, G_old of m
client vectors [m, n], k = n // 100 per row, max_norm 1.

Eager baseline: D = G_new - G_old; i = D.abs().topk(k, dim=1).indices; v = D.gather(1, i);
v.mul_((c / v.norm(dim=1)).clamp(max=1)[:, None]). The record reports the backend of
diff_topk_clip. Cases: quick n = 1e6 with m = 16; full m = 16, 64, 256 for n = 1e5, 1e6 (fp32).
"""

from __future__ import annotations

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
from fedkern.compress import TopK


def _setup(case, device, gen):
    x, k = stack_of(case, device, gen), case.k
    old = stack_of(case, device, gen)
    bound = 1.0

    def eager():
        D = x - old
        i = D.abs().topk(k, dim=1, sorted=False).indices
        v = D.gather(1, i)
        v.mul_((bound / v.float().norm(dim=1)).clamp(max=1)[:, None].to(v.dtype))
        return v, i

    return Prepared(
        fedkern=lambda: R.diff_compress_clip(x, old, TopK(k), bound),
        eager=eager,
        rearm_fedkern=nothing,
        rearm_eager=nothing,
        nbytes=min_bytes(case),
        tensors={"x": x, "old": old},
    )


def _bytes(c):  # read both stacks, write the k values and int64 indices per row
    return 2 * c.m * c.n * c.dtype.itemsize + c.m * c.k * (c.dtype.itemsize + 8)


register("diff_compress_clip", family="diffclip", setup=_setup, position=700, by_size=False,
         stacked=True, impl_op="diff_topk_clip", footprint=rows_footprint, nbytes=_bytes,
         eager="D = G_new - G_old; D.abs().topk(k, dim=1); gather; clip")  # fmt: skip


@cases("diffclip")
def _cases(suite, device, sizes):
    return stack_cases({"diff_compress_clip": lambda d, m: max(1, d // 100)}, suite, sizes)
