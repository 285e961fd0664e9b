"""bench/microadam_authors.py (fedkern's MicroAdam against its authors' and fused AdamW) without
a GPU: the CPU dry run's record, the record of an unavailable package, the timing loop with a
stand-in for the authors' optimizer, and the peer loader of ``fedkern.benchmarks.peers``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedkern.benchmarks import peers

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "microadam_authors.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "a.json")]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, json.loads((tmp_path / "a.json").read_text())


def test_dry_run_on_cpu_writes_the_record(tmp_path):
    """--dry-run: fedkern and AdamW timed on the CPU, the authors' part skipped (their kernels
    need CUDA), the matched and unmatched settings named; the targets row is a MISS saying so."""
    out, doc = _run(tmp_path, "--dry-run")
    assert doc["authors"]["status"] == "skipped" and "CUDA" in doc["authors"]["detail"]
    assert doc["settings"]["matched"]["m"] == 10 and doc["settings"]["matched"]["density"] == 0.01
    assert any("top-k block" in u for u in doc["settings"]["unmatched"])
    (rec,) = doc["results"]
    assert rec["status"] == "ok" and rec["n"] == 10**5 and rec["dtype"] == "bf16"
    assert rec["fedkern_ms"] > 0 and rec["adamw_ms"] > 0 and "authors_ms" not in rec
    assert rec["fedkern_over_adamw"] == pytest.approx(rec["fedkern_ms"] / rec["adamw_ms"])
    sb = rec["state_bytes_per_param"]
    assert sb["fedkern"] < 1.1 and sb["adamw"] == pytest.approx(4.0, abs=0.01)  # bf16 moments
    assert doc["meta"]["device"] == "cpu" and "ista-daslab-optimizers" in doc["meta"]["packages"]
    assert "authors' MicroAdam: skipped" in out
    targets = _load("gpu_targets", ROOT / "bench" / "gpu_targets.py")
    assert targets.authors_row(str(tmp_path / "a.json"))[1:] == (
        "MISS", "skipped: the authors' kernels need a CUDA device")  # fmt: skip


def test_unavailable_records_why(tmp_path):
    _, doc = _run(tmp_path, "--unavailable", "not installed: the install timed out")
    assert doc["authors"] == {"status": "unavailable",
                              "detail": "not installed: the install timed out"}  # fmt: skip
    assert doc["results"] == []


class _StandIn(torch.optim.Optimizer):
    """The authors' optimizer's interface as the script uses it: their keyword options, a
    ``log_interval``, and a step that overwrites p.grad (here: with zeros)."""

    seen: list = []
    made: list = []

    def __init__(self, params, lr, m, quant_block_size, k_init=0.01, alpha=0, betas=(0.9, 0.999),
                 weight_decay=0, eps=1e-8):  # fmt: skip
        super().__init__(params, {"lr": lr})
        self.options = (m, quant_block_size, k_init, alpha, betas, weight_decay, eps)
        self.log_interval = 100
        _StandIn.made.append(self)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                _StandIn.seen.append(float(p.grad.float().abs().sum()))
                self.state[p].setdefault("buf", torch.zeros(p.numel() // 2, dtype=torch.uint8))
                p.add_(p.grad, alpha=-group["lr"])
                p.grad.zero_()


def test_timing_loop_restores_the_authors_gradients():
    """``measure`` with a stand-in for the authors' class on the CPU: their options are
    fedkern's, logging is off, every step sees the original gradients (restored, untimed), the
    ratios and state bytes are recorded."""
    mod = _load("microadam_authors", SCRIPT)
    _StandIn.seen, _StandIn.made = [], []
    rec = mod.measure(20_000, torch.device("cpu"), _StandIn, reps=2, warmup=1)
    assert rec["status"] == "ok" and rec["authors_ms"] > 0 and rec["authors_q1e5_ms"] > 0
    assert rec["fedkern_over_authors"] == pytest.approx(rec["fedkern_ms"] / rec["authors_ms"])
    assert rec["state_bytes_per_param"]["authors"] == pytest.approx(0.5, abs=1e-3)
    (a, b) = _StandIn.made  # the matched options, then their README's bucket
    assert a.options[:4] == (10, 256, 0.01, 0) and b.options[1] == 100_000
    assert a.options[4:] == ((0.9, 0.999), 0.01, 1e-8) and a.log_interval > 10**9
    per_step = [sum(_StandIn.seen[i : i + 4]) for i in range(0, len(_StandIn.seen), 4)]
    assert len(per_step) == 6 and min(per_step) > 0 and max(per_step) == min(per_step)


def test_authors_loader_stands_in_for_the_logging_modules(tmp_path, monkeypatch):
    """``peers.authors_microadam`` imports a package that imports wandb and gpustat at import
    time where neither is installed, and leaves no stand-in in sys.modules; the peers suite has
    the authors' case on CUDA only, in bfloat16."""
    import importlib.util as iu

    if any(iu.find_spec(name) is not None for name in peers.LOGGING_ONLY):
        pytest.skip("wandb or gpustat is installed here")
    pkg = tmp_path / peers.AUTHORS
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import gpustat\nimport wandb\n\n\nclass MicroAdam:\n"
                                     "    pass\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, peers.AUTHORS, raising=False)
    try:
        cls = peers.authors_microadam()
        assert cls.__name__ == "MicroAdam" and cls.__module__ == peers.AUTHORS
        assert not any(name in sys.modules for name in peers.LOGGING_ONLY)
        assert peers.available(peers.AUTHORS)
        cpu = {c.op for c in peers._cases("peers", "cpu", None)}
        assert "microadam_vs_authors" not in cpu
        cuda = [c for c in peers._cases("peers", "cuda", None) if c.op == "microadam_vs_authors"]
        assert [(c.n, c.dtype) for c in cuda] == [(10**7, torch.bfloat16)]
    finally:
        sys.modules.pop(peers.AUTHORS, None)
    assert not peers.available("surely_not_an_installed_module_fedkern")
