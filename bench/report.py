"""Turn a pytest-benchmark JSON (``--benchmark-json``) of the bench/ suites into a markdown table.

Usage: ``python bench/report.py results.json [--out table.md]``. One row per case (the benchmark
group), pairing its ``fedkern`` and ``eager`` benchmarks: median times, ratio = eager / fedkern
(> 1: fedkern faster), fedkern GB/s over the bytes the op must move, and peak memory of one call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ms(s) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _n(n: int) -> str:
    s = f"{n:.0e}".replace("e+0", "e").replace("e+", "e")
    return s if n >= 1000 and float(s) == n else str(n)


def table(doc: dict) -> str:
    """Markdown for one pytest-benchmark JSON document."""
    rows: dict[str, dict] = {}
    for b in doc.get("benchmarks", []):
        info = b.get("extra_info", {})
        side = info.get("side")
        if side not in ("fedkern", "eager"):
            continue
        rows.setdefault(b.get("group") or b["name"], {})[side] = (info, b["stats"])
    commit = (doc.get("commit_info") or {}).get("id", "unknown")
    cpu = (doc.get("machine_info") or {}).get("cpu", {}).get("brand_raw", "")
    lines = [
        f"# pytest-benchmark: fedkern vs eager ({doc.get('datetime', '')})",
        "",
        f"commit {commit}; {cpu}".rstrip("; "),
        "",
        "ratio = eager median / fedkern median (> 1: fedkern faster); GB/s = bytes the op must "
        "move / fedkern median.",
        "",
        "| case | n | k | dtype | backend | fedkern ms | eager ms | ratio | GB/s "
        "| fedkern peak MB | eager peak MB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for _group, sides in rows.items():
        info = (sides.get("fedkern") or sides.get("eager"))[0]
        fk = sides.get("fedkern", ({}, {}))
        eg = sides.get("eager", ({}, {}))
        t_fk, t_eg = fk[1].get("median"), eg[1].get("median")
        ratio = f"{t_eg / t_fk:.2f}" if t_fk and t_eg else "-"
        gbps = f"{info['bytes'] / t_fk / 1e9:.2f}" if t_fk and info.get("bytes") else "-"
        n = _n(info["n"]) + (f" (m={info['m']})" if info.get("m", 1) > 1 else "")
        lines.append(
            f"| {info['case']} | {n} | {_n(info['k'])} | {info['dtype']} "
            f"| {fk[0].get('backend', '-')} | {_ms(t_fk)} | {_ms(t_eg)} | {ratio} | {gbps} "
            f"| {_mb(fk[0].get('peak_bytes'))} | {_mb(eg[0].get('peak_bytes'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.json}: {exc}")
    md = table(doc)
    print(md, end="")
    if args.out:
        args.out.write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
