"""The ``fedkern`` command line.

fedkern bench [--full | --peers] [--device cpu|cuda] [--backend auto|cpu|triton|cuda|reference]
              [--out DIR] [--filter SUBSTR[,SUBSTR...]]
    time every benchmark case (fedkern.benchmarks) against its eager-PyTorch baseline (--peers:
    against the peer libraries installed), print a markdown table and write it, with the raw
    numbers as JSON and a speed-up PNG, to DIR
fedkern run ALGORITHM [ALGORITHM...] [--dataset D] [--clients N] [--rounds R] ...
    run federated methods on real data (fedkern.run): progress, summary, metrics JSON/CSV, plot
fedkern backends     print which backends this process can use
fedkern --version
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import fedkern
from fedkern import benchmarks as B

BACKEND_CHOICES = ("auto", "cpu", "triton", "cuda", "reference")


# --------------------------------------------------------------------------- environment


def git_commit(path: Path | None = None) -> str:
    """Commit of the checkout holding the fedkern package ("+dirty" if modified), or "unknown"."""
    path = path or Path(fedkern.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or broken: the report says so
        return None
    return getattr(triton, "__version__", "unknown")


def environment(device: torch.device) -> dict:
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "fedkern": fedkern.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backends": fedkern.backends(),
    }


def is_checkout(path: Path) -> bool:
    """Whether ``path`` is the root of a fedkern source checkout."""
    pyproject = path / "pyproject.toml"
    if not (pyproject.is_file() and (path / "fedkern").is_dir() and (path / "bench").is_dir()):
        return False
    try:
        return 'name = "fedkern"' in pyproject.read_text(encoding="utf-8")
    except OSError:
        return False


def default_out_dir() -> Path:
    cwd = Path.cwd()
    return cwd / "bench" / "results" if is_checkout(cwd) else cwd / "fedkern-bench-results"


# --------------------------------------------------------------------------- report


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def markdown(meta: dict, results: list[dict]) -> str:
    """The report: a header with the environment, the table, then notes and baselines."""
    lines = [
        f"# fedkern bench ({meta['suite']} suite, {meta['device']})",
        "",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}"
        + (f" (CUDA {meta['cuda']})" if meta.get("cuda") else "")
        + f", triton {meta['triton'] or 'not installed'}, fedkern {meta['fedkern']}",
        f"- git commit: {meta['git_commit']}",
        f"- date: {meta['timestamp']}; backend choice: {meta['backend_choice']}"
        + (f"; filter: {meta['filter']!r}" if meta.get("filter") else ""),
        "- backends: "
        + ", ".join(
            f"{name} {'yes' if b['available'] else 'no'} ({b['reason']})"
            for name, b in meta["backends"].items()
        ),
        "",
        (
            "peers suite: the eager column is the peer library's call (the list at the end). "
            if meta["suite"] == "peers"
            else ""
        )
        + "backend = the implementation that ran (with the op's size crossover on this device, if "
        "it has one: below it 'auto' runs the reference); "
        "ratio = eager ms / fedkern ms (> 1: fedkern faster); GB/s = bytes the op must move / "
        "fedkern time; x read = fedkern time / one read of the input at copy bandwidth; "
        "peak = memory one call adds at its peak ("
        + ("torch.cuda.max_memory_allocated" if meta["device"] == "cuda" else "process peak RSS")
        + "); median of reps.",
        "",
        "| case | n | k | dtype | backend | fedkern ms | eager ms | ratio | GB/s | x read "
        "| fedkern peak MB | eager peak MB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in results:
        n = B.fmt_n(r["n"])
        if r["case"] in B.STACKED:
            n = f"{n} (m={r['m']})"
        backend = r.get("backend") or "-"
        if r.get("crossover"):  # the op has a size crossover on this device: say which side ran
            backend += f" (crossover {B.fmt_n(r['crossover'])})"
        head = f"| {r['case']} | {n} | {B.fmt_n(r['k'])} | {r['dtype']} | {backend}"
        if r["status"] != "ok":
            lines.append(f"{head} | {r['status']} | | | | | | |")
            notes.append(f"- {r['id']}: {r['status']}: {r.get('note', '')}")
            continue
        xr = "-" if r.get("x_read") is None else f"{r['x_read']:.2f}"
        lines.append(
            f"{head} | {_ms(r['fedkern_ms'])} | {_ms(r['eager_ms'])} | {r['ratio']:.2f} "
            f"| {r['gbps']:.2f} | {xr} | {_mb(r['fedkern_peak_bytes'])} "
            f"| {_mb(r['eager_peak_bytes'])} |"
        )
    copies = sorted(
        {(r["n"], r["dtype"], r["copy_gbps"]) for r in results if r.get("copy_gbps") is not None}
    )
    if copies:
        lines += ["", "Copy bandwidth (y.copy_(x), read + write): " + ", ".join(
            f"n={B.fmt_n(n)} {dt} {bw:.1f} GB/s" for n, dt, bw in copies
        )]  # fmt: skip
    states = [r for r in results if r.get("state_bytes_per_param") is not None]
    if states:
        lines += ["", "Optimizer state, bytes per parameter (fedkern / eager): " + ", ".join(
            f"{r['case']} n={B.fmt_n(r['n'])} {r['dtype']} {r['state_bytes_per_param']:.3f} / "
            f"{r['eager_state_bytes_per_param']:.3f}" for r in states
        )]  # fmt: skip
    if notes:
        lines += ["", "Not run:", *notes]
    lines += ["", "Eager baselines:"]
    seen = set()
    for r in results:
        if r["case"] not in seen:
            seen.add(r["case"])
            lines.append(f"- {r['case']}: `{r['eager']}`")
    return "\n".join(lines) + "\n"


def picture(results: list[dict], path: Path, title: str) -> bool:
    """A PNG of the speed-ups: one horizontal bar per case (ratio eager / fedkern, log scale,
    coloured by family, the parity line at 1). False when matplotlib is missing (nothing
    written)."""
    from fedkern._plot import pyplot

    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return False
    with pyplot() as plt:
        if plt is None:
            return False
        _draw_speedups(plt, ok, path, title)
    return True


def _draw_speedups(plt, ok: list[dict], path: Path, title: str) -> None:
    families = sorted({B.spec(r["case"]).family for r in ok})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    labels = []
    for r in ok:
        n = B.fmt_n(r["n"]) + (f" m={r['m']}" if r["case"] in B.STACKED else "")
        labels.append(f"{r['case']} {n} {r['dtype']}")
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(ok) + 1.5))
    y = range(len(ok))
    ax.barh(list(y), [r["ratio"] for r in ok],
            color=[colors[B.spec(r["case"]).family] for r in ok])  # fmt: skip
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up: baseline time / fedkern time (log scale; > 1: fedkern faster)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[f]) for f in families]
    ax.legend(handles, families, fontsize=7, loc="lower right")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: Path, meta: dict, results: list[dict], md: str) -> list[Path]:
    """JSON, markdown and (with matplotlib) the speed-up PNG, stamped and as latest-*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = meta["timestamp"].replace(":", "").replace("-", "")
    doc = json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n"
    kind = f"peers-{meta['device']}" if meta.get("suite") == "peers" else meta["device"]
    written = []
    for stem in (f"{kind}-{stamp}", f"latest-{kind}"):
        for ext, text in ((".json", doc), (".md", md)):
            path = out_dir / (stem + ext)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            written.append(path)
        png = out_dir / (stem + ".png")
        title = (f"fedkern bench ({meta.get('suite')} suite, {meta.get('device_name')}, "
                 f"{meta.get('git_commit', '')[:12]})")  # fmt: skip
        if picture(results, png, title):
            written.append(png)
    return written


# --------------------------------------------------------------------------- commands


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def _positive(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def cmd_bench(args, parser: argparse.ArgumentParser) -> int:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    device = torch.device(args.device)
    if args.backend != "auto":
        status = fedkern.backends()[args.backend]
        if not status["available"]:
            parser.error(f"--backend {args.backend}: not usable here ({status['reason']})")
        if args.backend == "cuda" and device.type != "cuda":
            parser.error("--backend cuda needs --device cuda")
    if args.peers and (args.full or args.sizes):
        parser.error("--peers runs its own cases: it does not combine with --full or --sizes")
    if args.crossover:
        if args.full or args.peers or args.backend != "auto":
            parser.error("--crossover times kernel against reference itself: it does not combine "
                         "with --full, --peers or --backend")  # fmt: skip
        return cmd_crossover(args, device)
    cases = B.suite(full=args.full, device=args.device, sizes=args.sizes, peers=args.peers)
    if args.peers and not cases:
        parser.error("--peers: no peer library is installed (pip install byzfl torchao "
                     "bitsandbytes flwr); see fedkern.benchmarks.peers")  # fmt: skip
    if args.filter:
        wanted = [f for f in args.filter.split(",") if f]
        cases = [c for c in cases if any(f in c.id for f in wanted)]
        if not cases:
            parser.error(f"--filter {args.filter!r} matches no case")
    budget = B.Budget()
    if device.type == "cuda":
        budget = B.Budget(warmup=2, min_reps=5, max_reps=50, seconds=1.0)
    if args.reps is not None:
        budget = B.Budget(warmup=1, min_reps=args.reps, max_reps=args.reps, seconds=0.0)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None

    meta = environment(device)
    meta.update(
        suite="peers"
        if args.peers
        else ("full" if args.full else ("custom" if args.sizes else "quick")),
        backend_choice=args.backend,
        filter=args.filter,
        timestamp=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )

    def progress(i, total, rec):
        if rec["status"] == "ok":
            what = (f"{rec['fedkern_ms']:.3f} ms vs eager {rec['eager_ms']:.3f} ms "
                    f"({rec['ratio']:.2f}x, {rec.get('backend')})")  # fmt: skip
        else:
            what = f"{rec['status']}: {rec.get('note', '')}"
        print(f"[{i + 1}/{total}] {rec['id']}: {what}", file=sys.stderr, flush=True)

    results = B.run_suite(cases, device, args.backend, budget, deadline=deadline, progress=progress)
    md = markdown(meta, results)
    print(md, end="")
    out_dir = Path(args.out) if args.out else default_out_dir()
    try:
        written = write_results(out_dir, meta, results, md)
    except OSError as exc:
        print(f"fedkern bench: error: cannot write results to {out_dir}: {exc}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    errors = [r for r in results if r["status"] == "error"]
    if errors:
        print(f"fedkern bench: {len(errors)} case(s) failed: "
              + ", ".join(r["id"] for r in errors), file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_crossover(args, device: torch.device) -> int:
    """``fedkern bench --crossover``: the measured crossovers (fedkern.benchmarks.crossover)."""
    from fedkern.benchmarks import crossover as X

    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    budget = None
    if args.reps is not None:
        budget = B.Budget(warmup=1, min_reps=args.reps, max_reps=args.reps, seconds=0.0)

    def progress(i, total, rec):
        if rec["status"] == "ok":
            what = (f"size {rec['size']}: {rec['kernel']} {rec['kernel_ms']:.3f} ms, reference "
                    f"{rec['reference_ms']:.3f} ms")  # fmt: skip
        else:
            what = f"{rec['status']}: {rec.get('note', '')}"
        print(f"[{i + 1}/{total}] {rec['op']} {rec['dtype']}: {what}", file=sys.stderr, flush=True)

    wanted = [f for f in (args.filter or "").split(",") if f] or None
    records = X.measure(device, args.sizes, dtypes=dtypes, filter_ops=wanted, budget=budget,
                        deadline=deadline, progress=progress)  # fmt: skip
    md = X.report(records, device.type)
    print(md, end="")
    meta = environment(device)
    meta.update(
        suite="crossover",
        backend_choice="kernel vs reference",
        timestamp=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    found = {f"{op}:{dt}": c for (op, dt), c in X.crossovers(records, device.type).items()}
    doc = json.dumps({"meta": meta, "results": records, "crossovers": found}, indent=2,
                     default=str) + "\n"  # fmt: skip
    out_dir = Path(args.out) if args.out else default_out_dir()
    stamp = meta["timestamp"].replace(":", "").replace("-", "")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for stem in (f"crossover-{device.type}-{stamp}", f"latest-crossover-{device.type}"):
            for ext, text in ((".json", doc), (".md", md)):
                path = out_dir / (stem + ext)
                path.write_text(text, encoding="utf-8")
                written.append(path)
    except OSError as exc:
        print(f"fedkern bench: error: cannot write results to {out_dir}: {exc}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 1 if any(r["status"] == "error" for r in records) else 0


def cmd_backends(args, parser) -> int:
    print(json.dumps(fedkern.backends(), indent=2))
    print("size crossovers of 'auto' (calls smaller than these run the reference): "
          + json.dumps(fedkern.crossovers()), file=sys.stderr)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedkern",
        description="fedkern: fused kernels for communication-efficient distributed optimization.",
    )
    parser.add_argument("--version", action="version", version=f"fedkern {fedkern.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser(
        "bench",
        help="time fedkern ops against eager PyTorch and print the table",
        description="Time every fedkern op against its eager-PyTorch baseline on identical inputs "
        "and print a markdown table (ratio = eager / fedkern). Results go to DIR as JSON and "
        "markdown: <device>-<timestamp>.{json,md} and latest-<device>.{json,md}.",
    )
    bench.add_argument(
        "--full",
        action="store_true",
        help="large sizes too (1e8, 1e9 on CUDA), bfloat16 everywhere",
    )
    bench.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to run (default: cuda if available, else cpu)",
    )
    bench.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="force one fedkern backend (default: auto)",
    )
    bench.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="results directory (default: bench/results/ in a fedkern checkout, "
        "else ./fedkern-bench-results/)",
    )
    bench.add_argument(
        "--filter",
        metavar="SUBSTR[,SUBSTR...]",
        default=None,
        help="only the cases whose id contains one of the comma-separated SUBSTRs "
        "(e.g. topk_compress-n1e7 or krum-,nnm-)",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="time fedkern against the peer libraries installed here (ByzFL, Flower's "
        "aggregation functions, torchao and bitsandbytes low-bit AdamW) instead of eager PyTorch",
    )
    bench.add_argument(
        "--crossover",
        action="store_true",
        help="time each op's kernel against its plain-PyTorch reference over sizes and print the "
        "measured size crossovers of 'auto' (a replacement for fedkern.ops._crossover.TABLE)",
    )
    # Undocumented knobs for smoke tests and time-boxed runs.
    bench.add_argument("--sizes", type=_sizes, default=None, help=argparse.SUPPRESS)
    bench.add_argument(
        "--reps", type=lambda s: int(_positive(s)), default=None, help=argparse.SUPPRESS
    )
    bench.add_argument("--max-seconds", type=_positive, default=None, help=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)

    from fedkern.run import add_parser as add_run

    add_run(sub)

    backends = sub.add_parser("backends", help="print which backends this process can use")
    backends.set_defaults(func=cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedkern`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, parser)
    except KeyboardInterrupt:
        print("fedkern: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
