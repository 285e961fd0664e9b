"""The server-side aggregation shared by the Message-API strategy and the legacy adapter.

``RobustCore.aggregate(server_round, global_arrays, replies)`` turns the replies of one round into
the new global parameters: row i of X [n, d] float32 (d = total parameter count, tensors flattened
in order) is client i's update -- its compressed message decoded (``codec.decode_into``) or its
dense parameters minus the current global parameters; then

1. clipping (optional): ``clip_rows_(X, lam)`` with ``lam = clip`` (fixed), or with ``clip_alpha``
   set, ``lam = clip_alpha * ||last global step||`` (the norm of the aggregate applied in the
   previous round); before any step, or when the last step is zero or non-finite, ``lam = clip``
   (no clipping if ``clip`` is None);
2. pre-aggregation and aggregation: ``fedkern.robust.Aggregator`` -> [d];
3. new global = current + aggregate, per tensor in its own dtype (integer tensors add the rounded
   aggregate; a non-finite aggregate leaves them unchanged).

A reply that cannot be decoded (wrong tensor count or shapes, bad header, indices not strictly
ascending or out of range, a missing record) is logged and becomes a NaN row; what a NaN row does is
the rule's documented behaviour (clipping zeroes it). A rule that cannot run on this round's n
(e.g. krum needs n > 2f + 2) skips the round with a warning: no new parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from logging import WARNING

import numpy as np
import torch

import fedkern.robust as R
from fedkern.integrations.flower.codec import as_f32_flat, decode_into, is_compressed

__all__ = ["MalformedReply", "RobustCore"]


class MalformedReply(ValueError):
    """A reply that cannot be read as an update of the global parameters."""


def positive_or_none(name: str, value) -> float | None:
    """None, or a finite float > 0 (as a Python float); TypeError / ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


def make_aggregator(rule, f, pre, bucket_size, seed, rule_options) -> R.Aggregator:
    """The strategies' ``Aggregator`` from their arguments (an Aggregator given as ``rule`` is
    used as it is, and then the other arguments must keep their defaults)."""
    if isinstance(rule, R.Aggregator):
        if (f, pre, bucket_size, seed, rule_options) != (0, None, 2, 0, None):
            raise ValueError("rule is an Aggregator: give f, pre, bucket_size, seed and "
                             "rule_options to it, not to the strategy")  # fmt: skip
        return rule
    if rule_options is not None and not isinstance(rule_options, dict):
        raise TypeError(f"rule_options must be a dict, got {type(rule_options).__name__}")
    return R.Aggregator(rule, f, pre=pre, bucket_size=bucket_size, seed=seed,
                        **(rule_options or {}))  # fmt: skip


class RobustCore:
    """Clipping, pre-aggregation and robust aggregation of one round's updates (module docstring).

    Args:
        aggregator: a ``fedkern.robust.Aggregator``.
        clip: None or a finite float > 0: the fixed clipping radius (and the first radius of
            adaptive clipping).
        clip_alpha: None or a finite float > 0: adaptive clipping, lam = clip_alpha * ||last step||.
        device: where X lives (a torch device).
        log: ``log(level, msg, *args)`` (Flower's logger).
    """

    def __init__(self, aggregator: R.Aggregator, *, clip, clip_alpha, device, log):
        self.aggregator = aggregator
        self.clip = positive_or_none("clip", clip)
        self.clip_alpha = positive_or_none("clip_alpha", clip_alpha)
        self.device = torch.device(device)
        self.log = log
        self.last_step_norm: float | None = None

    def radius(self) -> float | None:
        """This round's clipping radius (None: no clipping)."""
        if self.clip_alpha is not None:
            norm = self.last_step_norm
            if norm is not None and math.isfinite(norm) and norm > 0:
                return self.clip_alpha * norm
        return self.clip

    def aggregate(self, server_round: int, global_arrays: Sequence[np.ndarray],
                  replies: Sequence) -> tuple[list[np.ndarray] | None, dict]:  # fmt: skip
        """The new global arrays (None when the round is skipped) and the round's metrics.

        Args:
            server_round: the round (for the log).
            global_arrays: the current global parameters, T ndarrays.
            replies: one entry per client: a list of ndarrays (dense: T arrays shaped like the
                global ones; or a compressed reply, ``codec``), or a ``MalformedReply`` /
                exception describing why the reply could not be read.

        Metrics: ``fedkern_clients`` (n), ``fedkern_compressed``, ``fedkern_malformed``,
        ``fedkern_nonfinite`` (rows with a non-finite entry before clipping), ``fedkern_clip``
        (the radius, 0.0 when none), ``fedkern_step_norm`` (||aggregate||), or
        ``fedkern_skipped`` (the reason) when the rule could not run.
        """
        shapes = [a.shape for a in global_arrays]
        numels = [int(a.size) for a in global_arrays]
        d, n = sum(numels), len(replies)
        flat = [np.asarray(a, np.float32).reshape(-1) for a in global_arrays]
        current = torch.from_numpy(np.concatenate(flat) if d else np.zeros(0, np.float32))
        current = current.to(self.device)
        X = torch.zeros(n, d, dtype=torch.float32, device=self.device)
        compressed = malformed = 0
        for i, arrays in enumerate(replies):
            try:
                if isinstance(arrays, BaseException):
                    raise arrays
                if is_compressed(arrays):
                    compressed += 1
                    decode_into(arrays, numels, X[i])
                else:
                    got = [np.shape(a) for a in arrays]
                    if got != shapes:
                        raise MalformedReply(f"reply has tensor shapes {got}, the global "
                                             f"parameters {shapes}")  # fmt: skip
                    rows = [as_f32_flat(f"parameters[{t}]", a) for t, a in enumerate(arrays)]
                    X[i] = (torch.cat(rows) if rows else X[i]).to(self.device) - current
            except (ValueError, TypeError, KeyError, OSError, EOFError) as exc:
                malformed += 1
                self.log(WARNING, "fedkern: round %s, reply %s is malformed (%s); it counts as a "
                         "NaN update", server_round, i, exc)  # fmt: skip
                X[i] = math.nan
        nonfinite = int((~torch.isfinite(X).all(1)).sum()) if d and n else 0
        radius = self.radius()
        if radius is not None and d and n:
            R.clip_rows_(X, radius)
        metrics = {"fedkern_clients": n, "fedkern_compressed": compressed,
                   "fedkern_malformed": malformed, "fedkern_nonfinite": nonfinite,
                   "fedkern_clip": float(radius or 0.0)}  # fmt: skip
        try:
            agg = self.aggregator(X) if d else X.sum(0)
        except ValueError as exc:
            self.log(WARNING, "fedkern: round %s skipped: %s", server_round, exc)
            metrics["fedkern_skipped"] = str(exc)
            return None, metrics
        step_norm = float(torch.linalg.vector_norm(agg.double()))
        metrics["fedkern_step_norm"] = step_norm
        agg_np = agg.float().cpu().numpy()
        new, off = [], 0
        for a, s, k in zip(global_arrays, shapes, numels, strict=True):
            delta = agg_np[off : off + k].reshape(s)
            off += k
            if a.dtype.kind == "f":
                new.append((a + delta.astype(a.dtype)).astype(a.dtype, copy=False))
            else:  # a non-finite aggregate leaves an integer tensor as it is
                step = np.where(np.isfinite(delta), np.rint(delta), 0.0)
                new.append((a + step).astype(a.dtype))
        self.last_step_norm = step_norm
        return new, metrics

    def state_dict(self) -> dict:
        """The adaptive-clipping memory and the aggregator's state (bucketing's call counter)."""
        return {"last_step_norm": self.last_step_norm, "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        norm = state["last_step_norm"]
        self.last_step_norm = None if norm is None else float(norm)
        self.aggregator.load_state_dict(state["aggregator"])


class RobustOptions:
    """What the Message-API ``FedkernStrategy`` and its ``LegacyFedkernStrategy`` adapter share:
    the ``RobustCore`` built from their constructors' keywords (``_build_core``), read-only views
    of it and the ``repr``."""

    core: RobustCore

    def _build_core(self, rule, f, pre, bucket_size, clip, clip_alpha, seed, rule_options, device,
                    log) -> None:  # fmt: skip
        aggregator = make_aggregator(rule, f, pre, bucket_size, seed, rule_options)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.core = RobustCore(aggregator, clip=clip, clip_alpha=clip_alpha, device=device,
                               log=log)  # fmt: skip

    @property
    def aggregator(self) -> R.Aggregator:
        return self.core.aggregator

    @property
    def clip(self) -> float | None:
        return self.core.clip

    @property
    def clip_alpha(self) -> float | None:
        return self.core.clip_alpha

    @property
    def device(self) -> torch.device:
        return self.core.device

    @property
    def last_step_norm(self) -> float | None:
        """||aggregate|| of the last round (adaptive clipping's memory), or None."""
        return self.core.last_step_norm

    def __repr__(self) -> str:
        c = self.core
        clip = f", clip={c.clip}" if c.clip is not None else ""
        alpha = f", clip_alpha={c.clip_alpha}" if c.clip_alpha is not None else ""
        return f"{type(self).__name__}({c.aggregator!r}{clip}{alpha}, device={c.device})"
