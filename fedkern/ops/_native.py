"""Glue between the op schemas and the native backends (C++ core, Triton, CUDA C++)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from fedkern.validation import DTYPE_TAG


def lazy(module: str, attr: str) -> Callable:
    """A callable that imports ``module`` (Triton or CuPy code) only when first called."""

    def call(*args, **kwargs):
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
