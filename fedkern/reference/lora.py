"""Reference fused RAC-LoRA merge: W += scale * B A with the frozen factor generated.

W [m, n], B [m, r], A [r, n]; one of B, A may be None: that frozen factor is generated, entry e of
its own row-major shape being round32(std * z_e) with z the Gaussian draw of the key words
(``fedkern.reference.random``). Per element, fp32 without FMA:

    acc = +0;  for k = 0 .. r-1:  acc = acc + round32(B[i, k] * A[k, j])
    W[i, j] = W[i, j] + round32(scale * acc)

W float64 (the exact-arithmetic tests) runs the same formula in float64 with the generated factor
widened exactly from fp32.
"""

from __future__ import annotations

import torch

from fedkern.reference import random as rnd


def frozen(shape, key, std: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The generated factor of ``shape``: round32(std * z), in ``dtype`` (exact widening)."""
    m, n = shape
    z = rnd.gaussian(m * n, key, std, device)
    return z.view(m, n).to(dtype)


def lora_merge_(W, B, A, key, std: float, scale: float):
    """In place on W (contiguous [m, n]); returns W."""
    m, n = W.shape
    r = (B if B is not None else A).shape[1 if B is not None else 0]
    if B is None:
        B = frozen((m, r), key, std, W.dtype, W.device)
    if A is None:
        A = frozen((r, n), key, std, W.dtype, W.device)
    acc = torch.zeros_like(W)
    for k in range(r):
        acc = acc + B[:, k : k + 1] * A[k : k + 1, :]
    W += scale * acc
    return W
