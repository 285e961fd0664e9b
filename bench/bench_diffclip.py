"""Benchmarks: diff_compress_clip (per-row difference, top-k, clipping) against the eager per-row
torch.topk of the difference, gather and clip.

The cases, their inputs and baselines are in ``fedkern.benchmarks.diffclip``; see
bench/conftest.py.
"""

OPS = ("diff_compress_clip",)


def test_diffclip(bench_case):
    bench_case()
