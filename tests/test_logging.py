"""The "fedkern" logger: one WARNING when "auto" falls back to the reference because a native
backend failed to load (with the reason), DEBUG records of first-use compiles, backends()
unchanged; and a broken (not merely missing) native module is told apart from a missing one.

The fallback cases run in a subprocess: they need a fresh interpreter whose fedkern._C cannot be
imported.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import torch
from conftest import require

import fedkern
from fedkern.ops import _dispatch

PRELUDE = """
import logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("fedkern").addHandler(Keep())
logging.getLogger("fedkern").setLevel(logging.DEBUG)
"""


def run_py(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_one_warning_when_auto_falls_back():
    stdout = run_py(
        "sys.modules['fedkern._C'] = None\n"
        "import fedkern, torch\n"
        "x = torch.tensor([1., -3., 2.])\n"
        "for _ in range(3):\n"
        "    assert fedkern.topk_compress(x, 1)[1].tolist() == [1]\n"
        "fedkern.randk_compress(x, 1, seed=0)\n"
        "fedkern.sparse_add_(torch.zeros(3), torch.ones(1), torch.tensor([1]))\n"
        "warn = [m for lvl, m in records if lvl == 'WARNING']\n"
        "print(len(warn)); print(warn[0])\n"
        "print(sorted(fedkern.backends()['cpu']))\n"
    )
    count, message, keys = stdout.strip().splitlines()
    assert count == "1"
    assert "backend 'cpu' failed to load" in message and "not built" in message
    assert "falls back to the plain-PyTorch reference" in message
    assert keys == "['available', 'reason']"


def test_no_warning_when_a_backend_is_forced_or_loads():
    """A forced reference backend and a working C++ core are not fallbacks: no warning."""
    require("fedkern._C", in_ci=True)
    stdout = run_py(
        "import fedkern, torch\n"
        "x = torch.randn(100)\n"
        "fedkern.topk_compress(x, 3)\n"
        "with fedkern.backend('reference'):\n"
        "    fedkern.topk_compress(x, 3)\n"
        "print(sum(lvl == 'WARNING' for lvl, _ in records))\n"
    )
    assert stdout.strip() == "0"


def test_broken_native_module_is_not_a_missing_one():
    """An ImportError other than "module not found" (an undefined symbol, say) marks the backend
    broken: its reason says so, and the test suite fails on it instead of skipping."""
    stdout = run_py(
        "import importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fedkern._C':\n"
        "            raise ImportError('fedkern/_C.so: undefined symbol: _ZN7fedkern4oopsEv')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import fedkern\n"
        "from fedkern.ops import _dispatch\n"
        "print(_dispatch.backend_broken('cpu')); print(fedkern.backends()['cpu']['reason'])\n"
        "print(_dispatch.backend_broken('reference'))\n"
    )
    broken, reason, ref = stdout.strip().splitlines()
    assert broken == "True" and ref == "False"
    assert "failed to load" in reason and "undefined symbol" in reason


def test_first_use_debug_record(caplog):
    """The first call of a lazily imported Triton kernel module logs one DEBUG record."""
    require("triton", in_ci=True)
    from fedkern.ops import _native

    call = _native.lazy("fedkern.kernels.sparse", "sparse_add_batched_")
    name = "fedkern.kernels.sparse.sparse_add_batched_"
    _native._first_use.discard(name)
    dense = torch.zeros(8)
    with caplog.at_level(logging.DEBUG, logger="fedkern"):
        for _ in range(2):
            call(dense, torch.ones(1, 2), torch.tensor([[1, 5]]), 1.0)
    first = [r for r in caplog.records if "first use of " + name in r.getMessage()]
    assert len(first) == 1 and first[0].levelno == logging.DEBUG
    assert dense.tolist() == [0, 2, 0, 0, 0, 2, 0, 0]


def test_backends_report_is_unchanged():
    info = fedkern.backends()
    assert set(info) == set(_dispatch.BACKENDS)
    assert all(set(v) == {"available", "reason"} for v in info.values())
