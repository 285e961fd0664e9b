"""``fedkern run``: run federated methods on real data and write metrics and plots.

  fedkern run scaffnew --dataset breast_cancer --clients 100 --rounds 300
  fedkern run gd fedavg scaffold scaffnew --split label_sorted --l2 0.01

Every named algorithm runs on the same problem (``--problem``; default "convex": a dataset split
over clients with L2 regularization and its exact optimum) with its theory defaults unless
overridden; a progress bar shows each run; at the end a summary table is printed and DIR receives
``metrics.json`` (every history), ``metrics.csv`` (one row per algorithm and round) and a PNG plot
of the problem's metric (f - f* for the convex problems) against communication rounds and against
floats sent per client (needs matplotlib). A run that diverges stops and is reported as such.

Extending it: a method class declares ``problems`` (the ``--problem`` names it accepts) and
``cli_options`` (its own flags, see ``fedkern.algorithms.base.Method``); a problem family is a
``ProblemSpec`` given to ``register_problem``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fedkern
from fedkern import data
from fedkern.algorithms import REGISTRY
from fedkern.clients import ClientBatch
from fedkern.problems import Problem

KIND = {"breast_cancer": "logistic", "digits": "multinomial"}


@dataclass
class ProblemSpec:
    """A ``--problem`` family of ``fedkern run``.

    Attributes:
        name: the ``--problem`` value.
        help: one line for ``--help``.
        build: ``build(args, parser) -> (problem, meta)``: the object every method is constructed
            with (a ``ClientBatch`` for "convex") and a JSON-able dict for metrics.json; it calls
            ``parser.error`` on bad input.
        metric: the history key summarized and plotted ("gap": f - f*).
        label: the metric's axis label.
        title: the metric's column title in the summary.
        axes: history keys of per-round costs whose running sums are further x-axes of the plot.
        options: extra argparse options of the family: dest -> argparse keywords with "flag".
    """

    name: str
    help: str
    build: Callable
    metric: str = "gap"
    label: str = "f(x) - f*"
    title: str = "f - f*"
    axes: tuple[str, ...] = ("floats_up",)
    options: dict = field(default_factory=dict)


PROBLEMS: dict[str, ProblemSpec] = {}

AXIS_LABEL = {"floats_up": "floats sent per client", "grad_evals": "gradient evaluations"}


def register_problem(spec: ProblemSpec) -> ProblemSpec:
    """Add a ``--problem`` family (a name may be registered once)."""
    if spec.name in PROBLEMS:
        raise ValueError(f"problem {spec.name!r} is already registered")
    PROBLEMS[spec.name] = spec
    return spec


def _build_convex(args, parser):
    A, y, kind = _load(args, parser)
    if args.clients > A.shape[0]:
        _fail(parser, f"--clients must be at most the {A.shape[0]} samples of {args.dataset}")
    parts = data.split(y, args.clients, args.split, seed=args.seed, alpha=args.alpha)
    try:
        problem = Problem(A, y, parts, kind, args.l2)
    except ValueError as exc:
        _fail(parser, f"{exc} (try --split iid or fewer --clients)")
    batch = ClientBatch(problem, seed=args.seed, device=args.device)
    print(f"{problem}; kappa = {problem.L / problem.mu:.4g}; split {args.split}")
    meta = {"dataset": args.dataset, "clients": args.clients, "split": args.split, "l2": args.l2,
            "kind": kind, "L": problem.L, "mu": problem.mu,
            "f_star": problem.optimum()[1]}  # fmt: skip
    return batch, meta


register_problem(ProblemSpec(
    "convex", "a bundled dataset (or libsvm:PATH) split over clients: L2-regularized logistic "
    "(breast_cancer, LibSVM) or multinomial (digits) regression, with its exact optimum",
    _build_convex,
))  # fmt: skip


def _build_mast(args, parser):
    A, y, kind = _load(args, parser)
    if args.clients > A.shape[0]:
        _fail(parser, f"--clients must be at most the {A.shape[0]} samples of {args.dataset}")
    parts = data.split(y, args.clients, args.split, seed=args.seed, alpha=args.alpha)
    try:
        problem = Problem(A, y, parts, kind, args.l2)
    except ValueError as exc:
        _fail(parser, f"{exc} (try --split iid or fewer --clients)")
    print(f"{problem}; MAST sketches of its {problem.p} parameters (nodes = clients)")
    meta = {"dataset": args.dataset, "clients": args.clients, "split": args.split, "l2": args.l2,
            "kind": kind, "L": problem.L, "f_star": problem.optimum()[1]}  # fmt: skip
    return problem, meta


def _build_lora_quadratic(args, parser):
    from fedkern.algorithms.raclora import QuadraticTask

    task = QuadraticTask(seed=args.seed)
    print(f"{task}: LoRA chains on 3 x 3 matrices, L = {task.L:g}")
    return task, {"hessian": task.h.tolist(), "L": task.L}


def _build_lora_transfer(args, parser):
    from fedkern.algorithms.raclora import TransferTask

    task = TransferTask(seed=args.seed)
    if args.split not in data.SPLITS:
        _fail(parser, f"unknown split {args.split!r}")
    task.federation = {"clients": min(args.clients, task.train.numel()), "split": args.split}
    print(f"{task}; pre-trained accuracy on 0-4: {task.old_accuracy:.3f}")
    return task, {"old_accuracy": task.old_accuracy, "train": task.train.numel(),
                  "test": task.test.numel(), **task.federation}  # fmt: skip


register_problem(ProblemSpec(
    "mast_logistic", "MAST: a bundled dataset's L2-regularized logistic / multinomial regression "
    "trained through random sketches (--sketch, --q); f - f* of the ERM objective", _build_mast,
))  # fmt: skip
register_problem(ProblemSpec(
    "lora_quadratic", "RAC-LoRA's 3 x 3 quadratic with Hessian diag(10, 1, 1): LoRA chains "
    "(--rank, --lr, --link-steps); ||W - W*||", _build_lora_quadratic, metric="dist",
    label="||W - W*||", title="||W - W*||", axes=(),
))  # fmt: skip
register_problem(ProblemSpec(
    "lora_transfer", "RAC-LoRA transfer on digits: an MLP pre-trained on 0-4 adapted to 5-9 "
    "(rank --rank, one link per round); test error", _build_lora_transfer, metric="test_error",
    label="test error on 5-9", title="test error",
))  # fmt: skip


def _method_options() -> dict[str, dict]:
    """The union of every registered method's ``cli_options`` (dest -> argparse spec)."""
    out: dict[str, dict] = {}
    for cls in REGISTRY.values():
        for dest, spec in cls.cli_options.items():
            if dest in out and out[dest]["flag"] != spec["flag"]:
                raise ValueError(f"option {dest!r} has flags {out[dest]['flag']} and "
                                 f"{spec['flag']}")  # fmt: skip
            out.setdefault(dest, spec)
    for spec in PROBLEMS.values():
        for dest, opt in spec.options.items():
            out.setdefault(dest, opt)
    return out


def add_parser(sub) -> None:
    """Register ``run`` on the ``fedkern`` subcommand parser."""
    p = sub.add_parser(
        "run",
        help="run federated methods on real data; metrics as JSON/CSV and a PNG plot",
        description=__doc__.split("\n\n")[0] + " Algorithms: " + ", ".join(REGISTRY) + ".",
    )
    p.add_argument(
        "algorithms", nargs="+", metavar="ALGORITHM", help=f"one or more of: {', '.join(REGISTRY)}"
    )
    p.add_argument(
        "--problem",
        default="convex",
        help="; ".join(f"{s.name}: {s.help}" for s in PROBLEMS.values()) + " (default convex)",
    )
    p.add_argument(
        "--dataset",
        default="breast_cancer",
        help=f"{', '.join(data.DATASETS)}, or libsvm:PATH (binary labels) (default breast_cancer)",
    )
    p.add_argument("--clients", type=int, default=20, help="number of clients (default 20)")
    p.add_argument(
        "--split",
        default="label_sorted",
        help=f"{', '.join(data.SPLITS)} (default label_sorted: heterogeneous)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (default 0.5)")
    p.add_argument("--l2", type=float, default=0.01, help="L2 regularization (default 0.01)")
    p.add_argument("--rounds", type=int, default=300, help="communication rounds (default 300)")
    for dest, spec in _method_options().items():
        kw = {k: val for k, val in spec.items() if k != "flag"}
        kw.setdefault("default", None)
        p.add_argument(spec["flag"], dest=dest, **kw)
    p.add_argument("--seed", type=int, default=0, help="seed of splits, coins and batches")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="fedkern-run", help="output directory (default fedkern-run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)


def _fail(parser, msg: str):
    parser.error(msg)


def _options(args, name: str) -> dict:
    """The constructor keywords of algorithm ``name``: the seed and its own options when given."""
    kw = {"seed": args.seed}
    for dest in REGISTRY[name].cli_options:
        val = getattr(args, dest, None)
        if val is not None:
            kw[dest] = val
    return kw


def _load(args, parser):
    if args.dataset.startswith("libsvm:"):
        path = args.dataset.split(":", 1)[1]
        A, y = data.load_libsvm(path)
        return A, y, "logistic"
    if args.dataset not in data.DATASETS:
        _fail(
            parser,
            f"unknown dataset {args.dataset!r}; available: {', '.join(data.DATASETS)}, libsvm:PATH",
        )
    A, y = data.load(args.dataset)
    return A, y, KIND[args.dataset]


def _check(args, parser) -> None:
    unknown = [a for a in args.algorithms if a not in REGISTRY]
    if unknown:
        _fail(parser, f"unknown algorithm {unknown[0]!r}; available: {', '.join(REGISTRY)}")
    if args.problem not in PROBLEMS:
        _fail(parser, f"unknown problem {args.problem!r}; available: {', '.join(PROBLEMS)}")
    for name in args.algorithms:
        if args.problem not in REGISTRY[name].problems:
            _fail(parser, f"algorithm {name!r} does not run on --problem {args.problem}; it "
                          f"takes: {', '.join(REGISTRY[name].problems)}")  # fmt: skip
    if args.split not in data.SPLITS:
        _fail(parser, f"unknown split {args.split!r}; available: {', '.join(data.SPLITS)}")
    if args.rounds < 1:
        _fail(parser, f"--rounds must be >= 1, got {args.rounds}")
    if args.clients < 1:
        _fail(parser, f"--clients must be >= 1, got {args.clients}")
    if getattr(args, "gamma", None) is not None and not (
        args.gamma > 0 and math.isfinite(args.gamma)
    ):
        _fail(parser, f"--gamma must be > 0, got {args.gamma}")
    if getattr(args, "p", None) is not None and not 0 < args.p <= 1:
        _fail(parser, f"--p must be in (0, 1], got {args.p}")
    if getattr(args, "cohort", None) is not None and not 1 <= args.cohort <= args.clients:
        _fail(parser, f"--cohort must be in [1, --clients={args.clients}], got {args.cohort}")
    if args.l2 <= 0:
        _fail(parser, f"--l2 must be > 0, got {args.l2}")
    if getattr(args, "local_steps", None) is not None and args.local_steps < 1:
        _fail(parser, f"--local-steps must be >= 1, got {args.local_steps}")


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, enabled: bool, metric: str):
        self.label, self.enabled, self.metric = label, enabled, metric
        self.t0 = time.monotonic()

    def __call__(self, i: int, total: int, value: float) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * i / total)
        bar = "#" * done + "." * (width - done)
        elapsed = time.monotonic() - self.t0
        sys.stderr.write(f"\r{self.label:10s} [{bar}] {i}/{total}  {self.metric} {value:.3e}  "
                         f"{elapsed:5.1f}s")  # fmt: skip
        if i == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def plot(results: dict, path: Path, spec: ProblemSpec | None = None) -> bool:
    """The PNG at ``path``: the problem's metric vs rounds and vs each cost axis (running sums)."""
    spec = spec or PROBLEMS["convex"]
    with warnings.catch_warnings():  # notices from matplotlib's own dependencies
        warnings.simplefilter("ignore")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        _draw(plt, results, path, spec)
    return True


def _draw(plt, results: dict, path: Path, spec: ProblemSpec) -> None:
    axes_keys = [k for k in spec.axes if any(k in h for h in results.values())]
    fig, axes = plt.subplots(1, 1 + len(axes_keys), figsize=(5.5 * (1 + len(axes_keys)), 4))
    axes = list(axes) if len(axes_keys) else [axes]
    for name, h in results.items():
        vals = [max(abs(g), 1e-16) if math.isfinite(g) else math.nan for g in h[spec.metric]]
        label = name + (f" (diverged at {h['diverged_at']})" if h.get("diverged_at") else "")
        axes[0].semilogy(range(len(vals)), vals, label=label)
        for ax, key in zip(axes[1:], axes_keys, strict=True):
            if key in h:
                total, xs = 0, []
                for c in h[key]:
                    total += c
                    xs.append(total)
                ax.semilogy(xs, vals, label=label)
    axes[0].set_xlabel("communication rounds")
    for ax, key in zip(axes[1:], axes_keys, strict=True):
        ax.set_xlabel(AXIS_LABEL.get(key, key))
    for ax in axes:
        ax.set_ylabel(spec.label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary name beside ``path``, then rename: a partial file never
    carries the final name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cmd_run(args, parser) -> int:
    _check(args, parser)
    spec = PROBLEMS[args.problem]
    problem, meta = spec.build(args, parser)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"problem {spec.name}; backend {fedkern.current_backend()}")
    results, rows = {}, []
    for name in args.algorithms:
        try:
            method = REGISTRY[name](problem, **_options(args, name))
        except (TypeError, ValueError) as exc:
            _fail(parser, f"{name}: {exc}")
        bar = _Progress(name, not args.no_progress, spec.metric)
        t0 = time.monotonic()
        method.run(
            args.rounds,
            progress=lambda i, n, m=method, b=bar: b(i, n, m.history[spec.metric][-1]),
        )
        if args.no_progress is False and method.diverged_at is not None:
            sys.stderr.write("\n")
        h = dict(method.history)
        h["seconds"] = time.monotonic() - t0
        h["diverged_at"] = method.diverged_at
        results[name] = h
        rows.append((name, h[spec.metric][-1], h.get("dist", [math.nan])[-1],
                     sum(h.get("floats_up", [0])), h["seconds"], method.diverged_at))  # fmt: skip
    print(
        f"\n{'algorithm':10s} {spec.title:>12s} {'||x - x*||':>12s} {'floats up':>12s} "
        f"{'seconds':>8s}  status"
    )
    for name, val, dist, up, sec, div in rows:
        status = "ok" if div is None else f"diverged at round {div}"
        print(f"{name:10s} {val:12.4e} {dist:12.4e} {up:12d} {sec:8.2f}  {status}")
    meta = {"problem": spec.name, "rounds": args.rounds, "seed": args.seed, **meta}
    _write_atomic(
        out / "metrics.json",  # fmt: skip
        lambda fh: json.dump({"meta": meta, "results": results}, fh, indent=1),
    )

    def write_csv(fh) -> None:
        w = csv.writer(fh)
        keys = []
        for h in results.values():
            n = len(h[spec.metric])
            for k, val in h.items():
                if isinstance(val, list) and len(val) == n and k not in keys:
                    keys.append(k)
        first = ["loss", "gap"]
        keys = [k for k in first if k in keys] + [k for k in keys if k not in first]
        w.writerow(["algorithm", "round", *keys])
        for name, h in results.items():
            for r in range(len(h[spec.metric])):
                w.writerow([name, r, *(h[k][r] if k in h else "" for k in keys)])

    _write_atomic(out / "metrics.csv", write_csv)
    png_path = out / ("suboptimality.png" if spec.metric == "gap" else f"{spec.metric}.png")
    png = plot(results, png_path, spec)
    print(
        f"wrote {out / 'metrics.json'}, {out / 'metrics.csv'}"
        + (f", {png_path}" if png else f" (no plot: pip install matplotlib for {png_path.name})")
    )
    return 0
