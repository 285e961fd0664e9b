"""The benchmark machinery: cases, the registry the op families fill, timing and the runner.

A :class:`Case` names an op, a size and a dtype. ``case.setup(device)`` builds the inputs (fresh,
from a fixed seed, so every run and both sides see the same data) and returns a :class:`Prepared`
with the fedkern call, the eager baseline, the re-arming of mutated buffers and the bytes the op
must move. :func:`run_case` times both sides interleaved, repetition by repetition, and reports
medians; :func:`run_suite` runs a list of cases. What each op is, how its inputs are built and which
cases the suites hold is registered by its family's module (:func:`register`, :func:`cases`; see
the package docstring).

Fairness: the mutated buffer (EF error / state) is restored from a pristine copy before every
repetition of either side, untimed; ops that accumulate do so into their own buffer on both sides
(the cost does not depend on the values). Calls that draw randomness advance ``step`` every call, as
training does. Timing: warm-up, then fedkern and eager alternate; per repetition, CUDA events
around the call on a synchronized device (CPU: perf_counter). ``ratio = eager / fedkern`` (> 1:
fedkern is faster); ``GB/s = bytes / fedkern time`` with ``bytes`` the traffic the op cannot avoid
(see :func:`min_bytes`).

Peak memory: on CUDA the growth of ``torch.cuda.max_memory_allocated`` over one call (outputs
included); on Linux CPUs the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after ``malloc_trim``) over one call; elsewhere None.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

import fedkern
from fedkern.ops import _crossover

SEED = 1234

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
SUITES = ("quick", "full", "custom", "peers")


# --------------------------------------------------------------------------- cases


@dataclass
class Prepared:
    """Ready-to-time callables over one case's inputs (see the module docstring)."""

    fedkern: Callable[[], object]
    eager: Callable[[], object]
    rearm_fedkern: Callable[[], None]
    rearm_eager: Callable[[], None]
    nbytes: int
    tensors: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # merged into the result record


def nothing() -> None:
    """A re-arm that does nothing (the op does not mutate, or its cost does not depend on it)."""
    return None


def restore(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
    """A re-arm that copies ``src`` back into the mutated buffer ``dst``."""

    def rearm() -> None:
        dst.copy_(src)

    return rearm


@dataclass(frozen=True)
class Case:
    """One benchmark: ``op`` on ``n`` elements (the dense size for sparse ops), keep ``k``.

    ``m``: the number of client vectors (or messages) for the ops over a stack of them; what ``k``
    means for each op is in its family's module docstring.
    """

    op: str
    n: int
    k: int
    dtype: torch.dtype = torch.float32
    m: int = 1

    @property
    def spec(self) -> Bench:
        return spec(self.op)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def id(self) -> str:
        """Unique, filterable name, e.g. ``topk_compress-n1e7-k1e5-fp32``."""
        m = f"-m{self.m}" if self.spec.stacked else ""
        return f"{self.op}-n{fmt_n(self.n)}{m}-k{fmt_n(self.k)}-{self.dtype_name}"

    @property
    def eager_desc(self) -> str:
        return self.spec.eager

    def full_pass(self) -> bool:
        return self.spec.full_pass

    def footprint(self) -> int:
        """Rough bytes both sides need at once (inputs, copies, eager temporaries)."""
        return self.spec.footprint(self)

    def setup(self, device) -> Prepared:
        """Fresh inputs from a fixed seed on ``device`` and the two calls over them."""
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(SEED)
        return self.spec.setup(self, device, gen)


def fmt_n(n: int) -> str:
    """1000000 -> '1e6', 20000 -> '2e4', 12345 -> '12345'."""
    if n >= 1000:
        e = int(math.floor(math.log10(n)))
        mant, rem = divmod(n, 10**e)
        if rem == 0:
            return f"{mant}e{e}"
    return str(n)


def randn(n: int, case: Case, device, gen, scale: float = 1.0) -> torch.Tensor:
    """n standard normal values (times ``scale``) in the case's dtype, drawn as float32 from gen."""
    x = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        x.mul_(scale)
    return x.to(case.dtype)


def k_of(n: int) -> int:
    """k of the 1-D ops: 1% of n (at least 1)."""
    return max(1, n // 100)


def min_bytes(case: Case, touched: int | None = None) -> int:
    """Bytes the op must move at least: reads of its inputs, writes of its outputs.

    ``touched`` (sparse_add_batched_ only) is the number of distinct dense entries the messages hit.
    """
    fn = case.spec.nbytes
    return fn(case) if touched is None else fn(case, touched)


LR = 0.5  # lr of the EF14 cases


def prepare_feedback(case: Case, device, gen, fedkern_step, eager_step) -> Prepared:
    """The inputs of an error-feedback case (topk and randk): grad g and the mutated buffer (EF14:
    the error, scaled by 0.1; EF21: the state), one copy per side, restored before every
    repetition; ``fedkern_step(g, buf)`` / ``eager_step(g, buf)`` are the two calls."""
    g = randn(case.n, case, device, gen)
    buf0 = randn(case.n, case, device, gen, 0.1 if case.op.startswith("ef14") else 1.0)
    b_fk, b_eg = buf0.clone(), buf0.clone()
    return Prepared(
        fedkern=lambda: fedkern_step(g, b_fk),
        eager=lambda: eager_step(g, b_eg),
        rearm_fedkern=restore(b_fk, buf0),
        rearm_eager=restore(b_eg, buf0),
        nbytes=min_bytes(case),
        tensors={"grad": g, "buf0": buf0, "buf_fedkern": b_fk, "buf_eager": b_eg},
    )


def dense_cases(ops: Iterable[str], suite: str, device, sizes, *, big=(10**8, 10**9)):
    """The cases of 1-D ops (k = 1%): quick n = 1e6 and 1e7 fp32; full adds bf16 at those sizes
    and, on CUDA, ``big`` in both dtypes; custom: ``sizes`` in fp32."""
    f32, b16 = torch.float32, torch.bfloat16
    if suite == "custom":
        return [Case(op, n, k_of(n), f32) for n in sizes for op in ops]
    if suite == "quick":
        return [Case(op, n, k_of(n), f32) for n in (10**6, 10**7) for op in ops]
    big = big if torch.device(device).type == "cuda" else ()
    out = [Case(op, n, k_of(n), f32) for n in big for op in ops]
    return out + [Case(op, n, k_of(n), b16) for n in (10**6, 10**7, *big) for op in ops]


def stack_cases(ks: dict, suite: str, sizes, *, quick_m: int = 16) -> list[Case]:
    """fp32 cases over a stack of m client vectors of d coordinates: quick d = 1e6 with m =
    ``quick_m``; full m = 16, 64, 256 for d = 1e5, 1e6; custom d in ``sizes`` with m = 16.
    ``ks[op](d, m)`` is the k of op's case."""
    if suite == "custom":
        grid = [(n, 16) for n in sizes]
    elif suite == "quick":
        grid = [(10**6, quick_m)]
    else:
        grid = [(d, m) for m in (16, 64, 256) for d in (10**5, 10**6)]
    return [Case(op, d, k(d, m), torch.float32, m) for d, m in grid for op, k in ks.items()]


def stack_of(case: Case, device, gen) -> torch.Tensor:
    """The case's stack X [m, n] of client vectors (randn)."""
    return randn(case.m * case.n, case, device, gen).view(case.m, case.n)


def rows_footprint(case: Case) -> int:
    """X (two for differences) and the eager temporaries of a whole-row aggregator."""
    return case.m * case.n * (4 * case.dtype.itemsize + 8)


# --------------------------------------------------------------------------- registry


def _dense_footprint(case: Case) -> int:
    """Buffers + abs/diff temporaries + randperm's int64s of a 1-D op."""
    return 6 * case.n * case.dtype.itemsize + 2 * case.n * 8


@dataclass(frozen=True)
class Bench:
    """What the registry knows about one benchmarked op (see :func:`register`)."""

    op: str
    family: str
    setup: Callable[[Case, torch.device, torch.Generator], Prepared]
    eager: str
    nbytes: Callable[..., int]
    position: int
    by_size: bool = True
    stacked: bool = False
    impl_op: str | None = None
    full_pass: bool = False
    footprint: Callable[[Case], int] = _dense_footprint
    ops_module: str | None = None


_REGISTRY: dict[str, Bench] = {}
_CASES: dict[str, Callable[[str, torch.device, list[int] | None], list[Case]]] = {}


def register(op: str, *, family: str, setup, eager: str, nbytes, position: int,
             by_size: bool = True, stacked: bool = False, impl_op: str | None = None,
             full_pass: bool = False, footprint=None,
             ops_module: str | None = None) -> Bench:  # fmt: skip
    """Registers the benchmarked op ``op`` (the ``case`` name in the records; see the package
    docstring for every argument). Registering a name twice is an error."""
    if op in _REGISTRY:
        raise ValueError(f"benchmark op {op!r} is registered twice")
    if any(b.position == position for b in _REGISTRY.values()):
        raise ValueError(f"benchmark position {position} of {op!r} is taken")
    b = Bench(op, family, setup, eager, nbytes, position, by_size, stacked, impl_op, full_pass,
              footprint or _dense_footprint, ops_module)  # fmt: skip
    _REGISTRY[op] = b
    return b


def cases(family: str):
    """Decorator: ``fn(suite, device, sizes) -> list[Case]`` gives the family's cases of a suite
    (see the package docstring); one function per family."""

    def deco(fn):
        if family in _CASES:
            raise ValueError(f"benchmark family {family!r} registers its cases twice")
        _CASES[family] = fn
        return fn

    return deco


def spec(op: str) -> Bench:
    """The registry entry of ``op``."""
    try:
        return _REGISTRY[op]
    except KeyError:
        raise KeyError(f"no benchmark op {op!r}; registered: {', '.join(ops())}") from None


def ops() -> tuple[str, ...]:
    """Every registered op, in suite position order."""
    return tuple(sorted(_REGISTRY, key=lambda op: _REGISTRY[op].position))


def _order(case: Case) -> tuple:
    """Run order: the by-size ops' cases size by size (at one size in position order, fp32 before
    bf16), then the other cases in position order (a family's own order among equal positions)."""
    b = case.spec
    if b.by_size:
        return (0, case.n, b.position, case.dtype != torch.float32)
    return (1, b.position)


def suite(*, full: bool = False, device: str = "cpu", sizes: Iterable[int] | None = None,
          peers: bool = False):  # fmt: skip
    """The benchmark cases, in the order they run.

    Quick: every family's quick cases (see the package docstring for the current ones). ``full``
    runs the quick suite first, then every family's further cases (bf16 everywhere; on CUDA the
    sizes 1e8 and 1e9). ``sizes`` replaces the quick suite by the families' "custom" cases at those
    sizes (k = 1%), for smoke tests. ``peers`` gives only the cases against the installed peer
    libraries (``fedkern.benchmarks.peers``). Order: :func:`_order`, within the quick part and
    within the part that ``full`` adds.
    """
    dev = torch.device(device)
    if peers:  # fedkern against the peer libraries that are installed (benchmarks/peers.py)
        return sorted(_CASES["peers"]("peers", dev, None), key=_order)
    families = sorted(f for f in _CASES if f != "peers")
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        return sorted((c for f in families for c in _CASES[f]("custom", dev, sizes)), key=_order)
    quick = sorted((c for f in families for c in _CASES[f]("quick", dev, None)), key=_order)
    if not full:
        return quick
    more = sorted((c for f in families for c in _CASES[f]("full", dev, None)), key=_order)
    seen, out = set(), []
    for c in quick + more:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# --------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device) -> float:
    """Seconds one call of ``fn`` takes (CUDA: events on a synchronized device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_libc = None


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Bytes of memory one call of ``fn`` adds at its peak (outputs included); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    try:
        _malloc_trim()  # hand freed heap pages back, so reusing them shows as growth again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _proc_status("VmRSS")
        out = fn()
        peak = _proc_status("VmHWM") - base
        del out
        return max(int(peak), 0)
    except (OSError, KeyError, ValueError):
        return None


_copy_cache: dict[tuple, float] = {}


def copy_bandwidth(n: int, dtype: torch.dtype, device, reps: int = 5) -> float:
    """Bytes/s of ``y.copy_(x)`` for n elements (read + write counted), median of ``reps``."""
    device = torch.device(device)
    key = (n, dtype, str(device))
    if key not in _copy_cache:
        x = torch.ones(n, dtype=dtype, device=device)
        y = torch.empty_like(x)
        y.copy_(x)
        t = statistics.median(time_call(lambda: y.copy_(x), device) for _ in range(reps))
        _copy_cache[key] = 2 * n * dtype.itemsize / t
        del x, y
        _release(device)
    return _copy_cache[key]


def _release(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def resolve_backend(op: str, device, choice: str = "auto") -> str | None:
    """The backend a fedkern op runs with on ``device`` under ``choice``; None if it has none.

    A forced backend the op has no kernel for gives None. The op's kernel table is the ``IMPLS``
    of its family's ops module (``Bench.ops_module``, default ``fedkern.ops.<family>``), entry
    ``Bench.impl_op`` (default: the op's own name).
    """
    b = spec(op)
    name = b.impl_op or op
    try:
        impls = importlib.import_module(b.ops_module or f"fedkern.ops.{b.family}").IMPLS[name]
        from fedkern.ops._dispatch import pick
    except (ImportError, AttributeError, KeyError):
        return choice
    if choice != "auto":
        return choice if choice in impls else None
    with fedkern.backend("auto"):
        fn = pick(name, impls, torch.device(device))
    return next((backend for backend, f in impls.items() if f is fn), "auto")


def ran(calls: list, op: str, default: str | None) -> dict:
    """``{"backend": ..., "crossover": ...}`` from the dispatch decisions of one call
    (``fedkern.ops._crossover.recording``): the last decision for ``op`` and, when the crossover
    table has an entry for it on that device type, the entry; ``default`` when ``op`` was not
    dispatched by name (a composed function)."""
    mine = [c for c in calls if c[0] == op]
    if not mine:
        return {"backend": default}
    op_name, device_type, _, name = mine[-1]
    limit = _crossover.threshold(op_name, device_type)
    return {"backend": name, **({"crossover": limit} if limit else {})}


@dataclass
class Budget:
    """Repetitions per case: at least ``min_reps``, then until ``seconds`` of timed calls."""

    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 30
    seconds: float = 2.0


def run_case(case: Case, device, backend: str = "auto", budget: Budget | None = None) -> dict:
    """Time ``case`` on ``device`` with fedkern forced to ``backend``; one result record.

    Returns a dict with the case fields, ``backend`` (the implementation that ran: under "auto",
    the one the op's dispatch chose at this size, "reference" below a size crossover, with
    ``crossover`` the table's size for the op when it has one), ``fedkern_ms`` / ``eager_ms``
    (medians), their minima, ``ratio``, ``bytes``, ``gbps``, ``eager_gbps``, peak memory
    (``fedkern_peak_bytes`` / ``eager_peak_bytes``, None when unknown), ``copy_gbps`` and
    ``x_read`` (fedkern time over one read of the input at copy bandwidth) for ops that read
    their whole input, and ``status`` ("ok" or "skipped" with ``note``).
    """
    device = torch.device(device)
    budget = budget or Budget()
    rec = {
        "id": case.id,
        "case": case.op,
        "n": case.n,
        "k": case.k,
        "m": case.m,
        "dtype": case.dtype_name,
        "eager": case.eager_desc,
        "backend": resolve_backend(case.op, device, backend),
    }
    if rec["backend"] is None:
        return {**rec, "status": "skipped", "note": f"no {backend!r} kernel for {case.op}"}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if case.footprint() > 0.9 * free:
            gb = case.footprint() / 1e9
            note = f"needs ~{gb:.0f} GB, {free / 1e9:.0f} GB free"
            return {**rec, "status": "skipped", "note": note}
    copy_bw = copy_bandwidth(case.n, case.dtype, device) if case.full_pass() else None
    with fedkern.backend(backend):
        p = case.setup(device)
        p.rearm_fedkern()
        with _crossover.recording() as calls:  # which implementation the op's dispatch chose
            time_call(p.fedkern, device)
        rec.update(ran(calls, case.spec.impl_op or case.op, rec["backend"]))
        for _ in range(max(1, budget.warmup)):
            p.rearm_fedkern()
            t = time_call(p.fedkern, device)
            p.rearm_eager()
            time_call(p.eager, device)
        if t < 0.05:  # short calls: one more round for caches, clocks and JIT
            p.rearm_fedkern()
            time_call(p.fedkern, device)
            p.rearm_eager()
            time_call(p.eager, device)
        t_fk, t_eg = [], []
        while len(t_fk) < budget.max_reps and (
            len(t_fk) < budget.min_reps or sum(t_fk) + sum(t_eg) < budget.seconds
        ):
            p.rearm_fedkern()
            t_fk.append(time_call(p.fedkern, device))
            p.rearm_eager()
            t_eg.append(time_call(p.eager, device))
        p.rearm_fedkern()
        mem_fk = peak_memory(p.fedkern, device)
        p.rearm_eager()
        mem_eg = peak_memory(p.eager, device)
        nbytes, extra = p.nbytes, p.extra
    del p
    _release(device)
    fk, eg = statistics.median(t_fk), statistics.median(t_eg)
    rec.update(
        status="ok",
        fedkern_ms=fk * 1e3,
        eager_ms=eg * 1e3,
        fedkern_min_ms=min(t_fk) * 1e3,
        eager_min_ms=min(t_eg) * 1e3,
        reps=len(t_fk),
        ratio=eg / fk,
        bytes=nbytes,
        gbps=nbytes / fk / 1e9,
        eager_gbps=nbytes / eg / 1e9,
        fedkern_peak_bytes=mem_fk,
        eager_peak_bytes=mem_eg,
        copy_gbps=copy_bw / 1e9 if copy_bw else None,
        x_read=fk / (case.n * case.dtype.itemsize / copy_bw) if copy_bw else None,
        **extra,
    )
    return rec


def run_suite(
    cases: Iterable[Case],
    device,
    backend: str = "auto",
    budget: Budget | None = None,
    *,
    deadline: float | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """run_case over ``cases``; past ``deadline`` (time.monotonic()) the rest are skipped.

    An exception in one case becomes a record with status "error" and the message; the others run.
    """
    cases = list(cases)
    out = []
    for i, case in enumerate(cases):
        if deadline is not None and time.monotonic() > deadline:
            rec = {"id": case.id, "case": case.op, "n": case.n, "k": case.k, "m": case.m,
                   "dtype": case.dtype_name, "eager": case.eager_desc, "backend": None,
                   "status": "skipped", "note": "time budget spent"}  # fmt: skip
        else:
            try:
                rec = run_case(case, device, backend, budget)
            except Exception as exc:  # report and go on: one broken case must not hide the rest
                rec = {"id": case.id, "case": case.op, "n": case.n, "k": case.k, "m": case.m,
                       "dtype": case.dtype_name, "eager": case.eager_desc,
                       "backend": backend, "status": "error",
                       "note": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}  # fmt: skip
                with contextlib.suppress(Exception):
                    _release(device)
        out.append(rec)
        if progress is not None:
            progress(i, len(cases), rec)
    return out
