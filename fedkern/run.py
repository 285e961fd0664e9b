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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fedkern
from fedkern import data
from fedkern._plot import pyplot
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
        defaults: the family's values of the shared options the user did not give (dest ->
            value; "split" and "l2" have no global default).
        run: optional ``run(args, parser, problem, meta) -> int`` that replaces the usual loop
            over the algorithms when ``wants_run(args)`` is true (the Byzantine matrix).
    """

    name: str
    help: str
    build: Callable
    metric: str = "gap"
    label: str = "f(x) - f*"
    title: str = "f - f*"
    axes: tuple[str, ...] = ("floats_up",)
    options: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    run: Callable | None = None
    wants_run: Callable = lambda args: False  # noqa: E731


PROBLEMS: dict[str, ProblemSpec] = {}

AXIS_LABEL = {"floats_up": "floats sent per client", "grad_evals": "gradient evaluations"}


def register_problem(spec: ProblemSpec) -> ProblemSpec:
    """Add a ``--problem`` family (a name may be registered once)."""
    if spec.name in PROBLEMS:
        raise ValueError(f"problem {spec.name!r} is already registered")
    PROBLEMS[spec.name] = spec
    return spec


def split_problem(args, parser, check=None) -> tuple[Problem, str]:
    """The convex problem of the command line: the dataset (``--dataset``) split over
    ``--clients`` clients (``--split``, ``--alpha``, ``--seed``) with ``--l2``; returns (problem,
    kind). ``check(n_samples)``, when given, validates more options before the split. Errors go
    to ``parser.error`` (exit 2 with the usage line)."""
    A, y, kind = _load(args, parser)
    if args.clients > A.shape[0]:
        _fail(parser, f"--clients must be at most the {A.shape[0]} samples of {args.dataset}")
    if check is not None:
        check(A.shape[0])
    parts = data.split(y, args.clients, args.split, seed=args.seed, alpha=args.alpha)
    try:
        return Problem(A, y, parts, kind, args.l2), kind
    except ValueError as exc:
        _fail(parser, f"{exc} (try --split iid or fewer --clients)")


def _build_convex(args, parser):
    problem, kind = split_problem(args, parser)
    batch = ClientBatch(problem, seed=args.seed, device=args.device)
    print(f"{problem}; kappa = {problem.L / problem.mu:.4g}; split {args.split}")
    meta = {"dataset": args.dataset, "clients": args.clients, "split": args.split, "l2": args.l2,
            "kind": kind, "L": problem.L, "mu": problem.mu,
            "f_star": problem.optimum()[1]}  # fmt: skip
    return batch, meta


register_problem(ProblemSpec(
    "convex", "a bundled dataset (or libsvm:PATH) split over clients: L2-regularized logistic "
    "(breast_cancer, LibSVM) or multinomial (digits) regression, with its exact optimum",
    _build_convex, defaults={"split": "label_sorted", "l2": 0.01},
    axes=("floats_up", "grad_evals"),
))  # fmt: skip


def _build_quartic(args, parser):
    from fedkern.problems import Quartic

    if args.dim < 1 or args.points < args.clients:
        _fail(parser, f"--dim must be >= 1 and --points >= --clients, got {args.dim}, "
                      f"{args.points}")  # fmt: skip
    pts = Quartic.uniform_points(args.points, args.dim, seed=args.seed)
    q = Quartic.sorted_split(pts, args.clients)
    q.start = torch.full((args.dim,), float(args.x0), dtype=torch.float64)
    print(f"{q}; points sorted by norm into {args.clients} contiguous clients; x0 = {args.x0}")
    meta = {"dim": args.dim, "points": args.points, "clients": args.clients, "x0": args.x0,
            "L0": q.L0, "L1": q.L1, "f_star": q.optimum()[1]}  # fmt: skip
    return ClientBatch(q, seed=args.seed, device=args.device), meta


def _build_logistic_nonconvex(args, parser):
    from fedkern.estimators import gaussians

    A, y, kind = _load(args, parser)
    if kind != "logistic":
        y = (y >= 5).long()  # digits binarized: 0-4 vs 5-9
    problem = Problem(A, y, [torch.arange(A.shape[0])], "logistic", 0.0,
                      nonconvex_reg=args.lam)  # fmt: skip
    problem.start = gaussians(problem.p, seed=args.seed, step=0)  # x0 ~ N(0, I)
    print(f"{problem} with nonconvex_reg {args.lam}; x0 ~ N(0, I)")
    meta = {"dataset": args.dataset, "lam": args.lam, "L": problem.sample_smoothness_mean()}
    return problem, meta


register_problem(ProblemSpec(
    "quartic", "f(x) = mean ||x - x_j||^4, points uniform in [-10, 10]^dim sorted by norm over "
    "--clients (the (L0, L1)-smooth problem), started at --x0 * ones", _build_quartic,
    options={
        "dim": {"flag": "--dim", "type": int, "default": 1, "help": "quartic: dimension"},
        "points": {"flag": "--points", "type": int, "default": 1000,
                   "help": "quartic: points (default 1000)"},
        "x0": {"flag": "--x0", "type": float, "default": 100.0,
               "help": "quartic: start point x0 * ones (default 100)"},
    },
))  # fmt: skip
register_problem(ProblemSpec(
    "logistic_nonconvex", "logistic regression + lam sum w^2 / (1 + w^2) on one node "
    "(breast_cancer, or digits binarized), x0 ~ N(0, I): biased SGD's problem",
    _build_logistic_nonconvex, metric="grad_norm_sq", label="||grad f(x)||^2",
    title="||grad f||^2", axes=("grad_evals",),
    options={"lam": {"flag": "--lam", "type": float, "default": 1.0,
                     "help": "logistic_nonconvex: the regularizer's weight (default 1)"}},
))  # fmt: skip


def _build_pca(args, parser, k: int = 1):
    """PCA of a bundled dataset's standardized features (or --dataset synthetic: n = 20, a
    covariance with the spectrum 1, 0.5, 0.4 * 0.8^i), samples split over --clients nodes."""
    from fedkern.manifolds import PCA

    if args.dataset == "synthetic":
        spectrum = [1.0, 0.5] + [0.4 * 0.8**i for i in range(18)]
        if args.clients > 1000:
            _fail(parser, "--clients must be at most the 1000 samples of synthetic")
        try:
            problem = PCA.synthetic(20, 1000, spectrum, nodes=args.clients, k=k, seed=args.seed,
                                    device=args.device)  # fmt: skip
        except ValueError as exc:
            _fail(parser, str(exc))
    else:
        A, y, _ = _load(args, parser)
        Z = A[:, :-1]
        if args.clients > Z.shape[0]:
            _fail(parser, f"--clients must be at most the {Z.shape[0]} samples of {args.dataset}")
        parts = data.split(y, args.clients, args.split, seed=args.seed, alpha=args.alpha)
        try:
            problem = PCA(Z, parts, k=k, seed=args.seed, device=args.device)
        except ValueError as exc:
            _fail(parser, f"{exc} (try --split iid or fewer --clients)")
    print(f"{problem}; eigenvalues {', '.join(f'{e:.4g}' for e in problem.eigenvalues[: k + 1])}")
    meta = {"dataset": args.dataset, "clients": args.clients, "k": k, "gap": problem.gap,
            "L": problem.L, "f_star": problem.f_star}  # fmt: skip
    return problem, meta


def _build_pca_stiefel(args, parser):
    k = getattr(args, "components", None) or 3
    if k < 2:
        _fail(parser, f"--components must be >= 2 for pca_stiefel, got {k}")
    return _build_pca(args, parser, k)


_PCA_LABEL = "largest principal angle to the top eigenvector(s) (rad)"
register_problem(ProblemSpec(
    "pca", "the leading eigenvector of a dataset's covariance (digits, breast_cancer or "
    "synthetic) on the sphere, samples split over nodes",
    _build_pca, metric="angle", label=_PCA_LABEL, title="angle", axes=("floats_up", "grad_evals"),
))  # fmt: skip
register_problem(ProblemSpec(
    "pca_stiefel", "the --components leading eigenvectors (default 3) on the Stiefel manifold",
    _build_pca_stiefel, metric="angle", label=_PCA_LABEL, title="angle",
    axes=("floats_up", "grad_evals"),
    options={"components": {"flag": "--components", "type": int,
                            "help": "pca_stiefel: eigenvectors k (default 3)"}},
))  # fmt: skip


def _build_mast(args, parser):
    problem, kind = split_problem(args, parser)
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


MLP_TEST = 297  # held-out digits for the test error (about 1/6 of the 1797)
MLP_GAMMA = 0.3  # the local step of mlp_digits unless --gamma is given


def _build_mlp_digits(args, parser):
    """An MLP 65 -> --hidden (tanh) -> 10 with cross-entropy on the bundled digits (features +
    bias, float32): MLP_TEST samples held out by a keyed permutation (--seed), the rest split over
    --clients by --split (default label_sorted: each client sees one or two digits), trained through
    ``ModuleClients`` / ``ModuleBatch``. The step rule of the measured runs (tests/
    test_generalized_mlp.py) fills the options left unset: gamma MLP_GAMMA and, with s the largest
    client's RR steps per epoch at --batch-size (default 8), c0 = c1 = 1 / (gamma s) and eta =
    gamma s. --dataset is not used."""
    from fedkern.clients import ModuleBatch, ModuleClients
    from fedkern.random import permutation_tensor

    if args.hidden is None or args.hidden < 1:
        _fail(parser, f"--hidden must be >= 1, got {args.hidden}")
    A, y = data.load("digits")
    A = A.float()
    perm = permutation_tensor(A.shape[0], args.seed)
    test, train = perm[:MLP_TEST], perm[MLP_TEST:]
    if args.clients > train.numel():
        _fail(parser, f"--clients must be at most the {train.numel()} training samples of digits")
    try:
        parts = [train[p] for p in data.split(y[train], args.clients, args.split, seed=args.seed,
                                              alpha=args.alpha)]  # fmt: skip
    except ValueError as exc:
        _fail(parser, f"{exc} (try --split iid or fewer --clients)")
    if any(p.numel() == 0 for p in parts):
        _fail(parser, "a client got no samples (try --split iid or fewer --clients)")
    torch.manual_seed(args.seed)
    net = torch.nn.Sequential(torch.nn.Linear(A.shape[1], args.hidden), torch.nn.Tanh(),
                              torch.nn.Linear(args.hidden, 10))  # fmt: skip

    def loss(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    dev = torch.device(args.device)
    mc = ModuleClients(net.to(dev), loss, A.to(dev), y.to(dev), parts)
    batch = ModuleBatch(mc, seed=args.seed, test=(A[test].to(dev), y[test].to(dev)))
    batch.problem.start = mc.flat()  # the methods start from the initialized network
    if getattr(args, "gamma", None) is None:
        args.gamma = MLP_GAMMA
    if not args.batch_size >= 1:
        _fail(parser, f"--batch-size must be >= 1, got {args.batch_size}")
    s = max(math.ceil(p.numel() / args.batch_size) for p in parts)
    for dest, val in (("c0", 1 / (args.gamma * s)), ("c1", 1 / (args.gamma * s)),
                      ("eta", args.gamma * s)):  # fmt: skip
        if getattr(args, dest, None) is None:
            setattr(args, dest, val)
    print(f"{batch}: MLP 65 -> {args.hidden} -> 10 on digits, {train.numel()} training samples "
          f"over {args.clients} clients ({args.split}), {MLP_TEST} held out; gamma {args.gamma:g}, "
          f"batch {args.batch_size}, c0 = c1 = {args.c0:.4g}, eta {args.eta:.4g}")  # fmt: skip
    meta = {"dataset": "digits", "clients": args.clients, "split": args.split,
            "hidden": args.hidden, "test": MLP_TEST, "train": int(train.numel()),
            "parameters": batch.p, "epoch_steps": s, "gamma": args.gamma,
            "batch_size": args.batch_size, "c0": args.c0, "c1": args.c1,
            "eta": args.eta}  # fmt: skip
    return batch, meta


register_problem(ProblemSpec(
    "mlp_digits", "an MLP (65 -> --hidden -> 10, tanh) on digits (--dataset unused) through "
    f"ModuleClients, {MLP_TEST} samples held out, the rest over --clients (--split); the "
    f"generalized clipped methods (clerr, clipped_rr_cli, ...); defaults --gamma {MLP_GAMMA}, "
    "--c0 = --c1 = 1/(gamma s), --eta gamma s (s: RR steps per epoch); test error",
    _build_mlp_digits,
    metric="test_error", label="test error (held-out digits)", title="test error",
    axes=("floats_up",),
    options={"hidden": {"flag": "--hidden", "type": int, "default": 32,
                        "help": "mlp_digits: hidden width (default 32)"}},
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
        "algorithms", nargs="+", metavar="ALGORITHM",
        help=f"one or more of: {', '.join(REGISTRY)}; or byzantine (byz_vr_marina_pp on "
             "--problem byzantine)",
    )  # fmt: skip
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
        default=None,
        help=f"{', '.join(data.SPLITS)} (default label_sorted: heterogeneous; byzantine: iid)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (default 0.5)")
    p.add_argument("--l2", type=float, default=None,
                   help="L2 regularization (default 0.01; byzantine: 0.1)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=300, help="communication rounds (default 300)")
    for dest, spec in _method_options().items():
        kw = {k: val for k, val in spec.items() if k not in ("flag", "keyword")}
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
    for dest, spec in REGISTRY[name].cli_options.items():
        val = getattr(args, dest, None)
        if val is not None:
            kw[spec.get("keyword", dest)] = val
    return kw


def _load(args, parser):
    if args.dataset.startswith("libsvm:"):
        path = args.dataset.split(":", 1)[1]
        if not path:
            _fail(parser, "--dataset libsvm:PATH needs a file path")
        try:
            A, y = data.load_libsvm(path, binary=True)
        except OSError as exc:
            _fail(parser, f"--dataset: cannot read {path}: {exc.strerror or exc}")
        except ValueError as exc:  # names the file and the line
            _fail(parser, f"--dataset: {exc}")
        if len(set(y.tolist())) < 2:
            _fail(parser, f"--dataset: {path} has a single label; logistic regression needs two")
        return A, y, "logistic"
    if args.dataset not in data.DATASETS:
        _fail(
            parser,
            f"unknown dataset {args.dataset!r}; available: {', '.join(data.DATASETS)}, libsvm:PATH",
        )
    A, y = data.load(args.dataset)
    return A, y, KIND[args.dataset]


#: Algorithm words that stand for a method on its own problem family.
ALIASES = {"byzantine": ("byz_vr_marina_pp", "byzantine")}


def _resolve(args) -> None:
    """Expand ALIASES and apply the problem family's defaults to the options left unset."""
    for i, name in enumerate(args.algorithms):
        if name in ALIASES:
            args.algorithms[i], args.problem = ALIASES[name]
    spec = PROBLEMS.get(args.problem)
    for dest, val in (spec.defaults if spec else {}).items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, val)
    args.split = args.split or "label_sorted"
    args.l2 = 0.01 if args.l2 is None else args.l2


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
    """A tqdm progress bar on stderr, shown only on a terminal (``disable=None``: in a pipe or a
    CI log tqdm writes nothing, and the summary table tells the result)."""

    def __init__(self, label: str, enabled: bool, metric: str, total: int):
        from tqdm.auto import tqdm

        self.metric = metric
        self.bar = tqdm(total=total, desc=f"{label:10s}", file=sys.stderr, leave=True,
                        disable=None if enabled else True, dynamic_ncols=True)  # fmt: skip

    def __call__(self, i: int, total: int, value: float) -> None:
        self.bar.update(i - self.bar.n)
        self.bar.set_postfix_str(f"{self.metric} {value:.3e}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def plot(results: dict, path: Path, spec: ProblemSpec | None = None) -> bool:
    """The PNG at ``path``: the problem's metric vs rounds and vs each cost axis (running sums)."""
    spec = spec or PROBLEMS["convex"]
    with pyplot() as plt:
        if plt is None:
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
    _resolve(args)
    _check(args, parser)
    spec = PROBLEMS[args.problem]
    problem, meta = spec.build(args, parser)
    if spec.run is not None and spec.wants_run(args):
        return spec.run(args, parser, problem, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"problem {spec.name}; backend {fedkern.current_backend()}")
    results, rows = {}, []
    for name in args.algorithms:
        try:
            method = REGISTRY[name](problem, **_options(args, name))
        except (TypeError, ValueError) as exc:
            _fail(parser, f"{name}: {exc}")
        bar = _Progress(name, not args.no_progress, spec.metric, args.rounds)
        t0 = time.monotonic()
        try:
            method.run(
                args.rounds,
                progress=lambda i, n, m=method, b=bar: b(i, n, m.history[spec.metric][-1]),
            )
        finally:
            bar.close()
        h = dict(method.history)
        h["seconds"] = time.monotonic() - t0
        h["diverged_at"] = method.diverged_at
        results[name] = h
        rows.append((name, h[spec.metric][-1], h.get("dist", [math.nan])[-1],
                     sum(h.get("floats_up", [0])), h["seconds"], method.diverged_at))  # fmt: skip
    # the distance column only where some algorithm has one (a problem with a known optimum)
    w = max(10, *(len(r[0]) for r in rows))
    show_dist = any(math.isfinite(r[2]) for r in rows)
    dist_head = f" {'||x - x*||':>12s}" if show_dist else ""
    print(f"\n{'algorithm':{w}s} {spec.title:>12s}{dist_head} {'floats up':>12s} "
          f"{'seconds':>8s}  status")  # fmt: skip
    for name, val, dist, up, sec, div in rows:
        status = "ok" if div is None else f"diverged at round {div}"
        dist_col = f" {dist:12.4e}" if show_dist else ""
        print(f"{name:{w}s} {val:12.4e}{dist_col} {up:12.0f} {sec:8.2f}  {status}")
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


# the "byzantine" problem family (Byz-VR-MARINA-PP and its attack matrix) registers itself
import fedkern.run_byzantine  # noqa: E402, F401
