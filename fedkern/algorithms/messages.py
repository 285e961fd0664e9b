"""Client messages of the compressed methods (MARINA, DIANA, EF21 and their Riemannian forms):
compressed differences of stacked client vectors, batched over clients, with exact float counts.

A method's clients hold rows of a [c, d] stack (one row per client); each sends C(a_i - b_i), a
compressed difference, as a sparse message. ``RowCompressor.diff`` forms all of them in one fused
op of ``fedkern.ops.diffclip`` (the difference is never materialized):

  "randk": k coordinates uniformly without replacement, the mask of client i drawn from
           ``randk_keys(client_seed(seed, i), step)`` -- the mask the client and the server derive
           from (seed, step, client) alone, so only the k values travel; scaled by d/k when
           unbiased (omega = d/k - 1), not scaled when biased (contractive, alpha = k/d);
  "topk":  the k largest |entries| (ties toward the lower index), sent as values and indices
           (2k floats, indices counted as floats; contractive, alpha = k/d, biased);
  "none":  the dense difference (d floats; omega = 0, alpha = 1).

``mean`` is the server side: the mean of the messages as a dense [d] vector (float32 sums in row
order through ``fedkern.sparse_add_batched_``, deterministic); ``add_`` applies every message to
its own row of a [c, d] stack (the clients' shift or feedback buffers).
"""

from __future__ import annotations

import math
import numbers

import torch

from fedkern import validation as v
from fedkern.clients import minibatch_keys
from fedkern.ops import diffclip
from fedkern.ops.randk import scale_for
from fedkern.ops.sparse import sparse_add_batched_

__all__ = ["COMPRESSORS", "RowCompressor"]

COMPRESSORS = ("randk", "topk", "none")

Tensor = torch.Tensor


class RowCompressor:
    """The compressor of one method's client messages (rows of a [c, d] stack).

    Args:
        kind: "randk", "topk" or "none" (anything else: ValueError naming ``compressor``).
        d: the message length (floats per dense message).
        k: coordinates kept (1 <= k <= d), or
        ratio: k = ceil(ratio * d), ratio in (0, 1]; default ratio 0.1. Ignored for "none".
        seed: keys the rand-k masks (with the client id and the step).
        unbiased: rand-k scaled by d/k (the unbiased Q of MARINA / DIANA) or not (a contractive C
            for EF21). Must be False for top-k.

    Attributes:
        kind, d, k, omega (the variance factor of an unbiased compressor, E||Q(x) - x||^2 <=
        omega ||x||^2; NaN when biased), alpha (the contraction of a biased one, k/d; 1 for
        "none"), floats (floats one message costs: k for rand-k, 2k for top-k, d dense).
    """

    def __init__(self, kind: str = "randk", *, d: int, k: int | None = None,
                 ratio: float | None = None, seed: int = 0, unbiased: bool = True):  # fmt: skip
        if kind not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {', '.join(COMPRESSORS)}, got {kind!r}")
        self.kind, self.d = kind, v.integer("d", d, 1)
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self.unbiased = v.boolean("unbiased", unbiased) and kind == "randk"
        if kind == "topk" and unbiased:
            raise ValueError("top-k is biased: use unbiased=False (or rand-k)")
        if kind == "none":
            self.k = self.d
        elif k is not None:
            if ratio is not None:
                raise ValueError("give k or ratio, not both")
            self.k = v.integer("k", k, 1, self.d)
        else:
            ratio = 0.1 if ratio is None else ratio
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
                raise TypeError(f"ratio must be a float, got {type(ratio).__name__}")
            if not 0 < ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {ratio}")
            self.k = max(1, min(self.d, math.ceil(ratio * self.d)))
        if kind == "none":
            self.omega = 0.0
        else:
            self.omega = self.d / self.k - 1 if self.unbiased else math.nan
        self.alpha = 1.0 if kind == "none" else self.k / self.d
        self.floats = {"randk": self.k, "topk": 2 * self.k, "none": self.d}[kind]

    def keys(self, clients: Tensor, step: int) -> Tensor:
        """The rand-k round keys of every client of the stack at ``step``: int64 [c, 8] (CPU)."""
        return minibatch_keys(self.seed, clients, v.integer("step", step, 0))

    def diff(self, A: Tensor, B: Tensor, *, clients: Tensor, step: int):
        """Every client's message C(A[i] - B[i]): ``(values, indices)`` [c, k] (indices
        ascending per row), or the dense [c, d] difference for "none". A, B float32 [c, d] on
        one device, not modified; clients: the c client ids (rand-k masks); step: the mask key."""
        c = A.shape[0]
        if self.kind == "none":
            return A - B
        unbounded = torch.full((c,), torch.finfo(torch.float64).max, dtype=torch.float64,
                               device=A.device)  # fmt: skip
        if self.kind == "topk":
            values, indices, _ = diffclip.diff_topk_clip(A, B, self.k, unbounded)
            return values, indices
        scale = scale_for(self.d, self.k, self.unbiased)
        values, indices, _ = diffclip.diff_randk_clip(A, B, self.k, self.keys(clients, step),
                                                         scale, unbounded)  # fmt: skip
        return values, indices

    def dense(self, msg) -> Tensor:
        """The messages as dense rows [c, d] (zeros outside the kept coordinates)."""
        if not isinstance(msg, tuple):
            return msg
        values, indices = msg
        out = torch.zeros(values.shape[0], self.d, dtype=values.dtype, device=values.device)
        return out.scatter_(1, indices, values)

    def mean(self, msg, weights: Tensor | None = None) -> Tensor:
        """The server's aggregate: (1/c) sum_i message_i as a dense float32 [d] vector, or
        sum_i weights[i] message_i with per-client weights (float, [c])."""
        if not isinstance(msg, tuple):
            if weights is None:
                return msg.double().mean(0).float()
            return (weights.to(msg.device, torch.float64)[:, None] * msg.double()).sum(0).float()
        values, indices = msg
        out = torch.zeros(self.d, dtype=values.dtype, device=values.device)
        if weights is None:
            return sparse_add_batched_(out, values, indices, alpha=1.0 / values.shape[0])
        scaled = values * weights.to(values.device, values.dtype)[:, None]
        return sparse_add_batched_(out, scaled, indices)

    def add_(self, S: Tensor, msg, alpha: float = 1.0) -> Tensor:
        """S[i] += alpha * message_i for every row, in place on S [c, d] (float32); returns S."""
        if not isinstance(msg, tuple):
            return S.add_(msg, alpha=alpha) if alpha != 1.0 else S.add_(msg)
        values, indices = msg
        rows = torch.arange(values.shape[0], device=indices.device)[:, None] * self.d
        return sparse_add_batched_(S, values, indices + rows, alpha=alpha)

    def __repr__(self) -> str:
        return (f"RowCompressor({self.kind!r}, d={self.d}, k={self.k}, "
                f"unbiased={self.unbiased})")  # fmt: skip
