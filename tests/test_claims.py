"""Claim tests with teeth (issue 18): every claim runs next to its negative control, which must fail
the same assertion, on real bundled data with fixed seeds.

- ``fedkern run byzantine --matrix``: under the strong attacks the plain mean (the control row)
  breaks and the robust rules hold;
- Byz-VR-MARINA-PP+ under the shift-back attack: with clipping it converges, without (the
  control) the Byzantine-majority rounds throw it back;
- MicroAdam on a task where a linear model and an MLP differ (nested shells): MicroAdam is near
  AdamW, top-k of the same density without error feedback (the control) is clearly worse.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedkern import cli, data
from fedkern.algorithms import ByzVRMarinaPP
from fedkern.optim import MicroAdam
from fedkern.problems import LogisticRegression
from fedkern.run_byzantine import FAILED

# ---- the attack x aggregator x participation matrix -------------------------------------------


def test_matrix_command_mean_breaks_robust_rules_hold(tmp_path, capsys):
    """Breast cancer over 20 iid clients (heterogeneous honest gradients), 5 Byzantine, full
    participation, 40 rounds, the attacks at their strong settings: the mean ends above FAILED
    (0.1) of the start gap under bit flip, ALIE and IPM, the coordinate median and the geometric
    median below it under every attack. Shift-back strikes only when the Byzantine clients are a
    majority of the sampled set, which full participation never gives: there every rule, the
    mean included, passes (the partial-participation claim is the next tests')."""
    out = tmp_path / "m"
    rc = cli.main(["run", "byzantine", "--matrix", "--byzantine", "5", "--rounds", "40",
                   "--aggregators", "mean,coordinate_median,geometric_median",
                   "--attacks", "bit_flip,alie,ipm,shift_back", "--participation", "full",
                   "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "| aggregator | bit_flip | alie | ipm | shift_back |" in text
    doc = json.loads((out / "matrix.json").read_text())
    cells = doc["matrix"]["full"]
    print(json.dumps(cells, indent=1))

    def ratio(rule, attack):
        r = cells[rule][attack]
        return math.inf if r is None else r

    for attack in ("bit_flip", "alie", "ipm"):
        assert ratio("mean", attack) > FAILED, (attack, cells["mean"])  # the control fails
        for rule in ("coordinate_median", "geometric_median"):
            assert ratio(rule, attack) < FAILED, (rule, attack, cells[rule])
    assert all(ratio(rule, "shift_back") < FAILED for rule in cells)
    assert doc["meta"]["attack_settings"] == {"ipm_eps": 10.0, "alie_z": 10.0,
                                              "bit_flip_scale": 10.0}  # fmt: skip
    assert (out / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "matrix.csv").read_text().splitlines()
    assert rows[0] == "participation,aggregator,attack,final_over_initial_gap"
    assert len(rows) == 1 + 3 * 4


def test_single_byzantine_run_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "r"
    rc = cli.main(["run", "byzantine", "--byzantine", "5", "--attack", "ipm", "--ipm-eps", "10",
                   "--aggregator", "trimmed_mean", "--rounds", "5", "--out", str(out),
                   "--no-progress"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["problem"] == "byzantine" and metrics["meta"]["byzantine"] == 5
    h = metrics["results"]["byz_vr_marina_pp"]
    assert len(h["gap"]) == 6 and h["gap"][-1] < h["gap"][0]
    assert (out / "suboptimality.png").exists()
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--byzantine", "20"], r"--byzantine must be in \[0, --clients=20\)"),
        (["--matrix", "--attacks", "flood"], "--attacks must be a comma-separated list"),
        (["--matrix", "--aggregators", "median"], "--aggregators must be a comma-separated"),
        (["--aggregator", "krum", "--byzantine", "1", "--cohort", "2"], "krum needs at least 3"),
        (["--matrix", "--aggregators", "krum", "--cohort", "2"], "krum needs at least 3 rows"),
    ],
)
def test_byzantine_command_bad_input(argv, match, capsys, tmp_path):
    import re

    with pytest.raises(SystemExit):
        cli.main(["run", "byzantine", "--rounds", "2", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert re.search(match, err), err


# ---- Byz-VR-MARINA-PP+ under shift-back ---------------------------------------------------------


@pytest.fixture(scope="module")
def homogeneous():
    A, y = data.load("breast_cancer")
    return LogisticRegression(A, y, [torch.arange(A.shape[0])] * 20, l2=0.1)


@pytest.mark.parametrize("seed", [0, 1])
def test_claim_plus_variant_with_clipping_defeats_shift_back(homogeneous, seed):
    """PP+ (the mean of the clipped differences on compressed rounds), 15 honest + 5 Byzantine,
    4 of 20 sampled, shift-back: with clipping f - f* stays below 1e-3 of the start from round
    50 on (measured: at most 1.4e-4); the unclipped PP+ (the control) does not (measured: 0.46
    to 7 times the start gap after round 50)."""
    kw = {"byzantine": range(15, 20), "batch_size": 16, "cohort": 4, "seed": seed, "plus": True}
    clipped = ByzVRMarinaPP(homogeneous, **kw).run(100)
    plain = ByzVRMarinaPP(homogeneous, clip=False, **kw).run(100)
    gap0 = clipped["gap"][0]
    assert sum(clipped["byzantine_majority"]) >= 1  # the attack did strike
    assert clipped["byzantine_majority"] == plain["byzantine_majority"]  # the same cohorts
    assert max(clipped["gap"][50:]) < 1e-3 * gap0
    assert max(plain["gap"][50:]) > 1e-3 * gap0


# ---- MicroAdam against its control on a task a linear model cannot solve -------------------------


def radial_task(seed=0, n_train=3000, n_test=2000, d=16, classes=4):
    """Gaussian inputs in 16 dimensions labelled by the quartile of ||x[:4]||^2: the classes are
    nested shells, which no linear classifier separates (it stays near chance, 25%) and an MLP
    learns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d, generator=g)
    r = (x[:, :4] ** 2).sum(1)
    cuts = torch.quantile(r[:n_train], torch.tensor([0.25, 0.5, 0.75]))
    y = torch.bucketize(r, cuts)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class TopKWithoutFeedback(MicroAdam):
    """The control: MicroAdam's top-k window at the same density, its error feedback dropped
    (the quantized residual is zeroed after every step, so the next step sees the bare
    gradient)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for st in self.state.values():
            if "ef_scale" in st:
                st["ef"].zero_()
                st["ef_min"].zero_()
                st["ef_scale"].zero_()
        return loss


def test_microadam_beats_topk_without_error_feedback():
    """Nested-shells task (3000 training samples, 16 features, 4 classes), MLP 16-256-4, 10
    epochs of batches of 32 at lr 1e-3, mean of two seeds: AdamW's test accuracy is far above a
    linear model's (the task needs the MLP; digits does not tell them apart), MicroAdam (density
    1%, its default) is within 3 points of AdamW, and the same top-k window without error
    feedback (the control) is at least 5 points below MicroAdam. Measured: AdamW 76.8%, linear
    25.1%, MicroAdam 76.0%, top-k without error feedback 68.9%."""
    xtr, ytr, xte, yte = radial_task()

    def accuracy(make, seed, linear=False):
        torch.manual_seed(seed)
        d = xtr.shape[1]
        net = (torch.nn.Linear(d, 4) if linear else
               torch.nn.Sequential(torch.nn.Linear(d, 256), torch.nn.ReLU(),
                                   torch.nn.Linear(256, 4)))  # fmt: skip
        opt = make(net.parameters())
        gen = torch.Generator().manual_seed(seed)
        for _ in range(10):
            order = torch.randperm(len(xtr), generator=gen)
            for i in range(0, len(order), 32):
                b = order[i : i + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xtr[b]), ytr[b]).backward()
                opt.step()
        with torch.no_grad():
            return (net(xte).argmax(1) == yte).double().mean().item() * 100

    def mean_acc(make, linear=False):
        return sum(accuracy(make, s, linear) for s in range(2)) / 2

    # one thread: the 5k-parameter steps are too small to share, and on a busy 2-core machine
    # two threads make this test 7x slower (57 s against 381 s measured); the results are equal
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adamw = mean_acc(lambda p: torch.optim.AdamW(p, lr=1e-3))
        linear = mean_acc(lambda p: torch.optim.AdamW(p, lr=1e-2), linear=True)
        micro = mean_acc(lambda p: MicroAdam(p, lr=1e-3))
        control = mean_acc(lambda p: TopKWithoutFeedback(p, lr=1e-3))
    finally:
        torch.set_num_threads(threads)
    print(f"test accuracy: AdamW {adamw:.1f}%, linear {linear:.1f}%, MicroAdam {micro:.1f}%, "
          f"top-k without EF {control:.1f}%")  # fmt: skip
    assert adamw > linear + 10
    assert micro >= adamw - 3
    assert control < micro - 5
