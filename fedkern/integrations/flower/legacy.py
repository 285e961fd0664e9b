"""``LegacyFedkernStrategy``: fedkern's robust aggregation for Flower's legacy strategy API.

``flwr.server.strategy.FedAvg`` (the ``Server`` / ``start_server`` API with ``aggregate_fit``) with
the aggregation of ``core.RobustCore``, the same as the Message-API ``FedkernStrategy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

try:
    from flwr.common import (
        FitRes,
        Parameters,
        Scalar,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.common.logger import log
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

import fedkern.robust as R
from fedkern.integrations.flower.core import MalformedReply, RobustOptions

__all__ = ["LegacyFedkernStrategy"]


class LegacyFedkernStrategy(RobustOptions, FedAvg):
    """The legacy-API (``flwr.server.strategy.FedAvg``, ``aggregate_fit``) FedkernStrategy.

    A thin adapter over the same aggregation as the Message-API ``FedkernStrategy``
    (``core.RobustCore``): ``aggregate_fit`` (round r, n replies) stacks row i of X [n, d] float32
    (d = total parameter count, tensors flattened in order) as client i's update -- its compressed
    message decoded, or its dense parameters minus the current global parameters -- then clips
    (``clip`` / ``clip_alpha``), pre-aggregates and aggregates (``fedkern.robust.Aggregator(rule,
    f, pre=pre, bucket_size=bucket_size, seed=seed, **rule_options)``; bucketing's shuffle of call
    t is ``permutation(n, seed, t)``), and returns current + aggregate per tensor in its own dtype.

    Clients are weighted equally (``num_examples`` is ignored: a robust rule must not let a client
    buy weight by claiming many examples).

    What a NaN (or inf) update does: clipping zeroes a row with a non-finite entry, so with
    ``clip`` / ``clip_alpha`` such a client contributes a zero update. Without clipping it is the
    rule's documented behaviour: "mean" gives a NaN model; "coordinate_median" and
    "trimmed_mean" ignore it while NaN entries per coordinate stay a minority (median: fewer than
    n/2; trimmed mean: at most f); "krum" gives the row an infinite score (never chosen while at
    most f rows are non-finite); "geometric_median" gives it weight 0; "centered_clip" clips it to
    0; after bucketing its bucket is one NaN row; NNM mixes it into no finite row while at most f
    rows are non-finite. A malformed reply (not decodable: wrong tensor count or shapes, bad
    header, indices not strictly ascending or out of range) is logged and treated as a NaN row.
    A reply with an error status is a failure (FedAvg's ``accept_failures`` decides).

    If the rule cannot run on this round's n (e.g. krum needs n > 2f + 2; bucketing leaves
    ceil(n / bucket_size) rows), the round is skipped with a warning: ``aggregate_fit`` returns
    ``(None, metrics)`` (with ``fedkern_skipped``, the reason) and the server keeps the current
    parameters.

    Args:
        rule: a rule name of ``fedkern.robust.Aggregator`` ("mean", "coordinate_median",
            "trimmed_mean", "krum", "bulyan", "geometric_median", "centered_clip") or an
            ``Aggregator`` instance (then f, pre, bucket_size, seed and rule_options must be left
            default).
        f: Byzantine clients tolerated (trimmed_mean, krum, bulyan, nnm).
        pre: None, "bucketing" or "nnm".
        bucket_size: bucketing's s.
        clip: None or a finite float > 0: the fixed clipping radius (and the first-round radius
            of adaptive clipping).
        clip_alpha: None or a finite float > 0: adaptive clipping, lam = clip_alpha * ||last step||.
        seed: bucketing's seed.
        rule_options: dict passed to the rule (``m`` of krum, ``tau``/``iters`` of centered_clip,
            ``iters``/``nu`` of geometric_median).
        device: where X lives: None (CUDA when available, else CPU), or a torch device / string.
        **kwargs: FedAvg's options (fraction_fit, min_fit_clients, min_available_clients,
            evaluate_fn, on_fit_config_fn, accept_failures, initial_parameters,
            fit_metrics_aggregation_fn, ...), passed through.

    Metrics returned by ``aggregate_fit`` (besides ``fit_metrics_aggregation_fn``'s):
    ``fedkern_clients`` (n), ``fedkern_compressed`` (compressed replies), ``fedkern_malformed``,
    ``fedkern_nonfinite`` (rows with a non-finite entry before clipping), ``fedkern_clip`` (the
    radius used, 0.0 when none) and ``fedkern_step_norm`` (||aggregate||).
    """

    def __init__(self, *, rule: str | R.Aggregator = "coordinate_median", f: int = 0,
                 pre: str | None = None, bucket_size: int = 2, clip: float | None = None,
                 clip_alpha: float | None = None, seed: int = 0, rule_options: dict | None = None,
                 device: str | torch.device | None = None, **kwargs):  # fmt: skip
        self._build_core(rule, f, pre, bucket_size, clip, clip_alpha, seed, rule_options, device,
                         log)  # fmt: skip
        super().__init__(**kwargs)
        self._global: list[np.ndarray] | None = None
        if self.initial_parameters is not None:
            self.set_global_parameters(self.initial_parameters)

    # -- the current global parameters ----------------------------------------------------------

    @property
    def global_parameters(self) -> list[np.ndarray] | None:
        """The global parameters updates are measured against (list of ndarrays), or None."""
        return self._global

    def set_global_parameters(self, parameters: Parameters | Sequence[np.ndarray]) -> None:
        """Set the current global parameters (Flower ``Parameters`` or a list of ndarrays).

        ``configure_fit`` and ``initialize_parameters`` call this with what the server sends, and
        ``aggregate_fit`` with its result; call it yourself to use ``aggregate_fit`` on its own.
        """
        if isinstance(parameters, Parameters):
            arrays = parameters_to_ndarrays(parameters)
        else:
            arrays = [np.asarray(a) for a in parameters]
        for t, a in enumerate(arrays):
            if a.dtype.kind not in "fiub":
                raise TypeError(f"parameters[{t}] must be numeric, got dtype {a.dtype}")
        self._global = [a.copy() for a in arrays]

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """FedAvg's (returns ``initial_parameters`` once), remembering them as the global ones."""
        params = super().initialize_parameters(client_manager)
        if params is not None:
            self.set_global_parameters(params)
        return params

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager):  # fmt: skip
        """FedAvg's, after recording ``parameters`` as the global parameters of this round."""
        self.set_global_parameters(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    # -- aggregation ----------------------------------------------------------------------------

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Robust aggregation of the replies' updates (class docstring); returns new parameters."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        if self._global is None:
            raise RuntimeError(
                "LegacyFedkernStrategy has no global parameters to measure updates against: run "
                "it in flwr's Server (configure_fit records them) or call set_global_parameters "
                "first"
            )
        rows = []
        for _, res in results:
            try:
                rows.append(parameters_to_ndarrays(res.parameters))
            except (ValueError, TypeError, OSError, EOFError) as exc:
                rows.append(MalformedReply(f"parameters cannot be read ({exc})"))
        new, fk = self.core.aggregate(server_round, self._global, rows)
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn:
            metrics.update(
                self.fit_metrics_aggregation_fn([(r.num_examples, r.metrics) for _, r in results])
            )
        metrics.update(fk)
        if new is None:
            return None, metrics
        self._global = new
        return ndarrays_to_parameters([a.copy() for a in new]), metrics
