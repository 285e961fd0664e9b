"""Benchmarks: TAMUNA's fused server step (fedkern::tamuna_aggregate_: the s holders of every
coordinate gathered from the round's slot permutation, averaged, their control variates updated)
against the eager way (the bool pattern q [c, p] materialized from perm, (X * q).sum(0) / s,
H += coef * q * (xbar - X)), side by side on the same inputs; the report gives the ratio.

The case, its inputs and the baseline are in ``fedkern.benchmarks.tamuna``; see bench/conftest.py.
"""

OPS = ("tamuna_aggregate_",)


def test_tamuna(bench_case):
    bench_case()
