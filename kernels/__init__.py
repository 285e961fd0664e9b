"""Triton kernels of fedkern (installed as fedkern.kernels), one op family per module.

    topk       top-k compression, EF14 / EF21 top-k: on-device radix select (also per row),
               ascending indices
    randk      rand-k compression, EF14 / EF21 rand-k: keyed Feistel permutation of [0, n)
    sparse     deterministic batched sparse accumulation into a dense vector
    microadam  MicroAdam's fused step
    clients    batched per-client local steps, Scaffnew's consensus step, weighted row sums
    robust     coordinate-wise median and trimmed mean of a stack of client vectors
    gram       the fp64 Gram matrix of a stack (Krum, NNM distances)
    rowops     gather-mean, geometric median, centered clipping, row clipping
    diffclip   per-row difference -> top-k / rand-k / dense -> clipping
    tamuna     TAMUNA's fused server step (holders' average, control-variate update)
    _common    the dtype helpers and launch shapes every file shares

Launchers take validated, contiguous fp32/bf16 tensors on one device (CUDA, or CPU when
TRITON_INTERPRET=1 is set before triton is imported) and follow the bit-exact numerics of the spec:
fp32 arithmetic, no fused multiply-add (every launch passes enable_fp_fusion=False), one rounding to
the tensor dtype per stored value.  This package imports nothing: import a submodule to load Triton.
"""
