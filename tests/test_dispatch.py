"""Backend discovery, forcing and fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import require

import fedkern
from fedkern.ops import _dispatch


def test_backends_report():
    info = fedkern.backends()
    assert set(info) == {"reference", "cpu", "triton", "cuda"}
    for entry in info.values():
        assert isinstance(entry["available"], bool) and entry["reason"]
    assert info["reference"]["available"]
    if os.environ.get("CI") == "true":
        assert info["cpu"]["available"], info["cpu"]["reason"]
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"] and "CUDA" in info["cuda"]["reason"]


def test_backend_context_nests_and_restores():
    assert fedkern.current_backend() == _dispatch._ENV_BACKEND
    with fedkern.backend("reference"):
        assert fedkern.current_backend() == "reference"
        with fedkern.backend("auto"):
            assert fedkern.current_backend() == "auto"
        assert fedkern.current_backend() == "reference"
    assert fedkern.current_backend() == _dispatch._ENV_BACKEND


def test_backend_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fedkern.backend("gpu"):
            pass
    x = torch.randn(10)
    if not torch.cuda.is_available():
        with fedkern.backend("cuda"), pytest.raises(RuntimeError, match="'cuda' is forced but"):
            fedkern.topk_compress(x, 2)
    with fedkern.backend("cuda"), pytest.raises(RuntimeError, match="has no 'cuda' kernel"):
        fedkern.randk_compress(x, 2, seed=0)


def test_auto_uses_the_cpu_core_on_cpu():
    require("fedkern._C", in_ci=True)
    impl = _dispatch.pick("topk_compress", fedkern.ops.topk.IMPLS["topk_compress"],
                          torch.device("cpu"))  # fmt: skip
    assert impl is fedkern.ops.topk.IMPLS["topk_compress"]["cpu"]


def test_auto_order_keeps_the_gpu_measured_kernel(monkeypatch):
    """On CUDA, "auto" takes the CUDA C++ kernel, then Triton; an AUTO_ORDER entry (a CUDA C++
    kernel not yet run on a GPU) puts Triton first for that op only. Forcing ignores the entry."""
    monkeypatch.setattr(_dispatch, "_probe_cache", {"cuda": (True, "x"), "triton": (True, "x")})
    impls = {"reference": 0, "triton": 1, "cuda": 2}
    cuda = torch.device("cuda", 0)
    assert ("microadam_step_", "cuda") in _dispatch.AUTO_ORDER
    assert _dispatch._choose("microadam_step_", impls, cuda, None) == "triton"
    assert _dispatch._choose("topk_compress", impls, cuda, None) == "cuda"
    with fedkern.backend("cuda"):
        assert _dispatch._choose("microadam_step_", impls, cuda, None) == "cuda"
    monkeypatch.setitem(_dispatch._probe_cache, "triton", (False, "not installed"))
    assert _dispatch._choose("microadam_step_", impls, cuda, None) == "cuda"


def test_env_variable_forces_a_backend():
    code = (
        "import fedkern, torch; print(fedkern.current_backend());"
        "print(fedkern.topk_compress(torch.tensor([1., -3., 2.]), 1)[1].tolist())"
    )
    env = dict(os.environ, FEDKERN_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "[1]"]
    env["FEDKERN_BACKEND"] = "fastest"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "backend must be one of" in out.stderr


def test_import_survives_a_missing_native_module():
    """With fedkern._C unimportable, import works, backends() says why, ops use the reference."""
    code = (
        "import sys; sys.modules['fedkern._C'] = None\n"
        "import fedkern, torch\n"
        "info = fedkern.backends()['cpu']; assert not info['available'], info\n"
        "print(info['reason'])\n"
        "print(fedkern.topk_compress(torch.tensor([1., -3., 2.]), 2)[1].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout and out.stdout.strip().endswith("[1, 2]")
