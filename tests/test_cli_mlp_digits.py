"""``fedkern run ... --problem mlp_digits``: the MLP-on-digits family of the generalized clipped
methods (CLERR, Clipped RR-CLI, ...). The CLI's histories are checked against the same methods
built directly from the documented construction (tests/test_generalized_mlp.py's setup with the
CLI's step rule), and the written files (metrics.json, metrics.csv, the PNG plot)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedkern import cli, data
from fedkern.algorithms import CLERR, ClippedRRCLI
from fedkern.clients import ModuleBatch, ModuleClients
from fedkern.random import permutation_tensor


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def reference(clients, batch_size, gamma, seed=0):
    """The documented construction, written out: 297 held-out digits (keyed permutation), the
    rest label-sorted over the clients, MLP 65 -> 32 -> 10 (tanh) from torch.manual_seed(seed);
    c0 = c1 = 1 / (gamma s), eta = gamma s, s = the largest client's RR steps per epoch."""
    A, y = data.load("digits")
    A = A.float()
    perm = permutation_tensor(A.shape[0], seed)
    test, train = perm[:297], perm[297:]
    parts = [train[p] for p in data.split(y[train], clients, "label_sorted")]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(65, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def loss(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    mc = ModuleClients(net, loss, A, y, parts)
    mb = ModuleBatch(mc, seed=seed, test=(A[test], y[test]))
    s = max(math.ceil(p.numel() / batch_size) for p in parts)
    c = 1 / (gamma * s)
    kw = {"gamma": gamma, "c0": c, "c1": c, "batch_size": batch_size, "x0": mc.flat(),
          "seed": seed}  # fmt: skip
    return mb, kw, gamma * s


def test_run_clerr_and_clipped_rr_cli_on_mlp_digits(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "clerr", "clipped_rr_cli", "--problem", "mlp_digits", "--rounds", "3",
            "--clients", "10", "--out", str(out), "--no-progress"]  # fmt: skip
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    doc = json.loads((out / "metrics.json").read_text())
    meta, res = doc["meta"], doc["results"]
    assert meta["problem"] == "mlp_digits" and meta["test"] == 297 and meta["train"] == 1500
    assert meta["gamma"] == 0.3 and meta["batch_size"] == 8 and meta["clients"] == 10
    assert set(res) == {"clerr", "clipped_rr_cli"}
    mb, kw, eta = reference(10, 8, 0.3)
    assert math.isclose(meta["eta"], eta) and math.isclose(meta["c0"], kw["c0"])
    for name, m in (
        ("clerr", CLERR(mb, **kw)),
        ("clipped_rr_cli", ClippedRRCLI(mb, eta=eta, **kw)),
    ):
        h = res[name]
        assert len(h["test_error"]) == len(h["test_accuracy"]) == 4 and h["diverged_at"] is None
        m.run(3)
        # the CLI's histories are the directly built method's (same data, net, steps, keys)
        assert h["test_accuracy"] == m.history["test_accuracy"]
        assert h["loss"] == pytest.approx(m.history["loss"], rel=1e-12)
        assert math.isclose(h["test_accuracy"][-1], mb.accuracy(m.x))
        for a, e in zip(h["test_accuracy"], h["test_error"], strict=True):
            assert 0 <= a <= 1 and math.isclose(a + e, 1.0)
        # trained 3 rounds: below 0.5 test error; the control, the untrained start, is not
        assert h["test_error"][-1] < 0.5
        assert not h["test_error"][0] < 0.5
    print({n: [round(e, 4) for e in h["test_error"]] for n, h in res.items()})
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "test_error" in header and "test_accuracy" in header
    assert (out / "test_error.png").read_bytes()[:4] == b"\x89PNG"
    assert "test error" in stdout and "clipped_rr_cli" in stdout


def test_mlp_digits_record_every_help_and_bad_input(tmp_path, capsys):
    out = tmp_path / "r2"
    argv = ["run", "clerr", "--problem", "mlp_digits", "--rounds", "3", "--clients", "5",
            "--record-every", "2", "--hidden", "8", "--gamma", "0.1", "--out", str(out),
            "--no-progress"]  # fmt: skip
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["meta"]["hidden"] == 8 and doc["meta"]["parameters"] == 65 * 8 + 8 + 8 * 10 + 10
    te = doc["results"]["clerr"]["test_error"]
    assert len(te) == 4 and math.isnan(te[1]) and math.isnan(te[3])
    assert math.isfinite(te[0]) and math.isfinite(te[2])

    rc, out_help, _ = run_cli(["run", "--help"], capsys)
    assert rc == 0
    flat = " ".join(out_help.split())
    assert "mlp_digits: an MLP" in flat and "--hidden" in flat and "--gamma 0.3" in flat

    base = ["--problem", "mlp_digits", "--rounds", "1", "--out", str(tmp_path / "bad"),
            "--no-progress"]  # fmt: skip
    for argv, match in (
        (["run", "clerr", "--hidden", "0", *base], "--hidden must be >= 1"),
        (["run", "local_gd", *base], "does not run on --problem mlp_digits"),
        (["run", "clipped_fedavg", *base], "clip"),
        (["run", "clerr", "--clients", "2000", *base], "--clients must be at most the 1500"),
    ):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and match in err, (argv, err)
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_no_test_set_no_test_metrics():
    """A ModuleBatch without a test set records no test metrics (the keys are absent)."""
    mb, kw, _ = reference(4, 64, 0.1)
    mb.test = None
    m = CLERR(mb, **kw)
    m.run(1)
    assert "test_error" not in m.history and "test_accuracy" not in m.history
