"""Federated and distributed optimization methods, each a thin composition of fedkern's ops.

- ``GD``, ``FedAvg``, ``FedProx``, ``Scaffold``, ``ProxSkip``, ``Scaffnew`` on a
  ``fedkern.clients.ClientBatch`` (batched local training; ``fedkern.algorithms.federated``);
- ``ByzVRMarinaPP``: Byzantine-robust variance reduction with partial participation and clipped
  gradient differences (``plus=True``: the PP+ variant).

``REGISTRY`` maps the command-line names (``fedkern run <name>``) to the classes.
"""

from fedkern.algorithms.byzantine import ByzVRMarinaPP
from fedkern.algorithms.federated import GD, FedAvg, FedProx, Method, ProxSkip, Scaffnew, Scaffold

REGISTRY = {cls.name: cls for cls in (GD, FedAvg, FedProx, Scaffold, ProxSkip, Scaffnew)}

__all__ = ["GD", "REGISTRY", "ByzVRMarinaPP", "FedAvg", "FedProx", "Method", "ProxSkip",
           "Scaffnew", "Scaffold"]  # fmt: skip
