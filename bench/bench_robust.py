"""Benchmarks: the robust aggregators and clipping over a stack of m client vectors against the
eager-PyTorch way of each (torch.median(dim=0), the sort-based trimmed mean, torch.cdist-based Krum
and NNM, Python Weiszfeld and centered-clipping loops, norm-and-scale clipping, per-row
torch.topk of the difference).

The cases, their inputs and baselines are in ``fedkern.benchmarks``; see bench/conftest.py.
"""

OPS = ("coordinate_median", "trimmed_mean", "krum", "nnm", "geometric_median", "centered_clip",
       "clip_rows_", "diff_compress_clip")  # fmt: skip


def test_robust(bench_case):
    bench_case()
