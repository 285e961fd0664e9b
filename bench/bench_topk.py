"""Benchmarks: topk_compress, ef14_topk_, ef21_topk_ against eager ``abs().topk()`` + gather.

The cases, their inputs and baselines are in ``fedkern.benchmarks.topk``; see bench/conftest.py.
"""

OPS = ("topk_compress", "ef14_topk_", "ef21_topk_")


def test_topk(bench_case):
    bench_case()
