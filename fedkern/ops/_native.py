"""Glue between the op schemas and the native backends (C++ core, Triton, CUDA C++)."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable

import torch

from fedkern.validation import DTYPE_TAG

logger = logging.getLogger("fedkern")
_first_use: set[str] = set()
_first_use_lock = threading.Lock()


def lazy(module: str, attr: str) -> Callable:
    """A callable that imports ``module`` (Triton or CuPy code) only when first called.

    The first call of each ``module.attr`` logs a DEBUG record on the "fedkern" logger: for a
    Triton module that is where its kernels are JIT-compiled (or read from Triton's cache).
    """
    name = f"{module}.{attr}"

    def call(*args, **kwargs):
        if name not in _first_use:
            with _first_use_lock:
                first = name not in _first_use
                _first_use.add(name)
            if first:
                logger.debug("fedkern: first use of %s (Triton JIT-compiles its kernels at their "
                             "first launch for each new specialization)", name)  # fmt: skip
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = f"{module}.{attr}"
    return call


def cpu_core():
    from fedkern import _C

    return _C


def tag(x: torch.Tensor) -> int:
    """dtype tag of the C++ core (0 float32, 1 bfloat16)."""
    return DTYPE_TAG[x.dtype]


def outputs(k: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (values[k] in like's dtype, indices[k] int64) on like's device."""
    return (
        torch.empty(k, dtype=like.dtype, device=like.device),
        torch.empty(k, dtype=torch.int64, device=like.device),
    )
