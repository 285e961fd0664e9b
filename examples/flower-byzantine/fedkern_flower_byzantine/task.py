"""The run configuration (checked), the clients' data and the server's measure of progress.

Data: scikit-learn's bundled breast-cancer set (569 samples, 30 standardized features and a bias;
no download), split over the n clients at random (``fedkern.data.split(y, n, "iid", seed=0)``).
Problem: l2-regularized logistic regression (``fedkern.problems.LogisticRegression``). The last
``num-byzantine`` clients are Byzantine; progress is the optimality gap of the honest clients'
objective, f_H(x) - f_H*, with f_H the mean loss of the honest clients.
"""

from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path

import torch

from fedkern import data
from fedkern.problems import LogisticRegression
from fedkern.robust.aggregator import RULES

try:
    import tomllib
except ImportError:  # Python 3.10: Flower depends on tomli
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
#: attacks: "bit_flip" runs in the Byzantine clients' ClientApp; the others are simulated at the
#: server (``SimulatedAttack``); "none": the Byzantine clients reply honestly
CLIENT_ATTACKS = ("bit_flip",)
SERVER_ATTACKS = ("shift_back", "alie", "ipm")
ATTACKS = ("none", *CLIENT_ATTACKS, *SERVER_ATTACKS)
COMPRESSORS = ("none", "randk", "topk")


def config(context) -> dict:
    """The run configuration: pyproject.toml's [tool.flwr.app.config] (what ``flwr run`` passes)
    overridden by ``context.run_config`` (``flwr run --run-config``; empty when the apps run
    through ``flwr.simulation.run_simulation`` directly)."""
    cfg = {}
    if PYPROJECT.exists():
        with open(PYPROJECT, "rb") as fh:
            cfg = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return {**cfg, **dict(context.run_config)}


def _int(cfg, name, lo, hi=None) -> int:
    val = cfg.get(name)
    if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < lo or (
            hi is not None and val > hi):  # fmt: skip
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"run config {name} must be an integer {rng}, got {val!r}")
    return int(val)


def _float(cfg, name, lo=0.0, hi=math.inf, *, open_lo=True) -> float:
    val = cfg.get(name)
    ok = (isinstance(val, numbers.Real) and not isinstance(val, bool) and math.isfinite(val)
          and (val > lo if open_lo else val >= lo) and val <= hi)  # fmt: skip
    if not ok:
        bound = f"{'>' if open_lo else '>='} {lo}" + ("" if hi == math.inf else f" and <= {hi}")
        raise ValueError(f"run config {name} must be a finite number {bound}, got {val!r}")
    return float(val)


def _bool(cfg, name) -> bool:
    val = cfg.get(name)
    if not isinstance(val, bool):
        raise ValueError(f"run config {name} must be true or false, got {val!r}")
    return val


def _choice(cfg, name, choices) -> str:
    val = cfg.get(name)
    if val not in choices:
        raise ValueError(f"run config {name} must be one of {', '.join(choices)}, got {val!r}")
    return str(val)


def settings(cfg: dict) -> dict:
    """The checked settings of a run configuration (ValueError naming the setting otherwise);
    both apps call it, so a bad value is refused before any round runs."""
    n = _int(cfg, "num-clients", 2)
    out = {"rounds": _int(cfg, "num-server-rounds", 0), "n": n,
           "f": _int(cfg, "num-byzantine", 0, n - 1), "cohort": _int(cfg, "cohort", 1, n),
           "p": _float(cfg, "p-full", 0.0, 1.0), "batch_size": _int(cfg, "batch-size", 1),
           "gamma_L": _float(cfg, "gamma-times-L"), "clip": _bool(cfg, "clip"),
           "alpha": _float(cfg, "alpha"), "plus": _bool(cfg, "plus"),
           "attack": _choice(cfg, "attack", ATTACKS),
           "bit_flip_scale": _float(cfg, "bit-flip-scale"), "ipm_eps": _float(cfg, "ipm-eps"),
           "aggregator": _choice(cfg, "aggregator", ("default", *RULES)),
           "bucketing": _int(cfg, "bucketing", 1),
           "compressor": _choice(cfg, "compressor", COMPRESSORS),
           "ratio": _float(cfg, "compress-ratio", 0.0, 1.0),
           "l2": _float(cfg, "l2", open_lo=False),
           "seed": _int(cfg, "seed", 0, (1 << 63) - 1)}  # fmt: skip
    out["byzantine"] = list(range(n - out["f"], n))
    return out


@functools.lru_cache(maxsize=4)
def problem(num_clients: int, l2: float) -> LogisticRegression:
    """The n clients' data as one problem (float32 data, CPU); each client's gradients use its own
    rows only (``ProblemSampleGradients``); built once per process."""
    A, y = data.load("breast_cancer")
    return LogisticRegression(A, y, data.split(y, num_clients, "iid", seed=0), l2=l2)


@functools.lru_cache(maxsize=8)
def optimum(num_clients: int, num_byzantine: int, l2: float) -> float:
    """f_H*, the honest clients' optimal value (float64)."""
    honest = list(range(num_clients - num_byzantine))
    return float(problem(num_clients, l2).optimum(honest)[1])


def gap(x: torch.Tensor, num_clients: int, num_byzantine: int, l2: float) -> float:
    """The honest optimality gap f_H(x) - f_H* of a model x (float64 [d], CPU)."""
    honest = list(range(num_clients - num_byzantine))
    f = float(problem(num_clients, l2).loss(x.double(), honest))
    return f - optimum(num_clients, num_byzantine, l2)
