"""The text NVRTC compiles (fedkern.cuda.runtime.source): every csrc/cuda kernel source with its
shared headers pasted in, once each, and no include directive left; compiled for sm_90 by nvcc
from that text alone (standard input, no include path) when nvcc is installed. CuPy is not needed
(and never imported)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fedkern.cuda import runtime

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
KERNELS = sorted(p.stem for p in CUDA_DIR.glob("*.cu"))
#: One variant each (every variant of every source is compiled by the CMake stage's nvcc check).
ONE_VARIANT = {
    "topk": ["-DFK_TOPK_OP=1", "-DFK_TOPK_BF16=1", "-DFK_TOPK_VEC=8"],
    "microadam": ["-DFK_MA_BF16=1", "-DFK_MA_D=4096"],
}


def test_every_kernel_source_is_listed():
    assert {"topk", "microadam"} <= set(KERNELS)


@pytest.mark.parametrize("name", KERNELS)
def test_source_pastes_each_header_once(name):
    text = runtime.source(name)
    assert runtime._INCLUDE.search(text) is None  # no include directive is left for NVRTC
    raw = (CUDA_DIR / f"{name}.cu").read_text()
    for header in runtime._INCLUDE.findall(raw):
        body = (CUDA_DIR / header).read_text()
        assert text.count(body.strip()) == 1, header
    # the control: the file itself does include a header, which the pasted text replaced
    assert runtime._INCLUDE.search(raw) is not None


def test_a_header_included_twice_is_pasted_once(tmp_path, monkeypatch):
    files = {"a.cu": '#include "h.cuh"\nint a;\n#include "h.cuh"\n', "h.cuh": "int h;\n"}
    monkeypatch.setattr(runtime, "_read", lambda fname: files[fname])
    assert runtime.source("a") == "int h;\n\nint a;\n\n"


@pytest.mark.parametrize("name", KERNELS)
def test_pasted_source_compiles_alone(name, tmp_path):
    local = Path("/usr/local/cuda/bin/nvcc")
    nvcc = shutil.which("nvcc") or (str(local) if local.is_file() else None)
    if nvcc is None:
        pytest.skip("needs nvcc")
    src = tmp_path / f"{name}.cu"  # a directory without the headers: nothing to include from
    src.write_text(runtime.source(name))
    cmd = [nvcc, "-std=c++17", "--fmad=false", "-arch=sm_90", *ONE_VARIANT.get(name, []), "-c",
           str(src), "-o", str(tmp_path / "k.o")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
