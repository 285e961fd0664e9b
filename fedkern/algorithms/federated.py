"""Federated methods on a ``ClientBatch``: GD, FedAvg, FedProx, Scaffold, ProxSkip and Scaffnew.

Each is a short composition of the batched kernels (``ClientBatch.local_steps_``, its server ops).
Common interface (``FederatedMethod``, on ``fedkern.algorithms.base.Method``): construct with the
problem (a ClientBatch) and hyperparameters (the theory defaults of the papers where they give
them), then ``run(rounds)`` or ``step()`` (one communication round); ``state_dict`` /
``load_state_dict`` resume exactly. ``history`` holds, per round (index 0 = the start point):
"loss" f(x), "gap" f(x) - f*, "grad_norm" ||grad f(x)||, "dist" ||x - x*||, "floats_up" /
"floats_down" (floats one participating client sent / received that round), "local_steps" and
"diverged". The metrics are float64 (``fedkern.problems``) at the server model x; on a problem
without a known optimum "gap" and "dist" are NaN.

Randomness: the local-step count K ~ Geometric(p) and coins use ``key(0)``, cohorts ``key(1)``
(``fedkern.sampling.uniform``), so methods that share a seed draw the same cohorts and counts.
"""

from __future__ import annotations

import math

import torch

from fedkern import validation as v
from fedkern.algorithms.base import Method
from fedkern.clients import ClientBatch

__all__ = ["FedAvg", "FedProx", "FederatedMethod", "GD", "ProxSkip", "Scaffnew", "Scaffold"]

#: ``key`` slots shared by the federated methods (a method's own draws use slots from 3 on).
SLOT_COIN, SLOT_COHORT, SLOT_PATTERN = 0, 1, 2


#: ``fedkern run`` options shared by several methods (``Method.cli_options`` entries).
OPT_MODE = {
    "flag": "--mode",
    "default": "gd",
    "choices": ("gd", "sgd", "rr"),
    "help": "local gradient: full batch, minibatch SGD or random reshuffling",
}
OPT_BATCH = {"flag": "--batch-size", "type": int, "default": 8,
             "help": "sgd/rr minibatch (default 8)"}  # fmt: skip
OPT_GAMMA = {"flag": "--gamma", "type": float, "help": "step size (default 1/L)"}
OPT_COHORT = {"flag": "--cohort", "type": int, "help": "clients per round (default all)"}
OPT_P = {
    "flag": "--p",
    "type": float,
    "help": "communication probability of ProxSkip-type methods (default 1/sqrt(kappa))",
}
OPT_LOCAL_STEPS = {"flag": "--local-steps", "type": int, "help": "local steps K (default 10)"}
OPT_SERVER_LR = {"flag": "--server-lr", "type": float,
                 "help": "FedAvg-type server step size (default 1)"}  # fmt: skip


def _require_batch(batch) -> ClientBatch:
    if not isinstance(batch, ClientBatch):
        raise TypeError(f"batch must be a fedkern.clients.ClientBatch, got {type(batch).__name__}")
    return batch


def soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    """prox of t * ||.||_1: sign(x) max(|x| - t, 0)."""
    return torch.sign(x) * (x.abs() - t).clamp_min(0)


def l1_optimum(problem, lam: float, iters: int = 20000) -> tuple[torch.Tensor, float]:
    """(x*, F*) of F = f + lam ||x||_1 by FISTA in float64 (step 1/L), for the metrics."""
    x = y = torch.zeros(problem.p, dtype=torch.float64)
    t, step = 1.0, 1.0 / problem.L
    for _ in range(iters):
        x_new = soft_threshold(y - step * problem.grad(y), step * lam)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        if float((x_new - x).norm()) < 1e-15:
            x = x_new
            break
        x, t = x_new, t_new
    return x, problem.loss(x) + lam * float(x.abs().sum())


class FederatedMethod(Method):
    """Base of the methods on a ``ClientBatch``: the server model x, local steps, the metrics.

    Args:
        batch: a ``fedkern.clients.ClientBatch``.
        x0: the start point, [p] (default zeros).
        seed: keys coins, counts and cohorts (``Method.key``; the clients' own minibatches come
            from the batch's seed and the round).
        mode, batch_size: the local gradient: "gd" (full local batch), "sgd" or "rr".
        diverge_factor: see ``Method``.
    """

    name = "method"
    state_attrs = ("x", "total_local_steps")
    config_attrs = ("gamma", "mode", "batch_size")
    cli_options = {"mode": OPT_MODE, "batch_size": OPT_BATCH}

    def __init__(self, batch: ClientBatch, *, x0=None, seed: int = 0, mode: str = "gd",
                 batch_size: int = 1, diverge_factor: float = 1e8):  # fmt: skip
        _require_batch(batch)
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        self.batch, self.problem = batch, batch.problem
        self.mode, self.batch_size = mode, v.integer("batch_size", batch_size, 1)
        if mode not in ("gd", "sgd", "rr"):
            raise ValueError(f"mode must be 'gd', 'sgd' or 'rr', got {mode!r}")
        p = batch.p
        if x0 is None:
            self.x = torch.zeros(p, device=batch.device)
        else:
            v.tensor("x0", x0)
            self.x = x0.detach().to(batch.device, torch.float32).clone()
        if self.x.shape != (p,):
            raise ValueError(f"x0 must have shape ({p},), got {tuple(self.x.shape)}")
        self.remember_start()
        self.total_local_steps = 0
        self._optimum = self.optimum()
        self._record(0, 0, 0)

    def optimum(self) -> tuple[torch.Tensor, float] | None:
        """(x*, f*) of the objective this method minimizes, or None when it is not known (a
        problem without an ``optimum`` method, or with ``has_optimum = False``: non-convex)."""
        opt = getattr(self.problem, "optimum", None)
        if opt is None or not getattr(self.problem, "has_optimum", True):
            return None
        return opt()

    def objective(self, x: torch.Tensor) -> float:
        return self.problem.loss(x)

    def _record(self, up: int, down: int, local: int) -> None:
        x = self.x.double().cpu()
        f = self.objective(x) if bool(torch.isfinite(x).all()) else math.nan
        if self._optimum is None:
            gap = dist = math.nan
        else:
            xs, fs = self._optimum
            gap, dist = f - fs, float((x - xs).norm())
        gn = float(self.problem.grad(x).norm()) if math.isfinite(f) else math.nan
        self.record(loss=f, gap=gap, grad_norm=gn, dist=dist, floats_up=up, floats_down=down,
                    local_steps=local)  # fmt: skip

    def _local(self, X, K, **kw):
        self.batch.local_steps_(X, gamma=self.gamma, steps=K, mode=self.mode,
                                batch_size=self.batch_size, round=self.rounds, **kw)  # fmt: skip
        self.total_local_steps += K

    def _cohort(self, c: int) -> torch.Tensor:
        """This round's cohort of c clients (all when c = n), on the batch's device."""
        return self.cohort(self.batch.n, c, SLOT_COHORT).to(self.batch.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rounds={self.rounds}, gamma={self.gamma:.4g})"


class GD(FederatedMethod):
    """Gradient descent: every client sends grad f_i(x); x <- x - gamma * mean_i grad f_i(x).

    Computed as one local GD step from x on every client, then the cohort mean (identical). gamma
    defaults to 1/L.
    """

    name = "gd"
    cli_options = {**FederatedMethod.cli_options, "gamma": OPT_GAMMA}

    def __init__(self, batch, *, gamma: float | None = None, **kw):
        _require_batch(batch)
        self.gamma = v.positive("gamma", 1.0 / batch.problem.L if gamma is None else gamma)
        super().__init__(batch, **kw)

    def step(self) -> None:
        X = self.x.repeat(self.batch.n, 1)
        self._local(X, 1)
        self.x = self.batch.mean(X)
        self.rounds += 1
        self._record(self.batch.p, self.batch.p, 1)


class FedAvg(FederatedMethod):
    """FedAvg / Local SGD: a cohort runs K local steps from x; x += eta_g * mean_i (y_i - x).

    Args:
        batch: the ClientBatch. gamma: local step (default 1/L). local_steps: K (default 10).
        server_lr: eta_g (default 1). cohort: clients per round (default all), sampled uniformly
        without replacement. mu: FedProx's proximal weight (0 for FedAvg).
    """

    name = "fedavg"
    config_attrs = ("gamma", "mode", "batch_size", "K", "server_lr", "cohort_size", "mu")
    cli_options = {**FederatedMethod.cli_options, "gamma": OPT_GAMMA,
                   "local_steps": OPT_LOCAL_STEPS, "server_lr": OPT_SERVER_LR,
                   "cohort": OPT_COHORT}  # fmt: skip

    def __init__(self, batch, *, gamma: float | None = None, local_steps: int = 10,
                 server_lr: float = 1.0, cohort: int | None = None, mu: float = 0.0,
                 **kw):  # fmt: skip
        _require_batch(batch)
        self.gamma = v.positive("gamma", 1.0 / batch.problem.L if gamma is None else gamma)
        self.K = v.integer("local_steps", local_steps, 1)
        self.server_lr = v.positive("server_lr", server_lr)
        self.cohort_size = v.integer("cohort", batch.n if cohort is None else cohort, 1, batch.n)
        self.mu = v.fp32_scalar("mu", mu, nonneg=True)
        super().__init__(batch, **kw)

    def step(self) -> None:
        S = self._cohort(self.cohort_size)
        Y = self.x.repeat(S.numel(), 1)
        self._local(Y, self.K, clients=S, mu=self.mu, anchor=self.x if self.mu else None)
        self.x = self.x + self.server_lr * (self.batch.mean(Y) - self.x)
        self.rounds += 1
        self._record(self.batch.p, self.batch.p, self.K)


class FedProx(FedAvg):
    """FedProx: FedAvg whose local objective adds (mu/2)||y - x||^2 (mu default 0.1)."""

    name = "fedprox"
    cli_options = {
        **FedAvg.cli_options,
        "mu": {"flag": "--mu", "type": float, "help": "FedProx weight (default 0.1)"},
    }

    def __init__(self, batch, *, mu: float = 0.1, **kw):
        if not v.fp32_scalar("mu", mu) > 0:
            raise ValueError(f"mu must be > 0 for FedProx, got {mu}")
        super().__init__(batch, mu=mu, **kw)


class Scaffold(FedAvg):
    """Scaffold with option II control variates (Karimireddy et al. 2020).

    Local: y <- y - gamma (g_i(y) - c_i + c) for K steps; then c_i+ = c_i - c + (x - y_i)/(K gamma);
    server: x += eta_g mean(y_i - x), c += (|S|/n) mean(c_i+ - c_i). Sends 2p floats each way.
    """

    name = "scaffold"
    state_attrs = ("x", "total_local_steps", "C", "c")

    def __init__(self, batch, **kw):
        super().__init__(batch, **kw)
        self.C = batch.zeros()
        self.c = torch.zeros(batch.p, device=batch.device)

    def step(self) -> None:
        S = self._cohort(self.cohort_size)
        Y = self.x.repeat(S.numel(), 1)
        H = (self.C[S] - self.c).contiguous()
        self._local(Y, self.K, clients=S, H=H)
        c_new = H + (self.x - Y) / (self.K * self.gamma)  # c_i - c + (x - y_i)/(K gamma)
        dc = c_new - self.C[S]
        self.C[S] = c_new
        self.x = self.x + self.server_lr * (self.batch.mean(Y) - self.x)
        self.c = self.c + (S.numel() / self.batch.n) * self.batch.mean(dc)
        self.rounds += 1
        p = self.batch.p
        self._record(2 * p, 2 * p, self.K)


class ProxSkip(FederatedMethod):
    """ProxSkip / Scaffnew (Mishchenko et al. 2022) in the federated form.

    Every client keeps x_i and a control variate h_i (sum_i h_i = 0 at the start). One round: a
    number K ~ Geometric(p) of local steps x_i <- x_i - gamma (g_i(x_i) - h_i) (the shared coin:
    tails K - 1 times, then heads), then the prox of (gamma/p) psi at x_i - (gamma/p) h_i:
      prox "consensus" (Scaffnew): x = mean_i x_i;
      prox "l1" (psi = consensus + lam ||x||_1): x = soft_threshold(mean_i (x_i - (gamma/p) h_i),
      gamma lam / p);
    then h_i += (p/gamma)(x - x_i) and x_i = x. Only x is sent (p floats up and down).

    Args:
        batch: the ClientBatch. gamma: default 1/L. p: default 1/sqrt(kappa), kappa = L/mu.
        prox: "consensus" or "l1". lam: the L1 weight (prox "l1").
        cohort: partial participation (untheorized here; TAMUNA gives it theory): the cohort's
            clients start from x, run the local steps with their h_i, and only they are averaged
            and updated. Default all clients.
    """

    name = "proxskip"
    state_attrs = ("x", "total_local_steps", "H")
    config_attrs = ("gamma", "mode", "batch_size", "p", "prox", "lam", "cohort_size")
    cli_options = {**FederatedMethod.cli_options, "gamma": OPT_GAMMA, "p": OPT_P,
                   "cohort": OPT_COHORT}  # fmt: skip

    def __init__(self, batch, *, gamma: float | None = None, p: float | None = None,
                 prox: str = "consensus", lam: float = 0.0, cohort: int | None = None,
                 **kw):  # fmt: skip
        P = _require_batch(batch).problem
        self.gamma = v.positive("gamma", 1.0 / P.L if gamma is None else gamma)
        self.p = v.probability("p", 1.0 / math.sqrt(P.L / P.mu) if p is None else p)
        if prox not in ("consensus", "l1"):
            raise ValueError(f"prox must be 'consensus' or 'l1', got {prox!r}")
        self.prox, self.lam = prox, v.fp32_scalar("lam", lam, nonneg=True)
        self.cohort_size = v.integer("cohort", batch.n if cohort is None else cohort, 1, batch.n)
        self.H = batch.zeros()
        super().__init__(batch, **kw)

    def optimum(self):
        if self.prox == "l1" and self.lam > 0:
            return l1_optimum(self.problem, self.lam)
        return super().optimum()

    def objective(self, x):
        return self.problem.loss(x) + self.lam * float(x.abs().sum()) * (self.prox == "l1")

    def step(self) -> None:
        K = self.geometric(self.p, SLOT_COIN)
        S = self._cohort(self.cohort_size)
        X = self.x.repeat(S.numel(), 1)
        H = self.H[S].contiguous()
        self._local(X, K, clients=S, H=H)
        if self.prox == "consensus":
            self.x = self.batch.scaffnew_sync_(X, H, p=self.p, gamma=self.gamma)
        else:
            # each client's x_i - (gamma/p) h_i, then the mean: what a client computes and sends
            # on a real network (fedkern.integrations.flower.ProxSkipStrategy), bit for bit
            shift = self.gamma / self.p
            x_new = soft_threshold(self.batch.mean(X - shift * H), self.gamma * self.lam / self.p)
            H += (self.p / self.gamma) * (x_new - X)
            self.x = x_new
        self.H[S] = H
        self.rounds += 1
        self._record(self.batch.p, self.batch.p, K)


class Scaffnew(ProxSkip):
    """Scaffnew: ProxSkip with the consensus prox (the FL form of ALGORITHMS.md section 1)."""

    name = "scaffnew"

    def __init__(self, batch, **kw):
        if kw.get("prox", "consensus") != "consensus":
            raise ValueError("Scaffnew's prox is the consensus average; use ProxSkip for 'l1'")
        super().__init__(batch, **kw)
