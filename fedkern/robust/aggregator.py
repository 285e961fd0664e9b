"""``Aggregator``: a robust aggregation rule with an optional pre-aggregator, as one callable."""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.robust import preaggregate, rules

RULES = ("mean", "coordinate_median", "trimmed_mean", "krum", "bulyan", "geometric_median",
         "centered_clip")  # fmt: skip
PRE = (None, "bucketing", "nnm")


class Aggregator:
    """Robust aggregation building block: ``Aggregator(rule, f, pre=...)(X) -> [d]``.

    The pre-aggregator runs first (bucketing: shuffle and average groups of ``bucket_size``; NNM:
    mix every row with its n - f nearest), then the rule aggregates its output.

    Args:
        rule: "mean", "coordinate_median", "trimmed_mean", "krum", "bulyan", "geometric_median"
            or "centered_clip".
        f: the number of Byzantine rows to tolerate (int >= 0). Used by trimmed_mean (trims f per
            side), krum (n > 2f + 2), bulyan (n >= 4f + 3) and nnm. After bucketing the rule sees
            ceil(n / s) rows, of which at most f can hold a Byzantine row, so f stays the same and
            must still be valid for the smaller stack (a clear error says when it is not).
        pre: None, "bucketing" or "nnm".
        bucket_size: s of bucketing (int >= 1, default 2).
        seed: keys bucketing's shuffles; call t (counted in ``step``, in ``state_dict``) uses
            ``fedkern.random.permutation(n, seed, t)``.
        warm_start: centered_clip only: start from the previous call's output (the paper's
            choice) instead of ``center``; the first call uses ``center``.
        **options: passed to the rule: ``m`` (krum), ``iters``/``nu``/``init`` (geometric_median),
            ``tau``/``iters``/``center`` (centered_clip; tau required).

    Calling: ``agg(X)`` with X [n, d] float32/bfloat16 on CPU or CUDA (or a list of n 1-D rows,
    see ``fedkern.robust.as_stack``) returns [d] in X's dtype; X is not modified. What a NaN row
    does is the rule's documented behaviour (after bucketing, the NaN row's bucket is one NaN row).
    """

    def __init__(self, rule: str = "coordinate_median", f: int = 0, *, pre: str | None = None,
                 bucket_size: int = 2, seed: int = 0, warm_start: bool = False,
                 **options):  # fmt: skip
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if pre not in PRE:
            raise ValueError(f"pre must be None, 'bucketing' or 'nnm', got {pre!r}")
        allowed = {
            "krum": {"m"},
            "geometric_median": {"iters", "nu", "init"},
            "centered_clip": {"tau", "iters", "center"},
        }.get(rule, set())
        extra = set(options) - allowed
        if extra:
            raise TypeError(f"rule {rule!r} takes no option {', '.join(sorted(extra))}; it takes: "
                            f"{', '.join(sorted(allowed)) or 'none'}")  # fmt: skip
        if rule == "centered_clip" and "tau" not in options:
            raise TypeError("rule 'centered_clip' needs the option tau (the clipping radius)")
        self.rule, self.pre = rule, pre
        self.f = v.integer("f", f, 0)
        self.bucket_size = v.integer("bucket_size", bucket_size, 1)
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self.warm_start = v.boolean("warm_start", warm_start)
        self.options = options
        self.step = 0
        self._last: torch.Tensor | None = None

    def __call__(self, X: torch.Tensor, *, f: int | None = None) -> torch.Tensor:
        """Aggregate X [n, d]; ``f`` overrides the Byzantine count for this call only (default
        ``self.f``; a method that samples cohorts passes the count valid for the cohort)."""
        f = self.f if f is None else v.integer("f", f, 0)
        X = rules.as_stack(X)
        if self.pre == "bucketing":
            X = preaggregate.bucketing(X, self.bucket_size, seed=self.seed, step=self.step)
        elif self.pre == "nnm":
            X = preaggregate.nnm(X, f)
        self.step += 1
        rule, opts = self.rule, dict(self.options)
        if rule == "mean":
            return X.float().mean(0).to(X.dtype)
        if rule == "coordinate_median":
            return rules.coordinate_median(X)
        if rule == "trimmed_mean":
            return rules.trimmed_mean(X, f)
        if rule == "krum":
            return rules.krum(X, f, **opts)
        if rule == "bulyan":
            return rules.bulyan(X, f)
        if rule == "geometric_median":
            return rules.geometric_median(X, **opts)
        if self.warm_start and self._last is not None and self._last.shape == X.shape[1:]:
            opts["center"] = self._last.to(X.device)
        out = rules.centered_clip(X, **opts)
        self._last = out.float()
        return out

    def state_dict(self) -> dict:
        """The call counter (bucketing's shuffles) and the warm-start center."""
        return {"step": self.step, "last": self._last}

    def load_state_dict(self, state: dict) -> None:
        self.step = v.integer("step", state["step"], 0)
        self._last = state.get("last")

    def __repr__(self) -> str:
        opts = "".join(f", {k}={val!r}" for k, val in self.options.items())
        pre = f", pre={self.pre!r}, bucket_size={self.bucket_size}" if self.pre else ""
        return f"Aggregator({self.rule!r}, f={self.f}{pre}{opts})"
