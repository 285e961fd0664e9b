"""examples/flower-scaffnew runs as its README says.

The ServerApp and ClientApp of the app run once in Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray, the runtime ``flwr run .`` uses) with Scaffnew on 10
label-sorted breast-cancer clients: the final model equals ``fedkern.algorithms.Scaffnew`` on the
same data and seed, bit for bit, and the optimality gap falls by a steady factor. TAMUNA (run
config ``method = "tamuna"``) runs the app's ServerApp ``main`` over an in-process grid
(conftest's) against ``fedkern.algorithms.TAMUNA``. Bad run configs are refused with the setting
named.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from conftest import final_model, in_process_grid  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402

from fedkern.algorithms import TAMUNA, Scaffnew  # noqa: E402

N = 10


@pytest.fixture
def app(load_example):
    """The app's modules (imported from examples/flower-scaffnew; unloaded afterwards)."""
    return load_example("flower-scaffnew", "fedkern_flower_scaffnew")


def simulator(task, cfg, rounds):
    n, l2 = int(cfg["num-clients"]), float(cfg["l2"])
    batch = task.batch(n, l2)
    gamma = float(cfg["gamma-times-L"]) / batch.problem.L
    kw = {"cohort": int(cfg["cohort"]), "p": float(cfg["p-communicate"]), "gamma": gamma,
          "seed": int(cfg["seed"])}  # fmt: skip
    if cfg["method"] == "scaffnew":
        sim = Scaffnew(batch, **kw)
    else:
        sim = TAMUNA(batch, s=int(cfg["s"]), **kw)
    sim.run(rounds)
    return sim


def test_scaffnew_app_in_the_simulation_engine(app, ray_example):
    client_app, server_app, task = app
    rounds = 30
    # fewer rounds than the README's 60
    result, _ = ray_example(app, rounds, N)
    cfg = task.config(type("Ctx", (), {"run_config": {}})())
    assert cfg["method"] == "scaffnew" and int(cfg["num-clients"]) == N
    sim = simulator(task, cfg, rounds)
    assert torch.equal(final_model(result), sim.x)  # the simulator's model, bit for bit
    sim_short = simulator(task, cfg, rounds - 1)  # negative control: one round short differs
    assert not torch.equal(final_model(result), sim_short.x)
    gaps = [result.evaluate_metrics_serverapp[t]["gap"] for t in range(rounds + 1)]
    assert gaps[rounds] < 1e-4 * gaps[0], gaps
    # linear: each third of the run gains a factor (no plateau)
    thirds = [gaps[0], gaps[rounds // 3], gaps[2 * rounds // 3], gaps[rounds]]
    assert all(b < 0.3 * a for a, b in zip(thirds, thirds[1:], strict=False)), thirds
    metrics = result.train_metrics_clientapp[rounds]
    assert metrics["clients"] == int(cfg["cohort"]) and metrics["failures"] == 0


def test_tamuna_by_run_config_in_process(app, flower_process):
    client_app, server_app, task = app
    rounds = 15
    run_config = {"method": "tamuna", "num-server-rounds": rounds, "s": 3}
    grid = in_process_grid()(client_app.app, [500 + i for i in range(N)])
    for ctx in grid.contexts.values():
        ctx.run_config = dict(run_config)
    ctx = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                  run_config=run_config)  # fmt: skip
    server_app.main(grid, ctx)
    result = server_app.RESULTS[-1]
    cfg = task.config(ctx)
    sim = simulator(task, cfg, rounds)
    assert torch.equal(final_model(result), sim.x)
    # negative control: Scaffnew on the same settings ends elsewhere
    assert not torch.equal(final_model(result), simulator(task, {**cfg, "method": "scaffnew"},
                                                          rounds).x)  # fmt: skip
    gaps = result.evaluate_metrics_serverapp
    assert gaps[rounds]["gap"] < 0.1 * gaps[0]["gap"]
    # the cohort sends s values of every coordinate up (each coordinate has s = 3 holders)
    p = task.batch(N, float(cfg["l2"])).p
    assert result.train_metrics_clientapp[rounds]["floats_up"] == 3 * p


def test_bad_method_is_named(app):
    _, server_app, task = app
    cfg = {**task.config(type("Ctx", (), {"run_config": {}})()), "method": "fedavg"}
    with pytest.raises(ValueError, match="method"):
        server_app.strategy_of(cfg)
    with pytest.raises(ValueError, match="s"):
        server_app.strategy_of({**cfg, "method": "tamuna", "s": 9})
