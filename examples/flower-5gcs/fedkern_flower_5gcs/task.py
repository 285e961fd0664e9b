"""The run configuration, the clients' data and the server's measure of progress.

Data: scikit-learn's bundled breast-cancer set (569 samples, 30 standardized features and a bias;
no download), split over the M clients by label (``fedkern.data.split(y, M, "label_sorted")``:
each client sees mostly one class). Problem: l2-regularized logistic regression
(``fedkern.problems.Problem``), whose exact optimum the server knows, so progress is the
optimality gap f(x) - f*.
"""

from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path

import torch

from fedkern import data
from fedkern.clients import ClientBatch
from fedkern.problems import Problem

try:
    import tomllib
except ImportError:  # Python 3.10: Flower depends on tomli
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
#: the model size d of the bundled data (30 features and a bias)
DIM = 31


def config(context) -> dict:
    """The run configuration: pyproject.toml's [tool.flwr.app.config] (what ``flwr run`` passes)
    overridden by ``context.run_config`` (``flwr run --run-config``; empty when the apps run
    through ``flwr.simulation.run_simulation`` directly)."""
    cfg = {}
    if PYPROJECT.exists():
        with open(PYPROJECT, "rb") as fh:
            cfg = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return {**cfg, **dict(context.run_config)}


def _int(cfg: dict, name: str, lo: int, hi: int | None = None) -> int:
    val = cfg.get(name)
    ok = isinstance(val, numbers.Integral) and not isinstance(val, bool)
    if not ok or val < lo or (hi is not None and val > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"run config {name!r} must be an int {rng}, got {val!r}")
    return int(val)


def _float(cfg: dict, name: str, positive: bool = False) -> float:
    val = cfg.get(name)
    ok = isinstance(val, numbers.Real) and not isinstance(val, bool) and math.isfinite(val)
    if not ok or (positive and val <= 0):
        what = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"run config {name!r} must be {what}, got {val!r}")
    return float(val)


def _choice(cfg: dict, name: str, options: tuple[str, ...]) -> str:
    val = cfg.get(name)
    if val not in options:
        raise ValueError(f"run config {name!r} must be one of {list(options)}, got {val!r}")
    return str(val)


def settings(cfg: dict) -> dict:
    """The run configuration checked and typed (ValueError naming the first bad setting):
    num-server-rounds, num-clients (M), cohort (C in [1, M]), sampling, alpha, k (0 or in
    [1, d]), local-solver, l2 (> 0), seed (>= 0)."""
    n = _int(cfg, "num-clients", 1)
    return {
        "num-server-rounds": _int(cfg, "num-server-rounds", 1),
        "num-clients": n,
        "cohort": _int(cfg, "cohort", 1, n),
        "sampling": _choice(cfg, "sampling", ("importance", "uniform")),
        "alpha": _float(cfg, "alpha"),
        "k": _int(cfg, "k", 0, DIM),
        "local-solver": _choice(cfg, "local-solver", ("gd", "agd")),
        "l2": _float(cfg, "l2", positive=True),
        "seed": _int(cfg, "seed", 0, (1 << 63) - 1),
    }


@functools.lru_cache(maxsize=4)
def batch(num_clients: int, l2: float) -> ClientBatch:
    """The M clients' data as one ``ClientBatch`` (float32, CPU): each client solves on its own
    rows only (``ConvexSolver`` picks them by the client id); built once per process."""
    A, y = data.load("breast_cancer")
    parts = data.split(y, num_clients, "label_sorted")
    return ClientBatch(Problem(A, y, parts, "logistic", l2))


@functools.lru_cache(maxsize=4)
def optimum(num_clients: int, l2: float) -> float:
    """f*, the problem's optimal value (float64)."""
    return float(batch(num_clients, l2).problem.optimum()[1])


def gap(x: torch.Tensor, num_clients: int, l2: float) -> float:
    """The optimality gap f(x) - f* of a model x [d] (float64 arithmetic)."""
    return float(batch(num_clients, l2).problem.loss(x.double())) - optimum(num_clients, l2)
