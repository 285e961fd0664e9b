"""Benchmarks: Krum (distances from fedkern's fp64 Gram matrix) against torch.cdist-based Krum.

The cases, their inputs and baselines are in ``fedkern.benchmarks.gram``; see bench/conftest.py.
"""

OPS = ("krum",)


def test_gram(bench_case):
    bench_case()
