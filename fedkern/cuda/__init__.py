"""CUDA C++ kernels (csrc/cuda), compiled at first use by NVRTC through CuPy.

``fedkern.cuda.runtime`` finds, compiles, caches and launches the sources on PyTorch's current
stream; one module per op family (``fedkern.cuda.topk``, ``fedkern.cuda.microadam``) holds the
launchers. This package only names them: importing it imports neither CuPy nor a family.
"""
