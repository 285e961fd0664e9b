"""Riemannian manifolds with batched fused primitives, and PCA problems on them.

- ``Sphere(n)``: the unit sphere, points x [..., n];
- ``Stiefel(n, p)``: orthonormal frames X [..., n, p] (X^T X = I_p), embedded metric;
  both with proj / retr / exp / log / transport (parallel and projection) / dist / random, in plain
  PyTorch for float32 and float64 on any device, and ``step``: the fused in-place step
  x <- R_x(-eta proj_x(u)) with the transport of a vector to the new point (op family
  "manifolds": ``fedkern::sphere_step_``, ``fedkern::stiefel_step_``; C++ core on CPU, Triton
  on CUDA), which renormalizes every iterate so that it stays on the manifold;
- ``PCA``: the leading eigenvector (sphere) or k leading eigenvectors (Stiefel) of a covariance,
  with the samples split over nodes; its batched gradients come from ``fedkern::client_grads``.

The Riemannian methods (R-SGD, R-LSVRG, R-PAGE, R-MARINA) are in
``fedkern.algorithms.riemannian``.
"""

from fedkern.manifolds.geometry import Manifold, Sphere, Stiefel, gaussian
from fedkern.manifolds.pca import PCA

__all__ = ["PCA", "Manifold", "Sphere", "Stiefel", "gaussian"]
