"""Plain-PyTorch implementation of every fedkern op.

These functions are the oracle of the tests, the fallback on devices without a native backend
(and under FEDKERN_BACKEND=reference), and define the exact numerics the fused kernels reproduce
bit for bit: fp32 arithmetic without fused multiply-add, one rounding to the tensor dtype on store.
They take already validated, contiguous 1-D tensors; use the public ops in ``fedkern`` instead.
"""

from fedkern.reference import randk, sparse, topk

__all__ = ["randk", "sparse", "topk"]
