"""examples/flower-compressed runs as its README says.

The app's ServerApp and ClientApp run once in Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray, the runtime ``flwr run .`` uses) with DIANA (rand-k, the
default shift step) on 10 label-sorted breast-cancer clients: the final model equals
``fedkern.algorithms.DIANA`` on the same data and seed, bit for bit, and the optimality gap falls
far below its start where the control (run config shift-step = 0: compressed GD, the same app
in process) stays above the same bound. MARINA and EF21 (run config ``method``) run the app's
ServerApp ``main`` over an in-process grid (conftest's) against ``fedkern.algorithms.MARINA`` /
``EF21``. Bad run configs are refused with the setting named, before anything runs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from conftest import final_model, in_process_grid  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402

from fedkern.algorithms import DIANA, EF21, MARINA  # noqa: E402

N = 10


@pytest.fixture
def app(load_example):
    """The app's modules (imported from examples/flower-compressed; unloaded afterwards)."""
    return load_example("flower-compressed", "fedkern_flower_compressed")


def defaults(task) -> dict:
    return task.config(type("Ctx", (), {"run_config": {}})())


def simulator(task, cfg, rounds):
    """fedkern's simulator method of the run config, run for ``rounds`` rounds."""
    s = task.settings(cfg)
    batch = task.batch(s["num-clients"], s["l2"], s["seed"])
    kw = {"gamma": s["gamma-times-L"] / batch.problem.L, "compressor": s["compressor"],
          "seed": s["seed"], "mode": s["mode"], "batch_size": s["batch-size"],
          "k": None if s["compressor"] == "none" else s["k"]}  # fmt: skip
    if s["method"] == "diana":
        sim = DIANA(batch, shift_step=s["shift-step"], **kw)
    elif s["method"] == "marina":
        sim = MARINA(batch, p=s["p-full"], **kw)
    else:
        sim = EF21(batch, feedback=s["feedback"], **kw)
    sim.run(rounds)
    return sim


def run_in_process(client_app, server_app, run_config):
    """The app's ServerApp ``main`` over an in-process grid of N ClientApp nodes (each with its
    own persistent Context, run config ``run_config``); returns the strategy's Result."""
    grid = in_process_grid()(client_app.app, [700 + 3 * i for i in range(N)])
    for ctx in grid.contexts.values():
        ctx.run_config = dict(run_config)
    ctx = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                  run_config=dict(run_config))  # fmt: skip
    server_app.main(grid, ctx)
    return server_app.RESULTS[-1]


def relative_gaps(result, rounds):
    g = result.evaluate_metrics_serverapp
    return [g[t]["gap"] / g[0]["gap"] for t in range(rounds + 1)]


def test_diana_app_in_the_simulation_engine(app, ray_example, flower_process):
    client_app, server_app, task = app
    rounds, tol = 30, 1.3e-3
    # fewer rounds than the README's 60
    result, _ = ray_example(app, rounds, N)
    cfg = task.config(type("Ctx", (), {"run_config": {}})())
    assert cfg["method"] == "diana" and cfg["compressor"] == "auto" and cfg["num-clients"] == N
    sim = simulator(task, cfg, rounds)
    assert torch.equal(final_model(result), sim.x)  # the simulator's model, bit for bit
    # negative control: another seed's masks end elsewhere
    assert not torch.equal(final_model(result), simulator(task, {**cfg, "seed": 1}, rounds).x)
    metrics = result.train_metrics_clientapp[rounds]
    assert metrics["clients"] == N and metrics["failures"] == 0
    assert metrics["floats_up_per_client"] == cfg["k"]  # k values, no indices (rand-k masks)
    gaps = relative_gaps(result, rounds)
    # the claim: the shifts reach gap <= tol * gap0; compressed GD (shift-step = 0, same app,
    # same seed, in process) fails the same assertion and plateaus above it over the second half.
    # Measured (relative gaps after 30 rounds): DIANA 7.8e-4; control 4.3e-3, its minimum over
    # rounds 15..30 2.2e-3
    control = relative_gaps(run_in_process(client_app, server_app, {"shift-step": 0.0,
                            "num-server-rounds": rounds}), rounds)  # fmt: skip
    print(f"DIANA {gaps[-1]:.2e}, shift-step 0 {control[-1]:.2e}")
    assert gaps[-1] <= tol, gaps
    assert not control[-1] <= tol, control
    assert min(control[rounds // 2 :]) > tol, control


@pytest.mark.parametrize("run_config,bound", [
    ({"method": "marina", "num-server-rounds": 12}, 0.1),
    ({"method": "marina", "num-server-rounds": 8, "mode": "sgd", "batch-size": 4, "seed": 3}, 0.5),
    ({"method": "ef21", "num-server-rounds": 12}, 0.1),
    ({"method": "ef21", "num-server-rounds": 8, "compressor": "randk", "k": 7,
      "feedback": False}, 0.5),
])  # fmt: skip
def test_marina_and_ef21_by_run_config_in_process(app, flower_process, run_config, bound):
    client_app, server_app, task = app
    rounds = run_config["num-server-rounds"]
    result = run_in_process(client_app, server_app, run_config)
    cfg = {**defaults(task), **run_config}
    sim = simulator(task, cfg, rounds)
    assert torch.equal(final_model(result), sim.x)  # bit for bit
    # negative control: the same settings under DIANA end elsewhere
    other = simulator(task, {**cfg, "method": "diana", "compressor": "randk"}, rounds)
    assert not torch.equal(final_model(result), other.x)
    gaps = relative_gaps(result, rounds)
    # progress in these few rounds: a factor 10 with the defaults, 2 for minibatches / no feedback
    assert gaps[-1] < bound, gaps
    # the initialization is round 0 (all n clients), then `rounds` method rounds
    assert sorted(result.train_metrics_clientapp) == list(range(rounds + 1))
    assert result.train_metrics_clientapp[rounds]["failures"] == 0
    if run_config["method"] == "ef21" and cfg["compressor"] == "topk":
        # top-k: k values and k indices per client and round
        assert result.train_metrics_clientapp[rounds]["floats_up_per_client"] == 2 * cfg["k"]


@pytest.mark.parametrize("setting,value,match", [
    ("method", "fedavg", "method"),
    ("compressor", "topk", "compressor"),  # DIANA needs an unbiased compressor
    ("compressor", "qsgd", "compressor"),
    ("k", 0, "run config k"),
    ("k", 32, "run config k must be <= 31"),
    ("k", 2.5, "run config k"),
    ("gamma-times-L", 0.0, "gamma-times-L"),
    ("gamma-times-L", float("nan"), "gamma-times-L"),
    ("shift-step", 1.5, "shift-step"),
    ("shift-step", "half", "shift-step"),
    ("p-full", 0.0, "p-full"),
    ("feedback", "yes", "feedback"),
    ("mode", "adam", "mode"),
    ("batch-size", 0, "batch-size"),
    ("num-clients", True, "num-clients"),
    ("num-server-rounds", -1, "num-server-rounds"),
    ("l2", -0.1, "l2"),
    ("seed", -3, "seed"),
])  # fmt: skip
def test_bad_run_config_is_named(app, setting, value, match):
    _, server_app, task = app
    cfg = defaults(task)
    server_app.strategy_of(cfg)  # the defaults pass
    with pytest.raises(ValueError, match=match):
        server_app.strategy_of({**cfg, setting: value})
    if setting == "compressor" and value == "topk":
        # EF21 takes top-k
        server_app.strategy_of({**cfg, "method": "ef21", setting: value})
