"""Federated and distributed optimization methods, each a thin composition of fedkern's ops.

- ``Method`` (``fedkern.algorithms.base``): the common base: seeded counter-based randomness,
  history, divergence as a result, exact ``state_dict`` resume;
- ``GD``, ``FedAvg``, ``FedProx``, ``Scaffold``, ``ProxSkip``, ``Scaffnew`` on a
  ``fedkern.clients.ClientBatch`` (batched local training; ``fedkern.algorithms.federated``);
- ``TAMUNA``: local training, compression and partial participation with the fused pattern
  aggregation (``fedkern.algorithms.tamuna``); ``FiveGCS``: 5GCS / 5GCS-CC with uniform or
  importance client sampling (``fedkern.algorithms.fivegcs``);
- ``ByzVRMarinaPP``: Byzantine-robust variance reduction with partial participation and clipped
  gradient differences (``plus=True``: the PP+ variant);
- ``ClipLocalGDJ``, ``ClippedGD``, ``CLERR``, ``NASTYA``, ``ClippedRRCLI``, ``LocalClippedSGD``,
  ``ClippedFedAvg``, ``LocalGD``: local / random-reshuffling methods for (L0, L1)-smooth problems
  with the fused clipped server jump (``fedkern.algorithms.generalized``);
- ``BiasedSGD``: SGD with the biased estimators of ``fedkern.estimators``
  (``fedkern.algorithms.biased``);
- ``MARINA``, ``DIANA``, ``EF21`` (compressed messages; ``fedkern.algorithms.compressed``) and
  ``LSVRG``, ``PAGE`` (loopless variance reduction; ``fedkern.algorithms.vr``) on a ClientBatch;
- ``RSGD``, ``RLSVRG``, ``RPAGE``, ``RMARINA`` on the PCA problems of ``fedkern.manifolds``
  (``fedkern.algorithms.riemannian``);
- ``DSGD``, ``DistributedDSGD``, ``LSVRDSG``: MAST, training through random sketches
  (``fedkern.algorithms.mast``);
- ``RACLoRA``, ``AsymmLoRA``, ``COLA``, ``LoRA``, ``FPFT``, ``FedRACLoRA``: chains of low-rank
  adapters and their baselines (``fedkern.algorithms.raclora``).

``REGISTRY`` maps the command-line names (``fedkern run <name>``) to the classes.
"""

from fedkern.algorithms.base import Method
from fedkern.algorithms.biased import BiasedSGD
from fedkern.algorithms.byzantine import ByzVRMarinaPP
from fedkern.algorithms.compressed import DIANA, EF21, MARINA
from fedkern.algorithms.federated import (
    GD,
    FedAvg,
    FederatedMethod,
    FedProx,
    ProxSkip,
    Scaffnew,
    Scaffold,
)
from fedkern.algorithms.fivegcs import FiveGCS
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
from fedkern.algorithms.riemannian import RLSVRG, RMARINA, RPAGE, RSGD
from fedkern.algorithms.tamuna import TAMUNA
from fedkern.algorithms.vr import LSVRG, PAGE

REGISTRY = {
    cls.name: cls
    for cls in (GD, FedAvg, FedProx, Scaffold, ProxSkip, Scaffnew, TAMUNA, FiveGCS, ByzVRMarinaPP)
}
REGISTRY.update({cls.name: cls for cls in (ClipLocalGDJ, ClippedGD, CLERR, NASTYA, ClippedRRCLI,
                                           LocalClippedSGD, ClippedFedAvg, LocalGD,
                                           BiasedSGD)})  # fmt: skip
REGISTRY.update({cls.name: cls for cls in (MARINA, DIANA, EF21, LSVRG, PAGE, RSGD, RLSVRG, RPAGE,
                                           RMARINA)})  # fmt: skip
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
    "CLERR",
    "DIANA",
    "EF21",
    "GD",
    "LSVRG",
    "MARINA",
    "NASTYA",
    "PAGE",
    "RLSVRG",
    "RMARINA",
    "RPAGE",
    "RSGD",
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
    "FiveGCS",
    "FedProx",
    "FederatedMethod",
    "Method",
    "ProxSkip",
    "Scaffnew",
    "Scaffold",
    "TAMUNA",
]
