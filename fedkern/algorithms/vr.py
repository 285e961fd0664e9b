"""Loopless variance reduction on a ``ClientBatch``: L-SVRG and PAGE (and the base of the
gradient-difference methods, ``GradientMethod``, which counts gradient evaluations).

The objective is the problem's f = mean_i f_i, a finite sum over every client's samples. The
clients draw their minibatches with ``ClientBatch.grads`` (mode "sgd": min(b, m_i) samples of
client i without replacement, keyed by (the batch's seed, client, ``key(SLOT_MINIBATCH)``)), so
the two gradients of a difference share their samples and every client's gradients of a round
come from one batched kernel call. A ClientBatch of one client is the single-node method.

History (besides FederatedMethod's): "grad_evals", the per-sample gradient evaluations of the round
summed over the clients (a full local gradient of client i costs m_i); index 0 holds the cost of
the initialization (a full gradient), as "floats_up" does.
"""

from __future__ import annotations

import math

import torch

from fedkern import validation as v
from fedkern.algorithms.federated import (
    OPT_BATCH,
    OPT_GAMMA,
    OPT_P,
    SLOT_COIN,
    FederatedMethod,
    _require_batch,
)

__all__ = ["LSVRG", "PAGE", "GradientMethod", "sample_smoothness"]

#: ``key`` slots of these methods: minibatches and rand-k masks (coins use SLOT_COIN = 0).
SLOT_MINIBATCH, SLOT_MASK, SLOT_BIG = 3, 4, 5

OPT_SMALL_BATCH = {"flag": "--small-batch", "type": int,
                   "help": "PAGE's minibatch b' of the difference rounds (default 1)"}  # fmt: skip
OPT_VR_P = {
    "flag": "--p",
    "type": float,
    "help": OPT_P["help"].split(" (")[0]
    + " / refresh probability of L-SVRG, PAGE, MARINA (defaults: each method's theory)",
}
_FACTOR = {"logistic": 0.25, "multinomial": 0.5, "least_squares": 1.0}


def sample_smoothness(problem, mean_square: bool = False) -> float:
    """The smoothness constant of the per-sample losses (plus l2): max_j c ||a_j||^2 + l2, or with
    ``mean_square`` the root mean square over the samples (PAGE's average L-smoothness); c = 1/4
    (logistic), 1/2 (multinomial), 1 (least squares)."""
    sq = _FACTOR[problem.kind] * problem.A.pow(2).sum(1) + problem.l2
    return float(sq.pow(2).mean().sqrt()) if mean_square else float(sq.max())


class GradientMethod(FederatedMethod):
    """``FederatedMethod`` whose rounds are one server step from gradients the clients compute
    with ``ClientBatch.grads``; adds the "grad_evals" history and the helpers below."""

    def __init__(self, batch, **kw):
        self._evals = 0
        super().__init__(batch, **kw)
        if self.mode == "rr":
            raise ValueError(f"mode must be 'gd' or 'sgd' for {self.name}, got 'rr'")

    def _record(self, up: int, down: int, local: int) -> None:
        super()._record(up, down, local)
        self.history.setdefault("grad_evals", []).append(self._evals)
        self._evals = 0

    def _charge_start(self, up: int, down: int = 0) -> None:
        """Book the initialization's cost (and the evaluations made so far) on history index 0."""
        self.history["floats_up"][0] = up
        self.history["floats_down"][0] = down
        self.history["grad_evals"][0] = self._evals
        self._evals = 0

    def _grads(self, X, mode: str = "gd", batch_size: int = 1, slot: int = SLOT_MINIBATCH,
               initial: bool = False):  # fmt: skip
        """Every client's gradient at its row of X ([n, p] or a shared [p]): "gd" the full local
        gradient, "sgd" the keyed minibatch of this round's ``key(slot)`` (``initial_key(slot)``
        before the first round). Counts the evaluations."""
        sizes = self.batch.problem.sizes
        if mode == "gd":
            self._evals += int(sizes.sum())
            return self.batch.grads(X)
        self._evals += int(sizes.clamp(max=batch_size).sum())
        step = self.initial_key(slot) if initial else self.key(slot)
        return self.batch.grads(X, mode="sgd", batch_size=batch_size, step=step)


class LSVRG(GradientMethod):
    """Loopless SVRG (Hofmann et al. 2015; Kovalev, Horvath and Richtarik 2020), federated.

    The server keeps the reference point w and mu = grad f(w). Round k (x, w, mu):
      1. every client i draws its minibatch B_i (b samples) and sends d_i = g_i^B(x) - g_i^B(w),
         the two gradients on the same samples (p floats);
      2. the server steps x+ = x - gamma (mean_i d_i + mu);
      3. a shared coin (prob. p, ``key(0)``): heads: w = x (the point before the step) and every
         client sends its full local gradient at x (p floats more), mu = mean of them.
    It starts with w = x0 and mu = grad f(x0) (a full round, booked on history index 0).

    Args:
        batch: the ClientBatch (one client: the single-node L-SVRG).
        gamma: step size; default 1/(6 L_max), Kovalev et al.'s step with L_max the largest
            per-sample smoothness (``sample_smoothness``; a valid expected-smoothness bound).
        p: refresh probability; default b / m_mean (a refresh costs about as much as 1/p steps,
            the paper's p ~ b/n with n the samples of the finite sum).
        batch_size: b >= 1 per client.
    """

    name = "lsvrg"
    state_attrs = ("x", "total_local_steps", "w", "mu")
    config_attrs = ("gamma", "p", "batch_size")
    cli_options = {"gamma": OPT_GAMMA, "p": OPT_VR_P, "batch_size": OPT_BATCH}

    def __init__(self, batch, *, gamma: float | None = None, p: float | None = None,
                 batch_size: int = 8, **kw):  # fmt: skip
        P = _require_batch(batch).problem
        b = v.integer("batch_size", batch_size, 1)
        self.gamma = v.positive("gamma", 1 / (6 * sample_smoothness(P)) if gamma is None else gamma)
        m_mean = float(P.sizes.double().mean())
        self.p = v.probability("p", min(1.0, b / m_mean) if p is None else p)
        super().__init__(batch, mode="sgd", batch_size=b, **kw)
        self.w = self.x.clone()
        self.mu = self.batch.mean(self._grads(self.x))
        self._charge_start(batch.p)

    def client_differences(self) -> torch.Tensor:
        """[n, p]: every client's d_i = g_i^B(x) - g_i^B(w) on this round's shared minibatch."""
        b = self.batch_size
        return self._grads(self.x, "sgd", b) - self._grads(self.w, "sgd", b)

    def step(self) -> None:
        heads = self.coin(self.p, SLOT_COIN)
        D = self.client_differences()
        x_new = self.x - self.gamma * (self.batch.mean(D) + self.mu)
        if heads:  # w <- x (the pre-step point): clients send their full gradients there
            self.w = self.x
            self.mu = self.batch.mean(self._grads(self.x))
        self.x = x_new
        self.rounds += 1
        p = self.batch.p
        self._record(2 * p if heads else p, p, 1)


class PAGE(GradientMethod):
    """PAGE (Li, Bao, Zhang and Richtarik 2021), federated with stratified minibatches.

    Round k (x, g): x+ = x - gamma g; a shared coin (prob. p, ``key(0)``):
      heads: g+ = mean_i g_i^b(x+) (b samples per client; the full local gradient when b is None);
      tails: g+ = g + mean_i (g_i^{b'}(x+) - g_i^{b'}(x)), both on the same b' samples.
    Every client sends p floats per round (its gradient or its difference). It starts with
    g = mean_i g_i^b(x0) (booked on history index 0).

    Args:
        batch: the ClientBatch (one client: the single-node PAGE).
        gamma: default 1/(L (1 + sqrt((1 - p) / (p b' n)))), PAGE's step with L the mean-square
            per-sample smoothness (``sample_smoothness(..., mean_square=True)``) and the
            n b' samples of a difference round (b' per client) as its minibatch.
        p: default b' / (b + b') (b = the mean local size when b is None).
        batch_size: b (None: full local gradients on heads).
        small_batch: b' >= 1.
    """

    name = "page"
    state_attrs = ("x", "total_local_steps", "g")
    config_attrs = ("gamma", "p", "batch_size", "small_batch", "full")
    cli_options = {"gamma": OPT_GAMMA, "p": OPT_VR_P, "small_batch": OPT_SMALL_BATCH}

    def __init__(self, batch, *, gamma: float | None = None, p: float | None = None,
                 batch_size: int | None = None, small_batch: int = 1, **kw):  # fmt: skip
        P = _require_batch(batch).problem
        self.full = batch_size is None
        b = float(P.sizes.double().mean()) if self.full else v.integer("batch_size", batch_size, 1)
        self.small_batch = v.integer("small_batch", small_batch, 1)
        bp = self.small_batch
        self.p = v.probability("p", bp / (b + bp) if p is None else p)
        if gamma is None:
            L = sample_smoothness(P, mean_square=True)
            gamma = 1 / (L * (1 + math.sqrt((1 - self.p) / (self.p * bp * P.n))))
        self.gamma = v.positive("gamma", gamma)
        super().__init__(batch, mode="sgd", batch_size=1 if self.full else int(b), **kw)
        self.g = self.batch.mean(self._big(self.x, initial=True))
        self._charge_start(batch.p)

    def _big(self, x, initial: bool = False):
        if self.full:
            return self._grads(x)
        return self._grads(x, "sgd", self.batch_size, SLOT_BIG, initial)

    def step(self) -> None:
        heads = self.coin(self.p, SLOT_COIN)
        x_new = self.x - self.gamma * self.g
        if heads:
            self.g = self.batch.mean(self._big(x_new))
        else:
            b = self.small_batch
            D = self._grads(x_new, "sgd", b) - self._grads(self.x, "sgd", b)
            self.g = self.g + self.batch.mean(D)
        self.x = x_new
        self.rounds += 1
        self._record(self.batch.p, self.batch.p, 1)
