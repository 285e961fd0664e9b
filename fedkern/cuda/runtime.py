"""The CuPy runtime of the CUDA C++ kernels of csrc/cuda, compiled at first use by NVRTC.

A source ``<name>.cu`` holds ``extern "C" __global__`` kernels and includes no CUDA headers, only
csrc/cuda's own ``.cuh`` helpers, which ``source`` pastes in (NVRTC gets one self-contained text).
It is found next to the installed package (``fedkern/cuda/src/<name>.cu``) or in a repository
checkout (``<repo>/csrc/cuda/<name>.cu``) and compiled with ``cupy.RawModule`` for the architecture
of the device in use (CuPy adds ``-arch=sm_XY`` for the current device). Modules are cached per
(name, device index, defines); CuPy also caches the binaries on disk. Kernels run on PyTorch's
current stream of the tensors' device and take raw device pointers (``ptr``), 64-bit integers
(``i64``/``u64``) and fp32 scalars (``f32``): numpy scalars of the exact parameter width.

Numerics: CuPy appends ``-ftz=true`` to every NVRTC compile and the last flag wins, so it cannot be
undone through ``options``. Plain ``float`` arithmetic and the ``__fadd_rn`` family then flush
denormals to zero, which breaks the bit-exact contract of SPEC.md; kernels issue fp32 arithmetic as
explicit ``add.rn.f32`` / ``sub.rn.f32`` / ``mul.rn.f32`` PTX instead (no FMA, no flush).
``--fmad=false`` is passed as well, so nothing else is contracted into an FMA.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OPTIONS = ("-std=c++17", "--fmad=false")
logger = logging.getLogger("fedkern")

_lock = threading.Lock()
_modules: dict[tuple[str, int, tuple[str, ...]], Any] = {}
_kernels: dict[tuple[str, str, int, tuple[str, ...]], Any] = {}
_streams: dict[tuple[int, int], Any] = {}
_available: tuple[bool, str] | None = None


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_]+\.cuh)"[ \t]*$', re.M)


def _read(fname: str) -> str:
    """Text of ``fname`` (a .cu or .cuh of csrc/cuda): the installed copy, else the repository's."""
    try:
        res = importlib.resources.files("fedkern.cuda").joinpath("src", fname)
        if res.is_file():
            return res.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        pass
    repo = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / fname
    if repo.is_file():
        return repo.read_text(encoding="utf-8")
    raise FileNotFoundError(f"CUDA kernel source {fname} not found (fedkern/cuda/src or csrc/cuda)")


def source(name: str) -> str:
    """Text of the kernel source ``<name>.cu`` as NVRTC compiles it: the installed copy, else the
    repository's, with every ``#include "<header>.cuh"`` of csrc/cuda replaced by the header's
    text (once per header: NVRTC is given no include path)."""
    seen: set[str] = set()

    def paste(match: re.Match) -> str:
        header = match.group(1)
        if header in seen:
            return ""
        seen.add(header)
        return _INCLUDE.sub(paste, _read(header))

    return _INCLUDE.sub(paste, _read(f"{name}.cu"))


def available() -> tuple[bool, str]:
    """``(True, "")`` when CUDA C++ kernels can run here, else ``(False, reason)``. Never raises."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> tuple[bool, str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "torch has no CUDA device"
        try:
            import cupy
        except Exception as e:  # ImportError, or a broken CUDA install under cupy
            return False, f"cupy is not importable: {e}"
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return False, "cupy sees no CUDA device"
        except Exception as e:
            return False, f"cupy cannot use the CUDA driver: {e}"
        try:
            cupy.cuda.nvrtc.getVersion()
        except Exception as e:
            return False, f"NVRTC is not available to cupy: {e}"
        try:
            source("topk")
        except FileNotFoundError as e:
            return False, str(e)
        return True, ""
    except Exception as e:  # never raise from a capability probe
        return False, f"CUDA C++ backend unavailable: {e}"


def module(name: str, device_index: int, defines: Sequence[str] = ()) -> Any:
    """The compiled ``cupy.RawModule`` of ``<name>.cu`` for one device (cached).

    ``defines`` are extra NVRTC options such as ``-DFOO=1`` that select what the source builds.
    """
    import cupy

    key = (name, device_index, tuple(defines))
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                logger.debug("fedkern: compiling csrc/cuda/%s.cu for CUDA device %d with "
                             "NVRTC (options %s)", name, device_index,
                             " ".join(OPTIONS + tuple(defines)))  # fmt: skip
                with cupy.cuda.Device(device_index):
                    mod = cupy.RawModule(code=source(name), options=OPTIONS + tuple(defines))
                    mod.compile()
                _modules[key] = mod
    return mod


def kernel(name: str, func: str, device_index: int, defines: Sequence[str] = ()) -> Any:
    """Kernel ``func`` of ``<name>.cu`` on ``device_index``: call as ``k(grid, block, args)``."""
    import cupy

    key = (name, func, device_index, tuple(defines))
    k = _kernels.get(key)
    if k is None:
        mod = module(name, device_index, defines)
        with cupy.cuda.Device(device_index):  # CuPy binds modules and functions per current device
            k = mod.get_function(func)
        _kernels[key] = k
    return k


def _cupy_stream(cupy: Any, torch_stream: Any, device_index: int) -> Any:
    key = (device_index, torch_stream.cuda_stream)
    s = _streams.get(key)
    if s is None:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
            s = from_external(torch_stream)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                s = cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)
        _streams[key] = s
    return s


@contextlib.contextmanager
def on_torch_stream(device: Any) -> Iterator[int]:
    """Makes ``device`` CuPy's current device and PyTorch's current stream on it CuPy's current
    stream; yields the device index. Kernels called inside are stream-ordered with torch's work."""
    import cupy
    import torch

    device = torch.device(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(idx):
        with _cupy_stream(cupy, torch.cuda.current_stream(idx), idx):
            yield idx


def launch(
    name: str,
    func: str,
    device: Any,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple[Any, ...],
    defines: Sequence[str] = (),
) -> None:
    """Launches one kernel on PyTorch's current stream of ``device``."""
    with on_torch_stream(device) as idx:
        kernel(name, func, idx, defines)(grid, block, args)


def ptr(t: Any) -> np.uint64:
    """Kernel argument: device pointer of a tensor (``T*``)."""
    return np.uint64(t.data_ptr())


def i64(v: int) -> np.int64:
    """Kernel argument: ``long long``."""
    return np.int64(v)


def u64(v: int) -> np.uint64:
    """Kernel argument: ``unsigned long long`` (or a raw address)."""
    return np.uint64(v)


def f32(v: float) -> np.float32:
    """Kernel argument: ``float``."""
    return np.float32(v)
