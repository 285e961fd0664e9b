"""The ServerApp: ``DianaStrategy``, ``MarinaStrategy`` or ``Ef21Strategy`` (run config
``method``) from the zero model, with the optimality gap f(x) - f* evaluated at the server after
every round."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedkern.integrations.flower import DianaStrategy, Ef21Strategy, MarinaStrategy
from fedkern_flower_compressed import task

app = ServerApp()
#: the ``Result`` of every run of this process (for programmatic runs and tests)
RESULTS: list = []


def strategy_of(cfg: dict):
    """The strategy the run configuration names (a ValueError naming the bad setting, raised
    before any data is loaded or any message sent)."""
    s = task.settings(cfg)
    n, l2 = s["num-clients"], s["l2"]
    p = task.batch(n, l2, s["seed"]).p
    if s["compressor"] != "none" and s["k"] > p:
        raise ValueError(f"run config k must be <= {p} (the model size), got {s['k']}")
    gamma = s["gamma-times-L"] / task.batch(n, l2, s["seed"]).problem.L
    kw = {"num_clients": n, "gamma": gamma, "compressor": s["compressor"], "seed": s["seed"],
          "k": None if s["compressor"] == "none" else s["k"]}  # fmt: skip
    if s["method"] == "diana":
        return DianaStrategy(shift_step=s["shift-step"], **kw)
    if s["method"] == "marina":
        return MarinaStrategy(p=s["p-full"], **kw)
    return Ef21Strategy(feedback=s["feedback"], **kw)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = task.config(context)
    strategy = strategy_of(cfg)
    s = task.settings(cfg)
    n, l2 = s["num-clients"], s["l2"]
    p = task.batch(n, l2, s["seed"]).p

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        x = torch.from_numpy(np.array(arrays["x"].numpy()))
        return MetricRecord({"gap": task.gap(x, n, l2)})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"x": Array(np.zeros(p,
                            np.float32))}), num_rounds=s["num-server-rounds"],
                            evaluate_fn=evaluate)  # fmt: skip
    gaps = result.evaluate_metrics_serverapp
    up = sum(strategy.history["floats_up_per_client"])
    print(
        f"fedkern-flower-compressed: {s['method']} ({s['compressor']}) optimality gap "
        f"{gaps[0]['gap']:.3e} -> {gaps[max(gaps)]['gap']:.3e} after {max(gaps)} rounds, "
        f"{up:.0f} floats up per client"
    )
    RESULTS.append(result)
