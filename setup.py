"""Build script: CMake (Ninja, Release, OpenMP) builds the pybind11 module ``fedkern._C``.

CMakeLists.txt is the one description of the native targets; this file only drives it. The module
is torch-free and needs a C++17 compiler, never CUDA. Besides the extension it

* installs the top-level ``kernels/`` directory (Triton kernels) as the subpackage
  ``fedkern.kernels``;
* ships ``csrc/cuda/*.cu`` and their ``*.cuh`` helpers as package data under
  ``fedkern/cuda/src/`` in regular installs (an editable install reads them from the repository).

Environment: FEDKERN_BUILD_JOBS sets the build parallelism (default 2); FEDKERN_CMAKE_ARGS adds
extra ``-D...`` arguments (space separated) to the CMake configure step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _tool(module: str, attr: str, name: str) -> str | None:
    """Path of a build tool: from its PyPI package (build isolation) or else from PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / name
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


class CMakeExtension(Extension):
    """An extension built by CMake: no sources for setuptools to compile."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    """Configure CMakeLists.txt and build the one target of each CMakeExtension."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise RuntimeError("fedkern: building fedkern._C needs CMake (pip install cmake)")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        # get_ext_fullpath is the final place of the module: the source tree for an editable
        # install, build/lib... otherwise. CMake writes the module straight there.
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DFEDKERN_BUILD_TESTS=OFF",
            "-DFEDKERN_CUDA_CHECK=OFF",
        ]
        if ninja is not None:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += os.environ.get("FEDKERN_CMAKE_ARGS", "").split()
        jobs = os.environ.get("FEDKERN_BUILD_JOBS", "").strip() or "2"
        # A cache from another generator or source dir cannot be reused.
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}" not in cache.read_text():
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--target", ext.target, "--parallel", jobs],
            check=True,
        )


def _cuda_sources() -> list[Path]:
    """The CUDA C++ kernel sources and their shared headers (NVRTC compiles them at first use)."""
    cuda = ROOT / "csrc" / "cuda"
    return sorted([*cuda.glob("*.cu"), *cuda.glob("*.cuh")])


class BuildPy(build_py):
    """build_py that also copies csrc/cuda/*.cu and *.cuh to fedkern/cuda/src/ (not for editable
    installs, which read csrc/cuda directly)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "fedkern" / "cuda" / "src"
        for src in _cuda_sources():
            dest.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(src), str(dest / src.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            dest = Path(self.build_lib) / "fedkern" / "cuda" / "src"
            outputs += [str(dest / p.name) for p in _cuda_sources()]
        return outputs


def _packages() -> list[str]:
    packages = find_packages(where=str(ROOT), include=["fedkern", "fedkern.*"])
    packages.append("fedkern.kernels")
    packages += [f"fedkern.kernels.{p}" for p in find_packages(where=str(ROOT / "kernels"))]
    return packages


setup(
    packages=_packages(),
    package_dir={"fedkern.kernels": "kernels"},
    package_data={"fedkern": ["py.typed"]},
    ext_modules=[CMakeExtension("fedkern._C", target="_C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    zip_safe=False,
)
