"""Federated and distributed optimization methods, each a thin composition of fedkern's ops.

- ``Method`` (``fedkern.algorithms.base``): the common base: seeded counter-based randomness,
  history, divergence as a result, exact ``state_dict`` resume;
- ``GD``, ``FedAvg``, ``FedProx``, ``Scaffold``, ``ProxSkip``, ``Scaffnew`` on a
  ``fedkern.clients.ClientBatch`` (batched local training; ``fedkern.algorithms.federated``);
- ``ByzVRMarinaPP``: Byzantine-robust variance reduction with partial participation and clipped
  gradient differences (``plus=True``: the PP+ variant);
- ``DSGD``, ``DistributedDSGD``, ``LSVRDSG``: MAST, training through random sketches
  (``fedkern.algorithms.mast``);
- ``RACLoRA``, ``AsymmLoRA``, ``COLA``, ``LoRA``, ``FPFT``, ``FedRACLoRA``: chains of low-rank
  adapters and their baselines (``fedkern.algorithms.raclora``).

``REGISTRY`` maps the command-line names (``fedkern run <name>``) to the classes.
"""

from fedkern.algorithms.base import Method
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
from fedkern.algorithms.mast import DSGD, LSVRDSG, DistributedDSGD
from fedkern.algorithms.raclora import (
    COLA,
    FPFT,
    AsymmLoRA,
    FedRACLoRA,
    LoRA,
    LoRAChain,
    RACLoRA,
)

REGISTRY = {cls.name: cls for cls in (GD, FedAvg, FedProx, Scaffold, ProxSkip, Scaffnew)}
REGISTRY.update({cls.name: cls for cls in (DSGD, DistributedDSGD, LSVRDSG, RACLoRA, AsymmLoRA,
                                           COLA, LoRA, FPFT, FedRACLoRA)})  # fmt: skip

__all__ = [
    "COLA",
    "DSGD",
    "FPFT",
    "LSVRDSG",
    "AsymmLoRA",
    "DistributedDSGD",
    "FedRACLoRA",
    "LoRA",
    "LoRAChain",
    "RACLoRA",
    "GD",
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
