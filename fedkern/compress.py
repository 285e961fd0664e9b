"""Compressors and error feedback as building blocks.

A compressor maps a tensor to a sparse message ``(values, indices)`` over its flattened entries;
``decompress`` scatters a message back into a dense tensor. ``ErrorFeedback`` wraps any compressor
with the EF14 or EF21 buffer (ALGORITHMS.md section 0) and uses the fused op of the compressor when
it has one (TopK, RandK).
"""

from __future__ import annotations

import abc
import math
import numbers

import torch

from fedkern import validation as v
from fedkern.ops.randk import ef14_randk_, ef21_randk_, randk_compress
from fedkern.ops.sparse import sparse_add_
from fedkern.ops.topk import ef14_topk_, ef21_topk_, topk_compress

__all__ = ["Compressor", "TopK", "RandK", "ErrorFeedback"]


class Compressor(abc.ABC):
    """Base class: a sparsifier defined by ``k`` (entries kept) or ``ratio`` (k = ceil(ratio*n)).

    Args:
        k: int >= 1 (clamped to the tensor's numel at call time), or
        ratio: float in (0, 1]; exactly one of the two.
    """

    def __init__(self, k: int | None = None, *, ratio: float | None = None):
        if (k is None) == (ratio is None):
            raise ValueError("give exactly one of k and ratio")
        if k is not None:
            k = v.integer("k", k, 1)
        else:
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
                raise TypeError(f"ratio must be a float, got {type(ratio).__name__}")
            if not 0 < float(ratio) <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {ratio}")
            ratio = float(ratio)
        self.k, self.ratio = k, ratio

    def k_for(self, numel: int) -> int:
        """Entries kept for a tensor of ``numel`` elements: min(k, numel) or ceil(ratio*numel)."""
        if self.k is not None:
            return min(self.k, numel)
        return max(1, min(numel, math.ceil(self.ratio * numel)))

    @abc.abstractmethod
    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` of the flattened x; x is not modified."""

    def ef14_(self, grad, error, lr: float):
        """EF14 through compress + sparse_add (subclasses with a fused op override this)."""
        error.add_(grad.reshape(error.shape), alpha=lr)
        values, indices = self.compress(error)
        sparse_add_(error, values, indices, alpha=-1.0)
        return values, indices

    def ef21_(self, grad, state):
        """EF21 through compress + sparse_add (subclasses with a fused op override this)."""
        values, indices = self.compress(grad.reshape(state.shape) - state)
        sparse_add_(state, values, indices)
        return values, indices

    @staticmethod
    def decompress(values, indices, like: torch.Tensor) -> torch.Tensor:
        """A zero tensor shaped like ``like`` with the message added in (float32 accumulation)."""
        out = torch.zeros(like.shape, dtype=values.dtype, device=values.device)
        return sparse_add_(out, values, indices)

    def state_dict(self) -> dict:
        """Stateless by default: ``{}``. Compressors with state (RandK's step) override both."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 -- stateless default, not abstract
        """Restore ``state_dict()``; the default compressor has nothing to restore."""

    def __repr__(self) -> str:
        arg = f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"
        return f"{type(self).__name__}({arg})"


class TopK(Compressor):
    """Top-k by magnitude (contractive, alpha = k/d); see ``fedkern.topk_compress``."""

    def compress(self, x):
        return topk_compress(x, self.k_for(x.numel()))

    def ef14_(self, grad, error, lr):
        return ef14_topk_(grad, error, self.k_for(error.numel()), lr=lr)

    def ef21_(self, grad, state):
        return ef21_topk_(grad, state, self.k_for(state.numel()))


class RandK(Compressor):
    """Rand-k with a mask drawn from (seed, step); see ``fedkern.randk_compress``.

    Each call without an explicit ``step`` uses the internal counter and advances it, so
    successive messages draw fresh masks; the counter is in ``state_dict``.

    Args:
        k / ratio: as in ``Compressor``.
        seed: int in [0, 2**63).
        unbiased: scale kept values by d/k (w = d/k - 1). Error feedback assumes a contractive
            compressor: use ``unbiased=False`` inside ``ErrorFeedback``.
    """

    def __init__(self, k=None, *, ratio=None, seed: int = 0, unbiased: bool = True):
        super().__init__(k, ratio=ratio)
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self.unbiased = v.boolean("unbiased", unbiased)
        self.step = 0

    def _next(self, step):
        if step is None:
            step, self.step = self.step, self.step + 1
        return step

    def compress(self, x, *, step: int | None = None):
        return randk_compress(
            x, self.k_for(x.numel()), seed=self.seed, step=self._next(step), unbiased=self.unbiased
        )

    def ef14_(self, grad, error, lr):
        return ef14_randk_(
            grad, error, self.k_for(error.numel()), seed=self.seed, step=self._next(None), lr=lr,
            unbiased=self.unbiased,
        )  # fmt: skip

    def ef21_(self, grad, state):
        return ef21_randk_(
            grad, state, self.k_for(state.numel()), seed=self.seed, step=self._next(None),
            unbiased=self.unbiased,
        )  # fmt: skip

    def state_dict(self):
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"state_dict has seed {state['seed']}, this RandK has {self.seed}")
        self.step = v.integer("step", state["step"], 0)

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, seed={self.seed}, unbiased={self.unbiased})"


class ErrorFeedback:
    """Error feedback around a compressor: EF14 (classic) or EF21.

    EF14: ``a = e + lr*g; c = C(a); e = a - c``.  EF21: ``c = C(g - s); s = s + c``.
    The buffer (``e`` or ``s``) is created at the first ``step`` as zeros with the gradient's
    shape, dtype and device, and lives in ``state_dict``.

    Args:
        compressor: a ``Compressor`` (TopK and RandK run one fused op per step).
        kind: "ef14" or "ef21".
        lr: EF14's gradient scale (finite, >= 0); must be 1.0 for EF21.
    """

    KINDS = ("ef14", "ef21")

    def __init__(self, compressor: Compressor, kind: str = "ef14", *, lr: float = 1.0):
        if not isinstance(compressor, Compressor):
            raise TypeError(
                f"compressor must be a fedkern.compress.Compressor, got {type(compressor).__name__}"
            )
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.lr = v.fp32_scalar("lr", lr, nonneg=True)
        if kind == "ef21" and self.lr != 1.0:
            raise ValueError("lr applies to kind='ef14' only")
        self.compressor, self.kind = compressor, kind
        self.buffer: torch.Tensor | None = None

    def step(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress ``grad`` with feedback; returns the message ``(values, indices)``.

        Args:
            grad: float32/bfloat16 tensor; its shape, dtype and device must match the buffer's
                after the first call. Not modified.
        """
        v.float_tensor("grad", grad)
        if self.buffer is None:
            self.buffer = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        if self.kind == "ef14":
            return self.compressor.ef14_(grad, self.buffer, self.lr)
        return self.compressor.ef21_(grad, self.buffer)

    def state_dict(self) -> dict:
        """``{"kind", "buffer" (tensor or None), "compressor": compressor.state_dict()}``."""
        buf = None if self.buffer is None else self.buffer.detach().clone()
        return {"kind": self.kind, "buffer": buf, "compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the buffer keeps its saved dtype (no casting)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state_dict is for kind {state.get('kind')!r}, this is {self.kind!r}")
        buf = state.get("buffer")
        if buf is not None:
            v.float_tensor("state['buffer']", buf)
            buf = buf.detach().clone().contiguous()
        self.compressor.load_state_dict(state.get("compressor", {}))
        self.buffer = buf

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.compressor!r}, kind={self.kind!r}, lr={self.lr})"
