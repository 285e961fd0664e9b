"""MicroAdam's fused step in plain PyTorch: the oracle all backends match and the eager baseline.

One step of MicroAdam (ALGORITHMS.md section 10) on one parameter tensor p (n elements, flattened),
with gradient g, block size D, K entries kept per block, quantization bucket Q and window length m.
All arithmetic is float32 and every product and sum is rounded on its own (no fused multiply-add).

State (allocated by ``new_state``; nb = ceil(n / D) blocks, the last one may be partial):
  ef        uint8 [nb*D/2]    the error feedback, 4 bits per element: element 2j in the low nibble
                              of byte j, element 2j+1 in the high nibble (0 past the tensor's end)
  ef_min    float32 [nb*D/Q]  per bucket of Q elements: the lowest value
  ef_scale  float32 [nb*D/Q]  per bucket: the step between two of the 16 levels (0: all equal)
  idx       int16 [m, nb*K]   ring window of selected block-local indices; block b owns columns
                              b*K .. b*K+K-1, ascending, padded at the end with -1 (unused slot)
  val       bfloat16 [m, nb*K] the selected values, 0 in unused slots

The step (``row`` is the window row written now, (t-1) mod m for step t >= 1):
  1. e = ef_min[q] + code * ef_scale[q]; a = float(g) + e
  2. per block, the K_b = min(K, block length) entries of largest |a| (NaN above inf, ties to the
     lower index) go to window row ``row``: indices ascending, values rounded to bfloat16
  3. residual r = a with the selected entries set to 0; per bucket (elements of the tensor only):
     lo = min r, hi = max r, scale = (hi - lo) / 15, code = clamp(floor((r - lo) / scale + 0.5), 0,
     15), or 0 when scale is not > 0; (lo, scale, code) become the new error feedback.
  4. moments from the window: for age a = 0 .. m-1 (row (row - a) mod m), every valid entry (i, v)
     adds w1[a] * v to mom1[i] and w2[a] * (v * v) to mom2[i]; w1[a] = (1 - beta1) * beta1^a and
     w2[a] = (1 - beta2) * beta2^a are given (rounded to float32 by the caller).
  5. p = p * decay - (c1 * mom1) / (sqrt(mom2) * c2 + eps), rounded to p's dtype, where the caller
     passes decay = 1 - lr * weight_decay, c1 = lr / (1 - beta1^t), c2 = 1 / sqrt(1 - beta2^t).
     Elements outside the window get mom1 = mom2 = 0, so they only decay.
Non-finite gradients make the step's output non-finite; the order of the float32 sums in step 4 is
not specified (backends agree to rounding, and select identically).
"""

from __future__ import annotations

import math

import numpy as np
import torch

Tensor = torch.Tensor
LEVELS = 15  # 4 bits: codes 0..15


def state_shapes(n: int, block_size: int, k: int, quant_bucket: int, m: int) -> dict:
    """Shapes and dtypes of the MicroAdam state of a tensor with n elements."""
    nb = math.ceil(n / block_size)
    return {
        "ef": ((nb * block_size // 2,), torch.uint8),
        "ef_min": ((nb * block_size // quant_bucket,), torch.float32),
        "ef_scale": ((nb * block_size // quant_bucket,), torch.float32),
        "idx": ((m, nb * k), torch.int16),
        "val": ((m, nb * k), torch.bfloat16),
    }


def new_state(n: int, block_size: int, k: int, quant_bucket: int, m: int, device) -> dict:
    """Fresh state: zero error feedback and an empty window (every index -1, every value 0)."""
    out = {}
    for name, (shape, dtype) in state_shapes(n, block_size, k, quant_bucket, m).items():
        out[name] = torch.zeros(shape, dtype=dtype, device=device)
    out["idx"].fill_(-1)
    return out


def _one_tensor(p, g, ef, ef_min, ef_scale, idx, val, row, c1, c2, decay, eps, w1, w2, D, K, Q):
    n = p.numel()
    nb = math.ceil(n / D)
    total = nb * D
    f32 = torch.float32
    dev = p.device
    pos = torch.arange(total, device=dev)
    inside = pos < n

    # 1. dequantize the error feedback and add the gradient
    codes = torch.stack((ef & 15, ef >> 4), dim=1).reshape(nb * D // Q, Q).to(f32)
    e = (ef_min[:, None] + codes * ef_scale[:, None]).reshape(-1)
    a = torch.zeros(total, dtype=f32, device=dev)
    a[:n] = g.reshape(-1).to(f32) + e[:n]

    # 2. per-block top-K of |a|: keys are the bits of |a| (NaN above inf), padding ranks below all
    keys = a.abs().view(torch.int32).to(torch.int64)
    keys = torch.where(inside, keys, -1).view(nb, D)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[
        :, :K
    ]  # ties: lower index
    lengths = (n - torch.arange(nb, device=dev) * D).clamp(max=D)
    used = torch.arange(K, device=dev)[None, :] < lengths.clamp(max=K)[:, None]
    local = torch.where(used, order, D).sort(dim=1).values  # ascending, unused slots last
    used = local < D
    flat = (torch.arange(nb, device=dev)[:, None] * D + local).clamp(max=total - 1)
    idx[row] = torch.where(used, local, -1).to(torch.int16).view(-1)
    val[row] = torch.where(used, a[flat], 0.0).to(torch.bfloat16).view(-1)

    # 3. residual and its 4-bit quantization, per bucket over the tensor's own elements
    r = a.clone()
    r[flat[used]] = 0.0
    rb, ib = r.view(-1, Q), inside.view(-1, Q)
    lo = torch.where(ib, rb, math.inf).amin(dim=1)
    hi = torch.where(ib, rb, -math.inf).amax(dim=1)
    empty = ~ib.any(dim=1)
    lo = torch.where(empty, 0.0, lo)
    hi = torch.where(empty, 0.0, hi)
    # a tensor divisor: torch's CUDA division by a Python scalar multiplies by its reciprocal,
    # which is not the correctly rounded quotient the spec (and the CPU) uses
    scale = (hi - lo) / torch.full_like(hi, LEVELS)
    q = torch.floor((rb - lo[:, None]) / scale[:, None] + 0.5)
    q = torch.nan_to_num(q, nan=0.0).clamp(0, LEVELS)
    q = torch.where((scale[:, None] > 0) & ib, q, 0.0).to(torch.uint8).view(-1, 2)
    ef.copy_(q[:, 0] | (q[:, 1] << 4))
    ef_min.copy_(lo)
    ef_scale.copy_(scale)

    # 4. both moments from the window, newest row first
    m = idx.shape[0]
    mom1 = torch.zeros(total, dtype=f32, device=dev)
    mom2 = torch.zeros(total, dtype=f32, device=dev)
    base = (torch.arange(nb, device=dev) * D).repeat_interleave(K)
    for age in range(m):
        r_ = (row - age) % m
        ok = idx[r_] >= 0
        where = (base + idx[r_].to(torch.int64))[ok]
        v = val[r_][ok].to(f32)
        mom1.index_add_(0, where, torch.tensor(w1[age], dtype=f32, device=dev) * v)
        mom2.index_add_(0, where, torch.tensor(w2[age], dtype=f32, device=dev) * (v * v))

    # 5. decoupled weight decay and the Adam update
    pf = p.reshape(-1).to(f32)
    c1_, c2_, eps_ = (torch.tensor(x, dtype=f32, device=dev) for x in (c1, c2, eps))
    step = (c1_ * mom1[:n]) / (torch.sqrt(mom2[:n]) * c2_ + eps_)
    new = pf * torch.tensor(decay, dtype=f32, device=dev) - step
    p.copy_(new.view(p.shape).to(p.dtype))


def microadam_step_(
    params, grads, ef, ef_min, ef_scale, idx, val, rows, c1, c2, decay, eps, w1, w2,
    block_size, k, quant_bucket,
) -> None:  # fmt: skip
    """One MicroAdam step over a list of tensors; arguments as in ``fedkern.ops.microadam``."""
    for i, p in enumerate(params):
        _one_tensor(
            p, grads[i], ef[i], ef_min[i], ef_scale[i], idx[i], val[i], rows[i], c1[i], c2[i],
            decay, eps, w1, w2, block_size, k, quant_bucket,
        )  # fmt: skip


# ---- the launch layout of the GPU kernels (host side; Triton and CUDA C++ share it) -------------

#: Columns of a tensor's row of the launch table: the data pointers of p, g, ef, ef_min, ef_scale,
#: idx and val, then n, the tensor's first block in the launch, its window row, c1 and c2 (as
#: float32 bits).
TABLE_COLS = 12
_OWNERS: dict = {}  # (device, blocks per tensor) -> the device copy of the block -> tensor map


def _f32_bits(xs) -> np.ndarray:
    return np.asarray(xs, dtype=np.float32).view(np.int32).astype(np.int64)


def launch_tables(params, grads, ef, ef_min, ef_scale, idx, val, rows, c1, c2, w1, w2,
                  block_size: int) -> list[tuple[torch.dtype, list[int], np.ndarray]]:  # fmt: skip
    """The host side of one GPU launch per parameter dtype (arguments as ``microadam_step_``).

    Returns, per dtype present (in order of first appearance), ``(dtype, nbs, table)``: the
    blocks of each of its tensors (``nbs``) and the int64 table the kernels read, TABLE_COLS
    columns per tensor followed by w1 and w2 as float32 bits (1-D, ``len(nbs) * TABLE_COLS +
    2 m`` entries)."""
    out = []
    for dtype in dict.fromkeys(p.dtype for p in params):
        group = [i for i, p in enumerate(params) if p.dtype == dtype]
        nbs = [-(-params[i].numel() // block_size) for i in group]
        first = np.concatenate(([0], np.cumsum(nbs)[:-1]))
        table = np.empty((len(group), TABLE_COLS), dtype=np.int64)
        for j, i in enumerate(group):
            tensors = (params[i], grads[i], ef[i], ef_min[i], ef_scale[i], idx[i], val[i])
            table[j, :7] = [t.data_ptr() for t in tensors]
            table[j, 7:10] = [params[i].numel(), first[j], rows[i]]
        table[:, 10] = _f32_bits([c1[i] for i in group])
        table[:, 11] = _f32_bits([c2[i] for i in group])
        out.append((dtype, nbs, np.concatenate((table.reshape(-1), _f32_bits([*w1, *w2])))))
    return out


def block_owners(nbs: list[int], device, empty=None) -> torch.Tensor:
    """The block -> tensor map of a launch, int32 [sum(nbs)] on ``device``: block b belongs to
    tensor t when sum(nbs[:t]) <= b < sum(nbs[:t+1]). Cached per (device, nbs), so a training
    loop over the same tensors copies it once. ``empty(size)`` allocates the int32 buffer it is
    copied into (default ``torch.empty`` on ``device``)."""
    key = (str(device), tuple(nbs))
    out = _OWNERS.get(key)
    if out is None:
        if len(_OWNERS) > 64:
            _OWNERS.clear()
        host = torch.from_numpy(np.repeat(np.arange(len(nbs), dtype=np.int32), nbs))
        if empty is None:
            out = torch.empty(host.numel(), dtype=torch.int32, device=device)
        else:
            out = empty(host.numel())
        out.copy_(host)
        _OWNERS[key] = out
    return out
