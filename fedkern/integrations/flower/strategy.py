"""``FedkernStrategy``: Flower's Message-API FedAvg with fedkern's robust aggregation.

The strategy of ``flwr.serverapp.strategy`` (Flower 1.42's current API: ``ServerApp``,
``strategy.start(grid=..., initial_arrays=..., num_rounds=...)``, ``aggregate_train(server_round,
replies)``, ``ArrayRecord``) whose aggregation is ``RobustCore`` (clipping, bucketing / NNM, a
robust rule) over the clients' updates, dense or compressed by ``make_compress_mod``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

import fedkern.robust as R
from fedkern.integrations.flower.codec import is_compressed
from fedkern.integrations.flower.core import MalformedReply, RobustOptions
from fedkern.integrations.flower.mod import message_arrays

__all__ = ["FedkernStrategy"]


class FedkernStrategy(RobustOptions, FedAvg):
    """Flower's (Message API) FedAvg with fedkern's clipping, pre-aggregation and robust rule.

    Sampling, messages and evaluation are FedAvg's. ``aggregate_train`` (round r, the replies
    without an error): row i of X [n, d] float32 (d = total parameter count, the global
    ArrayRecord's arrays flattened in its key order) is client i's update -- its compressed reply
    decoded, or its dense arrays (the same keys and shapes as the global record) minus the current
    global arrays; then clipping, pre-aggregation and the rule (``core.RobustCore``), and the new
    global ArrayRecord (same keys, each array in its own dtype) = current + aggregate.

    Clients are weighted equally (the reply's "num-examples" is ignored: a robust rule must not let
    a client buy weight). A reply that cannot be read (no ArrayRecord, other keys or shapes, a bad
    compressed message) is logged and becomes a NaN row, whose effect is the rule's documented NaN
    behaviour (clipping zeroes it). Replies with an error (a failed client) are left out. If the
    rule cannot run on this round's n, the round is skipped (no new arrays; metric
    ``fedkern_skipped`` = 1) and the server keeps the current model.

    Args:
        rule: a rule name of ``fedkern.robust.Aggregator`` ("mean", "coordinate_median",
            "trimmed_mean", "krum", "bulyan", "geometric_median", "centered_clip") or an
            ``Aggregator`` (then f, pre, bucket_size, seed and rule_options must keep their
            defaults).
        f: Byzantine clients tolerated (trimmed_mean, krum, bulyan, nnm).
        pre: None, "bucketing" or "nnm".
        bucket_size: bucketing's s.
        clip: None or a finite float > 0: the fixed clipping radius (and the first radius of
            adaptive clipping).
        clip_alpha: None or a finite float > 0: adaptive clipping, radius = clip_alpha * ||last
            global step||.
        seed: bucketing's seed.
        rule_options: dict passed to the rule (``m`` of krum, ``tau``/``iters`` of
            centered_clip, ``iters``/``nu`` of geometric_median).
        device: where X lives: None (CUDA when available, else CPU), or a torch device / string.
        **kwargs: Flower FedAvg's options (fraction_train, fraction_evaluate, min_train_nodes,
            min_available_nodes, arrayrecord_key, configrecord_key, train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn, weighted_by_key, ...).

    Metrics (``aggregate_train``'s MetricRecord): the clients' metrics aggregated by
    ``train_metrics_aggr_fn`` when every reply carries a MetricRecord with ``weighted_by_key``,
    plus ``fedkern_clients``, ``fedkern_failures``, ``fedkern_compressed``, ``fedkern_malformed``,
    ``fedkern_nonfinite``, ``fedkern_clip`` and ``fedkern_step_norm`` (``core.RobustCore``).
    """

    def __init__(self, *, rule: str | R.Aggregator = "coordinate_median", f: int = 0,
                 pre: str | None = None, bucket_size: int = 2, clip: float | None = None,
                 clip_alpha: float | None = None, seed: int = 0, rule_options: dict | None = None,
                 device: str | torch.device | None = None, **kwargs):  # fmt: skip
        self._build_core(rule, f, pre, bucket_size, clip, clip_alpha, seed, rule_options, device,
                         log)  # fmt: skip
        super().__init__(**kwargs)
        self._keys: list[str] | None = None
        self._global: list[np.ndarray] | None = None

    def summary(self) -> None:
        """Flower's summary log, with the fedkern aggregation."""
        super().summary()
        log(INFO, "\t└──> fedkern: %r", self)

    # -- the current global arrays ----------------------------------------------------------------

    @property
    def global_arrays(self) -> ArrayRecord | None:
        """The global ArrayRecord updates are measured against, or None before the first round."""
        if self._global is None:
            return None
        return _record(self._keys, self._global)

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Set the current global arrays (``configure_train`` does it with what it sends; call it
        to use ``aggregate_train`` on its own)."""
        if not isinstance(arrays, ArrayRecord):
            raise TypeError(f"arrays must be a flwr.app.ArrayRecord, got {type(arrays).__name__}")
        keys = list(arrays.keys())
        values = [np.array(arrays[k].numpy()) for k in keys]
        for k, a in zip(keys, values, strict=True):
            if a.dtype.kind not in "fiub":
                raise TypeError(f"arrays[{k!r}] must be numeric, got dtype {a.dtype}")
        self._keys, self._global = keys, values

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        """FedAvg's, after recording ``arrays`` as this round's global arrays."""
        self.set_global_arrays(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    # -- aggregation ------------------------------------------------------------------------------

    def _reply_arrays(self, msg: Message):
        """A reply's arrays in the global key order (dense), its encoded list (compressed), or a
        MalformedReply saying why it cannot be read."""
        try:
            _, rec = message_arrays(msg.content, self.arrayrecord_key, "reply")
        except ValueError as exc:
            return MalformedReply(str(exc))
        arrays = rec.to_numpy_ndarrays()
        if is_compressed(arrays):
            return arrays
        if set(rec.keys()) != set(self._keys):
            return MalformedReply(f"reply has arrays {sorted(rec.keys())}, the global model "
                                  f"{sorted(self._keys)}")  # fmt: skip
        return [rec[k].numpy() for k in self._keys]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                             MetricRecord | None]:  # fmt: skip
        """Robust aggregation of the replies' updates (class docstring)."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        failures = len(replies) - len(valid)
        log(INFO, "aggregate_train: received %s results and %s failures", len(valid), failures)
        if not valid:
            return None, None
        if self._global is None:
            raise RuntimeError(
                "FedkernStrategy has no global arrays to measure updates against: run it with "
                "strategy.start (configure_train records them) or call set_global_arrays first"
            )
        rows = [self._reply_arrays(m) for m in valid]
        new, fk = self.core.aggregate(server_round, self._global, rows)
        metrics = MetricRecord()
        contents = [m.content for m in valid]
        if all(
            len(c.metric_records) == 1
            and self.weighted_by_key in next(iter(c.metric_records.values()))
            for c in contents
        ):
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        elif any(len(c.metric_records) for c in contents):
            log(WARNING, "FedkernStrategy: round %s: client metrics not aggregated (every reply "
                "needs one MetricRecord with %r)", server_round, self.weighted_by_key)  # fmt: skip
        for k, val in fk.items():
            metrics[k] = 1 if k == "fedkern_skipped" else val
        metrics["fedkern_failures"] = failures
        if new is None:
            return None, metrics
        self._global = new
        return _record(self._keys, new), metrics

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The global arrays (keys and copies), adaptive clipping's memory and the aggregator's
        state: what a restarted server needs to continue exactly."""
        return {
            "keys": None if self._keys is None else list(self._keys),
            "global": None if self._global is None else [a.copy() for a in self._global],
            "core": self.core.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``."""
        self._keys = None if state["keys"] is None else list(state["keys"])
        self._global = None if state["global"] is None else [np.array(a) for a in state["global"]]
        self.core.load_state_dict(state["core"])


def _record(keys, arrays) -> ArrayRecord:
    rec = ArrayRecord()
    for k, a in zip(keys, arrays, strict=True):
        rec[k] = Array(np.ascontiguousarray(a))
    return rec
