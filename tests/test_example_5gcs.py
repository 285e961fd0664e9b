"""examples/flower-5gcs runs as its README says.

The ServerApp and ClientApp of the app run once in Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray, the runtime ``flwr run .`` uses) with 5GCS and
importance sampling on 10 label-sorted breast-cancer clients: the final model equals
``fedkern.algorithms.FiveGCS`` on the same data and seed, bit for bit, and the optimality gap
falls far below the start. 5GCS-CC (run config ``k``) runs the app's ServerApp ``main`` over an
in-process grid (conftest's) against ``FiveGCS(k=...)``. Bad run configs are refused with the
setting named.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from conftest import final_model, in_process_grid  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402

from fedkern.algorithms import FiveGCS  # noqa: E402

N = 10


@pytest.fixture
def app(load_example):
    """The app's modules (imported from examples/flower-5gcs; unloaded afterwards)."""
    return load_example("flower-5gcs", "fedkern_flower_5gcs")


def defaults(task) -> dict:
    return task.config(type("Ctx", (), {"run_config": {}})())


def simulator(task, cfg, rounds):
    """``FiveGCS`` on the app's data with the run configuration's settings (its own defaults for
    the step sizes and local steps)."""
    s = task.settings(cfg)
    sim = FiveGCS(task.batch(s["num-clients"], s["l2"]), cohort=s["cohort"],
                  sampling=s["sampling"], alpha=s["alpha"], local_solver=s["local-solver"],
                  k=s["k"] or None, seed=s["seed"])  # fmt: skip
    sim.run(rounds)
    return sim


def test_5gcs_app_in_the_simulation_engine(app, ray_example):
    client_app, server_app, task = app
    rounds = 30
    # fewer rounds than the README's 60
    result, _ = ray_example(app, rounds, N)
    cfg = defaults(task)
    assert cfg["sampling"] == "importance" and cfg["k"] == 0 and int(cfg["num-clients"]) == N
    sim = simulator(task, cfg, rounds)
    assert torch.equal(final_model(result), sim.x)  # the simulator's model, bit for bit
    sim_short = simulator(task, cfg, rounds - 1)  # negative control: one round short differs
    assert not torch.equal(final_model(result), sim_short.x)
    gaps = [result.evaluate_metrics_serverapp[t]["gap"] for t in range(rounds + 1)]
    assert gaps[rounds] < 1e-4 * gaps[0], gaps
    # linear: each third of the run gains a factor (no plateau)
    thirds = [gaps[0], gaps[rounds // 3], gaps[2 * rounds // 3], gaps[rounds]]
    assert all(b < 0.3 * a for a, b in zip(thirds, thirds[1:], strict=False)), thirds
    # independent participation: the cohort sizes vary, and are the simulator's
    cohorts = [result.train_metrics_clientapp[t]["cohort"] for t in range(1, rounds + 1)]
    assert cohorts == sim.history["cohort"][1:] and len(set(cohorts)) > 1
    m = result.train_metrics_clientapp[rounds]
    assert m["failures"] == 0 and m["floats_up_per_client"] == task.DIM


def test_5gcs_cc_rand_k_by_run_config_in_process(app, flower_process):
    client_app, server_app, task = app
    rounds = 15
    run_config = {"num-server-rounds": rounds, "k": 8, "sampling": "uniform", "cohort": 5,
                  "seed": 3}  # fmt: skip
    grid = in_process_grid()(client_app.app, [700 + 3 * i for i in range(N)])
    for ctx in grid.contexts.values():
        ctx.run_config = dict(run_config)
    ctx = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                  run_config=run_config)  # fmt: skip
    server_app.main(grid, ctx)
    result = server_app.RESULTS[-1]
    cfg = task.config(ctx)
    sim = simulator(task, cfg, rounds)
    assert torch.equal(final_model(result), sim.x)
    # negative control: dense 5GCS on the same settings ends elsewhere
    assert not torch.equal(final_model(result), simulator(task, {**cfg, "k": 0}, rounds).x)
    gaps = result.evaluate_metrics_serverapp
    assert gaps[rounds]["gap"] < 0.1 * gaps[0]["gap"]
    # every cohort client sends k = 8 floats up, the broadcast is dense
    m = result.train_metrics_clientapp[rounds]
    assert m["cohort"] == 5 and m["floats_up"] == 5 * 8 and m["floats_down"] == 5 * task.DIM


BAD = [
    ({"cohort": 11}, "cohort"),
    ({"cohort": 0}, "cohort"),
    ({"k": 32}, "'k'"),
    ({"k": -1}, "'k'"),
    ({"k": 2.5}, "'k'"),
    ({"sampling": "stratified"}, "sampling"),
    ({"local-solver": "sgd"}, "local-solver"),
    ({"l2": 0.0}, "l2"),
    ({"alpha": float("nan")}, "alpha"),
    ({"num-clients": 0}, "num-clients"),
    ({"num-server-rounds": True}, "num-server-rounds"),
    ({"seed": -1}, "seed"),
]


@pytest.mark.parametrize("bad,name", BAD, ids=lambda v: str(v)[:30])
def test_bad_run_config_is_refused_naming_the_setting(app, bad, name):
    _, server_app, task = app
    cfg = defaults(task)
    assert isinstance(server_app.strategy_of(cfg), server_app.FiveGCSStrategy)  # the defaults pass
    with pytest.raises(ValueError, match=f"run config .*{name}"):
        server_app.strategy_of({**cfg, **bad})
