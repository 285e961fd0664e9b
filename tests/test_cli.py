"""The ``fedkern`` command line and the benchmark cases behind ``fedkern bench``.

Everything runs in-process on CPU with tiny sizes; no test asserts a wall-clock time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import runpy
import sys

import pytest
import torch

import fedkern
from fedkern import benchmarks as B
from fedkern import cli

RESULT_KEYS = {"id", "case", "n", "k", "m", "dtype", "backend", "status", "fedkern_ms", "eager_ms",
               "ratio", "bytes", "gbps", "fedkern_peak_bytes", "eager_peak_bytes", "reps",
               "x_read", "copy_gbps"}  # fmt: skip
META_KEYS = {"device", "device_name", "torch", "triton", "fedkern", "git_commit", "backends",
             "suite", "backend_choice", "filter", "timestamp"}  # fmt: skip


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``fedkern <argv>``."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse errors and --version
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys):
    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0
    assert out.strip() == f"fedkern {fedkern.__version__}"


def test_python_dash_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fedkern", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("fedkern", run_name="__main__")
    assert exc.value.code == 0
    assert fedkern.__version__ in capsys.readouterr().out


def test_console_script_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "fedkern" and ep.value == "fedkern.cli:main" for ep in eps)


def test_backends(capsys):
    rc, out, _ = run_cli(["backends"], capsys)
    assert rc == 0
    got = json.loads(out)
    assert set(got) == {"reference", "cpu", "triton", "cuda"}
    assert got["reference"]["available"] is True
    assert all(set(v) == {"available", "reason"} for v in got.values())


def test_bench_small(tmp_path, capsys):
    argv = ["bench", "--device", "cpu", "--filter", "topk_compress", "--sizes", "2000",
            "--reps", "2", "--out", str(tmp_path)]  # fmt: skip
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "| case | n | k | dtype | backend | fedkern ms | eager ms | ratio | GB/s |" in out
    assert "| topk_compress | 2e3 | 20 | fp32 |" in out
    assert "git commit:" in out and "torch " in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "latest-cpu.json" in names and "latest-cpu.md" in names
    stamped = [n for n in names if n.startswith("cpu-")]
    assert sorted(n.rsplit(".", 1)[1] for n in stamped) == ["json", "md", "png"]
    doc = json.loads((tmp_path / "latest-cpu.json").read_text())
    assert META_KEYS <= set(doc["meta"])
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["filter"] == "topk_compress"
    assert [r["case"] for r in doc["results"]] == ["topk_compress"]
    rec = doc["results"][0]
    assert RESULT_KEYS <= set(rec)
    assert rec["status"] == "ok" and rec["n"] == 2000 and rec["k"] == 20 and rec["reps"] == 2
    assert rec["ratio"] == pytest.approx(rec["eager_ms"] / rec["fedkern_ms"])
    assert rec["bytes"] == 2000 * 4 + 20 * (4 + 8)
    assert (tmp_path / "latest-cpu.md").read_text() == out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--device", "tpu"], "invalid choice"),
        (["bench", "--backend", "nope"], "invalid choice"),
        (["bench", "--device", "cpu", "--filter", "no-such-case"], "matches no case"),
        (["bench", "--device", "cpu", "--sizes", "0"], "sizes must be >= 1"),
        (["bench", "--device", "cpu", "--backend", "cuda"], "--backend cuda"),
        (["bench", "--unknown-flag"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
        (["run"], "arguments are required: ALGORITHM"),
        ([], "required"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert message in err


def test_cuda_device_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc, _, err = run_cli(["bench", "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA device" in err


def test_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.default_out_dir() == tmp_path / "fedkern-bench-results"
    (tmp_path / "fedkern").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "fedkern"\n')
    assert cli.default_out_dir() == tmp_path / "bench" / "results"


def test_suites():
    quick = B.suite()
    ids = [c.id for c in quick]
    assert len(ids) == len(set(ids))
    from fedkern.benchmarks import peers

    peer_ops = set(peers.ROBUST) | set(peers.OPTIMIZERS)
    assert peer_ops <= set(B.OPS)
    gpu_only = {"microadam_cuda_vs_adamw"}  # the CUDA C++ MicroAdam forced, full suite on CUDA
    assert {c.op for c in quick} == set(B.OPS) - peer_ops - gpu_only  # peers: only with --peers
    assert "topk_compress-n1e7-k1e5-bf16" in ids
    assert "sparse_add_batched_-n1e7-m16-k1e5-fp32" in ids
    sized = [c for c in quick
             if c.family not in ("clients", "tamuna", "tamuna_rounds", "flower_methods")
             and c.op != "sparse_add_batched_"]  # fmt: skip
    assert {c.n for c in sized} == {10**6, 10**7}
    # the clients cases: one round for 1000 clients of 50 samples, K = 10 local steps
    assert {(c.n, c.k, c.m) for c in quick if c.family == "clients"} == {(1000, 10, 50)}
    # TAMUNA's server step: p = 1e4 coordinates, s = 4 holders, a cohort of c = 100
    assert {(c.n, c.k, c.m) for c in quick if c.family == "tamuna"} == {(10**4, 4, 100)}
    # one TAMUNA and one 5GCS round of 1000 clients (50 samples, K = 10) against a client loop
    assert {(c.n, c.k, c.m) for c in quick if c.family == "tamuna_rounds"} == {(1000, 10, 50)}
    # a Flower round's server side (with Flower): c = 100 replies of p = 1e4, s = c or 2
    flower = {(c.n, c.k, c.m) for c in quick if c.family == "flower_methods"}
    has_flwr = importlib.util.find_spec("flwr") is not None
    assert flower == ({(10**4, 100, 100), (10**4, 2, 100)} if has_flwr else set())
    full_gpu = B.suite(full=True, device="cuda")
    assert set(quick) <= set(full_gpu)
    assert {c.n for c in full_gpu} >= {10**8, 10**9}
    assert {(c.op, c.n) for c in full_gpu if c.op in gpu_only} == {
        ("microadam_cuda_vs_adamw", 10**7),
        ("microadam_cuda_vs_adamw", 10**8),
    }
    assert all(c.n <= 10**7 for c in B.suite(full=True, device="cpu"))


# --------------------------------------------------------------------------- like with like


def _sorted(values, indices):
    order = torch.argsort(indices)
    return values[order], indices[order]


@pytest.mark.parametrize("op", ["topk_compress", "ef14_topk_", "ef21_topk_"])
def test_prepared_topk_cases_agree(op):
    """The prepared fedkern call and eager baseline select and return the same entries."""
    case = B.Case(op, 3000, 30)
    p = case.setup("cpu")
    p.rearm_fedkern()
    v_fk, i_fk = p.fedkern()
    p.rearm_eager()
    v_eg, i_eg = _sorted(*p.eager())
    assert torch.equal(i_fk, i_eg)
    assert torch.equal(v_fk, v_eg)
    if op != "topk_compress":
        assert torch.equal(p.tensors["buf_fedkern"], p.tensors["buf_eager"])
        assert not torch.equal(p.tensors["buf_fedkern"], p.tensors["buf0"])
        p.rearm_fedkern()
        assert torch.equal(p.tensors["buf_fedkern"], p.tensors["buf0"])


@pytest.mark.parametrize("unbiased", [False, True])
def test_eager_randk_matches_on_the_same_indices(unbiased):
    gen = torch.Generator().manual_seed(0)
    n, k = 4000, 40
    x, g, e = (torch.randn(n, generator=gen) for _ in range(3))
    v_fk, i_fk = fedkern.randk_compress(x, k, seed=7, step=3, unbiased=unbiased)
    v_eg, i_eg = B.eager_randk(x, k, unbiased=unbiased, indices=i_fk)
    torch.testing.assert_close(v_eg, v_fk, rtol=0, atol=0)

    e_fk, e_eg = e.clone(), e.clone()
    v_fk, i_fk = fedkern.ef14_randk_(g, e_fk, k, seed=7, lr=0.5, unbiased=unbiased)
    v_eg, _ = B.eager_ef14_randk_(g, e_eg, k, lr=0.5, unbiased=unbiased, indices=i_fk)
    torch.testing.assert_close(v_eg, v_fk, rtol=0, atol=0)
    torch.testing.assert_close(e_eg, e_fk, rtol=0, atol=0)

    s_fk, s_eg = e.clone(), e.clone()
    v_fk, i_fk = fedkern.ef21_randk_(g, s_fk, k, seed=7, unbiased=unbiased)
    v_eg, _ = B.eager_ef21_randk_(g, s_eg, k, unbiased=unbiased, indices=i_fk)
    torch.testing.assert_close(v_eg, v_fk, rtol=0, atol=0)
    torch.testing.assert_close(s_eg, s_fk, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["randk_compress", "ef14_randk_", "ef21_randk_"])
def test_prepared_randk_cases_draw_k_distinct(op):
    p = B.Case(op, 5000, 50).setup("cpu")
    for fn in (p.fedkern, p.eager):
        values, indices = fn()
        assert values.shape == (50,) and indices.unique().numel() == 50


def test_prepared_sparse_case_agrees():
    case = B.Case("sparse_add_batched_", 5000, 100, m=B.M_MESSAGES)
    p = case.setup("cpu")
    idx = p.tensors["indices"]
    assert idx.shape == (B.M_MESSAGES, 100) and bool((idx.diff(dim=1) > 0).all())
    p.fedkern()
    p.eager()
    torch.testing.assert_close(p.tensors["dense_fedkern"], p.tensors["dense_eager"])
    touched = int(torch.unique(idx).numel())
    assert B.min_bytes(case, touched) == p.nbytes


def test_setup_is_deterministic():
    a, b = (B.Case("ef14_topk_", 1000, 10).setup("cpu") for _ in range(2))
    assert torch.equal(a.tensors["grad"], b.tensors["grad"])
    assert torch.equal(a.tensors["buf0"], b.tensors["buf0"])


def test_run_case_record():
    rec = B.run_case(B.Case("ef21_randk_", 2000, 20), "cpu", budget=B.Budget(1, 2, 2, 0.0))
    assert rec["status"] == "ok" and rec["backend"] == "cpu" and rec["reps"] == 2
    assert rec["gbps"] == pytest.approx(rec["bytes"] / rec["fedkern_ms"] / 1e6)
    rec = B.run_case(B.Case("sparse_add_batched_", 100, 2, m=2), "cpu", backend="cuda")
    assert rec["status"] == "skipped"


def test_bench_microadam_reports_state_bytes(tmp_path, capsys):
    argv = ["bench", "--device", "cpu", "--filter", "microadam", "--sizes", "20000",
            "--reps", "2", "--out", str(tmp_path)]  # fmt: skip
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "latest-cpu.json").read_text())
    recs = {r["case"]: r for r in doc["results"]}
    assert set(recs) == {"microadam_step_", "microadam_vs_adamw"}
    for r in recs.values():
        assert r["status"] == "ok" and r["backend"] == "cpu"
        # 20000 parameters in 4 tensors: MicroAdam state, each tensor in whole 4096-blocks
        assert 0.5 < r["state_bytes_per_param"] < 2.0
    assert recs["microadam_vs_adamw"]["eager_state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert "Optimizer state, bytes per parameter" in out


def test_prepared_microadam_sides_compute_the_same_step():
    """The benchmark's fedkern side and its reference-backend baseline take the same step."""
    case = B.Case("microadam_step_", 30_000, B.MICROADAM_K)
    p = case.setup("cpu")
    p.fedkern()
    p.eager()
    fk = p.tensors["fedkern_optimizer"].param_groups[0]["params"]
    eg = p.tensors["eager_optimizer"].param_groups[0]["params"]
    for a, b in zip(fk, eg, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the registry

QUICK_IDS = [
    "topk_compress-n1e6-k1e4-fp32", "randk_compress-n1e6-k1e4-fp32", "ef14_topk_-n1e6-k1e4-fp32",
    "ef21_topk_-n1e6-k1e4-fp32", "ef14_randk_-n1e6-k1e4-fp32", "ef21_randk_-n1e6-k1e4-fp32",
    "topk_compress-n1e7-k1e5-fp32", "topk_compress-n1e7-k1e5-bf16", "randk_compress-n1e7-k1e5-fp32",
    "ef14_topk_-n1e7-k1e5-fp32", "ef21_topk_-n1e7-k1e5-fp32", "ef14_randk_-n1e7-k1e5-fp32",
    "ef21_randk_-n1e7-k1e5-fp32", "sparse_add_batched_-n1e7-m16-k1e5-fp32",
    "microadam_step_-n1e7-k41-fp32", "microadam_vs_adamw-n1e7-k41-fp32",
    "coordinate_median-n1e6-m64-k0-fp32", "trimmed_mean-n1e6-m64-k16-fp32",
    "krum-n1e6-m16-k4-fp32", "nnm-n1e6-m16-k4-fp32", "geometric_median-n1e6-m16-k8-fp32",
    "centered_clip-n1e6-m16-k3-fp32", "clip_rows_-n1e6-m16-k0-fp32",
    "diff_compress_clip-n1e6-m16-k1e4-fp32", "local_steps_vs_loop-n1e3-m50-k10-fp32",
    "local_steps_vs_vmap-n1e3-m50-k10-fp32", "module_steps_vs_loop-n1e3-m50-k10-fp32",
    "tamuna_aggregate_-n1e4-m100-k4-fp32", "tamuna_round_vs_loop-n1e3-m50-k10-fp32",
    "fivegcs_round_vs_loop-n1e3-m50-k10-fp32",
]  # fmt: skip
if importlib.util.find_spec("flwr") is not None:  # the Flower round cases need Flower
    QUICK_IDS += ["flower_scaffnew_round-n1e4-m100-k100-fp32",
                  "flower_tamuna_round-n1e4-m100-k2-fp32"]  # fmt: skip


def test_quick_suite_order():
    """The quick suite (the README's main command) runs these cases in this order."""
    assert [c.id for c in B.suite()] == QUICK_IDS


def test_full_suite_runs_the_quick_cases_first():
    for device in ("cpu", "cuda"):
        full = [c.id for c in B.suite(full=True, device=device)]
        assert full[: len(QUICK_IDS)] == QUICK_IDS and len(full) == len(set(full))


def test_a_family_registers_its_cases(monkeypatch):
    """A new family adds an op and its cases from its own module; suite, the records and the
    backend lookup pick them up, ordered by position."""
    from fedkern.benchmarks import core

    monkeypatch.setattr(core, "_REGISTRY", dict(core._REGISTRY))
    monkeypatch.setattr(core, "_CASES", dict(core._CASES))

    def setup(case, device, gen):
        x = core.randn(case.n, case, device, gen)
        return B.Prepared(fedkern=lambda: x.sum(), eager=lambda: x.sum(), nbytes=B.min_bytes(case),
                          rearm_fedkern=core.nothing, rearm_eager=core.nothing)  # fmt: skip

    B.register("my_sum", family="topk", setup=setup, eager="x.sum()", position=105,
               nbytes=lambda c: c.n * c.dtype.itemsize)  # fmt: skip

    @B.cases("myfamily")
    def _cases(suite, device, sizes):
        return [B.Case("my_sum", n, 1) for n in sizes or [10**6]] if suite != "full" else []

    quick = [c.id for c in B.suite()]
    assert quick[:2] == ["topk_compress-n1e6-k1e4-fp32", "my_sum-n1e6-k1-fp32"]
    assert [c.op for c in B.suite(sizes=[300])].count("my_sum") == 1
    rec = B.run_case(B.Case("my_sum", 300, 1), "cpu", budget=B.Budget(1, 2, 2, 0.0))
    assert rec["status"] == "ok" and rec["bytes"] == 1200 and rec["eager"] == "x.sum()"
    assert rec["backend"] == "auto"  # no kernel table entry for my_sum: reported as "auto"
    with pytest.raises(ValueError, match="registered twice"):
        B.register("my_sum", family="x", setup=setup, eager="", nbytes=len, position=999)
    with pytest.raises(ValueError, match="position 105"):
        B.register("other", family="x", setup=setup, eager="", nbytes=len, position=105)
    with pytest.raises(ValueError, match="registers its cases twice"):
        B.cases("myfamily")(_cases)


def test_bench_peers_against_flowers_aggregation(tmp_path, capsys):
    """``fedkern bench --peers`` times fedkern against the installed peers (Flower is a test
    requirement): one case, its record, the peers header, the files and the picture."""
    pytest.importorskip("flwr")
    argv = ["bench", "--peers", "--device", "cpu", "--filter", "median_vs_flower-n1e5-m16",
            "--reps", "2", "--out", str(tmp_path)]  # fmt: skip
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "peers suite: the eager column is the peer library's call" in out
    assert "| median_vs_flower | 1e5 (m=16) | 4 | fp32 | cpu |" in out
    assert "flwr aggregate_median(results)" in out
    doc = json.loads((tmp_path / "latest-peers-cpu.json").read_text())
    assert doc["meta"]["suite"] == "peers" and [r["case"] for r in doc["results"]] == [
        "median_vs_flower"
    ]
    assert (tmp_path / "latest-peers-cpu.png").read_bytes()[:4] == b"\x89PNG"
    rc, _, err = run_cli(["bench", "--peers", "--full"], capsys)
    assert rc == 2 and "does not combine" in err


def test_peer_cases_only_for_installed_peers(monkeypatch):
    from fedkern.benchmarks import peers

    monkeypatch.setattr(peers, "available", lambda module: module == "flwr")
    got = {c.op for c in B.suite(peers=True)}
    assert got == {"median_vs_flower", "trimmed_mean_vs_flower", "krum_vs_flower",
                   "bulyan_vs_flower"}  # fmt: skip
    assert not any(c.op in peers.ROBUST or c.op in peers.OPTIMIZERS for c in B.suite())
