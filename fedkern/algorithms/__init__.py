"""Federated and distributed optimization methods, each a thin composition of fedkern's ops.

- ``ByzVRMarinaPP``: Byzantine-robust variance reduction with partial participation and clipped
  gradient differences (``plus=True``: the PP+ variant).
"""

from fedkern.algorithms.byzantine import ByzVRMarinaPP

__all__ = ["ByzVRMarinaPP"]
