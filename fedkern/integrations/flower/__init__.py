"""Flower (flwr) integration: fedkern's robust aggregation and compressed client updates.

Server (Message API, Flower's current strategy API): ``FedkernStrategy`` is
``flwr.serverapp.strategy.FedAvg`` whose ``aggregate_train`` stacks the clients' updates into
X [n, d] (on CUDA when available), optionally clips the rows (``fedkern.robust.clip_rows_``, a fixed
or an adaptive radius), pre-aggregates (bucketing / NNM) and aggregates with a robust rule
(``fedkern.robust.Aggregator``); use it in a ``ServerApp`` with ``strategy.start(grid=...,
initial_arrays=..., num_rounds=...)``. ``LegacyFedkernStrategy`` is the same aggregation
(``core.RobustCore``) for the legacy ``flwr.server.strategy`` API (``aggregate_fit``).

Client: ``make_compress_mod(compressor, error_feedback=True)`` is a client mod (for
``ClientApp(mods=[...])``) that replaces the trained model a client returns by its compressed update
(top-k, rand-k sent as values and a seed, or any ``fedkern.compress.Compressor``), with the EF14
residual in the node's persistent ``context.state``. It works with Message-API ``@app.train()``
functions and with legacy ``NumPyClient`` apps; both strategies decode its replies (``codec``: the
wire format). Updates travel and are aggregated in float32 whatever the model's dtype.

Methods (Message API): ``ScaffnewStrategy``, ``ProxSkipStrategy`` (the L1 prox) and
``TamunaStrategy`` (``methods``; their model-averaging round is ``MethodStrategy``, and every
method strategy here builds on ``BaseMethodStrategy``) run fedkern's federated methods on Flower,
equal to ``fedkern.algorithms`` on the same seeds; the clients register ``MethodClient(trainer)``
(``method_client``) on their ClientApp, with ``ConvexTrainer`` (fedkern's convex problems) or
``ModuleTrainer`` (a PyTorch module) or any ``trainer(x, h, K, gamma, config)``. The wire protocol
is in ``protocol``.
``FiveGCSStrategy`` with ``FiveGCSClient(ConvexSolver(batch) | ModuleSolver(...))`` runs 5GCS /
5GCS-CC with uniform or importance client sampling (``fivegcs``).
``MarinaStrategy``, ``DianaStrategy`` and ``Ef21Strategy`` with
``GradientClient(ConvexGradients(batch) | ModuleGradients(...))`` run the compressed-gradient
methods (``compressed``, ``gradient_client``);
``ByzVRMarinaPPStrategy`` with ``ByzVRMarinaClient`` runs Byz-VR-MARINA-PP with fedkern's robust
rules, clipping and compressors (``byzantine``; omniscient attacks through ``SimulatedAttack``).

Simulation: Flower's simulation engine (``flwr.simulation.run_simulation``) needs Ray (``pip install
"flwr[simulation]"``); the example app in examples/flower-app runs there with ``flwr run .``.
"""

from fedkern.integrations.flower.byzantine import (
    ByzVRMarinaClient,
    ByzVRMarinaPPStrategy,
    ModuleSampleGradients,
    ProblemSampleGradients,
    RoundView,
    SimulatedAttack,
)
from fedkern.integrations.flower.codec import (
    FORMAT_VERSION,
    KIND_RANDK,
    KIND_SPARSE,
    MAGIC,
    compress_update,
    decompress,
    is_compressed,
)
from fedkern.integrations.flower.compressed import (
    CompressedStrategy,
    DianaStrategy,
    Ef21Strategy,
    MarinaStrategy,
)
from fedkern.integrations.flower.fivegcs import (
    ConvexSolver,
    FiveGCSClient,
    FiveGCSStrategy,
    ModuleSolver,
)
from fedkern.integrations.flower.gradient_client import (
    ConvexGradients,
    GradientClient,
    ModuleGradients,
)
from fedkern.integrations.flower.legacy import LegacyFedkernStrategy
from fedkern.integrations.flower.method_client import (
    ConvexTrainer,
    MethodClient,
    ModuleTrainer,
    module_arrays,
)
from fedkern.integrations.flower.methods import (
    BaseMethodStrategy,
    MethodStrategy,
    ProxSkipStrategy,
    ScaffnewStrategy,
    TamunaStrategy,
)
from fedkern.integrations.flower.mod import CompressMod, make_compress_mod
from fedkern.integrations.flower.strategy import FedkernStrategy

__all__ = [
    "BaseMethodStrategy",
    "ByzVRMarinaClient",
    "ByzVRMarinaPPStrategy",
    "CompressMod",
    "CompressedStrategy",
    "ConvexGradients",
    "ConvexSolver",
    "ConvexTrainer",
    "DianaStrategy",
    "Ef21Strategy",
    "FORMAT_VERSION",
    "FedkernStrategy",
    "FiveGCSClient",
    "FiveGCSStrategy",
    "GradientClient",
    "KIND_RANDK",
    "KIND_SPARSE",
    "LegacyFedkernStrategy",
    "MAGIC",
    "MarinaStrategy",
    "MethodClient",
    "MethodStrategy",
    "ModuleGradients",
    "ModuleSampleGradients",
    "ModuleSolver",
    "ModuleTrainer",
    "ProblemSampleGradients",
    "ProxSkipStrategy",
    "RoundView",
    "ScaffnewStrategy",
    "SimulatedAttack",
    "TamunaStrategy",
    "compress_update",
    "decompress",
    "is_compressed",
    "make_compress_mod",
    "module_arrays",
]
