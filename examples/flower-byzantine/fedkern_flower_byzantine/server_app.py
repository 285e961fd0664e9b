"""The ServerApp: ``ByzVRMarinaPPStrategy`` from the zero model, with the honest optimality gap
f_H(x) - f_H* evaluated at the server after every round.

The omniscient attacks (run config ``attack`` = "shift_back", "alie", "ipm") are simulated here
through the strategy's ``adversary`` hook (``SimulatedAttack``): it replaces the Byzantine
clients' rows with what an attacker who sees the round's honest messages, x0 and g would send.
This is a simulation device for measuring robustness; a real deployment passes no adversary and
need not know who is Byzantine."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedkern.compress import RandK, TopK
from fedkern.integrations.flower import ByzVRMarinaPPStrategy, SimulatedAttack
from fedkern_flower_byzantine import task

app = ServerApp()
#: the ``Result`` of every run of this process (for programmatic runs and tests)
RESULTS: list = []


def strategy_of(cfg: dict) -> ByzVRMarinaPPStrategy:
    """The strategy of a run configuration (ValueError naming a bad setting)."""
    s = task.settings(cfg)
    prob = task.problem(s["n"], s["l2"])
    compressor = {"none": None, "randk": RandK(ratio=s["ratio"], seed=s["seed"]),
                  "topk": TopK(ratio=s["ratio"])}[s["compressor"]]  # fmt: skip
    agg = {} if s["aggregator"] == "default" else {"aggregator": s["aggregator"],
                                                    "bucketing": s["bucketing"]}  # fmt: skip
    adversary = None
    if s["attack"] in task.SERVER_ATTACKS:
        adversary = SimulatedAttack(s["attack"], ipm_eps=s["ipm_eps"])
    return ByzVRMarinaPPStrategy(
        num_clients=s["n"], gamma=s["gamma_L"] / prob.L, p=s["p"], cohort=s["cohort"],
        batch_size=s["batch_size"], alpha=s["alpha"], clip=s["clip"], plus=s["plus"],
        compressor=compressor, byzantine=s["byzantine"], adversary=adversary, seed=s["seed"],
        **agg)  # fmt: skip


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = task.config(context)
    s = task.settings(cfg)
    strategy = strategy_of(cfg)
    d = task.problem(s["n"], s["l2"]).d

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        x = torch.from_numpy(np.array(arrays["w"].numpy()))
        return MetricRecord({"gap": task.gap(x, s["n"], s["f"], s["l2"])})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(d))}),
                            num_rounds=s["rounds"], evaluate_fn=evaluate)  # fmt: skip
    gaps = result.evaluate_metrics_serverapp
    h = strategy.history
    print(
        f"fedkern-flower-byzantine: attack {s['attack']}, clip {s['clip']}, "
        f"{s['f']} of {s['n']} clients Byzantine ({sum(h['byzantine_majority'])} rounds with a "
        f"Byzantine majority): honest gap {gaps[0]['gap']:.3e} -> {gaps[max(gaps)]['gap']:.3e} "
        f"after {max(gaps)} rounds"
    )
    RESULTS.append(result)
