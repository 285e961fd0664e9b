"""Argument checks shared across fedkern (a public-internal module: stable for fedkern's own
layers, not part of the user API).

Every public op validates its arguments here before any kernel runs, so that kernels only ever see
contiguous float32/bfloat16 tensors on one device, k in [1, numel] and finite fp32 scalars, and so
that nothing is modified when an error is raised. The blocks and algorithms use the same checks for
their hyperparameters. Messages name the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16)
DTYPE_TAG = {torch.float32: 0, torch.bfloat16: 1}


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(name: str, x) -> torch.Tensor:
    tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or bfloat16 tensor, got dtype {x.dtype}")
    if x.is_sparse or x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.numel() == 0:
        raise ValueError(f"{name} must have at least one element, got shape {tuple(x.shape)}")
    return x


def stack(name: str, x) -> torch.Tensor:
    """A stack of n client vectors: a [n, d] float32/bfloat16 tensor with n >= 1 and d >= 1."""
    tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D stack of client vectors [n, d], got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row (n >= 1), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}'s vectors must not be empty (d >= 1), got shape {tuple(x.shape)}")
    return float_tensor(name, x)


def vector(name: str, t, like: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of ``length`` entries of ``dtype`` on ``like``'s device."""
    tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be a {dtype} tensor, got dtype {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} (as X), got {t.device}")
    return t


def row_bounds(name: str, t, x: torch.Tensor, inspect: bool = True) -> torch.Tensor:
    """One bound per row of the stack x: float64 [n] on x's device, every entry finite and > 0.

    The entries are checked on their values (a host synchronization on CUDA; skipped while tracing
    with fake tensors, and with ``inspect=False``, for callers that built the bounds from a float
    they checked on the host)."""
    vector(name, t, x, x.shape[0], torch.float64)
    if inspect and not isinstance(t, FakeTensor) and t.numel():
        ok = torch.isfinite(t) & (t > 0)
        if not bool(ok.all()):
            bad = t[~ok][0].item()
            raise ValueError(f"{name} must be finite and > 0 for every row, got {bad}")
    return t


def writable(name: str, x: torch.Tensor) -> torch.Tensor:
    """A buffer updated in place through a flat view must be contiguous and not need grad."""
    if not x.is_contiguous():
        raise ValueError(f"{name} is updated in place and must be contiguous")
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} is updated in place and must not require grad")
    return x


def same_as(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(x.shape)}"
        )
    return x


def disjoint(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if isinstance(x, FakeTensor) or x.device.type == "meta":
        return  # no memory behind it (torch.compile tracing, meta tensors)
    if x.untyped_storage().data_ptr() == other.untyped_storage().data_ptr():
        raise ValueError(f"{name} and {other_name} must not share memory")


def integer(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {v}")
    return v


def k_for(k, numel: int, x_name: str = "x") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= numel:
        raise ValueError(f"k must be in [1, {x_name}.numel()={numel}], got {int(k)}")
    return int(k)


def fp32_scalar(name: str, v, *, nonneg: bool = False) -> float:
    """A finite Python number, returned rounded to the nearest float32 (what every kernel uses)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    with np.errstate(over="ignore"):
        r = float(np.float32(v))
    if not math.isfinite(r):
        raise ValueError(f"{name} must fit in float32, got {v}")
    return r


def finite(name: str, v) -> float:
    """A finite real number (not a bool), as a Python float (full float64 precision)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def positive(name: str, v) -> float:
    """A finite real number > 0 that fits float32 (step sizes, radii), as a Python float."""
    fp32_scalar(name, v)
    if float(v) <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return float(v)


def probability(name: str, v) -> float:
    """A probability in (0, 1], as a Python float."""
    v = finite(name, v)
    if not 0 < v <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {v}")
    return v


def boolean(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def schema_types(**args) -> None:
    """Type-check Python scalars before torch.ops parses them (its errors do not name the API).

    Keyword names select the expected type: k/seed/step -> int, lr/alpha -> real, unbiased -> bool.
    """
    for name, val in args.items():
        if name in ("k", "seed", "step"):
            ok = isinstance(val, numbers.Integral) and not isinstance(val, bool)
            want = "an int"
        elif name in ("lr", "alpha"):
            ok = isinstance(val, numbers.Real) and not isinstance(val, bool)
            want = "a real number"
        else:
            ok, want = isinstance(val, bool), "a bool"
        if not ok:
            raise TypeError(f"{name} must be {want}, got {type(val).__name__}")
        if name in ("seed", "step") and not 0 <= int(val) < 2**63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {val}")


def cohort_layout(clients, offsets, *, c: int, rows: int, rows_name: str, device,
                  check: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """The client layout of a batched client op: ``clients`` int64 [c] (one client id per cohort
    row) and ``offsets`` int64 [n + 1] (client i owns rows offsets[i] .. offsets[i+1] of the data,
    which has ``rows`` rows and is named ``rows_name`` in messages), both on ``device``.

    With ``check`` (and real tensors, not fake ones) also the values, which reads them to the host
    (a synchronization on CUDA): offsets rise from 0 to ``rows``, client ids in [0, n). Returns the
    host copies (offsets, clients) when it read them, else None."""
    for name, t, shape in (("clients", clients, (c,)), ("offsets", offsets, None)):
        tensor(name, t)
        if t.dtype != torch.int64 or t.device != device or (shape is not None and t.shape != shape):
            raise ValueError(f"{name} must be an int64 tensor of shape {shape or '[n + 1]'} on "
                             f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}")  # fmt: skip
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError("offsets must be [n + 1] with n >= 1")
    if not check or isinstance(offsets, FakeTensor):
        return None
    o, cl = offsets.cpu(), clients.cpu()
    if int(o[0]) != 0 or int(o[-1]) != rows or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"offsets must rise from 0 to {rows} (the rows of {rows_name})")
    if c and (int(cl.min()) < 0 or int(cl.max()) >= o.shape[0] - 1):
        raise ValueError(f"clients must be ids in [0, {o.shape[0] - 1})")
    return o, cl


def step_keys(keys, *, c: int, K: int, device) -> torch.Tensor:
    """The per-step sampling keys of a batched client op: int64 [c, K, 8] on ``device``."""
    tensor("keys", keys)
    if keys.dtype != torch.int64 or keys.shape != (c, K, 8) or keys.device != device:
        raise ValueError(f"keys must be an int64 tensor [{c}, {K}, 8] on {device}")
    return keys
