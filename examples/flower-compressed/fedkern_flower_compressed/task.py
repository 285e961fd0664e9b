"""The run configuration, the clients' data and the server's measure of progress.

Data: scikit-learn's bundled breast-cancer set (569 samples, 30 standardized features and a bias;
no download), split over the n clients by label (``fedkern.data.split(y, n, "label_sorted")``:
each client sees mostly one class, so the local gradients disagree at the optimum -- the case
where compressing the raw gradients stalls and DIANA's shifts / EF21's feedback do not). Problem:
l2-regularized logistic regression (``fedkern.problems.Problem``), whose exact optimum the server
knows, so progress is the optimality gap f(x) - f*.
"""

from __future__ import annotations

import functools
import math
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
METHODS = ("diana", "marina", "ef21")
COMPRESSORS = ("auto", "randk", "topk", "none")


def config(context) -> dict:
    """The run configuration: pyproject.toml's [tool.flwr.app.config] (what ``flwr run`` passes)
    overridden by ``context.run_config`` (``flwr run --run-config``; empty when the apps run
    through ``flwr.simulation.run_simulation`` directly)."""
    cfg = {}
    if PYPROJECT.exists():
        with open(PYPROJECT, "rb") as fh:
            cfg = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return {**cfg, **dict(context.run_config)}


def _bad(name: str, want: str, got) -> ValueError:
    return ValueError(f"run config {name} must be {want}, got {got!r}")


def _int(cfg: dict, name: str, lo: int) -> int:
    val = cfg.get(name)
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        raise _bad(name, f"an integer >= {lo}", val)
    return val


def _float(cfg: dict, name: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    val = cfg.get(name)
    ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
    if not ok or val > hi or val < lo or (open_lo and val == lo):
        rng = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise _bad(name, f"a number in {rng}", val)
    return float(val)


def _choice(cfg: dict, name: str, options: tuple) -> str:
    val = cfg.get(name)
    if val not in options:
        raise _bad(name, "one of " + ", ".join(repr(o) for o in options), val)
    return val


def settings(cfg: dict) -> dict:
    """The run configuration checked and typed (a ValueError naming the setting otherwise; nothing
    is built before every setting passed). Returns a new dict with the pyproject's keys; the
    compressor "auto" resolved to the method's default ("randk" for DIANA / MARINA, "topk" for
    EF21), shift-step None for "auto". k is checked against p by the strategy (``server_app``)."""
    s = {"method": _choice(cfg, "method", METHODS)}
    s["num-server-rounds"] = _int(cfg, "num-server-rounds", 0)
    s["num-clients"] = _int(cfg, "num-clients", 1)
    comp = _choice(cfg, "compressor", COMPRESSORS)
    if comp == "auto":
        comp = "topk" if s["method"] == "ef21" else "randk"
    if comp == "topk" and s["method"] != "ef21":
        raise _bad("compressor", f"'randk' or 'none' for {s['method']} (unbiased)", comp)
    s["compressor"] = comp
    s["k"] = _int(cfg, "k", 1)
    s["gamma-times-L"] = _float(cfg, "gamma-times-L", 0.0, 1e6, open_lo=True)
    shift = cfg.get("shift-step")
    s["shift-step"] = None if shift == "auto" else _float(cfg, "shift-step", 0.0, 1.0)
    s["p-full"] = _float(cfg, "p-full", 0.0, 1.0, open_lo=True)
    if not isinstance(cfg.get("feedback"), bool):
        raise _bad("feedback", "true or false", cfg.get("feedback"))
    s["feedback"] = cfg["feedback"]
    s["mode"] = _choice(cfg, "mode", ("gd", "sgd"))
    s["batch-size"] = _int(cfg, "batch-size", 1)
    s["l2"] = _float(cfg, "l2", 0.0, 1e6)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise _bad("seed", "an integer in [0, 2**63)", seed)
    s["seed"] = seed
    return s


@functools.lru_cache(maxsize=4)
def batch(num_clients: int, l2: float, seed: int = 0) -> ClientBatch:
    """The n clients' data as one ``ClientBatch`` (float32, CPU; ``seed`` keys its minibatches):
    each client computes gradients on its own rows only (``ConvexGradients`` picks them by the
    client id); built once per process and setting."""
    A, y = data.load("breast_cancer")
    parts = data.split(y, num_clients, "label_sorted")
    return ClientBatch(Problem(A, y, parts, "logistic", l2), seed=seed)


@functools.lru_cache(maxsize=4)
def optimum(num_clients: int, l2: float) -> float:
    """f*, the problem's optimal value (float64)."""
    return float(batch(num_clients, l2).problem.optimum()[1])


def gap(x: torch.Tensor, num_clients: int, l2: float) -> float:
    """The optimality gap f(x) - f* of a model x [p] (float64 arithmetic; x is not modified)."""
    return float(batch(num_clients, l2).problem.loss(x.double())) - optimum(num_clients, l2)
