"""Benchmarks: sparse_add_batched_ (m messages at once) against one eager ``index_add_`` call over
the concatenated messages.

The cases, their inputs and baselines are in ``fedkern.benchmarks.sparse``; see bench/conftest.py.
"""

OPS = ("sparse_add_batched_",)


def test_sparse(bench_case):
    bench_case()
