"""examples/flower-byzantine runs as its README says.

The app's ServerApp and ClientApp run once in Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray, the runtime ``flwr run .`` uses) with the pyproject's
settings (10 breast-cancer clients, the last 3 Byzantine, shift-back simulated at the server,
clipping on): the final model equals ``fedkern.algorithms.ByzVRMarinaPP`` with the same seeds, bit
for bit, and the honest gap stays small from round 15 on, where the same app with ``clip = false``
(the control, run over an in-process grid) is thrown back. The client-local bit flip, ALIE, the
compressors and robust rules run the ServerApp ``main`` over an in-process grid (conftest's)
against the simulator. Bad run configs are refused with the setting named, before any message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from conftest import in_process_grid  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402

from fedkern import data  # noqa: E402
from fedkern.algorithms import ByzVRMarinaPP  # noqa: E402
from fedkern.compress import RandK, TopK  # noqa: E402
from fedkern.problems import LogisticRegression  # noqa: E402

N = 10


@pytest.fixture
def app(load_example):
    """The app's modules (imported from examples/flower-byzantine; unloaded afterwards)."""
    return load_example(
        "flower-byzantine",
        "fedkern_flower_byzantine",
        reset=(("server_app", "RESULTS"), ("client_app", "_CLIENTS")),
    )


def defaults(task):
    return task.config(type("Ctx", (), {"run_config": {}})())


def simulator(cfg, rounds, **over):
    """``ByzVRMarinaPP`` on the app's data and settings, built from the raw run config."""
    A, y = data.load("breast_cancer")
    n, f = int(cfg["num-clients"]), int(cfg["num-byzantine"])
    problem = LogisticRegression(A, y, data.split(y, n, "iid", seed=0), l2=float(cfg["l2"]))
    comp = {"none": None, "randk": RandK(ratio=cfg["compress-ratio"], seed=cfg["seed"]),
            "topk": TopK(ratio=cfg["compress-ratio"])}[cfg["compressor"]]  # fmt: skip
    agg = {} if cfg["aggregator"] == "default" else {"aggregator": cfg["aggregator"],
                                                      "bucketing": cfg["bucketing"]}  # fmt: skip
    kw = {"byzantine": list(range(n - f, n)), "gamma": cfg["gamma-times-L"] / problem.L,
          "p": cfg["p-full"], "cohort": cfg["cohort"], "batch_size": cfg["batch-size"],
          "alpha": cfg["alpha"], "clip": cfg["clip"], "plus": cfg["plus"], "compressor": comp,
          "attack": cfg["attack"], "bit_flip_scale": cfg["bit-flip-scale"],
          "ipm_eps": cfg["ipm-eps"], "seed": cfg["seed"], "x0": torch.zeros(problem.d,
          dtype=torch.float64), **agg}  # fmt: skip
    sim = ByzVRMarinaPP(problem, **{**kw, **over})
    sim.run(rounds)
    return sim


def final_model(result):
    return torch.from_numpy(np.array(result.arrays["w"].numpy()))


def run_in_process(client_app, server_app, run_config):
    """The ServerApp's ``main`` over conftest's in-process grid of N nodes (every node gets the
    same run config, as ``flwr run --run-config`` gives them); returns (result, grid)."""
    grid = in_process_grid()(client_app.app, [500 + i for i in range(N)])
    for ctx in grid.contexts.values():
        ctx.run_config = dict(run_config)
    ctx = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                  run_config=dict(run_config))  # fmt: skip
    server_app.main(grid, ctx)
    return server_app.RESULTS[-1], grid


def gaps_of(result, rounds):
    return [result.evaluate_metrics_serverapp[t]["gap"] for t in range(rounds + 1)]


def robust(gaps, gap0):
    """The claim: from round 15 on (the Byzantine majorities of this seed are in rounds 18-24)
    the honest gap never exceeds 5% of the start's."""
    return max(gaps[15:]) < 0.05 * gap0


def test_app_in_the_simulation_engine_clipping_defeats_shift_back(app, flower_process, ray_example):
    client_app, server_app, task = app
    rounds = 25
    # fewer rounds than the README's 40
    result, _ = ray_example(app, rounds, N)
    cfg = defaults(task)
    assert cfg["attack"] == "shift_back" and cfg["clip"] is True and int(cfg["num-clients"]) == N
    sim = simulator(cfg, rounds)
    assert torch.equal(final_model(result), sim.x)  # the simulator's model, bit for bit
    assert not torch.equal(final_model(result), simulator(cfg, rounds - 1).x)  # one round short
    metrics = result.train_metrics_clientapp
    assert sum(metrics[t]["byzantine_majority"] for t in metrics if t >= 15) >= 1  # attack rounds
    assert sum(metrics[t]["failures"] + metrics[t]["rejected"] for t in metrics) == 0
    # the claim, and its control: the same app with clip = false (in process, same seeds)
    control, _ = run_in_process(client_app, server_app, {"clip": False})
    assert torch.equal(final_model(control), simulator(cfg, rounds, clip=False).x)
    gap0 = gaps_of(result, rounds)[0]
    for res, ok in ((result, True), (control, False)):
        g = gaps_of(res, rounds)
        assert g[0] == gap0
        assert robust(g, gap0) is ok, (ok, max(g[15:]) / gap0)


@pytest.mark.parametrize("case", ["bit_flip_randk", "alie_topk_trimmed", "ipm_plus_noclip"])
def test_attacks_compressors_and_rules_by_run_config(app, flower_process, case):
    """12 rounds over an in-process grid: the client-local bit flip (with rand-k differences),
    ALIE simulated at the server (top-k, trimmed mean with bucketing 2), IPM on the plus variant
    without clipping: the final model equals the simulator's; the attack-free simulator's differs
    (the attack reached the model)."""
    client_app, server_app, task = app
    run_config = {"num-server-rounds": 12, **{
        "bit_flip_randk": {"attack": "bit_flip", "bit-flip-scale": 3.0, "compressor": "randk"},
        "alie_topk_trimmed": {"attack": "alie", "compressor": "topk",
                              "aggregator": "trimmed_mean"},
        "ipm_plus_noclip": {"attack": "ipm", "ipm-eps": 5.0, "plus": True, "clip": False},
    }[case]}  # fmt: skip
    result, grid = run_in_process(client_app, server_app, run_config)
    cfg = {**defaults(task), **run_config}
    sim = simulator(cfg, 12)
    assert torch.equal(final_model(result), sim.x), case
    assert not torch.equal(final_model(result), simulator(cfg, 12, attack="none").x), case
    # the bit flip is the Byzantine clients' own doing; the server-side attacks leave them honest
    byz = grid.contexts[500 + N - 1]
    assert byz.node_config["partition-id"] == N - 1
    local = client_app.client(byz)
    assert (local.attack == "bit_flip") is (case == "bit_flip_randk")
    assert local.byzantine == ({7, 8, 9} if case == "bit_flip_randk" else set())


BAD = [
    ("num-clients", 1), ("num-byzantine", 10), ("num-byzantine", -1), ("cohort", 0),
    ("cohort", 11), ("p-full", 0.0), ("p-full", 1.5), ("batch-size", 0), ("batch-size", 2.5),
    ("gamma-times-L", 0.0), ("gamma-times-L", float("nan")), ("clip", "no"), ("clip", 1),
    ("alpha", -1.0), ("plus", "yes"), ("attack", "label_flip"), ("bit-flip-scale", 0.0),
    ("ipm-eps", float("inf")), ("aggregator", "median"), ("bucketing", 0),
    ("compressor", "sketch"), ("compress-ratio", 0.0), ("compress-ratio", 2.0), ("l2", -0.1),
    ("seed", -1), ("num-server-rounds", -1), ("num-server-rounds", True),
]  # fmt: skip


def test_bad_run_config_is_refused_naming_the_setting(app, flower_process):
    client_app, server_app, task = app
    cfg = defaults(task)
    server_app.strategy_of(cfg)  # the defaults are fine
    for name, bad in BAD:
        with pytest.raises(ValueError, match=f"run config {name} must be"):
            server_app.strategy_of({**cfg, name: bad})
        node = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                       run_config={name: bad})  # fmt: skip
        with pytest.raises(ValueError, match=f"run config {name} must be"):
            client_app.client(node)
    assert client_app._CLIENTS == {}
    # the ServerApp refuses before any message is sent
    grid = in_process_grid()(client_app.app, [500 + i for i in range(N)])
    sent = []
    grid.deliver = lambda m, ctx: sent.append(m)
    ctx = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                  run_config={"attack": "label_flip"})  # fmt: skip
    with pytest.raises(ValueError, match="run config attack must be one of"):
        server_app.main(grid, ctx)
    assert sent == [] and server_app.RESULTS == []
