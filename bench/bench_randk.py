"""Benchmarks: randk_compress, ef14_randk_, ef21_randk_ against eager ``randperm(n)[:k]`` + gather.

The cases, their inputs and baselines are in ``fedkern.benchmarks.randk``; see bench/conftest.py.
"""

OPS = ("randk_compress", "ef14_randk_", "ef21_randk_")


def test_randk(bench_case):
    bench_case()
