"""pytest-benchmark suites over the cases of ``fedkern.benchmarks`` (the same as ``fedkern bench``).

Run: ``python -m pytest bench -q --benchmark-only [--benchmark-json out.json]``, then
``python bench/report.py out.json`` for the table of ratios. The files are named bench_<family>.py,
not test_*.py, so the normal test run (testpaths = tests) never collects them; this conftest
collects them when pytest is pointed at bench/.

Each case gives two benchmarks side by side, ``<case>-fedkern`` and ``<case>-eager``, in one group
(the case id), timed on identical inputs with the mutated buffers restored, untimed, before every
round. Options: --fedkern-full (the large suite), --fedkern-device cpu|cuda (default: cuda if
available), --fedkern-backend NAME (force a fedkern backend), --fedkern-sizes N,N,... (custom
sizes, for smoke runs).
"""

from __future__ import annotations

import math

import pytest
import torch

import fedkern
from fedkern import benchmarks as B

SIDES = ("fedkern", "eager")


def pytest_addoption(parser):
    group = parser.getgroup("fedkern", "fedkern benchmarks")
    group.addoption("--fedkern-full", action="store_true", help="run the full (large) suite")
    group.addoption("--fedkern-device", choices=("cpu", "cuda"), default=None,
                    help="device (default: cuda if available, else cpu)")  # fmt: skip
    group.addoption("--fedkern-backend", default="auto",
                    choices=("auto", "cpu", "triton", "cuda", "reference"),
                    help="force one fedkern backend")  # fmt: skip
    group.addoption("--fedkern-sizes", default=None, help="comma-separated sizes (smoke runs)")


def pytest_collect_file(file_path, parent):
    # Paths named on the command line are collected by pytest itself.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config) -> torch.device:
    name = config.getoption("--fedkern-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    sizes = config.getoption("--fedkern-sizes")
    cases = B.suite(
        full=config.getoption("--fedkern-full"),
        device=str(_device(config)),
        sizes=[int(float(s)) for s in sizes.split(",")] if sizes else None,
    )
    ops = metafunc.module.OPS
    params = [
        pytest.param((case, side), id=f"{case.id}-{side}")
        for case in cases
        if case.op in ops
        for side in SIDES
    ]
    metafunc.parametrize("bench_case", params, indirect=True)


_last: dict = {}


def _prepared(case, device, backend) -> B.Prepared:
    """The inputs of ``case``, built once for its two sides (only the last case is kept)."""
    key = (case, str(device), backend)
    if _last.get("key") != key:
        _last.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with fedkern.backend(backend):
            _last.update(key=key, prepared=case.setup(device))
    return _last["prepared"]


@pytest.fixture
def bench_case(request, benchmark):
    """A callable that benchmarks one side of one case with pytest-benchmark's ``benchmark``."""
    case, side = request.param
    device = _device(request.config)
    backend = request.config.getoption("--fedkern-backend")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if B.resolve_backend(case.op, device, backend) is None:
        pytest.skip(f"{case.op} has no {backend!r} kernel")

    def run() -> None:
        p = _prepared(case, device, backend)
        fn, rearm = getattr(p, side), getattr(p, f"rearm_{side}")

        def target() -> None:
            fn()
            B.synchronize(device)

        def setup() -> None:  # returns None: pytest-benchmark would take a value as arguments
            rearm()
            B.synchronize(device)

        with fedkern.backend(backend):
            setup()
            t = B.time_call(fn, device)  # one untimed call: JIT, caches; sizes the round count
            rounds = int(min(30, max(5, math.ceil(1.0 / max(t, 1e-6)))))
            benchmark.group = case.id
            benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
            rearm()
            peak = B.peak_memory(fn, device)
        info = benchmark.extra_info
        info.update(case=case.op, side=side, n=case.n, k=case.k, m=case.m,
                    dtype=case.dtype_name, bytes=p.nbytes, peak_bytes=peak,
                    backend=B.resolve_backend(case.op, device, backend) if side == "fedkern"
                    else "eager", eager=case.eager_desc, **p.extra)  # fmt: skip
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None:
            info["gbps"] = p.nbytes / stats.median / 1e9

    return run
