"""Benchmarks: a Flower round's server side (``aggregate_train`` on the cohort's reply Messages) of
fedkern's ScaffnewStrategy / TamunaStrategy against their NumPy twins, side by side on the same
Messages; the report gives the ratio.

The cases, the twins and the replies are in ``fedkern.benchmarks.flower_methods``; see
bench/conftest.py. Needs Flower (no cases without it).
"""

OPS = ("flower_scaffnew_round", "flower_tamuna_round")


def test_flower_methods(bench_case):
    bench_case()
