"""SGD with biased gradient estimators (Demidovich et al., "A guide through the zoo of biased SGD",
2305.16296): x <- x - gamma g(x), g from a ``fedkern.estimators`` estimator.

The step is the estimator's theory step for the iteration budget T, times ``factor`` (the theory
is very conservative: the official experiments use factors 2^18 .. 2^20), unless gamma is given.
Everything runs in float64 on the problem's samples (f = (1/N) sum_j f_j, ``Problem.mean_loss``).
History per iteration (index 0 = the start): "loss", "grad_norm_sq" ||grad f(x)||^2, "grad_evals"
(sample gradients the estimate cost), "diverged".

Biased vs unbiased independent sampling (measured, tests/test_biased.py): each at its own theory
step times one factor, the biased one can win at small p only because its theory step is about
sqrt(N) times smaller (the unbiased step overshoots at the factors where the biased one is tuned);
at one common step, or each at its best step of a grid, the unbiased twin ends at least as low
(uniform p: a tie within seed noise; importance p_j: the biased average stalls higher).
"""

from __future__ import annotations

import torch

from fedkern import estimators as est
from fedkern import validation as v
from fedkern.algorithms.base import Method

__all__ = ["BiasedSGD"]

SLOT_ESTIMATOR = 3


class BiasedSGD(Method):
    """SGD with a (biased) estimator.

    Args:
        problem: a ``fedkern.problems.Problem`` (e.g. logistic with ``nonconvex_reg``).
        estimator: a ``fedkern.estimators.Estimator``, or its name ("independent", "topk",
            "randk", "zo") with ``estimator_args``.
        gamma: the step size (default: ``estimator.theory_gamma(problem, budget) * factor``).
        factor: the multiplier of the theory step (finite, > 0; default 1).
        budget: T, the iteration budget the theory step is computed for (default 1000).
        x0: [p] start (default the problem's ``start`` attribute if set, else zeros).
        p: with a named estimator, its sampling probability (independent: default 0.1).
        seed: keys the estimator's draws (slot 3 of each round).
        diverge_factor: see ``Method``.
    Raises ValueError / TypeError (before any work) on bad arguments or an unknown estimator.
    """

    name = "biased_sgd"
    problems = ("logistic_nonconvex",)
    state_attrs = ("x", "evals")
    config_attrs = ("gamma",)
    cli_options = {
        "estimator": {"flag": "--estimator", "default": "independent",
                      "choices": tuple(est.ESTIMATORS), "help": "biased SGD's estimator"},
        "factor": {"flag": "--factor", "type": float,
                   "help": "multiplier of the theory step (official tuned: 2^18..2^20)"},
        "p": {"flag": "--p", "type": float,
              "help": "communication probability (ProxSkip) / sampling probability (biased SGD)"},
        "budget": {"flag": "--budget", "type": int,
                   "help": "biased SGD: the iteration budget T of the theory step (default 1000)"},
    }  # fmt: skip

    def __init__(self, problem, *, estimator="independent", estimator_args: dict | None = None,
                 gamma: float | None = None, factor: float = 1.0, budget: int = 1000, x0=None,
                 p: float | None = None, seed: int = 0, diverge_factor: float = 1e8):  # fmt: skip
        if not hasattr(problem, "sample_grad_sum"):
            raise TypeError(f"problem must be a fedkern.problems.Problem, got "
                            f"{type(problem).__name__}")  # fmt: skip
        if isinstance(estimator, str):
            args = dict(estimator_args or {})
            if p is not None:
                args["p"] = p
            if estimator == "independent":
                args.setdefault("p", 0.1)
            estimator = est.build(estimator, **args)
        elif p is not None:
            raise ValueError("p is the sampling probability of a named estimator; set it on the "
                             "estimator object instead")  # fmt: skip
        elif not isinstance(estimator, est.Estimator):
            raise TypeError(f"estimator must be a fedkern.estimators.Estimator or a name, got "
                            f"{type(estimator).__name__}")  # fmt: skip
        self.factor = v.positive("factor", factor)
        self.budget = v.integer("budget", budget, 1)
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        self.problem, self.estimator = problem, estimator
        base = estimator.theory_gamma(problem, self.budget) if gamma is None else gamma
        self.gamma = v.finite("gamma", base * (self.factor if gamma is None else 1.0))
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        x0 = getattr(problem, "start", None) if x0 is None else x0
        if x0 is None:
            self.x = torch.zeros(problem.p, dtype=torch.float64)
        else:
            v.tensor("x0", x0)
            self.x = x0.detach().to("cpu", torch.float64).clone()
        if self.x.shape != (problem.p,):
            raise ValueError(f"x0 must have shape ({problem.p},), got {tuple(self.x.shape)}")
        self.remember_start()
        self.evals = 0
        self._record(0)

    def config(self) -> dict:
        out = super().config()
        out["estimator"] = repr(self.estimator)
        return out

    def _record(self, cost: int) -> None:
        x = self.x
        finite = bool(torch.isfinite(x).all())
        loss = self.problem.mean_loss(x) if finite else float("nan")
        gn = float(self.problem.mean_grad(x).pow(2).sum()) if finite else float("nan")
        self.record(loss=loss, grad_norm_sq=gn, grad_evals=cost)

    def step(self) -> None:
        g, cost = self.estimator.estimate(self.problem, self.x, seed=self.seed,
                                          step=self.key(SLOT_ESTIMATOR))  # fmt: skip
        self.x = self.x - self.gamma * g
        self.evals += cost
        self.rounds += 1
        self._record(cost)

    def __repr__(self) -> str:
        return f"BiasedSGD({self.estimator!r}, gamma={self.gamma:.4g}, rounds={self.rounds})"
