"""bench/triton_compile_check.py: every Triton kernel of fedkern.kernels compiles for sm_90 (H100 /
H200) without a GPU, with the argument types and constexprs its launchers use; every JITFunction
is either launched by a scenario or listed as a helper / skip; and a kernel that only the real
compiler rejects (a loop-carried variable changing type, which the interpreter runs) is reported
as an error.

The check runs in a subprocess without TRITON_INTERPRET (this suite sets it, and interpreted
kernels are not JITFunctions), with a fresh Triton cache.  The full check compiles about 190
variants in about 100 s on one core, so it is run whole.  Skipped when Triton has no NVIDIA
backend or no ptxas."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import require

require("triton", in_ci=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "triton_compile_check.py"
SPEC = importlib.util.spec_from_file_location("triton_compile_check", SCRIPT)
CHECK = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = CHECK  # dataclasses look their module up
SPEC.loader.exec_module(CHECK)

MISSING = CHECK.backend_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile for sm_90: {MISSING}")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(args, tmp_path, timeout):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_every_kernel_is_launched_or_listed(tmp_path):
    """--list records the launches only: every JITFunction is covered, no list entry is stale."""
    r = _run([str(SCRIPT), "--list"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "uncovered kernel" not in r.stdout and "stale entry" not in r.stdout
    assert " variants of " in r.stdout.splitlines()[-1]


def test_every_variant_compiles_for_sm90(tmp_path):
    """The whole check: every recorded variant compiles to a cubin for sm_90."""
    r = _run([str(SCRIPT)], tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    last = r.stdout.strip().splitlines()[-1]
    done, total = last.split()[0].split("/")
    assert done == total and int(total) > 0, last


BROKEN = """
import triton
import triton.language as tl


@triton.jit
def broken_kernel(out_ptr, n):
    acc = 0
    for i in range(n):
        acc += 1.5  # int32 -> fp32 loop-carried: the interpreter runs it, the compiler rejects it
    tl.store(out_ptr, acc)


@triton.jit
def fine_kernel(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, offs.to(tl.float32), mask=offs < n)
"""

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import triton_compile_check as c
import broken_kernels as b

sig = {"out_ptr": "*fp32", "n": "i32"}
bad = c.compile_variant(c.Variant("broken", b.broken_kernel, sig, {}, {}, {}))
good = c.compile_variant(c.Variant("fine", b.fine_kernel, dict(sig, BLOCK="constexpr"),
                                   {"BLOCK": 128}, {}, {"num_warps": 4}))
print("BAD", bad.ok, bad.error.splitlines()[0] if bad.error else "")
print("GOOD", good.ok, good.num_warps, good.error)
"""


def test_compile_errors_are_reported(tmp_path):
    """compile_variant returns ok=False with the compiler's message for a kernel the
    interpreter would run, and ok=True for a correct one."""
    (tmp_path / "broken_kernels.py").write_text(textwrap.dedent(BROKEN))
    r = _run(["-c", PROBE, str(SCRIPT.parent), str(tmp_path)], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert lines["BAD"].startswith("False "), r.stdout
    assert lines["GOOD"].startswith("True 4"), r.stdout
