"""The "byzantine" problem family of ``fedkern run`` and its attack x aggregator x participation
matrix.

  fedkern run byzantine --byzantine 5 --attack shift_back --aggregator trimmed_mean
  fedkern run byzantine --matrix --byzantine 5 --rounds 80 --out results/

``byzantine`` is short for ``byz_vr_marina_pp --problem byzantine``: Byz-VR-MARINA-PP
(``fedkern.algorithms.ByzVRMarinaPP``) on a bundled dataset split over ``--clients`` clients
(default iid, l2 = 0.1), the last ``--byzantine`` of them Byzantine; the metric is f - f* of the
honest clients' objective.

``--matrix`` runs the method once per cell of attack x aggregator x participation instead and
writes ``matrix.json``, ``matrix.csv`` and ``matrix.png`` (a heat map per participation level of
log10 of the final f - f* relative to the start; red is failure) and prints one table per
participation level. Rows: ``--aggregators`` (default mean, the control row, then every robust
rule), columns: ``--attacks`` (default none, bit_flip, alie, ipm, shift_back), participation
levels ``--participation`` (default full,partial): "full" samples every client in every round
(p = 1: every round is a full-gradient round), "partial" samples ``--cohort`` clients (default
20%) in compressed rounds and all of them with probability p = cohort / n. The attacks run at
the standard strong settings (``fedkern.algorithms.byzantine.STRONG``: IPM eps 10, ALIE z 10,
bit flip scale 10) unless ``--ipm-eps`` / ``--alie-z`` / ``--bit-flip-scale`` say otherwise; f of
trimmed mean and Krum is the Byzantine count (capped per round to what the cohort allows).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from fedkern._plot import pyplot
from fedkern.algorithms.byzantine import ATTACKS, STRONG, ByzVRMarinaPP
from fedkern.robust.aggregator import RULES
from fedkern.run import ProblemSpec, _fail, _write_atomic, register_problem, split_problem

__all__ = ["PARTICIPATION", "run_matrix"]

PARTICIPATION = ("full", "partial")
#: A cell whose final f - f* is above this fraction of the start's has failed (the table's "x").
FAILED = 0.1


def _build(args, parser):
    f = getattr(args, "byzantine", None) or 0

    def check(_samples: int) -> None:
        if not 0 <= f < args.clients:
            _fail(parser, f"--byzantine must be in [0, --clients={args.clients}), got {f}")

    problem, kind = split_problem(args, parser, check)
    print(f"{problem}; {f} of {args.clients} clients Byzantine; split {args.split}")
    meta = {"dataset": args.dataset, "clients": args.clients, "split": args.split, "l2": args.l2,
            "kind": kind, "byzantine": f, "L": problem.L}  # fmt: skip
    return problem, meta


def _names(text, allowed, what, parser) -> list[str]:
    names = [t for t in (text or "").split(",") if t]
    bad = [t for t in names if t not in allowed]
    if bad or not names:
        _fail(parser, f"--{what} must be a comma-separated list of {', '.join(allowed)}; got "
                      f"{text!r}")  # fmt: skip
    return names


def cell_options(args, attack: str, rule: str, participation: str, n: int) -> dict:
    """ByzVRMarinaPP keywords of one matrix cell (the strong attack settings by default)."""
    kw = {"byzantine": getattr(args, "byzantine", None) or 0, "attack": attack,
          "aggregator": rule, "seed": args.seed}  # fmt: skip
    for dest in ("ipm_eps", "alie_z", "bit_flip_scale"):
        val = getattr(args, dest, None)
        kw[dest] = STRONG[dest] if val is None else val
    names = {"gamma": "gamma", "batch_size": "batch_size", "bucketing": "bucketing",
             "byz_clip": "clip", "plus": "plus"}  # fmt: skip
    for dest, keyword in names.items():
        val = getattr(args, dest, None)
        if val is not None:
            kw[keyword] = val
    if participation == "full":
        kw.update(cohort=n, full_cohort=n, p=1.0)
    else:
        cohort = getattr(args, "cohort", None) or math.ceil(0.2 * n)
        kw.update(cohort=cohort, p=getattr(args, "p", None) or cohort / n)
    return kw


def final_ratio(history: dict) -> float:
    """The matrix's cell value: f - f* at the end over f - f* at the start (inf if diverged)."""
    gap = history["gap"]
    last = gap[-1]
    if not math.isfinite(last) or any(history["diverged"]):
        return math.inf
    return max(last, 0.0) / gap[0]


def run_matrix(problem, args, attacks, rules, levels, progress=None) -> dict:
    """{level: {rule: {attack: ratio}}} of ``final_ratio`` after ``args.rounds`` rounds."""
    out: dict = {}
    for level in levels:
        out[level] = {}
        for rule in rules:
            out[level][rule] = {}
            for attack in attacks:
                kw = cell_options(args, attack, rule, level, problem.n)
                h = ByzVRMarinaPP(problem, **kw).run(args.rounds)
                out[level][rule][attack] = final_ratio(h)
                if progress is not None:
                    progress(level, rule, attack, out[level][rule][attack])
    return out


def _fmt(r: float) -> str:
    return "diverged" if math.isinf(r) else f"{r:.1e}" + (" x" if r > FAILED else "")


def table(matrix: dict, attacks, rules) -> str:
    """The matrix as markdown tables (one per participation level)."""
    lines = []
    for level, rows in matrix.items():
        lines.append(f"\nparticipation {level}: final f - f* / initial (x: above {FAILED:g})\n")
        lines.append("| aggregator | " + " | ".join(attacks) + " |")
        lines.append("|---" * (len(attacks) + 1) + "|")
        for rule in rules:
            lines.append(f"| {rule} | " + " | ".join(_fmt(rows[rule][a]) for a in attacks) + " |")
    return "\n".join(lines)


def heatmap(matrix: dict, attacks, rules, path: Path) -> bool:
    """matrix.png: log10 of each cell (diverged drawn at the top of the scale); False without
    matplotlib."""
    with pyplot() as plt:
        if plt is None:
            return False
        import numpy as np

        levels = list(matrix)
        fig, axes = plt.subplots(1, len(levels), figsize=(1.3 * len(attacks) * len(levels) + 2,
                                                          0.55 * len(rules) + 1.8),
                                 squeeze=False)  # fmt: skip
        top = 1.0
        for ax, level in zip(axes[0], levels, strict=True):
            vals = np.array([[matrix[level][r][a] for a in attacks] for r in rules], dtype=float)
            logs = np.log10(np.clip(vals, 1e-12, 10.0**top))
            im = ax.imshow(logs, cmap="RdYlGn_r", vmin=-8, vmax=top, aspect="auto")
            for i in range(len(rules)):
                for j in range(len(attacks)):
                    text = "div" if math.isinf(vals[i, j]) else f"{logs[i, j]:.1f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
            ax.set_yticks(range(len(rules)), rules)
            ax.set_title(f"participation: {level}")
        fig.colorbar(im, ax=axes[0].tolist(), label="log10 (final f - f*) / (initial f - f*)")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return True


def _run(args, parser, problem, meta) -> int:
    attacks = _names(args.attacks, ATTACKS, "attacks", parser)
    rules = _names(args.aggregators, RULES, "aggregators", parser)
    levels = _names(args.participation, PARTICIPATION, "participation", parser)
    if "krum" in rules and "partial" in levels:
        cohort = getattr(args, "cohort", None) or math.ceil(0.2 * problem.n)
        if -(-cohort // (getattr(args, "bucketing", None) or 1)) < 3:
            _fail(parser, "krum needs at least 3 rows per round: raise --cohort or leave krum "
                          "out of --aggregators")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = len(attacks) * len(rules) * len(levels)
    done = [0]

    def progress(level, rule, attack, ratio):
        done[0] += 1
        if not args.no_progress:
            print(f"[{done[0]}/{total}] {level:8s} {rule:18s} {attack:10s} {_fmt(ratio)}")

    matrix = run_matrix(problem, args, attacks, rules, levels, progress)
    text = table(matrix, attacks, rules)
    print(text)
    settings = {dest: (STRONG[dest] if getattr(args, dest, None) is None else getattr(args, dest))
                for dest in STRONG}  # fmt: skip
    doc = {"meta": {**meta, "rounds": args.rounds, "seed": args.seed, "attack_settings": settings,
                    "failed_above": FAILED},
           "matrix": {lv: {r: {a: (None if math.isinf(x) else x) for a, x in row.items()}
                           for r, row in rows.items()} for lv, rows in matrix.items()}}  # fmt: skip
    _write_atomic(out / "matrix.json", lambda fh: json.dump(doc, fh, indent=1))

    def write_csv(fh):
        w = csv.writer(fh)
        w.writerow(["participation", "aggregator", "attack", "final_over_initial_gap"])
        for level, rows in matrix.items():
            for rule, row in rows.items():
                for attack, x in row.items():
                    w.writerow([level, rule, attack, "inf" if math.isinf(x) else repr(x)])

    _write_atomic(out / "matrix.csv", write_csv)
    png = heatmap(matrix, attacks, rules, out / "matrix.png")
    print(
        f"wrote {out / 'matrix.json'}, {out / 'matrix.csv'}"
        + (f", {out / 'matrix.png'}" if png else " (no heat map: pip install matplotlib)")
    )
    return 0


register_problem(ProblemSpec(
    "byzantine", "Byz-VR-MARINA-PP's setting: a bundled dataset split over clients (default "
    "iid, l2 0.1), the last --byzantine of them Byzantine; f - f* of the honest objective",
    _build,
    options={
        "matrix": {"flag": "--matrix", "action": "store_true",
                   "help": "byzantine: run the attack x aggregator x participation matrix"},
        "attacks": {"flag": "--attacks", "default": "none,bit_flip,alie,ipm,shift_back",
                    "help": "--matrix columns (comma-separated attacks)"},
        "aggregators": {"flag": "--aggregators", "default": ",".join(RULES),
                        "help": "--matrix rows (comma-separated rules; mean is the control)"},
        "participation": {"flag": "--participation", "default": "full,partial",
                          "help": "--matrix participation levels: full, partial"},
    },
    defaults={"split": "iid", "l2": 0.1},
    run=_run,
    wants_run=lambda args: bool(getattr(args, "matrix", None)),
))  # fmt: skip
