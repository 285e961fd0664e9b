"""fedkern: fused kernels for communication-efficient, robust and memory-efficient training.

Ops (torch.library namespace "fedkern", dispatched to the C++ core on CPU, Triton / CUDA C++ on
GPU, plain PyTorch elsewhere): ``topk_compress``, ``randk_compress``, ``ef14_topk_``,
``ef21_topk_``, ``ef14_randk_``, ``ef21_randk_``, ``sparse_add_``, ``sparse_add_batched_``.
Backends: ``fedkern.backends()`` reports what is usable; ``with fedkern.backend(name):`` or
FEDKERN_BACKEND forces one; ``fedkern.crossovers()`` lists the sizes below which "auto" runs the
plain-PyTorch path on a GPU (``fedkern.set_crossover`` or FEDKERN_CROSSOVER override them).
Building blocks: ``fedkern.compress``; optimizers: ``fedkern.optim``
(``MicroAdam``); robust aggregation: ``fedkern.robust``; methods: ``fedkern.algorithms``; data and
problems: ``fedkern.data``, ``fedkern.problems``; manifolds (sphere, Stiefel, fused Riemannian
steps, PCA): ``fedkern.manifolds``. Arrays of other libraries (NumPy, CuPy, JAX) are
accepted through DLPack: ``fedkern.interop``.
"""

from fedkern import algorithms, compress, data, interop, manifolds, optim, problems, robust
from fedkern.ops import (
    backend,
    backends,
    crossovers,
    current_backend,
    ef14_randk_,
    ef14_topk_,
    ef21_randk_,
    ef21_topk_,
    randk_compress,
    set_crossover,
    sparse_add_,
    sparse_add_batched_,
    topk_compress,
)

try:  # the one version string: the package metadata (pyproject.toml)
    from importlib.metadata import PackageNotFoundError as _NotFound
    from importlib.metadata import version as _version

    __version__ = _version("fedkern")
except _NotFound:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "algorithms",
    "backend",
    "backends",
    "compress",
    "crossovers",
    "current_backend",
    "data",
    "interop",
    "manifolds",
    "ef14_randk_",
    "ef14_topk_",
    "ef21_randk_",
    "ef21_topk_",
    "optim",
    "problems",
    "randk_compress",
    "robust",
    "set_crossover",
    "sparse_add_",
    "sparse_add_batched_",
    "topk_compress",
]
