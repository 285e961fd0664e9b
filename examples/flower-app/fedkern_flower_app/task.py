"""The model, the data split and the local training of the example app.

Data: scikit-learn's bundled digits (1,797 8x8 images, 10 classes; no download), 80 % for the
clients, split over the nodes by ``fedkern.data.split`` (iid), 20 % held out for the server's
evaluation. Model: an MLP 64-32-10 in PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tomllib
import torch

from fedkern import data

try:
    import tomllib
except ImportError:  # Python 3.10: Flower depends on tomli
    import tomli as tomllib

SEED = 0
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


def model() -> torch.nn.Module:
    """The MLP every node trains (the same initial weights everywhere)."""
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _digits():
    A, y = data.load("digits")
    A = A[:, :-1]  # the standardized pixels (the last column is fedkern's bias feature)
    perm = np.random.default_rng(SEED).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = perm[:cut], perm[cut:]
    return (A[train].float(), y[train].long()), (A[test].float(), y[test].long())


def partition(pid: int, num_partitions: int):
    """Node ``pid``'s training samples (inputs [m, 64] float32, labels [m] int64)."""
    (A, y), _ = _digits()
    parts = data.split(y, num_partitions, "iid", seed=SEED)
    rows = parts[pid]
    return A[rows], y[rows]


def test_set():
    """The server's held-out samples."""
    return _digits()[1]


def train(net: torch.nn.Module, inputs, labels, *, epochs: int, lr: float) -> float:
    """Local SGD (batch 32) for ``epochs`` epochs in place on ``net``; returns the last loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(SEED)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(32):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(inputs[idx]), labels[idx])
            loss.backward()
            opt.step()
    return float(loss.detach())


def accuracy(net: torch.nn.Module, inputs, labels) -> float:
    with torch.no_grad():
        return float((net(inputs).argmax(1) == labels).float().mean())
