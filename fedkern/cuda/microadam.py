"""CUDA C++ MicroAdam step (csrc/cuda/microadam.cu): one kernel launch per parameter dtype.

The math and exact numerics are those of ``fedkern.reference.microadam`` (which also documents the
state layout); microadam.cu explains the algorithm. One CUDA block per MicroAdam block of D
elements of any tensor of the call: it reads its gradient, error feedback and window, writes its
window row, error feedback and parameters, and depends on no other block.

Launcher, per parameter dtype present: an int64 table (per tensor: the 7 data pointers, n, its
first block in the launch, its window row, c1 and c2 as float32 bits; then w1 and w2) goes to the
device in one non-blocking copy from pinned memory (no host synchronisation); the int32 block ->
tensor map is cached per (device, blocks per tensor); the kernel is enqueued on PyTorch's current
stream. Kernel variants are compiled per (dtype, D) (``-DFK_MA_BF16``, ``-DFK_MA_D``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedkern.cuda import runtime as _cuda
from fedkern.reference.microadam import TABLE_COLS, block_owners, launch_tables


def threads(block_size: int) -> int:
    """Threads per CUDA block for block size D (fkma::Cfg<D>::kThreads)."""
    return min(1024, max(32, block_size // 16))


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    src = torch.from_numpy(host)
    out = torch.empty(host.size, dtype=torch.int64, device=device)
    if device.type == "cuda":  # pinned + non_blocking: queued behind the stream's work, no sync
        out.copy_(src.pin_memory(), non_blocking=True)
    else:
        out.copy_(src)
    return out


def microadam_step_(
    params, grads, ef, ef_min, ef_scale, idx, val, rows, c1, c2, decay, eps, w1, w2,
    block_size, k, quant_bucket,
) -> None:  # fmt: skip
    """One MicroAdam step over lists of tensors, in place; arguments as in
    ``fedkern.reference.microadam.microadam_step_`` (validated by ``fedkern.ops.microadam``).

    params/grads: contiguous 1-D float32/bfloat16 CUDA tensors (grads[i] has params[i]'s dtype;
    dtypes may differ between tensors); ef uint8 [nb*D/2], ef_min/ef_scale float32 [nb*D/Q], idx
    int16 [m, nb*K], val bfloat16 [m, nb*K] with nb = ceil(n/D); all on one device. rows, c1, c2:
    per tensor (window row, bias corrections as float32 values); w1, w2: per age (length m); decay,
    eps: floats. params, ef, ef_min, ef_scale and row ``rows[i]`` of idx/val are updated in place;
    grads are not modified. One launch per parameter dtype present, no host synchronisation.
    """
    device = params[0].device
    D, m = block_size, len(w1)
    tables = launch_tables(params, grads, ef, ef_min, ef_scale, idx, val, rows, c1, c2, w1, w2, D)

    def empty(size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int32, device=device)

    for dtype, nbs, host in tables:
        bf16 = dtype == torch.bfloat16
        defines = (f"-DFK_MA_BF16={int(bf16)}", f"-DFK_MA_D={D}")
        name = f"fk_microadam_step_{'bf16' if bf16 else 'f32'}_d{D}"
        with _cuda.on_torch_stream(device) as dev:
            tab = _to_device(host, device)
            owners = block_owners(nbs, device, empty)
            args = (_cuda.ptr(tab), _cuda.ptr(owners), _cuda.i64(len(nbs) * TABLE_COLS))
            args += (_cuda.i64(k),)
            args += (_cuda.i64(m), _cuda.i64(quant_bucket), _cuda.f32(decay), _cuda.f32(eps))
            _cuda.kernel("microadam", name, dev, defines)((int(sum(nbs)),), (threads(D),), args)
