"""Backend discovery and per-call backend choice.

Every op has a table of implementations keyed by backend name. The backend that runs a call is
chosen from, in order: the innermost ``with fedkern.backend(name)`` block, the FEDKERN_BACKEND
environment variable (read once, at import), or "auto". "auto" picks the op's first usable backend
for the tensors' device: on CPU the C++ core, on CUDA the op's CUDA C++ kernel if it has one and
CuPy works, else its Triton kernel; everything else (and any missing native backend) falls back to
the plain-PyTorch reference. On a device type with a size crossover for the op
(``fedkern.ops._crossover``: measured, documented, overridable), "auto" runs the reference for
calls smaller than the crossover, where it is faster than launching the kernel. ``AUTO_ORDER``
overrides the CUDA order for an op whose CUDA C++ kernel has not yet been run on a GPU, so that
"auto" keeps the kernel that has. A forced backend that cannot run the call is an error, never a
silent fallback; it ignores the crossovers and ``AUTO_ORDER``.

Logging (the standard ``logging`` module, logger "fedkern"): the first time "auto" falls back to
the reference because a native backend that would have run the call failed to load (the C++ core
not built or broken, Triton or CuPy missing), one WARNING names the backend and the reason; a
backend that cannot run on the device at all (no GPU) is not a fallback and logs nothing.
``fedkern.ops._native.lazy`` and ``fedkern.cuda.runtime.module`` log the first use of each Triton
kernel module (JIT-compiled at its first launch) and each CUDA C++ compile at DEBUG level.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator

import torch

from fedkern.ops import _crossover

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)

#: Per-op backend order of "auto" on one device type, where it differs from the default order
#: ("cuda" then "triton" on CUDA). An entry is for a CUDA C++ kernel written and tested on the CPU
#: (compiled for sm_90 by nvcc, run bit for bit through the SIMT emulator of tests/cuda_emu) that
#: has not yet been run and timed on a GPU: "auto" keeps the Triton kernel the last GPU run
#: measured until a GPU check (bench/gpu_check.sh) has shown the new one correct and faster;
#: ``fedkern.backend("cuda")`` selects it meanwhile.
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("microadam_step_", "cuda"): ("triton", "cuda"),
}
_DEFAULT_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

_state = threading.local()
_probe_cache: dict[str, tuple[bool, str]] = {}
_broken: set[str] = set()  # backends installed but failing to load (see backend_broken)
#: Backends whose load failure has been reported (one warning each per process).
_warned: set[str] = set()
_warn_lock = threading.Lock()

logger = logging.getLogger("fedkern")


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
        except ModuleNotFoundError as exc:  # the native build is optional
            return False, f"fedkern._C is not built ({exc})"
        except ImportError as exc:  # built but unloadable: a broken build, not a missing one
            _broken.add(name)
            return False, f"fedkern._C is built but failed to load ({exc})"
        info = _C.build_info()
        return True, f"C++ core ({info.get('compiler', '?')}, OpenMP={info.get('openmp')})"
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ModuleNotFoundError as exc:
            return False, f"triton is not installed ({exc})"
        except ImportError as exc:
            _broken.add(name)
            return False, f"triton is installed but failed to import ({exc})"
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
            _broken.add(name)
            _probe_cache[name] = (False, f"{type(exc).__name__}: {exc}")
    return _probe_cache[name]


def backend_broken(name: str) -> bool:
    """True when backend ``name`` is installed but failed to load (an import error other than
    "module not found", or an exception while probing it): a broken build or dependency, which
    the test suite treats as a failure rather than a skip."""
    backend_status(name)
    return name in _broken


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


def pick(
    op: str, impls: dict[str, Callable], device: torch.device, size: int | None = None
) -> Callable:
    """The implementation of ``op`` that runs on ``device`` under the current backend choice.

    ``size``: the numel of the op's first tensor argument, for the size crossovers of "auto"
    (``fedkern.ops._crossover``); None skips them (ops without a crossover entry need not pass it).
    """
    name = _choose(op, impls, device, size)
    _crossover.record(op, device.type, size, name)
    return impls[name]


def _choose(op: str, impls: dict[str, Callable], device: torch.device, size: int | None) -> str:
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
        return name
    if size is not None and size < _crossover.threshold(op, device.type):
        if _crossover.SMALL in impls:
            return _crossover.SMALL
    order = AUTO_ORDER.get((op, device.type)) or _DEFAULT_ORDER.get(device.type, ())
    failed = []
    for cand in order:
        if cand in impls:
            ok, why = backend_status(cand)
            if ok:
                return cand
            failed.append((cand, why))
    for cand, why in failed:
        _warn_fallback(cand, op, why)
    return "reference"


def _warn_fallback(name: str, op: str, why: str) -> None:
    """The one-time WARNING of an "auto" fallback to the reference (see the module docstring)."""
    if name in _warned:
        return
    with _warn_lock:
        if name in _warned:
            return
        _warned.add(name)
    logger.warning(
        "fedkern: backend %r failed to load (%s); 'auto' falls back to the plain-PyTorch "
        "reference for fedkern.%s and every other op it would have run",
        name, why, op,
    )  # fmt: skip
