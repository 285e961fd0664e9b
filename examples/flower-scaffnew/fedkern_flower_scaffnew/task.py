"""The run configuration, the clients' data and the server's measure of progress.

Data: scikit-learn's bundled breast-cancer set (569 samples, 30 standardized features and a bias;
no download), split over the n clients by label (``fedkern.data.split(y, n, "label_sorted")``:
each client sees mostly one class, the heterogeneity that makes FedAvg drift). Problem:
l2-regularized logistic regression (``fedkern.problems.Problem``), whose exact optimum the server
knows, so progress is the optimality gap f(x) - f*.
"""

from __future__ import annotations

import functools
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


def config(context) -> dict:
    """The run configuration: pyproject.toml's [tool.flwr.app.config] (what ``flwr run`` passes)
    overridden by ``context.run_config`` (``flwr run --run-config``; empty when the apps run
    through ``flwr.simulation.run_simulation`` directly)."""
    cfg = {}
    if PYPROJECT.exists():
        with open(PYPROJECT, "rb") as fh:
            cfg = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return {**cfg, **dict(context.run_config)}


@functools.lru_cache(maxsize=4)
def batch(num_clients: int, l2: float) -> ClientBatch:
    """The n clients' data as one ``ClientBatch`` (float32, CPU): each client trains on its own
    rows only (``ConvexTrainer`` picks them by the client id); built once per process."""
    A, y = data.load("breast_cancer")
    parts = data.split(y, num_clients, "label_sorted")
    return ClientBatch(Problem(A, y, parts, "logistic", l2))


@functools.lru_cache(maxsize=4)
def optimum(num_clients: int, l2: float) -> float:
    """f*, the problem's optimal value (float64)."""
    return float(batch(num_clients, l2).problem.optimum()[1])


def gap(x: torch.Tensor, num_clients: int, l2: float) -> float:
    """The optimality gap f(x) - f* of a model x [p] (float64 arithmetic)."""
    return float(batch(num_clients, l2).problem.loss(x.double())) - optimum(num_clients, l2)
