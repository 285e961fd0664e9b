"""Byz-VR-MARINA-PP (Malinovsky, Richtarik, Horvath, Gorbunov 2023; ALGORITHMS.md section 5).

Byzantine-robust variance-reduced learning with partial participation: clipping the (compressed)
gradient differences bounds what a Byzantine majority of a small sampled cohort can do.
"""

from __future__ import annotations

import math

import torch

from fedkern import robust as R
from fedkern import sampling
from fedkern import validation as v
from fedkern.algorithms.base import Method
from fedkern.random import client_seed
from fedkern.robust import attacks

__all__ = ["ATTACKS", "ByzVRMarinaPP"]

ATTACKS = ("shift_back", "bit_flip", "alie", "ipm", "none")


class ByzVRMarinaPP(Method):
    """Byz-VR-MARINA-PP over a federated problem with honest and Byzantine clients.

    Every round k (state x, g):
      1. a coin c ~ Bernoulli(p); a cohort S of ``full_cohort`` clients if c = 1, else ``cohort``
         (uniform without replacement over all n clients, honest and Byzantine);
      2. x+ = x - gamma g; lambda = alpha ||x+ - x||;
      3. an honest client in S sends grad f_i(x+) when c = 1, else Q(D_i) with D_i the difference
         of its gradients at x+ and x on one b-sample minibatch (the same samples at both points),
         formed, compressed and clipped at lambda by ``fedkern.robust.diff_compress_clip``;
         Byzantine clients in S send the attack's vectors;
      4. the server: c = 1: g+ = ARAgg(messages); c = 0: clip every message to lambda
         (``clip_rows_``; Byzantine ones included) and g+ = g + ARAgg(clipped), or the plain mean
         of the clipped messages with ``plus=True`` (Byz-VR-MARINA-PP+).
    With ``clip=False`` step 4 skips the clipping (the unclipped baseline the paper compares with).

    Args:
        problem: a ``fedkern.problems.LogisticRegression``-like object with ``n``, ``d``, ``L``,
            ``sizes``, ``grads(x, clients, samples)``, ``loss(x, clients)``, ``grad(x, clients)``
            and ``optimum(clients)``.
        byzantine: ids of the Byzantine clients (the rest are honest); the objective is the mean
            of the honest f_i.
        gamma: step size (default 1/L, fedkern's choice; the theory's bound is smaller).
        p: probability of a full round (default cohort / n, fedkern's choice).
        batch_size: b, samples per minibatch in compressed rounds (capped by a client's size).
        cohort: C, clients sampled in compressed rounds (default ceil(0.2 n)).
        full_cohort: C_hat, clients sampled in full rounds (default n: every client).
        alpha: the clipping multiplier (> 0).
        clip: clip the differences (True) or not (the unclipped baseline).
        aggregator: a ``fedkern.robust.Aggregator`` (default coordinate median with bucketing 2)
            or any callable [c, d] -> [d].
        compressor: None (dense differences), ``fedkern.compress.TopK`` or ``RandK`` (unbiased
            rand-k is the paper's Q; each client's mask is keyed by its id).
        attack: "shift_back" (when the Byzantine clients are a majority of S they send what moves
            the model back to x0, else they behave honestly), "bit_flip", "alie", "ipm" or "none".
        plus: Byz-VR-MARINA-PP+ (mean of the clipped differences on c = 0 rounds).
        seed: keys the coins (``key(0)``), cohorts (``key(1)``) and each client's minibatches
            (``fedkern.sampling.uniform`` under ``client_seed(seed, i)`` at ``key(2)``), and the
            default aggregator's bucketing.
        x0: the start point, [d] (default zeros).
        dtype: dtype of the messages (float32 or bfloat16); the model and the loss are float64.

    History (``self.history``, lists per round): "loss" f(x) - f* where f* is known ("gap"),
    "grad_norm" ||grad f(x)||, "full" (the coin), "byzantine_majority", "floats_up" (floats one
    client sent that round, indices counted as floats), "floats_down" (d: the model).
    """

    name = "byz_vr_marina_pp"
    state_attrs = ("x", "g", "aggregator", "_lam")
    config_attrs = ("gamma", "p", "batch_size", "cohort_size", "full_cohort", "alpha", "clip",
                    "plus", "attack", "byzantine")  # fmt: skip
    problems = ("byzantine",)

    def __init__(self, problem, *, byzantine=(), gamma=None, p=None, batch_size=1, cohort=None,
                 full_cohort=None, alpha=1.0, clip=True, aggregator=None, compressor=None,
                 attack="shift_back", plus=False, seed=0, x0=None,
                 dtype=torch.float32, diverge_factor: float = 1e8):  # fmt: skip
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        self.problem = problem
        n = problem.n
        self.byzantine = sorted({v.integer("byzantine", b, 0, n - 1) for b in byzantine})
        self.honest = [i for i in range(n) if i not in set(self.byzantine)]
        if not self.honest:
            raise ValueError("at least one client must be honest")
        self.gamma = v.positive("gamma", 1.0 / problem.L if gamma is None else gamma)
        self.cohort_size = v.integer("cohort", math.ceil(0.2 * n) if cohort is None else cohort,
                                     1, n)  # fmt: skip
        self.full_cohort = v.integer("full_cohort", n if full_cohort is None else full_cohort, 1, n)
        self.p = self.cohort_size / n if p is None else v.fp32_scalar("p", p)
        if not 0 < self.p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        self.batch_size = v.integer("batch_size", batch_size, 1)
        self.alpha = v.positive("alpha", alpha)
        self.clip = v.boolean("clip", clip)
        self.plus = v.boolean("plus", plus)
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
        self.attack = attack
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.dtype = dtype
        if aggregator is None:
            aggregator = R.Aggregator("coordinate_median", pre="bucketing", seed=seed)
        self.aggregator = aggregator
        self.compressor = compressor
        d = problem.p
        self.x0 = torch.zeros(d, dtype=torch.float64) if x0 is None else x0.to(torch.float64)
        if self.x0.shape != (d,):
            raise ValueError(f"x0 must have shape ({d},), got {tuple(self.x0.shape)}")
        self.x = self.x0.clone()
        self.remember_start()
        self._lam = 0.0
        # f* of the honest objective, when the problem can compute it (the "gap" metric)
        optimum = getattr(problem, "optimum", None)
        self.f_star = optimum(self.honest)[1] if optimum is not None else None
        # g0: the aggregate of full gradients at x0 (a full round without a step)
        S0 = sampling.uniform(n, self.full_cohort, seed=self.seed, step=self.initial_key(1))
        self.g = self._full_round(self.x, S0.tolist())
        self._record(True, False, d)

    # ---- one round ---------------------------------------------------------------------------

    def _sample(self, size: int) -> list[int]:
        return self.cohort(self.problem.n, size, 1).tolist()

    def _msg(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.dtype)

    def _byz_rows(self, S, honest_msgs, own_msgs, target) -> torch.Tensor | None:
        """The Byzantine clients' messages of this round ([b, d]) or None if none is sampled."""
        nb = sum(1 for i in S if i in self._byz_set)
        if nb == 0:
            return None
        if self.attack == "none" or (self.attack == "shift_back" and 2 * nb <= len(S)):
            return own_msgs  # behave honestly
        if self.attack == "shift_back":
            return attacks.shift_back(target.to(self.dtype), nb)
        if self.attack == "bit_flip":
            return attacks.bit_flip(own_msgs)
        if honest_msgs is None or honest_msgs.shape[0] < (2 if self.attack == "alie" else 1):
            return own_msgs  # nothing to imitate
        if self.attack == "alie":
            return attacks.alie(honest_msgs, nb)
        return attacks.ipm(honest_msgs, nb)

    @property
    def _byz_set(self) -> set:
        return set(self.byzantine)

    def _split(self, S):
        hon = [i for i in S if i not in self._byz_set]
        byz = [i for i in S if i in self._byz_set]
        return hon, byz

    def _stack(self, hon_msgs, byz_msgs) -> torch.Tensor:
        parts = [m for m in (hon_msgs, byz_msgs) if m is not None and m.shape[0]]
        return torch.cat(parts) if parts else None

    def _full_round(self, x_new: torch.Tensor, S) -> torch.Tensor:
        hon, byz = self._split(S)
        hon_msgs = self._msg(self.problem.grads(x_new, hon)) if hon else None
        own = self._msg(self.problem.grads(x_new, byz)) if byz else None
        target = (x_new - self.x0) / self.gamma  # g+ that sends x++ = x+ - gamma g+ to x0
        X = self._stack(hon_msgs, self._byz_rows(S, hon_msgs, own, target))
        return self.aggregator(X).to(torch.float64)

    def _differences(self, clients, x_new):
        """D_i of the clients: minibatch gradient differences, compressed, clipped (honestly)."""
        if not clients:
            return None
        sizes = self.problem.sizes[clients].tolist()
        key = self.key(2)
        samples = [sampling.uniform(m, min(self.batch_size, m), seed=client_seed(self.seed, i),
                                    step=key)
                   for i, m in zip(clients, sizes, strict=True)]  # fmt: skip
        g_new = self._msg(self.problem.grads(x_new, clients, samples))
        g_old = self._msg(self.problem.grads(self.x, clients, samples))
        bound = self._lam if (self.clip and self._lam > 0) else None
        # rand-k masks are keyed by (seed, client id, round); other compressors ignore both
        out = R.diff_compress_clip(g_new, g_old, self.compressor, bound, clients=clients,
                                   step=self.rounds)  # fmt: skip
        if isinstance(out, tuple):  # sparse message -> dense rows for the aggregator
            values, indices = out
            dense = torch.zeros_like(g_new)
            return dense.scatter_(1, indices, values)
        return out

    def _compressed_round(self, x_new: torch.Tensor, S) -> torch.Tensor:
        hon, byz = self._split(S)
        hon_msgs = self._differences(hon, x_new)
        own = self._differences(byz, x_new)
        target = (x_new - self.x0) / self.gamma - self.g  # the aggregate that sends x back to x0
        X = self._stack(hon_msgs, self._byz_rows(S, hon_msgs, own, target))
        if self.clip:
            if self._lam > 0:
                R.clip_rows_(X, self._lam)
            else:
                X.zero_()
        agg = X.float().mean(0) if self.plus else self.aggregator(X)
        return self.g + agg.to(torch.float64)

    def step(self) -> None:
        """One round (steps 1-4 above); appends to ``history``."""
        full = self.coin(self.p, 0)
        S = self._sample(self.full_cohort if full else self.cohort_size)
        x_new = self.x - self.gamma * self.g
        self._lam = self.alpha * float((x_new - self.x).norm())
        nb = sum(1 for i in S if i in self._byz_set)
        if full:
            g_new = self._full_round(x_new, S)
            up = self.problem.p
        else:
            g_new = self._compressed_round(x_new, S)
            c = self.compressor
            up = self.problem.p if c is None else c.k_for(self.problem.p) * (
                2 if type(c).__name__ == "TopK" else 1)  # fmt: skip
        self.x, self.g = x_new, g_new
        self.rounds += 1
        self._record(full, 2 * nb > len(S), up)

    def _record(self, full: bool, majority: bool, up: int) -> None:
        P = self.problem
        finite = bool(torch.isfinite(self.x).all())
        loss = P.loss(self.x, self.honest) if finite else math.nan
        self.record(
            loss=loss,
            gap=loss - self.f_star if self.f_star is not None else math.nan,
            grad_norm=float(P.grad(self.x, self.honest).norm()) if finite else math.nan,
            full=full,
            byzantine_majority=majority,
            floats_up=up,
            floats_down=P.p,
        )
