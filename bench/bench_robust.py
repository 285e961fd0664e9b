"""Benchmarks: the coordinate-wise robust aggregators over a stack of m client vectors against the
eager-PyTorch way of each (torch.median(dim=0), the sort-based trimmed mean).

The cases, their inputs and baselines are in ``fedkern.benchmarks.robust``; see bench/conftest.py.
"""

OPS = ("coordinate_median", "trimmed_mean")


def test_robust(bench_case):
    bench_case()
