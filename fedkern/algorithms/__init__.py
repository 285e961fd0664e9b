"""Federated and distributed optimization methods, each a thin composition of fedkern's ops.

- ``Method`` (``fedkern.algorithms.base``): the common base: seeded counter-based randomness,
  history, divergence as a result, exact ``state_dict`` resume;
- ``GD``, ``FedAvg``, ``FedProx``, ``Scaffold``, ``ProxSkip``, ``Scaffnew`` on a
  ``fedkern.clients.ClientBatch`` (batched local training; ``fedkern.algorithms.federated``);
- ``ByzVRMarinaPP``: Byzantine-robust variance reduction with partial participation and clipped
  gradient differences (``plus=True``: the PP+ variant);
- ``ClipLocalGDJ``, ``ClippedGD``, ``CLERR``, ``NASTYA``, ``ClippedRRCLI``, ``LocalClippedSGD``,
  ``ClippedFedAvg``, ``LocalGD``: local / random-reshuffling methods for (L0, L1)-smooth problems
  with the fused clipped server jump (``fedkern.algorithms.generalized``);
- ``BiasedSGD``: SGD with the biased estimators of ``fedkern.estimators``
  (``fedkern.algorithms.biased``).

``REGISTRY`` maps the command-line names (``fedkern run <name>``) to the classes.
"""

from fedkern.algorithms.base import Method
from fedkern.algorithms.biased import BiasedSGD
from fedkern.algorithms.byzantine import ByzVRMarinaPP
from fedkern.algorithms.federated import (
    GD,
    FedAvg,
    FederatedMethod,
    FedProx,
    ProxSkip,
    Scaffnew,
    Scaffold,
)
from fedkern.algorithms.generalized import (
    CLERR,
    NASTYA,
    ClipLocalGDJ,
    ClippedFedAvg,
    ClippedGD,
    ClippedRRCLI,
    LocalClippedSGD,
    LocalGD,
)

REGISTRY = {
    cls.name: cls for cls in (GD, FedAvg, FedProx, Scaffold, ProxSkip, Scaffnew, ByzVRMarinaPP)
}
REGISTRY.update({cls.name: cls for cls in (ClipLocalGDJ, ClippedGD, CLERR, NASTYA, ClippedRRCLI,
                                           LocalClippedSGD, ClippedFedAvg, LocalGD,
                                           BiasedSGD)})  # fmt: skip

__all__ = [
    "CLERR",
    "GD",
    "NASTYA",
    "BiasedSGD",
    "ClipLocalGDJ",
    "ClippedFedAvg",
    "ClippedGD",
    "ClippedRRCLI",
    "LocalClippedSGD",
    "LocalGD",
    "REGISTRY",
    "ByzVRMarinaPP",
    "FedAvg",
    "FedProx",
    "FederatedMethod",
    "Method",
    "ProxSkip",
    "Scaffnew",
    "Scaffold",
]
