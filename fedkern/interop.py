"""Arrays from other libraries: every fedkern op accepts any array that exports DLPack.

NumPy, CuPy, JAX, ... arrays passed to a public fedkern op (``topk_compress``, the error-feedback
ops, ``sparse_add_``, ``fedkern.robust.*``) are viewed as torch tensors through DLPack without a
copy, on their own device; an op that updates a buffer in place (``ef14_topk_``'s ``error``,
``sparse_add_``'s ``dense``, ``clip_rows_``'s ``X``) therefore updates the caller's array. The ops
return torch tensors; to get the caller's kind back, wrap the op:

    topk = fedkern.interop.wrap(fedkern.topk_compress)
    values, indices = topk(numpy_array, 10)       # NumPy arrays out, as in

``wrap(fn)`` converts every output tensor to the kind of the first foreign array argument (NumPy:
``numpy.from_dlpack``; any other library: its ``from_dlpack``), again without a copy. bfloat16 has
no NumPy dtype: such outputs stay torch tensors. A NumPy array that DLPack cannot export (read-only)
is viewed through ``torch.from_numpy`` instead (in-place ops on it raise, as they must).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

__all__ = ["accepts_dlpack", "from_torch", "is_foreign", "to_torch", "wrap"]


def is_foreign(x) -> bool:
    """True for a non-torch object that exports DLPack (``__dlpack__``)."""
    return not isinstance(x, torch.Tensor) and hasattr(x, "__dlpack__")


def to_torch(x):
    """A torch view of a DLPack array (no copy); anything else is returned unchanged."""
    if not is_foreign(x):
        return x
    try:
        return torch.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError) as exc:
        if type(x).__module__ == "numpy":
            import numpy as np

            return torch.from_numpy(np.asarray(x))
        raise TypeError(
            f"cannot view a {type(x).__name__} as a tensor through DLPack: {exc}"
        ) from exc


def from_torch(t, like):
    """``t`` as an array of ``like``'s library (no copy), or ``t`` itself when ``like`` is a torch
    tensor, t is not a tensor, or the library has no such dtype (bfloat16 in NumPy)."""
    if not isinstance(t, torch.Tensor) or not is_foreign(like):
        return t
    module = importlib.import_module(type(like).__module__.split(".")[0])
    if module.__name__ == "numpy":
        if t.dtype == torch.bfloat16:
            return t
        return module.from_dlpack(t.detach().cpu() if t.device.type != "cpu" else t.detach())
    if module.__name__ in ("jax", "jaxlib"):
        return importlib.import_module("jax.dlpack").from_dlpack(t.detach())
    return module.from_dlpack(t.detach())


def _convert(args, kwargs):
    return ([to_torch(a) for a in args], {k: to_torch(val) for k, val in kwargs.items()})


def accepts_dlpack(fn: Callable) -> Callable:
    """Decorator: DLPack arrays among the positional and keyword arguments become torch views."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if any(map(is_foreign, args)) or any(map(is_foreign, kwargs.values())):
            args, kwargs = _convert(args, kwargs)
        return fn(*args, **kwargs)

    return call


def wrap(fn: Callable) -> Callable:
    """``fn`` taking DLPack arrays and returning its outputs in the caller's array kind.

    Args:
        fn: any fedkern op (or function of tensors).

    Returns:
        A function with fn's arguments; its tensor outputs (a tensor, or a tuple/list of them) are
        converted with ``from_torch`` to the kind of the first foreign argument.
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        like = next((a for a in (*args, *kwargs.values()) if is_foreign(a)), None)
        args, kwargs = _convert(args, kwargs)
        out = fn(*args, **kwargs)
        if isinstance(out, (tuple, list)):
            return type(out)(from_torch(o, like) for o in out)
        return from_torch(out, like)

    return call
