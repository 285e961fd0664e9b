"""Benchmarks: NNM, the geometric median, centered clipping and row clipping over a stack of m
client vectors against the eager-PyTorch way of each (torch.cdist + one sgemm, Python Weiszfeld and
centered-clipping loops, norm-and-scale clipping).

The cases, their inputs and baselines are in ``fedkern.benchmarks.rowops``; see bench/conftest.py.
"""

OPS = ("nnm", "geometric_median", "centered_clip", "clip_rows_")


def test_rowops(bench_case):
    bench_case()
