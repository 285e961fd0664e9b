"""Benchmarks: one MicroAdam step (fedkern.optim.MicroAdam) against the same optimizer on the
reference backend (plain PyTorch) and against torch.optim.AdamW (foreach on CPU, fused on CUDA).

The cases, their inputs and baselines are in ``fedkern.benchmarks.microadam``; see
bench/conftest.py. The records also carry the optimizer state in bytes per parameter of both sides.
"""

OPS = ("microadam_step_", "microadam_vs_adamw")


def test_microadam(bench_case):
    bench_case()
