"""Backend discovery and per-call backend choice.

Every op has a table of implementations keyed by backend name. The backend that runs a call is
chosen from, in order: the innermost ``with fedkern.backend(name)`` block, the FEDKERN_BACKEND
environment variable (read once, at import), or "auto". "auto" picks the op's first usable backend
for the tensors' device: on CPU the C++ core, on CUDA the op's CUDA C++ kernel if it has one and
CuPy works, else its Triton kernel; everything else (and any missing native backend) falls back to
the plain-PyTorch reference. A forced backend that cannot run the call is an error, never a silent
fallback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)

_state = threading.local()
_probe_cache: dict[str, tuple[bool, str]] = {}


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _CHOICES))}, got {name!r}")
    return name


_ENV_BACKEND = _check_name(os.environ.get("FEDKERN_BACKEND", "auto") or "auto")


def triton_interpreted() -> bool:
    """True when Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe(name: str) -> tuple[bool, str]:
    if name == "reference":
        return True, "plain PyTorch"
    if name == "cpu":
        try:
            from fedkern import _C
        except ImportError as exc:  # the native build is optional
            return False, f"fedkern._C is not built ({exc})"
        info = _C.build_info()
        return True, f"C++ core ({info.get('compiler', '?')}, OpenMP={info.get('openmp')})"
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            return False, f"triton is not installed ({exc})"
        if triton_interpreted():
            return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
        if not torch.cuda.is_available():
            return (
                False,
                "no CUDA device (set TRITON_INTERPRET=1 to run Triton's interpreter on CPU)",
            )
        return True, "Triton JIT on CUDA"
    if name == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        from fedkern.cuda import runtime

        ok, why = runtime.available()
        return ok, why or "CUDA C++ compiled at first use by CuPy (NVRTC)"
    raise AssertionError(name)


def backend_status(name: str) -> tuple[bool, str]:
    """(usable, reason) for one backend name; probed once per process."""
    if name not in _probe_cache:
        try:
            _probe_cache[name] = _probe(name)
        except Exception as exc:  # a broken optional dependency must not break import fedkern
            _probe_cache[name] = (False, f"{type(exc).__name__}: {exc}")
    return _probe_cache[name]


def backends() -> dict[str, dict[str, object]]:
    """Which backends this process can use.

    Returns:
        ``{name: {"available": bool, "reason": str}}`` for "reference", "cpu", "triton" and
        "cuda"; ``reason`` says what the backend is, or why it cannot run.
    """
    out = {}
    for name in BACKENDS:
        ok, why = backend_status(name)
        out[name] = {"available": ok, "reason": why}
    return out


def current_backend() -> str:
    """The backend name in force for this thread: "auto" or a forced backend."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _ENV_BACKEND


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force one backend for every fedkern op called inside the block (this thread only).

    Args:
        name: "reference", "cpu", "triton", "cuda" or "auto". "triton" with CPU tensors needs
            TRITON_INTERPRET=1 set before triton is imported.

    Raises:
        ValueError: unknown name. Ops called inside the block raise RuntimeError when the forced
        backend cannot run them (not built, wrong device, no kernel for that op).
    """
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _device_ok(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


def pick(op: str, impls: dict[str, Callable], device: torch.device) -> Callable:
    """The implementation of ``op`` that runs on ``device`` under the current backend choice."""
    name = current_backend()
    if name != "auto":
        if name not in impls:
            raise RuntimeError(
                f"fedkern.{op} has no {name!r} kernel; it has: {', '.join(sorted(impls))}"
            )
        ok, why = backend_status(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is forced but unusable: {why}")
        if not _device_ok(name, device):
            raise RuntimeError(f"backend {name!r} cannot run fedkern.{op} on {device.type} tensors")
        return impls[name]
    order = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(device.type, ())
    for cand in order:
        if cand in impls and backend_status(cand)[0]:
            return impls[cand]
    return impls["reference"]
