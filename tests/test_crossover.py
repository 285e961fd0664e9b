"""The size crossovers of "auto" (fedkern.ops._crossover): the table logic on CPU with a fake
device type and a patched table, the overrides, the benchmark's report of which implementation
ran, and the measurement that gives a GPU session the new table. CPU dispatch is pinned."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

import fedkern
from fedkern import benchmarks as B
from fedkern.benchmarks import crossover as X
from fedkern.ops import _crossover, _dispatch

HAVE_CPU = _dispatch.backend_status("cpu")[0]
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="the C++ core is not built")


@pytest.fixture
def table(monkeypatch):
    """A private copy of the table for the test to edit."""
    monkeypatch.setattr(_crossover, "TABLE", dict(_crossover.TABLE))
    return _crossover.TABLE


def _calls_of(fn):
    with fedkern.backend("auto"), _crossover.recording() as calls:
        out = fn()
    return out, calls


def _sized_calls():
    """One small call of every op in SIZED_OPS (CPU tensors) and the numel it must report."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, generator=g)
    X_ = torch.randn(7, 40, generator=g)
    vals, idx = torch.randn(2, 3), torch.tensor([[1, 5, 9], [0, 5, 200]])
    return {
        "topk_compress": (lambda: fedkern.topk_compress(x, 7), 300),
        "ef14_topk_": (lambda: fedkern.ef14_topk_(x, x.clone() * 0.1, 7), 300),
        "ef21_topk_": (lambda: fedkern.ef21_topk_(x, x.clone() * 0.5, 7), 300),
        "randk_compress": (lambda: fedkern.randk_compress(x, 7, seed=1), 300),
        "ef14_randk_": (lambda: fedkern.ef14_randk_(x, x.clone(), 7, seed=1), 300),
        "ef21_randk_": (lambda: fedkern.ef21_randk_(x, x.clone(), 7, seed=1), 300),
        "sparse_add_batched_": (lambda: fedkern.sparse_add_batched_(x.clone(), vals, idx), 300),
        "coordinate_median": (lambda: fedkern.robust.coordinate_median(X_), 280),
        "trimmed_mean": (lambda: fedkern.robust.trimmed_mean(X_, 1), 280),
    }


def test_the_shipped_table_leaves_cpu_alone():
    """No CPU entry, and on CPU "auto" runs the C++ core for every sized op at every size."""
    assert all(dev == "cuda" for _, dev in _crossover.TABLE)
    for n in (0, 1, 10**3, 10**9):
        want = "cpu" if HAVE_CPU else "reference"
        for op in _crossover.SIZED_OPS:
            impls = dict.fromkeys(("reference", "cpu", "triton"), None)
            assert _dispatch._choose(op, impls, torch.device("cpu"), n) == want, (op, n)


def test_sized_ops_report_their_size():
    """Every op listed in SIZED_OPS passes its first tensor's numel to pick (so a table entry
    applies to it); on CPU the C++ core runs it."""
    for op, (call, numel) in _sized_calls().items():
        _, calls = _calls_of(call)
        mine = [c for c in calls if c[0] == op]
        assert mine and mine[-1][1:3] == ("cpu", numel), (op, calls)
        assert mine[-1][3] == ("cpu" if HAVE_CPU else "reference")


def test_table_logic_on_a_fake_cuda_device(table):
    """A device whose type is "cuda" (a stand-in: only .type is read): below the entry the
    reference runs, at and above it the first usable GPU backend; no size, no entry or a forced
    backend ignore the table. The control: the same sizes without the entry run the kernel."""
    dev = types.SimpleNamespace(type="cuda")
    impls = {"reference": "ref", "triton": "tri", "cuda": "cu"}
    kernel = _dispatch._choose("topk_compress", impls, dev, None)
    if kernel == "reference":  # no GPU backend usable here: give it one
        impls = {"reference": "ref", "cpu": "c"}
        dev = types.SimpleNamespace(type="cpu")
        kernel = _dispatch._choose("topk_compress", impls, dev, None)
    if kernel == "reference":
        pytest.skip("no native backend usable here")
    assert all(_dispatch._choose("topk_compress", impls, dev, n) == kernel for n in (1, 99, 100))
    table[("topk_compress", dev.type)] = 100
    got = {n: _dispatch._choose("topk_compress", impls, dev, n) for n in (0, 1, 99, 100, 10**6)}
    assert got == {0: "reference", 1: "reference", 99: "reference", 100: kernel, 10**6: kernel}
    assert _dispatch._choose("topk_compress", impls, dev, None) == kernel
    assert _dispatch._choose("ef14_topk_", impls, dev, 1) == kernel  # another op: no entry
    with fedkern.backend(kernel):
        assert _dispatch.pick("topk_compress", impls, dev, 1) == impls[kernel]
    table[("topk_compress", dev.type)] = 0  # an entry of 0: the kernel everywhere
    assert _dispatch._choose("topk_compress", impls, dev, 1) == kernel


@needs_cpu
def test_set_crossover_end_to_end_on_cpu(table):
    """With a CPU entry set through the public API, a small top-k runs the reference (the
    dispatch log says so) and gives the C++ core's result bit for bit; removing it restores the
    core. fedkern.crossovers() shows the entry while it is set."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    (v0, i0), calls = _calls_of(lambda: fedkern.topk_compress(x, 50))
    assert calls[-1][3] == "cpu"
    fedkern.set_crossover("topk_compress", "cpu", 10**4)
    assert fedkern.crossovers()["topk_compress:cpu"] == 10**4
    (v1, i1), calls = _calls_of(lambda: fedkern.topk_compress(x, 50))
    assert calls[-1] == ("topk_compress", "cpu", 5000, "reference")
    assert torch.equal(i0, i1) and torch.equal(v0.view(torch.int32), v1.view(torch.int32))
    (_, _), calls = _calls_of(lambda: fedkern.topk_compress(torch.randn(20_000), 50))
    assert calls[-1][3] == "cpu"  # at and above the entry: the core
    fedkern.set_crossover("topk_compress", "cpu", None)
    assert "topk_compress:cpu" not in fedkern.crossovers()
    (_, _), calls = _calls_of(lambda: fedkern.topk_compress(x, 50))
    assert calls[-1][3] == "cpu"


@pytest.mark.parametrize("args, exc, match", [
    ((1, "cuda", 5), TypeError, "op must be a non-empty str"),
    (("topk_compress", "", 5), TypeError, "device_type must be"),
    (("topk_compress", "cuda", -1), ValueError, "n must be an int >= 0"),
    (("topk_compress", "cuda", 2.5), ValueError, "n must be an int >= 0"),
    (("topk_compress", "cuda", True), ValueError, "n must be an int >= 0"),
])  # fmt: skip
def test_set_crossover_bad_input(table, args, exc, match):
    before = dict(table)
    with pytest.raises(exc, match=match):
        fedkern.set_crossover(*args)
    assert table == before


def test_env_override_parsing():
    base = {("a", "cuda"): 10, ("b", "cuda"): 20}
    assert _crossover.parse_env(None, base) == base
    assert _crossover.parse_env("off", base) == {}
    assert _crossover.parse_env(" OFF ", base) == {}
    got = _crossover.parse_env("a:cuda=3e7, c:cuda=1000,b:cuda=0", base)
    assert got == {("a", "cuda"): 30_000_000, ("c", "cuda"): 1000}
    for bad in ("a=5", "a:cuda", ":cuda=5", "a:cuda=x", "a:cuda=-1", "a:cuda=2.5"):
        with pytest.raises(ValueError, match="FEDKERN_CROSSOVER"):
            _crossover.parse_env(bad, base)


def test_env_variable_is_read_at_import():
    code = "import fedkern; print(sorted(fedkern.crossovers().items()))"
    env = {**os.environ, "FEDKERN_CROSSOVER": "topk_compress:cuda=3e7,sparse_add_batched_:cuda=0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == "[('topk_compress:cuda', 30000000)]"
    env["FEDKERN_CROSSOVER"] = "off"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_suggest():
    sizes = [10**4, 10**5, 10**6, 10**7, 10**8]

    def pts(wins):
        return [(n, 1.0 if w else 2.0, 1.5) for n, w in zip(sizes, wins, strict=True)]

    assert X.suggest(pts([1, 1, 1, 1, 1])) == 0  # the kernel everywhere: no entry
    assert X.suggest(pts([0, 0, 1, 1, 1])) == 300_000  # between 1e5 and 1e6
    assert X.suggest(pts([0, 0, 0, 0, 1])) == 30_000_000
    assert X.suggest(pts([1, 0, 0, 1, 1])) == 3_000_000  # a win below a loss does not count
    assert X.suggest(pts([0, 0, 0, 0, 0])) == 10**9  # the reference everywhere
    assert X.suggest([]) == 0
    assert X.suggest([(10**6, 1.0, 1.0)]) == 0  # a tie goes to the kernel


@needs_cpu
def test_bench_reports_which_implementation_ran(table):
    """run_case under "auto" records the implementation the dispatch chose at the case's size and
    the op's crossover; the markdown table shows it. Control: without the entry, the core."""
    from fedkern.cli import environment, markdown

    case = B.Case("topk_compress", 3000, 30)
    budget = B.Budget(warmup=1, min_reps=2, max_reps=2, seconds=0.0)
    plain = B.run_case(case, "cpu", "auto", budget)
    assert plain["backend"] == "cpu" and "crossover" not in plain
    table[("topk_compress", "cpu")] = 10**4
    rec = B.run_case(case, "cpu", "auto", budget)
    assert rec["backend"] == "reference" and rec["crossover"] == 10**4
    meta = environment(torch.device("cpu"))
    meta.update(suite="custom", backend_choice="auto", filter=None, timestamp="t")
    row = "| topk_compress | 3e3 | 30 | fp32 | reference (crossover 1e4) |"
    assert row in markdown(meta, [rec])
    forced = B.run_case(case, "cpu", "cpu", budget)  # a forced backend ignores the table
    assert forced["backend"] == "cpu"


@needs_cpu
def test_measure_and_report_on_cpu(table):
    """The measurement times kernel and reference for the sized ops, in the dispatch's size unit,
    and prints a replacement table; table entries not measured are kept in it."""
    table[("ef21_randk_", "cpu")] = 777
    budget = B.Budget(warmup=1, min_reps=1, max_reps=1, seconds=0.0)
    recs = X.measure("cpu", [1000, 4000], filter_ops=["topk_compress", "trimmed_mean"],
                     budget=budget)  # fmt: skip
    ok = [r for r in recs if r["status"] == "ok"]
    assert {(r["op"], r["size"]) for r in ok} == {
        ("topk_compress", 1000), ("topk_compress", 4000),
        ("trimmed_mean", 16 * 1000), ("trimmed_mean", 16 * 4000),
    }  # fmt: skip
    assert all(r["kernel"] == "cpu" and r["kernel_ms"] > 0 and r["reference_ms"] > 0 for r in ok)
    md = X.report(recs, "cpu")
    assert "| topk_compress | fp32 | 1e3 | cpu |" in md
    assert '("ef21_randk_", "cpu"): 777,  # not measured in this run: kept' in md
    found = X.crossovers(recs, "cpu")
    assert set(found) == {("topk_compress", "fp32"), ("trimmed_mean", "fp32")}


def test_cli_crossover(tmp_path, capsys):
    from fedkern import cli

    argv = ["bench", "--crossover", "--device", "cpu", "--sizes", "1000", "--filter",
            "ef21_topk_", "--reps", "1", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "# fedkern crossovers (cpu)" in out and "TABLE: dict[tuple[str, str], int] = {" in out
    assert (tmp_path / "latest-crossover-cpu.json").exists()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--crossover", "--full", "--device", "cpu"])
