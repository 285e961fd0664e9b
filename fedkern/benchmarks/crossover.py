"""Measure the size crossovers of "auto" (``fedkern.ops._crossover``): kernel against reference.

For every benchmarked op whose dispatch takes a size (``_crossover.SIZED_OPS``), at each
size of the "custom" suite (k = 1%; stacked ops: m = 16 rows of that length), the op is timed
with its kernel backend forced (the one "auto" runs without a crossover) and with the reference
forced, interleaved repetition by repetition on the same inputs; medians. The *size* is the one
the op's dispatch sees (the numel of its first tensor argument), read from the dispatch log, so
the result is in the table's own unit.

Measured crossover of an op (per dtype): the smallest measured size from which the kernel is at
least as fast as the reference at that size and every larger one; the suggested table entry is
the geometric midpoint between it and the next smaller measured size, rounded to one significant
digit (0 when the kernel wins everywhere: no entry; ten times the largest size when the reference
wins everywhere). ``fedkern bench --crossover`` prints the table of timings, the crossovers and a
replacement for ``fedkern.ops._crossover.TABLE`` (the largest crossover over the dtypes).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

import fedkern
from fedkern.benchmarks import core
from fedkern.ops import _crossover

#: Default sizes: CUDA spans launch-bound to bandwidth-bound; CPU stays quick.
SIZES = {"cuda": (10**4, 10**5, 10**6, 10**7, 10**8), "cpu": (10**3, 10**4, 10**5)}


def _round1(x: float) -> int:
    """x rounded to one significant digit (>= 1)."""
    if x < 1:
        return 1
    e = 10 ** int(math.floor(math.log10(x)))
    return int(round(x / e)) * e


def suggest(points: list[tuple[int, float, float]]) -> int:
    """The table entry for one op and dtype from (size, kernel ms, reference ms) points (see the
    module docstring): 0 = kernel everywhere."""
    points = sorted(points)
    if not points:
        return 0
    start = len(points)  # index of the first size from which the kernel always wins
    for i in range(len(points) - 1, -1, -1):
        if points[i][1] <= points[i][2]:
            start = i
        else:
            break
    if start == 0:
        return 0
    if start == len(points):
        return 10 * points[-1][0]
    return _round1(math.sqrt(points[start - 1][0] * points[start][0]))


def _time_pair(p: core.Prepared, kernel: str, device, budget: core.Budget) -> tuple[float, float]:
    """Median seconds of the case's fedkern call forced to ``kernel`` and to the reference."""
    sides = {kernel: [], _crossover.SMALL: []}
    for _ in range(max(1, budget.warmup)):
        for name in sides:
            with fedkern.backend(name):
                p.rearm_fedkern()
                core.time_call(p.fedkern, device)
    spent = 0.0
    while len(sides[kernel]) < budget.max_reps and (
        len(sides[kernel]) < budget.min_reps or spent < budget.seconds
    ):
        for name, times in sides.items():
            with fedkern.backend(name):
                p.rearm_fedkern()
                t = core.time_call(p.fedkern, device)
            times.append(t)
            spent += t
    return statistics.median(sides[kernel]), statistics.median(sides[_crossover.SMALL])


def measure(device, sizes=None, *, dtypes=(torch.float32,), filter_ops=None,
            budget: core.Budget | None = None, deadline: float | None = None,
            progress=None) -> list[dict]:  # fmt: skip
    """Time kernel and reference per (op, size, dtype); one record each (see the module docstring).

    Records: ``op`` (the dispatched op), ``case`` (the benchmark case), ``dtype``, ``size``,
    ``n``, ``m``, ``kernel`` (backend name), ``kernel_ms``, ``reference_ms``, ``status`` ("ok",
    "skipped" or "error", with ``note``).
    """
    device = torch.device(device)
    sizes = list(sizes or SIZES.get(device.type, SIZES["cpu"]))
    budget = budget or core.Budget(warmup=1, min_reps=3, max_reps=20, seconds=0.3)
    base = [c for c in core.suite(device=str(device), sizes=sizes)
            if (c.spec.impl_op or c.op) in _crossover.SIZED_OPS]  # fmt: skip
    cases = [core.Case(c.op, c.n, c.k, d, c.m) for d in dtypes for c in base]
    if filter_ops:
        cases = [c for c in cases if any(f in c.op for f in filter_ops)]
    out = []
    for i, case in enumerate(cases):
        rec = {"case": case.op, "n": case.n, "m": case.m, "dtype": case.dtype_name}
        op = case.spec.impl_op or case.op
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise _Skip("time budget spent")
            kernel = core.resolve_backend(case.op, device, "auto")  # pick without a size
            if kernel in (None, "auto", _crossover.SMALL):
                raise _Skip(f"no kernel on {device.type} ({kernel})")
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                if case.footprint() > 0.9 * free:
                    raise _Skip(f"needs ~{case.footprint() / 1e9:.0f} GB")
            with fedkern.backend(kernel):
                p = case.setup(device)
                p.rearm_fedkern()
                with _crossover.recording() as calls:
                    p.fedkern()
            sized = [c for c in calls if c[0] == op and c[2] is not None]
            if not sized:
                raise _Skip(f"{op} takes no size in its dispatch (no crossover possible)")
            tk, tr = _time_pair(p, kernel, device, budget)
            del p
            core._release(device)
            rec.update(op=op, size=sized[-1][2], kernel=kernel, kernel_ms=tk * 1e3,
                       reference_ms=tr * 1e3, status="ok")  # fmt: skip
        except _Skip as why:
            rec.update(op=op, status="skipped", note=str(why))
        except Exception as exc:  # one broken case must not hide the rest
            rec.update(op=op, status="error", note=f"{type(exc).__name__}: {exc}"[:300])
            core._release(device)
        out.append(rec)
        if progress is not None:
            progress(i, len(cases), rec)
    return out


class _Skip(Exception):
    pass


def crossovers(records: list[dict], device_type: str) -> dict[tuple[str, str], dict]:
    """Per (op, dtype): the measured points and the suggested entry (:func:`suggest`)."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["dtype"]), []).append(
                (r["size"], r["kernel_ms"], r["reference_ms"])
            )
    return {
        key: {"points": sorted(pts), "suggested": suggest(pts),
              "current": _crossover.threshold(key[0], device_type)}
        for key, pts in sorted(groups.items())
    }  # fmt: skip


def report(records: list[dict], device_type: str) -> str:
    """Markdown: the timings, the measured crossovers and a replacement TABLE."""
    lines = [
        f"# fedkern crossovers ({device_type}): kernel vs reference under a forced backend",
        "",
        "size = numel of the op's first tensor argument (what the dispatch compares with the "
        "table); faster = the side with the lower median.",
        "",
        "| op | dtype | size | kernel | kernel ms | reference ms | faster |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['dtype']} | n={core.fmt_n(r['n'])} | - | "
                         f"{r['status']} | | {r.get('note', '')} |")  # fmt: skip
            continue
        faster = r["kernel"] if r["kernel_ms"] <= r["reference_ms"] else "reference"
        lines.append(f"| {r['op']} | {r['dtype']} | {core.fmt_n(r['size'])} | {r['kernel']} | "
                     f"{r['kernel_ms']:.3f} | {r['reference_ms']:.3f} | {faster} |")  # fmt: skip
    found = crossovers(records, device_type)
    lines += ["", "Measured crossovers (suggested entry; current table value):", ""]
    best: dict[str, int] = {}
    for (op, dtype), c in found.items():
        lines.append(f"- {op} {dtype}: suggested {core.fmt_n(c['suggested']) or 0} "
                     f"(current {core.fmt_n(c['current']) or 0})")  # fmt: skip
        best[op] = max(best.get(op, 0), c["suggested"])
    lines += ["", "Replacement for fedkern.ops._crossover.TABLE (largest over the dtypes):", "",
              "```python", "TABLE: dict[tuple[str, str], int] = {"]  # fmt: skip
    for op, n in sorted(best.items()):
        if n:
            lines.append(f'    ("{op}", "{device_type}"): {n},')
    for (op, dev), n in sorted(_crossover.TABLE.items()):
        if dev == device_type and op not in best:
            lines.append(f'    ("{op}", "{dev}"): {n},  # not measured in this run: kept')
    lines += ["}", "```"]
    return "\n".join(lines) + "\n"
