"""Concurrency: the C++ core's ops called from several Python threads at once, and under OpenMP
thread counts 1, 2 and 3, return the same bits as one call at a time.

The inputs are large enough that the ops split their work into several OpenMP blocks (top-k's
blocks hold 2**19 elements), and MicroAdam's per-thread scratch is exercised by concurrent steps
on separate states. The thread-count cases run in subprocesses (OMP_NUM_THREADS is read when the
OpenMP runtime starts) and compare SHA-256 digests of every output.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import require

import fedkern
from fedkern import robust as R
from fedkern.reference.microadam import new_state

N = 3 << 19  # three top-k blocks of 2**19: one per thread with 3 threads


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g)
    x[::1000] = 0.5  # ties across blocks
    return {
        "x": x,
        "xb": x.bfloat16(),
        "e": torch.randn(N, generator=g),
        "vals": torch.randn(16, 1 << 14, generator=g),
        "idx": torch.stack(
            [torch.randperm(N, generator=g)[: 1 << 14].sort().values for _ in range(16)]
        ),  # fmt: skip
        "stack": torch.randn(33, 1 << 15, generator=g),
        "p": torch.randn(N, generator=g),
        "grads": [torch.randn(N, generator=g) for _ in range(2)],
    }


def workload(t: dict) -> list[torch.Tensor]:
    """Every C++ op family once (fresh output buffers; the inputs are not modified)."""
    out = list(fedkern.topk_compress(t["x"], 5000))
    out += list(fedkern.topk_compress(t["xb"], 70_000))
    e = t["e"].clone()
    out += list(fedkern.ef14_topk_(t["x"], e, 3000, lr=0.5)) + [e]
    s = t["e"].clone()
    out += list(fedkern.ef21_randk_(t["x"], s, 20_000, seed=3, step=1)) + [s]
    out += list(fedkern.randk_compress(t["x"], 40_000, seed=9, step=2))
    dense = t["e"].clone()
    out.append(fedkern.sparse_add_batched_(dense, t["vals"], t["idx"], alpha=0.25))
    out += [R.coordinate_median(t["stack"]), R.trimmed_mean(t["stack"], 5)]
    p = t["p"].clone()
    st = new_state(N, 4096, 41, 256, 3, "cpu")
    for step, g in enumerate(t["grads"], start=1):
        fedkern.ops.microadam.microadam_step_([p], [g], [st], [step], lr=1e-3)
    out += [p, st["ef"], st["idx"], st["val"]]
    return out


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(autouse=True)
def cpu_backend():
    require("fedkern._C", in_ci=True)
    with fedkern.backend("cpu"):
        yield


def test_threads_give_the_serial_bits():
    t = inputs()
    want = digest(workload(t))
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with fedkern.backend("cpu"):  # the backend choice is per thread
                results[i] = digest(workload(t))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert set(results.values()) == {want}


SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import fedkern
from test_concurrency import digest, inputs, workload
with fedkern.backend("cpu"):
    print(fedkern._C.build_info()["max_threads"], digest(workload(inputs())))
"""


def test_openmp_thread_counts_give_the_same_bits():
    """OMP_NUM_THREADS 1, 2 and 3 (the OpenMP team the core sees may be capped at the machine's
    core count once torch has set its own thread pool: the test records what it got and needs
    at least a single-thread and a multi-thread run)."""
    got, teams = {}, set()
    for threads in (1, 2, 3):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                             text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        max_threads, dig = out.stdout.split()
        assert 1 <= int(max_threads) <= threads
        teams.add(int(max_threads))
        got[threads] = dig
    assert 1 in teams and max(teams) >= 2, teams
    assert len(set(got.values())) == 1, got
    assert got[1] == digest(workload(inputs()))  # and this process's bits
