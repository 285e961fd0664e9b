"""The ServerApp: ``ScaffnewStrategy`` or ``TamunaStrategy`` (run config ``method``) from the
zero model, with the optimality gap f(x) - f* evaluated at the server after every round."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedkern.integrations.flower import ScaffnewStrategy, TamunaStrategy
from fedkern_flower_scaffnew import task

app = ServerApp()
#: the ``Result`` of every run of this process (for programmatic runs and tests)
RESULTS: list = []


def strategy_of(cfg: dict):
    """The strategy the run configuration names (ValueError for another method)."""
    n, l2 = int(cfg["num-clients"]), float(cfg["l2"])
    gamma = float(cfg["gamma-times-L"]) / task.batch(n, l2).problem.L
    kw = {"num_clients": n, "cohort": int(cfg["cohort"]), "p": float(cfg["p-communicate"]),
          "gamma": gamma, "seed": int(cfg["seed"])}  # fmt: skip
    method = str(cfg["method"])
    if method == "scaffnew":
        return ScaffnewStrategy(**kw)
    if method == "tamuna":
        return TamunaStrategy(s=int(cfg["s"]), **kw)
    raise ValueError(f"run config method must be 'scaffnew' or 'tamuna', got {method!r}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = task.config(context)
    n, l2 = int(cfg["num-clients"]), float(cfg["l2"])
    strategy = strategy_of(cfg)
    p = task.batch(n, l2).p

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        x = torch.from_numpy(np.array(arrays["x"].numpy()))
        return MetricRecord({"gap": task.gap(x, n, l2)})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"x": Array(np.zeros(p,
                            np.float32))}), num_rounds=int(cfg["num-server-rounds"]),
                            evaluate_fn=evaluate)  # fmt: skip
    gaps = result.evaluate_metrics_serverapp
    print(
        f"fedkern-flower-scaffnew: {cfg['method']} optimality gap {gaps[0]['gap']:.3e} -> "
        f"{gaps[max(gaps)]['gap']:.3e} after {max(gaps)} rounds"
    )
    RESULTS.append(result)
