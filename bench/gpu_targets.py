"""The targets of the GPU work (issue 16), each ok or MISS, from what bench/gpu_check.sh wrote.

    python bench/gpu_targets.py RESULTS.json [--tests JUNIT.xml ...] [--authors AUTHORS.json]
                                [--cases]
    python bench/gpu_targets.py --test-files [FAMILY]   (GPU test modules, for gpu_check.sh)

RESULTS.json is a ``fedkern bench --device cuda`` record (``meta`` and ``results``); JUNIT.xml the
pytest report of GPU tests (``--tests`` once per report: gpu_check.sh writes one for the kernel
families and one for the integrations); AUTHORS.json the record of bench/microadam_authors.py.
``--cases`` first prints every case in a short table. The targets table comes last. A target whose
cases were not measured (not run, skipped, failed) is a MISS that says so: nothing counts as met
without a measurement. ratio = eager / fedkern time. ``--test-files`` prints the test files of
every family that runs in gpu_check.sh's gpu-tests step, or of the one family named (the
"integrations" family has a step of its own).

Targets (TARGETS below): every op >= 1.0x its eager baseline at every benchmarked size (MicroAdam
against AdamW has its own target); the top-k and rand-k families >= 3x at 1e8 and 1e9;
``topk_compress`` within 2.5x of one read of its input at 1e8 and 1e9; ``sparse_add_batched_``
>= 1.0x one ``index_add_``; a MicroAdam step <= 1.0x ``AdamW(fused=True)`` on 1e8 bf16 parameters
(as users call it, and the CUDA C++ step forced beside it: ``auto`` keeps the Triton step until a
GPU run shows the new one correct and faster);
coordinate median and trimmed mean >= 10x at 64 x 1e6; Krum and the iterative rules (geometric
median, centered clipping) >= 2x; a round of 1000 clients (``local_steps_vs_loop``) >= 100x a
client loop; and every GPU test family green (the kernel families; "integrations": the DDP hooks
over NCCL and gloo on CUDA, the Flower strategies with device="cuda", CuPy arrays through
fedkern.interop). With ``--authors``, a report row: "authors' MicroAdam ratio reported", ok when
bench/microadam_authors.py measured the authors' MicroAdam (it shows fedkern's step time over
theirs and over AdamW's, and the state bytes per parameter). Exit status 0 (the table is the
result), 2 when RESULTS.json cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET

TOPK = ("topk_compress", "ef14_topk_", "ef21_topk_")
RANDK = ("randk_compress", "ef14_randk_", "ef21_randk_")
BIG = (10**8, 10**9)
#: GPU test families and their test modules (bench/gpu_check.sh runs these files).
FAMILIES = {
    "robust": ("test_robust",),
    "rowops": ("test_rowops", "test_kernels_rowops"),
    "diffclip": ("test_diffclip", "test_kernels_diffclip"),
    "clients": ("test_clients", "test_kernels_clients_triton", "test_client_grads"),
    "tamuna": ("test_tamuna",),
    "sketch": ("test_sketch",),
    "manifolds": ("test_manifolds",),
    "microadam": ("test_microadam",),
    "topk": ("test_topk",),
    "randk": ("test_randk",),
    "sparse": ("test_sparse",),
    "integrations": ("test_ddp", "test_flower", "test_flower_methods", "test_flower_compressed",
                     "test_flower_fivegcs", "test_interop"),
}  # fmt: skip
#: Families with a step of their own in gpu_check.sh (ranks spawned, Flower rounds): left out of
#: ``--test-files`` without a family name.
OWN_STEP = ("integrations",)
AUTHORS = "authors' MicroAdam ratio reported"


def short(n: int) -> str:
    """1e8 for 100000000; plain digits when not a round power."""
    s = f"{n:.0e}".replace("e+0", "e").replace("e+", "e")
    return s if float(s) == n else str(n)


def label(r: dict) -> str:
    m = f" m={r['m']}" if r.get("m", 1) != 1 else ""
    return f"{r['case']} {short(r['n'])}{m} {r['dtype']}"


def ratio(r: dict) -> str:
    return f"{r['ratio']:.2f}x"


def x_read(r: dict) -> str:
    return "no x read" if r.get("x_read") is None else f"{r['x_read']:.2f}x read"


def check(records: list[dict], want, what, *, need=(), fig=ratio,
          worst=lambda r: r["ratio"]) -> tuple[str, str]:  # fmt: skip
    """(status, detail) of one target over ``records`` selected by ``want(r)``: every selected
    record measured and ``what(r)`` true. ``need``: (case, n) pairs that must be among them;
    ``fig(r)`` the figure shown, ``worst`` the key whose minimum is the worst record."""
    chosen = [r for r in records if want(r)]
    missing = [f"{c} {short(n)}" for c, n in need
               if not any(r["case"] == c and r["n"] == n for r in chosen)]  # fmt: skip
    if not chosen:
        return "MISS", "not measured"
    unrun = [r for r in chosen if r.get("status") != "ok"]
    ok = [r for r in chosen if r.get("status") == "ok"]
    bad = [r for r in ok if not what(r)]
    parts = []
    if ok:
        w = min(ok, key=worst)
        parts.append(f"{len(ok) - len(bad)}/{len(ok)} ok, worst {fig(w)} ({label(w)})")
    if bad:
        parts.append("miss: " + ", ".join(f"{label(r)} {fig(r)}" for r in bad[:4])
                     + (f" +{len(bad) - 4}" if len(bad) > 4 else ""))  # fmt: skip
    if unrun:
        parts.append(f"{len(unrun)} not measured ({unrun[0].get('status')}: {label(unrun[0])})")
    if missing:
        parts.append("no case: " + ", ".join(missing))
    return ("ok" if not (bad or unrun or missing) else "MISS"), "; ".join(parts)


def targets(records: list[dict]) -> list[tuple[str, str, str]]:
    """(target, status, detail) for every target of the issue (see the module docstring)."""
    out = []

    def add(name, *args, **kwargs):
        out.append((name, *check(records, *args, **kwargs)))

    adam = ("microadam_vs_adamw", "microadam_cuda_vs_adamw")
    add("every op >= 1.0x eager at every size (MicroAdam vs AdamW: below)",
        lambda r: r["case"] not in adam, lambda r: r["ratio"] >= 1.0)  # fmt: skip
    need = [(c, n) for c in TOPK + RANDK for n in BIG]
    add("top-k / rand-k families >= 3x eager at 1e8 and 1e9",
        lambda r: r["case"] in TOPK + RANDK and r["n"] in BIG, lambda r: r["ratio"] >= 3.0,
        need=need)  # fmt: skip
    add("topk_compress <= 2.5x one read of the input at 1e8 and 1e9",
        lambda r: r["case"] == "topk_compress" and r["n"] in BIG,
        lambda r: r.get("x_read") is not None and r["x_read"] <= 2.5,
        need=[("topk_compress", n) for n in BIG], fig=x_read,
        worst=lambda r: -(r.get("x_read") or float("inf")))  # fmt: skip
    add("sparse_add_batched_ >= 1.0x one index_add_",
        lambda r: r["case"] == "sparse_add_batched_", lambda r: r["ratio"] >= 1.0)  # fmt: skip
    status, detail = check(
        records, lambda r: r["case"] == "microadam_vs_adamw" and r["n"] == 10**8 and
        r["dtype"] == "bf16", lambda r: r["ratio"] >= 1.0)  # fmt: skip
    for r in records:
        if (r["case"], r["n"], r["dtype"], r.get("status")) == ("microadam_vs_adamw", 10**8,
                                                                "bf16", "ok"):  # fmt: skip
            detail += f"; {r['bytes'] / r['n']:.2f} B/param/step at {r['gbps']:.0f} GB/s"
    out.append(("MicroAdam step <= 1.0x AdamW(fused=True), 1e8 bf16", status, detail))
    # the CUDA C++ step, forced (auto keeps Triton until a GPU run shows it correct and faster:
    # fedkern.ops._dispatch.AUTO_ORDER); the same bar, so the two kernels stand side by side
    add("CUDA C++ MicroAdam (forced) <= 1.0x AdamW(fused=True), 1e8 bf16",
        lambda r: r["case"] == "microadam_cuda_vs_adamw" and r["n"] == 10**8
        and r["dtype"] == "bf16", lambda r: r["ratio"] >= 1.0,
        need=[("microadam_cuda_vs_adamw", 10**8)])  # fmt: skip
    add("coordinate median / trimmed mean >= 10x at 64 x 1e6",
        lambda r: r["case"] in ("coordinate_median", "trimmed_mean") and r["n"] == 10**6
        and r.get("m") == 64, lambda r: r["ratio"] >= 10.0,
        need=[("coordinate_median", 10**6), ("trimmed_mean", 10**6)])  # fmt: skip
    rules = ("krum", "geometric_median", "centered_clip")
    add("Krum and the iterative rules >= 2x", lambda r: r["case"] in rules,
        lambda r: r["ratio"] >= 2.0, need=[(c, 10**6) for c in rules])  # fmt: skip
    add("a round of 1000 clients >= 100x a client loop",
        lambda r: r["case"] == "local_steps_vs_loop" and r["n"] == 1000,
        lambda r: r["ratio"] >= 100.0)  # fmt: skip
    return out


def test_families(paths) -> list[tuple[str, str, str]]:
    """(target, status, detail) per GPU test family from JUnit XML reports (a path, a list of
    them, or None). A report that cannot be read is a MISS row of its own; the families it held
    then show no test."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        return [("GPU tests", "MISS", "no test report given")]
    roots, unread = [], []
    for path in paths:
        try:
            roots.append(ET.parse(path).getroot())
        except (OSError, ET.ParseError) as exc:
            unread.append(("GPU tests", "MISS", f"no test report ({exc})"))
    if not roots:
        return unread
    counts = {f: [0, 0, 0] for f in FAMILIES}  # passed, failed, skipped
    module_of = {m: f for f, mods in FAMILIES.items() for m in mods}
    for case in (c for root in roots for c in root.iter("testcase")):
        mod = case.get("classname", "").split(".")[-1]
        fam = module_of.get(mod)
        if fam is None:
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            counts[fam][1] += 1
        elif case.find("skipped") is not None:
            counts[fam][2] += 1
        else:
            counts[fam][0] += 1
    out = []
    for fam, (p, f, s) in counts.items():
        status = "ok" if p and not f else "MISS"
        detail = f"{p} passed, {f} failed, {s} skipped" if p + f + s else "no test ran"
        out.append((f"GPU tests: {fam}", status, detail))
    return unread + out


def authors_row(path: str | None) -> tuple[str, str, str]:
    """(target, status, detail) of the report row on the authors' MicroAdam, from the record of
    bench/microadam_authors.py: ok when their step was timed at some size."""
    if path is None:
        return AUTHORS, "MISS", "no record given"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        status, why = doc["authors"]["status"], doc["authors"].get("detail", "")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return AUTHORS, "MISS", f"no record ({exc})"
    if status != "ok":
        return AUTHORS, "MISS", f"{status}: {why}" if why else status
    done = [r for r in doc.get("results", []) if r.get("status") == "ok" and "authors_ms" in r]
    if not done:
        failed = [r for r in doc.get("results", []) if r.get("status") != "ok"]
        why = f" ({failed[0].get('detail', '')})"[:80] if failed else ""
        return AUTHORS, "MISS", "not measured" + why
    parts = []
    for r in sorted(done, key=lambda r: -r["n"]):
        sb = r.get("state_bytes_per_param", {})
        q1e5 = r.get("fedkern_over_authors_q1e5")
        parts.append(f"{short(r['n'])} {r['dtype']}: fedkern/authors "
                     f"{r['fedkern_over_authors']:.2f}x time ({r['fedkern_ms']:.2f} vs "
                     f"{r['authors_ms']:.2f} ms), "
                     + ("" if q1e5 is None else f"fedkern/authors(q=1e5) {q1e5:.2f}x, ")
                     + f"fedkern/AdamW {r['fedkern_over_adamw']:.2f}x, state "
                     f"{sb.get('fedkern', 0):.2f} vs {sb.get('authors', 0):.2f} "
                     "B/param")  # fmt: skip
    return AUTHORS, "ok", "; ".join(parts)


def case_table(doc: dict) -> str:
    """Every case in one line: backend, times, ratio, GB/s, x read."""
    fmt = "{:<22} {:>5} {:>4} {:>5} {:<16} {:>10} {:>10} {:>7} {:>7} {:>7}"
    lines = [fmt.format("case", "n", "m", "dtype", "backend", "fedkern ms", "eager ms", "ratio",
                        "GB/s", "x read")]  # fmt: skip
    for r in doc["results"]:
        backend = str(r.get("backend"))
        if r.get("crossover"):
            backend += f" (<{short(r['crossover'])})"
        if r.get("status") != "ok":
            lines.append(fmt.format(r["case"], short(r["n"]), r.get("m", 1), r["dtype"], backend,
                                    r.get("status", "?"), "", "", "", "")
                         + "  " + str(r.get("note", ""))[:60])  # fmt: skip
            continue
        xr = "-" if r.get("x_read") is None else f"{r['x_read']:.2f}"
        lines.append(fmt.format(r["case"], short(r["n"]), r.get("m", 1), r["dtype"], backend,
                                f"{r['fedkern_ms']:.3f}", f"{r['eager_ms']:.3f}",
                                f"{r['ratio']:.2f}", f"{r['gbps']:.0f}", xr))  # fmt: skip
    return "\n".join(lines)


def render(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(t) for t, _, _ in rows)
    lines = [f"{'target':<{width}}  {'':<4}  measured", "-" * (width + 40)]
    lines += [f"{t:<{width}}  {s:<4}  {d}" for t, s, d in rows]
    miss = sum(s != "ok" for _, s, _ in rows)
    lines.append(f"targets: {len(rows) - miss} ok, {miss} MISS")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", help="a fedkern bench --device cuda JSON record")
    parser.add_argument("--tests", action="append", default=None,
                        help="JUnit XML of GPU tests (repeat for several reports)")  # fmt: skip
    parser.add_argument("--authors", default=None,
                        help="the record of bench/microadam_authors.py (adds its row)")  # fmt: skip
    parser.add_argument("--cases", action="store_true", help="print every case first")
    parser.add_argument("--test-files", nargs="?", const="", default=None, metavar="FAMILY",
                        help="print the test files of the gpu-tests step's families (or of "
                             "FAMILY) and exit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.test_files is not None:
        if args.test_files and args.test_files not in FAMILIES:
            parser.error(f"no GPU test family {args.test_files!r}; families: {', '.join(FAMILIES)}")
        fams = [args.test_files] if args.test_files else [f for f in FAMILIES if f not in OWN_STEP]
        print(" ".join(f"tests/{m}.py" for f in fams for m in FAMILIES[f]))
        return 0
    extra = [] if args.authors is None else [authors_row(args.authors)]
    if args.results is None:
        parser.error("RESULTS.json is required")
    try:
        with open(args.results, encoding="utf-8") as f:
            doc = json.load(f)
        records = doc["results"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"no benchmark results ({exc})")
        print(render(test_families(args.tests)
                     + [("benchmark targets", "MISS", "no results")] + extra))  # fmt: skip
        return 2
    m = doc.get("meta", {})
    print(f"{m.get('device_name')} | torch {m.get('torch')} | triton {m.get('triton')} | "
          f"commit {m.get('git_commit')} | {m.get('timestamp')}")  # fmt: skip
    if args.cases:
        print(case_table(doc))
        print()
    print(render(test_families(args.tests) + targets(records) + extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
