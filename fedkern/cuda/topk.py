"""CUDA C++ top-k selection (csrc/cuda/topk.cu): topk_compress, ef14_topk_, ef21_topk_.

key(v) = bits(fp32 v) & 0x7fffffff (NaN -> 0x7f800001); select the k largest keys, ties to the
lower index; indices int64 ascending, values in the input dtype (SPEC.md ops 1-3):
  topk_compress(x, k):      values = x[idx]
  ef14_topk_(g, e, k, lr):  e <- a = round(e + lr*g) everywhere; values = a[idx]; e[idx] <- 0
  ef21_topk_(g, s, k):      d = round(g - s); values = d[idx]; s[idx] <- round(s[idx] + d[idx])

Six kernels are enqueued on PyTorch's current stream with no host synchronisation: a fused first
pass (keys, EF14 update, 12-bit histogram per tile), a candidate compaction pass over the input and
small passes over the candidates; topk.cu explains the algorithm and its slow path (when too many
keys share the k-th key's top 12 bits). Inputs are validated by fedkern.ops: contiguous 1-D CUDA
tensors of float32/bfloat16 on one device, 1 <= k <= numel.
"""

from __future__ import annotations

import functools

import torch

from fedkern.cuda import runtime as _cuda

_BLOCK = 256  # threads per block (fktopk::kBlock)
_TILES_PER_SM = 4  # blocks per SM in the tiled passes (launch bounds allow 4 resident blocks)
_MIN_TILE = 1 << 14  # elements per tile at least, so small inputs use few blocks
_L1_BINS = 4096  # top digit key >> 19
_CTRL_WORDS = 16
_COARSE_BINS = 2048
_FINE_BINS = 1 << 19
_WORKSPACE_WORDS = _CTRL_WORDS + _L1_BINS + _COARSE_BINS + _FINE_BINS
_OPS = {"topk": 0, "ef14": 1, "ef21": 2}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan(n: int, k: int, vec: int, sm_count: int) -> tuple[int, int, int]:
    """(tiles, chunk, cap): contiguous tiles of `chunk` elements (a multiple of vec), one block
    each, and the candidate capacity. Candidates are the keys whose top 12 bits are >= those of the
    k-th key: fewer than k above its bucket plus that 1/16-octave bucket, so k + n/16 covers smooth
    data (uniform, Gaussian, ...); heavier buckets (e.g. mostly zeros) take the slow path."""
    tiles = max(1, min(sm_count * _TILES_PER_SM, -(-n // _MIN_TILE)))
    chunk = -(-n // tiles)
    chunk = -(-chunk // vec) * vec
    tiles = -(-n // chunk)
    cap = min(n, k + max(n >> 4, 1 << 16))
    return tiles, chunk, cap


def _select(
    op: str, p0: torch.Tensor, p1: torch.Tensor | None, k: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = p0.numel()
    device = p0.device
    bf16 = p0.dtype == torch.bfloat16
    aligned = p0.data_ptr() % 16 == 0 and (p1 is None or p1.data_ptr() % 16 == 0)
    vec = (8 if bf16 else 4) if aligned else 1
    defines = (f"-DFK_TOPK_OP={_OPS[op]}", f"-DFK_TOPK_BF16={int(bf16)}", f"-DFK_TOPK_VEC={vec}")
    suffix = f"{op}_{'bf16' if bf16 else 'f32'}_v{vec}"

    ws = torch.zeros(_WORKSPACE_WORDS, dtype=torch.int64, device=device)
    values = torch.empty(k, dtype=p0.dtype, device=device)
    indices = torch.empty(k, dtype=torch.int64, device=device)
    with _cuda.on_torch_stream(device) as dev:
        tiles, chunk, cap = _plan(n, k, vec, _sm_count(dev))
        rows = torch.empty(tiles * _L1_BINS, dtype=torch.int32, device=device)
        tcnt = torch.empty(2 * tiles, dtype=torch.int64, device=device)
        cand_idx = torch.empty(cap, dtype=torch.int64, device=device)
        cand_key = torch.empty(cap, dtype=torch.int32, device=device)

        ctrl = ws.data_ptr()
        hist1 = ctrl + 8 * _CTRL_WORDS
        coarse = hist1 + 8 * _L1_BINS
        fine = coarse + 8 * _COARSE_BINS
        a0 = _cuda.ptr(p0)
        a1 = _cuda.u64(p1.data_ptr() if p1 is not None else 0)
        n_, chunk_ = _cuda.i64(n), _cuda.i64(chunk)
        ctrl_, coarse_, fine_ = _cuda.u64(ctrl), _cuda.u64(coarse), _cuda.u64(fine)
        grid, block = (tiles,), (_BLOCK,)

        def run(stage: str, args: tuple) -> None:
            name = f"fk_topk_{stage}_{suffix}" if stage != "tile_reduce" else "fk_topk_tile_reduce"
            _cuda.kernel("topk", name, dev, defines)(grid, block, args)

        run(
            "pass1",
            (a0, a1, _cuda.f32(lr), n_, chunk_, _cuda.u64(k), _cuda.u64(cap), ctrl_)
            + (_cuda.u64(hist1), _cuda.ptr(rows)),
        )
        run("tile_reduce", (_cuda.ptr(rows), ctrl_, _cuda.ptr(tcnt)))
        run(
            "compact",
            (a0, a1, n_, chunk_, ctrl_, _cuda.ptr(tcnt), _cuda.ptr(cand_idx), _cuda.ptr(cand_key))
            + (coarse_, fine_),
        )
        run("refine", (a0, a1, n_, chunk_, ctrl_, coarse_, fine_))
        cand = (_cuda.ptr(cand_idx), _cuda.ptr(cand_key))
        run("count", (a0, a1, n_, ctrl_) + cand + (_cuda.ptr(tcnt),))
        run(
            "write",
            (a0, a1, n_, ctrl_) + cand + (_cuda.ptr(tcnt), _cuda.ptr(values), _cuda.ptr(indices)),
        )
    return values, indices


def topk_compress(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of |x| by key. x: [n] float32/bfloat16 CUDA, contiguous; 1 <= k <= n.

    Returns (values [k] x.dtype, indices [k] int64 strictly ascending); values are exact copies of
    x[indices]. x is not modified."""
    return _select("topk", x, None, k, 0.0)


def ef14_topk_(
    grad: torch.Tensor, error: torch.Tensor, k: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """EF14 step, in place on error. grad, error: [n] same dtype (float32/bfloat16) and CUDA device.

    error <- a = round(error + lr*grad) (fp32 math, no FMA); returns (a[idx], idx) for the top-k
    keys of a (idx int64 ascending) and sets error[idx] = 0."""
    return _select("ef14", grad, error, k, lr)


def ef21_topk_(
    grad: torch.Tensor, state: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EF21 step, in place on state. grad, state: [n] same dtype (float32/bfloat16) and CUDA device.

    d = round(grad - state) (never stored); returns (d[idx], idx) for the top-k keys of d (idx int64
    ascending) and sets state[idx] = round(state[idx] + d[idx])."""
    return _select("ef21", grad, state, k, 0.0)
