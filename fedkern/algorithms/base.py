"""The base of every method in ``fedkern.algorithms``: seed, rounds, history, divergence, resume.

A method is a state machine over communication rounds (or iterations): ``step()`` runs one,
``run(rounds)`` runs several and stops early when the method diverges. Its randomness (coins,
cohorts, minibatches) comes from ``fedkern.sampling`` keyed by (seed, ``key(slot)``), a pure
function of the round counter, so

* a run is reproducible on any machine and backend;
* ``state_dict()`` needs only the round counter, not a generator state, and a run stopped at round r
  and resumed with ``load_state_dict`` equals the uninterrupted run bit for bit (on the CPU);
* a remote client can be told what was drawn by (seed, key) alone (the Flower integration).

Divergence is a result, not an exception: ``run`` stops when ``diverged()`` holds after a round
(by default: the model ``x`` is not finite, or its norm exceeds ``diverge_factor * (1 + ||x0||)``,
or the last recorded "loss" is not finite), sets ``diverged_at`` to that round and marks it in the
history's "diverged" list.
"""

from __future__ import annotations

import abc
import copy
import math
import numbers

import torch

from fedkern import sampling
from fedkern import validation as v

__all__ = ["Method"]

#: Draws per round: ``key(slot)`` for slot < SLOTS keys a distinct stream position per round.
SLOTS = 16


class Method(abc.ABC):
    """Base class: subclasses implement ``step()`` and call ``record(**metrics)`` once per round.

    Args:
        seed: int in [0, 2**63): keys every random choice of the method (``key``).
        diverge_factor: a finite float > 0 (default 1e8): ``run`` stops when ||x|| exceeds
            diverge_factor * (1 + ||x0||).

    Class attributes a subclass sets:
        name: the ``fedkern run`` name.
        state_attrs: names of the attributes that hold the resumable state besides the round
            counter and the history: tensors (copied), objects with ``state_dict`` (an
            ``Aggregator``, a compressor) or plain Python values.
        config_attrs: names of hyperparameters stored in the checkpoint and checked on load, so
            a state is never resumed under other settings.
        problems: the ``fedkern run --problem`` families the method accepts.
        cli_options: ``fedkern run`` options of the method: argparse destination -> argparse
            keywords (with "flag", e.g. "--local-steps"; and "keyword", the constructor keyword,
            where it differs from the destination because another method's option of that name
            means something else).
    """

    name = "method"
    state_attrs: tuple[str, ...] = ("x",)
    config_attrs: tuple[str, ...] = ()
    problems: tuple[str, ...] = ("convex",)
    cli_options: dict[str, dict] = {}

    def __init__(self, *, seed: int = 0, diverge_factor: float = 1e8):
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self.diverge_factor = v.positive("diverge_factor", diverge_factor)
        self.rounds = 0
        self.diverged_at: int | None = None
        self.history: dict[str, list] = {"diverged": []}
        self._x0_norm = 0.0

    # ---- randomness ------------------------------------------------------------------------

    def key(self, slot: int = 0) -> int:
        """The stream position of draw ``slot`` (0 <= slot < 16) of the current round.

        Round r (``self.rounds`` before it runs) uses keys (r + 1) * 16 + slot; keys 0..15 are for
        draws made before the first round (an initial full round, say).
        """
        return (self.rounds + 1) * SLOTS + v.integer("slot", slot, 0, SLOTS - 1)

    def initial_key(self, slot: int = 0) -> int:
        """The stream position of draw ``slot`` made before the first round (keys 0..15)."""
        return v.integer("slot", slot, 0, SLOTS - 1)

    def cohort(self, n: int, c: int, slot: int = 0) -> torch.Tensor:
        """``fedkern.sampling.uniform(n, c)`` at this round's ``key(slot)``: ascending int64 ids."""
        return sampling.uniform(n, c, seed=self.seed, step=self.key(slot))

    def coin(self, p: float, slot: int = 0) -> bool:
        """``fedkern.sampling.coin(p)`` at this round's ``key(slot)``."""
        return sampling.coin(p, seed=self.seed, step=self.key(slot))

    def geometric(self, p: float, slot: int = 0) -> int:
        """``fedkern.sampling.geometric(p)`` at this round's ``key(slot)``."""
        return sampling.geometric(p, seed=self.seed, step=self.key(slot))

    # ---- rounds, history, divergence --------------------------------------------------------

    @abc.abstractmethod
    def step(self) -> None:
        """One communication round (or iteration); appends one entry to every history list."""

    def record(self, **metrics) -> None:
        """Append one round's metrics to ``history`` (every key of every round) and the
        "diverged" flag (False; ``run`` sets the last one to True when it stops on divergence)."""
        for k, val in metrics.items():
            self.history.setdefault(k, []).append(val)
        self.history["diverged"].append(False)

    def remember_start(self) -> None:
        """Store ||x0|| for the divergence bound (call once x holds the start point)."""
        x = getattr(self, "x", None)
        if isinstance(x, torch.Tensor):
            self._x0_norm = float(x.double().norm())

    def diverged(self) -> bool:
        """Whether the run has diverged (see the module docstring); subclasses may extend it."""
        x = getattr(self, "x", None)
        if isinstance(x, torch.Tensor):
            norm = float(x.double().norm())
            if not math.isfinite(norm) or norm > self.diverge_factor * (1 + self._x0_norm):
                return True
        loss = self.history.get("loss")
        if loss:
            last = loss[-1]
            if isinstance(last, numbers.Real) and not math.isfinite(last):
                return True
        return False

    def run(self, rounds: int, progress=None) -> dict[str, list]:
        """Up to ``rounds`` more rounds; stops after a round that diverged. Returns ``history``.

        ``progress(i, rounds)`` is called after each round i (1-based).
        """
        rounds = v.integer("rounds", rounds, 0)
        for i in range(rounds):
            if self.diverged_at is not None:
                break
            self.step()
            if self.diverged():
                self.diverged_at = self.rounds
                self.history["diverged"][-1] = True
            if progress is not None:
                progress(i + 1, rounds)
        return self.history

    # ---- checkpoints -------------------------------------------------------------------------

    def config(self) -> dict:
        """The hyperparameters named by ``config_attrs`` (and the seed)."""
        out = {"seed": self.seed}
        for name in self.config_attrs:
            out[name] = getattr(self, name)
        return out

    def state_dict(self) -> dict:
        """Everything a resumed run needs: rounds, history, config and the ``state_attrs``.

        Tensors are cloned and objects with a ``state_dict`` contribute theirs, so the returned
        dict does not change when the method runs on (and ``torch.save`` can store it).
        """
        state = {
            "method": self.name,
            "rounds": self.rounds,
            "diverged_at": self.diverged_at,
            "x0_norm": self._x0_norm,
            "history": copy.deepcopy(self.history),
            "config": copy.deepcopy(self.config()),
            "attrs": {},
        }
        for name in self.state_attrs:
            val = getattr(self, name)
            if isinstance(val, torch.Tensor):
                val = val.detach().clone()
            elif hasattr(val, "state_dict"):
                val = val.state_dict()
            else:
                val = copy.deepcopy(val)
            state["attrs"][name] = val
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` of a method built with the same arguments.

        Raises ValueError (before changing anything) when the method name, a hyperparameter or a
        tensor's shape differs from this instance's.
        """
        if not isinstance(state, dict) or "attrs" not in state:
            raise TypeError("state must be a dict from Method.state_dict()")
        if state.get("method") != self.name:
            raise ValueError(f"state is of method {state.get('method')!r}, not {self.name!r}")
        mine = self.config()
        for k, val in state["config"].items():
            if k in mine and not _same(mine[k], val):
                raise ValueError(f"state was saved with {k} = {val!r}; this {self.name} has "
                                 f"{k} = {mine[k]!r}")  # fmt: skip
        for name in self.state_attrs:
            if name not in state["attrs"]:
                raise ValueError(f"state has no {name!r}")
            cur, val = getattr(self, name), state["attrs"][name]
            if isinstance(cur, torch.Tensor) and (
                not isinstance(val, torch.Tensor) or val.shape != cur.shape
            ):
                raise ValueError(f"state's {name} must be a tensor of shape {tuple(cur.shape)}")
        for name in self.state_attrs:
            cur, val = getattr(self, name), state["attrs"][name]
            if isinstance(cur, torch.Tensor):
                setattr(self, name, val.detach().to(cur.device, cur.dtype).clone())
            elif hasattr(cur, "load_state_dict"):
                cur.load_state_dict(copy.deepcopy(val))
            else:
                setattr(self, name, copy.deepcopy(val))
        self.rounds = v.integer("rounds", state["rounds"], 0)
        self.diverged_at = state["diverged_at"]
        self._x0_norm = float(state["x0_norm"])
        self.history = copy.deepcopy(state["history"])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # objects without a usable equality: compare their text
        return repr(a) == repr(b)
