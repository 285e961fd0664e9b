"""GD, FedAvg, FedProx, Scaffold, ProxSkip and Scaffnew: invariants, the ProxSkip paper's claims
on real heterogeneous data, and ``fedkern run`` end to end."""

from __future__ import annotations

import json
import math
import re

import pytest

from fedkern import cli, data
from fedkern.algorithms import GD, REGISTRY, FedAvg, ProxSkip, Scaffnew
from fedkern.clients import ClientBatch
from fedkern.problems import Problem


@pytest.fixture(scope="module")
def cancer():
    A, y = data.load("breast_cancer")
    return A, y, data.split(y, 20, "label_sorted")  # heterogeneous: sorted by label


def batch(cancer, l2):
    A, y, parts = cancer
    return ClientBatch(Problem(A, y, parts, "logistic", l2), seed=3)


def rounds_to(gaps, tol):
    return next((i for i, g in enumerate(gaps) if g <= tol * gaps[0]), None)


def test_scaffnew_invariants(cancer):
    B = batch(cancer, 0.1)
    m = Scaffnew(B, seed=1)
    m.run(150)
    H = m.H.double()
    assert float(H.sum(0).abs().max()) < 1e-3 * float(H.abs().max())  # sum_i h_i = 0
    xs, _ = B.problem.optimum()
    grads = B.problem.grads(xs)  # h_i -> grad f_i(x*)
    assert float((H - grads).norm() / grads.norm()) < 1e-4
    assert m.history["gap"][-1] < 1e-9 * m.history["gap"][0]
    assert set(m.history["floats_up"][1:]) == {B.p}


def test_claim_linear_convergence_where_local_gd_stalls(cancer):
    """ProxSkip's claim: with heterogeneous clients Scaffnew converges linearly to the exact
    optimum; Local GD (FedAvg) with the same step and about as many local steps stalls."""
    B = batch(cancer, 0.1)
    s = Scaffnew(B, seed=0).run(200)
    avg = FedAvg(B, local_steps=10, seed=0).run(200)
    assert s["gap"][-1] < 1e-9 * s["gap"][0]
    assert min(avg["gap"][100:]) > 1e-4 * avg["gap"][0]  # a neighbourhood, not the optimum
    assert max(avg["gap"][150:]) / min(avg["gap"][150:]) < 1.01  # and it has stopped moving


def test_claim_rounds_grow_like_sqrt_kappa(cancer):
    """Rounds to reach 1e-6 of the initial gap over kappa and 10 kappa: Scaffnew's grow about
    sqrt(10) times, GD's about 10 times."""
    need = {}
    for l2 in (0.1, 0.01):
        B = batch(cancer, l2)
        s = Scaffnew(B, seed=0).run(400)
        g = GD(B).run(12000 if l2 == 0.01 else 1500)
        need[l2] = rounds_to(s["gap"], 1e-6), rounds_to(g["gap"], 1e-6)
    s_ratio = need[0.01][0] / need[0.1][0]
    g_ratio = need[0.01][1] / need[0.1][1]
    assert 1.5 < s_ratio < 6, need  # sqrt(10) = 3.2
    assert 6 < g_ratio < 14, need  # 10
    assert g_ratio > 2 * s_ratio


def test_proxskip_l1_and_partial_participation(cancer):
    B = batch(cancer, 0.05)
    m = ProxSkip(B, prox="l1", lam=0.01, seed=2)
    h = m.run(300)
    assert h["gap"][-1] < 1e-7 * h["gap"][0]
    assert int((m.x == 0).sum()) > 0  # the L1 prox makes zeros
    pp = Scaffnew(B, cohort=10, seed=2).run(300)
    assert pp["gap"][-1] < 1e-2 * pp["gap"][0]  # converges (untheorized, slower)


@pytest.mark.parametrize(
    "name", sorted(n for n, c in REGISTRY.items() if c.__module__ == "fedkern.algorithms.federated")
)
def test_every_method_decreases_the_loss_and_counts_floats(cancer, name):
    B = batch(cancer, 0.05)
    h = REGISTRY[name](B, seed=0, mode="sgd", batch_size=4).run(30)
    assert h["loss"][-1] < 0.5 * h["loss"][0]
    assert len(h["gap"]) == 31 and all(math.isfinite(g) for g in h["gap"])
    assert h["floats_up"][1] == (2 * B.p if name == "scaffold" else B.p)


def test_method_bad_input(cancer):
    B = batch(cancer, 0.05)
    with pytest.raises(ValueError, match="p must be in"):
        Scaffnew(B, p=1.5)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        GD(B, gamma=0.0)
    with pytest.raises(ValueError, match="cohort must be"):
        FedAvg(B, cohort=21)
    with pytest.raises(ValueError, match="prox must be"):
        ProxSkip(B, prox="l2")
    with pytest.raises(TypeError, match="ClientBatch"):
        GD(B.problem)


def test_cli_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", "scaffnew", "gd", "--clients", "10", "--rounds", "15",
                   "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "scaffnew" in text and "f - f*" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"scaffnew", "gd"}
    assert len(metrics["results"]["gd"]["gap"]) == 16
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("algorithm,round,loss,gap") and len(rows) == 1 + 2 * 16
    assert (out / "suboptimality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "fedsgd"], "unknown algorithm 'fedsgd'; available: gd, fedavg"),
        (["run", "gd", "--dataset", "mnist"], "unknown dataset 'mnist'; available"),
        (["run", "gd", "--split", "shards"], "unknown split 'shards'"),
        (["run", "gd", "--gamma", "-1"], "--gamma must be > 0"),
        (["run", "gd", "--p", "0"], "--p must be in \\(0, 1\\]"),
        (["run", "gd", "--clients", "5", "--cohort", "6"], "--cohort must be in"),
        (["run", "gd", "--clients", "1000"], "--clients must be at most the 569 samples"),
        (
            ["run", "gd", "--split", "dirichlet", "--clients", "300", "--alpha", "0.01"],
            "every client needs a sample",
        ),
    ],
)
def test_cli_run_bad_input(argv, match, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err
    assert re.search(match, err), err
