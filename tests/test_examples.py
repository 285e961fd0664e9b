"""The example apps under examples/ run as their READMEs say.

examples/flower-app: the ServerApp and ClientApp of the Flower app run in Flower's simulation
engine (``flwr.simulation.run_simulation``, Ray backend, the runtime ``flwr run .`` uses) on 6
nodes, one of them Byzantine; the robust strategy with compressed updates must reach a held-out
accuracy that the plain mean cannot (the in-process control in tests/test_flower.py shows the mean
ruined by the same kind of attack).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "examples" / "flower-app"


def test_flower_example_app_in_the_simulation_engine(monkeypatch):
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation] (Ray)")
    from flwr.simulation import run_simulation

    monkeypatch.syspath_prepend(str(APP))
    from fedkern_flower_app import client_app, server_app, task

    try:
        run_simulation(
            server_app=server_app.app,
            client_app=client_app.app,
            num_supernodes=6,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "include_dashboard": False},
            },
        )
        result = server_app.RESULTS[-1]  # fmt: skip
    finally:
        for name in [m for m in sys.modules if m.startswith("fedkern_flower_app")]:
            del sys.modules[name]
    cfg = task.config(type("Ctx", (), {"run_config": {}})())
    rounds = int(cfg["num-server-rounds"])
    acc = result.evaluate_metrics_serverapp
    assert acc[0]["accuracy"] < 0.2  # the untrained model
    assert acc[rounds]["accuracy"] > 0.85, acc
    metrics = result.train_metrics_clientapp[rounds]
    assert metrics["fedkern_clients"] == 6 and metrics["fedkern_compressed"] == 6
