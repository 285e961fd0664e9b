"""Benchmarks: coordinate_median and trimmed_mean over a stack of m client vectors against
torch.median(dim=0) and the sort-based trimmed mean.

The cases, their inputs and baselines are in ``fedkern.benchmarks``; see bench/conftest.py.
"""

OPS = ("coordinate_median", "trimmed_mean")


def test_robust(bench_case):
    bench_case()
