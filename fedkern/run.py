"""``fedkern run``: run federated methods on real data and write metrics and plots.

  fedkern run scaffnew --dataset breast_cancer --clients 100 --rounds 300
  fedkern run gd fedavg scaffold scaffnew --split label_sorted --l2 0.01

Every named algorithm runs on the same problem (dataset, split over clients, L2 regularization,
exact optimum) with its theory defaults unless overridden; a progress bar shows each run; at the
end a summary table is printed and DIR receives ``metrics.json`` (every history), ``metrics.csv``
(one row per algorithm and round) and ``suboptimality.png`` (f - f* against communication rounds
and against floats sent per client; needs matplotlib).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path

import fedkern
from fedkern import data
from fedkern.algorithms import REGISTRY
from fedkern.clients import ClientBatch
from fedkern.problems import Problem

KIND = {"breast_cancer": "logistic", "digits": "multinomial"}


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
    p.add_argument("--gamma", type=float, default=None, help="step size (default 1/L)")
    p.add_argument(
        "--p",
        type=float,
        default=None,
        help="ProxSkip/Scaffnew communication probability (default 1/sqrt(kappa))",
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="FedAvg/FedProx/Scaffold local steps K (default 10)",
    )
    p.add_argument("--cohort", type=int, default=None, help="clients per round (default all)")
    p.add_argument(
        "--mode",
        default="gd",
        choices=("gd", "sgd", "rr"),
        help="local gradient: full batch, minibatch SGD or random reshuffling",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sgd/rr minibatch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, coins and batches")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="fedkern-run", help="output directory (default fedkern-run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)


def _fail(parser, msg: str):
    parser.error(msg)


def _options(args, name: str) -> dict:
    kw = {"seed": args.seed, "mode": args.mode, "batch_size": args.batch_size}
    if args.gamma is not None:
        kw["gamma"] = args.gamma
    if args.p is not None and name in ("proxskip", "scaffnew"):
        kw["p"] = args.p
    if args.local_steps is not None and name in ("fedavg", "fedprox", "scaffold"):
        kw["local_steps"] = args.local_steps
    if args.cohort is not None and name != "gd":
        kw["cohort"] = args.cohort
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
    if args.split not in data.SPLITS:
        _fail(parser, f"unknown split {args.split!r}; available: {', '.join(data.SPLITS)}")
    if args.rounds < 1:
        _fail(parser, f"--rounds must be >= 1, got {args.rounds}")
    if args.clients < 1:
        _fail(parser, f"--clients must be >= 1, got {args.clients}")
    if args.gamma is not None and not (args.gamma > 0 and math.isfinite(args.gamma)):
        _fail(parser, f"--gamma must be > 0, got {args.gamma}")
    if args.p is not None and not 0 < args.p <= 1:
        _fail(parser, f"--p must be in (0, 1], got {args.p}")
    if args.cohort is not None and not 1 <= args.cohort <= args.clients:
        _fail(parser, f"--cohort must be in [1, --clients={args.clients}], got {args.cohort}")
    if args.l2 <= 0:
        _fail(parser, f"--l2 must be > 0, got {args.l2}")
    if args.local_steps is not None and args.local_steps < 1:
        _fail(parser, f"--local-steps must be >= 1, got {args.local_steps}")


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.t0 = label, enabled, time.monotonic()

    def __call__(self, i: int, total: int, gap: float) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * i / total)
        bar = "#" * done + "." * (width - done)
        elapsed = time.monotonic() - self.t0
        sys.stderr.write(f"\r{self.label:10s} [{bar}] {i}/{total}  f-f* {gap:.3e}  {elapsed:5.1f}s")
        if i == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def plot(results: dict, path: Path) -> bool:
    """suboptimality.png: f - f* vs rounds and vs cumulative floats sent per client."""
    with warnings.catch_warnings():  # notices from matplotlib's own dependencies
        warnings.simplefilter("ignore")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        _draw(plt, results, path)
    return True


def _draw(plt, results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in results.items():
        gap = [max(g, 1e-16) for g in h["gap"]]
        floats, total = [], 0
        for up in h["floats_up"]:
            total += up
            floats.append(total)
        axes[0].semilogy(range(len(gap)), gap, label=name)
        axes[1].semilogy(floats, gap, label=name)
    axes[0].set_xlabel("communication rounds")
    axes[1].set_xlabel("floats sent per client")
    for ax in axes:
        ax.set_ylabel("f(x) - f*")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_run(args, parser) -> int:
    _check(args, parser)
    A, y, kind = _load(args, parser)
    if args.clients > A.shape[0]:
        _fail(parser, f"--clients must be at most the {A.shape[0]} samples of {args.dataset}")
    parts = data.split(y, args.clients, args.split, seed=args.seed, alpha=args.alpha)
    try:
        problem = Problem(A, y, parts, kind, args.l2)
    except ValueError as exc:
        _fail(parser, f"{exc} (try --split iid or fewer --clients)")
    batch = ClientBatch(problem, seed=args.seed, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{problem}; kappa = {problem.L / problem.mu:.4g}; split {args.split}; "
        f"backend {fedkern.current_backend()}"
    )
    results, rows = {}, []
    for name in args.algorithms:
        method = REGISTRY[name](batch, **_options(args, name))
        bar = _Progress(name, not args.no_progress)
        t0 = time.monotonic()
        method.run(
            args.rounds, progress=lambda i, n, m=method, b=bar: b(i, n, m.history["gap"][-1])
        )
        h = dict(method.history)
        h["seconds"] = time.monotonic() - t0
        results[name] = h
        rows.append((name, h["gap"][-1], h["dist"][-1], sum(h["floats_up"]), h["seconds"]))
    print(
        f"\n{'algorithm':10s} {'f - f*':>12s} {'||x - x*||':>12s} {'floats up':>12s} "
        f"{'seconds':>8s}"
    )
    for name, gap, dist, up, sec in rows:
        print(f"{name:10s} {gap:12.4e} {dist:12.4e} {up:12d} {sec:8.2f}")
    meta = {
        "dataset": args.dataset,
        "clients": args.clients,
        "split": args.split,
        "l2": args.l2,
        "rounds": args.rounds,
        "seed": args.seed,
        "kind": kind,
        "L": problem.L,
        "mu": problem.mu,
        "f_star": problem.optimum()[1],
    }
    (out / "metrics.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        keys = ["loss", "gap", "grad_norm", "dist", "floats_up", "floats_down", "local_steps"]
        w.writerow(["algorithm", "round", *keys])
        for name, h in results.items():
            for r in range(len(h["gap"])):
                w.writerow([name, r, *(h[k][r] for k in keys)])
    png = plot(results, out / "suboptimality.png")
    print(
        f"wrote {out / 'metrics.json'}, {out / 'metrics.csv'}"
        + (
            f", {out / 'suboptimality.png'}"
            if png
            else " (no plot: pip install matplotlib for suboptimality.png)"
        )
    )
    return 0
