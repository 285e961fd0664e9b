"""Size crossovers of "auto": per (op, device type), the size below which the plain-PyTorch path
runs instead of the device's kernel.

A kernel that wins at scale can lose at small sizes, where launches and Python overhead cost more
than the work. ``TABLE[(op, device_type)] = n`` says: with the backend choice "auto", a call of
``op`` on a device of that type whose *size* is < n runs the op's "reference" implementation
(plain PyTorch, the same function as every backend, bit for bit), and at size >= n the device's
kernel. The size is the numel of the op's first tensor argument (``x``, ``grad``, ``dense``),
which the op passes to ``fedkern.ops._dispatch.pick(..., size=)``. n = 0 (or no entry) means the
kernel always runs. A forced backend (``fedkern.backend``, FEDKERN_BACKEND) ignores the table.

Only CUDA has entries: on CPU, "auto" always runs the C++ core (measured faster than the reference
at every size; tests pin it).

Initial values. The only GPU measurements are bench/results/latest-cuda.{json,md} (NVIDIA H200,
2026-11-28, commit bdeab6c on an uncommitted tree: old and indicative only). They time each kernel
against the *eager baseline*, not against the reference, so they bound where a crossover could pay
off rather than measure it:

- ``sparse_add_batched_``: the Triton kernel lost to one ``index_add_`` at every measured size
  (0.04-0.07x at n = 1e7 and 1e8, m = 16 messages). Its reference is m ``index_put`` passes over
  k entries each (the same torch primitives as the baseline, m launches instead of one), far
  cheaper than the kernel's 1.4-12 ms there, so the reference runs up to 1e9 (above every measured
  size; the kernel is kept for larger dense vectors, unmeasured).
- top-k family (``topk_compress``, ``ef14_topk_``, ``ef21_topk_``): the kernel lost to eager's
  ``torch.topk`` at 1e6 and 1e7 (0.65-0.97x) and won from 1e8 (1.9-3.2x): a crossover near 3e7
  *if* a torch path as fast as eager existed. The reference is not that path (a full stable sort
  for the exact tie-break), so no entry: it would be slower than the kernel.
- rand-k family (``randk_compress``, ``ef14_randk_``, ``ef21_randk_``): lost at 1e6 (0.56-0.81x),
  won from 1e7 (2.0-3.9x): a crossover near 3e6 against eager's ``randperm``, which draws a
  different mask; the reference (an 8-round Feistel network with host-synchronizing cycle walks)
  is not faster, so no entry.

``fedkern bench --crossover --device cuda`` times each op's kernel and its reference side by side
over sizes 1e4..1e8 and prints the measured crossover of each op with a replacement for TABLE; a
GPU session pastes it here.

Overrides: the FEDKERN_CROSSOVER environment variable (read at import): "off" empties the table;
otherwise comma-separated ``op:device_type=n`` entries add or replace entries (n = 0 removes one),
e.g. ``FEDKERN_CROSSOVER="topk_compress:cuda=3e7"``. In code: :func:`set_crossover` and
:func:`crossovers` (also ``fedkern.set_crossover`` / ``fedkern.crossovers``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

#: (op, device type) -> size below which "auto" runs the op's reference (see the module docstring).
TABLE: dict[tuple[str, str], int] = {
    ("sparse_add_batched_", "cuda"): 10**9,
}

#: The implementation that runs below the crossover (a key of the op's IMPLS table).
SMALL = "reference"

#: The ops whose dispatch passes a size, so that a TABLE entry applies to them (the others always
#: run their kernel under "auto"; giving one a crossover means passing ``size=`` to its ``pick``).
SIZED_OPS = (
    "topk_compress", "ef14_topk_", "ef21_topk_", "randk_compress", "ef14_randk_", "ef21_randk_",
    "sparse_add_batched_", "coordinate_median", "trimmed_mean",
)  # fmt: skip

_lock = threading.Lock()
_log = threading.local()


def _parse_size(text: str, what: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: expected a size, got {text!r}") from None
    if not value >= 0 or value != int(value):
        raise ValueError(f"{what}: expected an integer size >= 0, got {text!r}")
    return int(value)


def parse_env(text: str | None, table: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """``table`` updated by a FEDKERN_CROSSOVER value (see the module docstring); a new dict.

    Raises:
        ValueError naming FEDKERN_CROSSOVER and the entry that does not parse.
    """
    text = (text or "").strip()
    if not text:
        return dict(table)
    if text.lower() == "off":
        return {}
    out = dict(table)
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key, sep, size = entry.partition("=")
        op, colon, dev = key.strip().partition(":")
        if not (sep and colon and op and dev):
            raise ValueError(f"FEDKERN_CROSSOVER: expected op:device_type=n, got {entry!r}")
        n = _parse_size(size.strip(), f"FEDKERN_CROSSOVER entry {entry!r}")
        if n:
            out[(op, dev.strip())] = n
        else:
            out.pop((op, dev.strip()), None)
    return out


TABLE = parse_env(os.environ.get("FEDKERN_CROSSOVER"), TABLE)


def threshold(op: str, device_type: str) -> int:
    """The crossover size of ``op`` on ``device_type`` (0: none, the kernel always runs)."""
    return TABLE.get((op, device_type), 0)


def set_crossover(op: str, device_type: str, n: int | None) -> None:
    """Set (n > 0) or remove (n = None or 0) the crossover of ``op`` on ``device_type``.

    Args:
        op: the op's name as dispatched (e.g. "topk_compress", "sparse_add_batched_").
        device_type: a torch device type ("cuda"; "cpu" is allowed but the shipped table has none).
        n: int >= 0 or None: calls of size < n run the reference under "auto".

    Affects every thread; takes effect at the next call.
    """
    if not isinstance(op, str) or not op:
        raise TypeError(f"op must be a non-empty str, got {op!r}")
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f"device_type must be a non-empty str, got {device_type!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be an int >= 0 or None, got {n!r}")
    with _lock:
        if n:
            TABLE[(op, device_type)] = n
        else:
            TABLE.pop((op, device_type), None)


def crossovers() -> dict[str, int]:
    """The table in force: ``{"op:device_type": n}`` (sizes below n run the reference)."""
    with _lock:
        return {f"{op}:{dev}": n for (op, dev), n in sorted(TABLE.items())}


def record(op: str, device_type: str, size: int | None, backend: str) -> None:
    """Note one dispatch decision while :func:`recording` is active in this thread."""
    log = getattr(_log, "calls", None)
    if log is not None:
        log.append((op, device_type, size, backend))


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str, int | None, str]]]:
    """Collect the dispatch decisions of this thread: a list of (op, device type, size, backend
    name) that ``pick`` fills, one per call (what ``fedkern bench`` reports as the backend)."""
    prev = getattr(_log, "calls", None)
    _log.calls = calls = []
    try:
        yield calls
    finally:
        _log.calls = prev
