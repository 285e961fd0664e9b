"""The ServerApp: ``FiveGCSStrategy`` (importance sampling by default; 5GCS-CC with run config
``k`` >= 1) from the zero model, with the optimality gap f(x) - f* evaluated at the server after
every round. The step sizes and local steps are the simulator's defaults, from the clients'
smoothness constants (``client_smoothness``)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedkern.algorithms.fivegcs import client_smoothness
from fedkern.integrations.flower import FiveGCSStrategy
from fedkern_flower_5gcs import task

app = ServerApp()
#: the ``Result`` of every run of this process (for programmatic runs and tests)
RESULTS: list = []


def strategy_of(cfg: dict) -> FiveGCSStrategy:
    """The strategy of a run configuration (ValueError naming a bad setting, before anything is
    built)."""
    s = task.settings(cfg)
    n, l2 = s["num-clients"], s["l2"]
    problem = task.batch(n, l2).problem
    return FiveGCSStrategy(num_clients=n, mu=problem.mu, cohort=s["cohort"],
                           sampling=s["sampling"], smoothness=client_smoothness(problem),
                           alpha=s["alpha"], local_solver=s["local-solver"],
                           k=s["k"] or None, seed=s["seed"])  # fmt: skip


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = task.config(context)
    strategy = strategy_of(cfg)
    s = task.settings(cfg)
    n, l2 = s["num-clients"], s["l2"]
    d = task.batch(n, l2).p

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        x = torch.from_numpy(np.array(arrays["x"].numpy()))
        return MetricRecord({"gap": task.gap(x, n, l2)})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"x": Array(np.zeros(d,
                            np.float32))}), num_rounds=s["num-server-rounds"],
                            evaluate_fn=evaluate)  # fmt: skip
    gaps = result.evaluate_metrics_serverapp
    name = "5GCS" if s["k"] == 0 else f"5GCS-CC (Rand-{s['k']})"
    print(
        f"fedkern-flower-5gcs: {name}, {s['sampling']} sampling, optimality gap "
        f"{gaps[0]['gap']:.3e} -> {gaps[max(gaps)]['gap']:.3e} after {max(gaps)} rounds"
    )
    RESULTS.append(result)
