"""Gradient estimators for SGD with biased estimators (Demidovich et al., 2305.16296).

An estimator turns the float64 finite-sum problem f(x) = (1/N) sum_j f_j(x) (a
``fedkern.problems.Problem``'s samples, ``sample_grad_sum``) into a random direction g(x), drawn
from the counter-based streams at (seed, step) so a run is reproducible and resumes exactly:

  IndependentSampling(p, biased=True, importance=False)
      sample j enters S with probability p_j (uniform p_j = p, or importance p_j = min(1,
      b L_j / sum_i L_i) with b = p N, the mass of capped samples shared out again by
      ``fedkern.sampling.importance`` so that E|S| = b); biased: g = (1/|S|) sum_{j in S}
      grad f_j (0 when S is empty); unbiased: g = sum_{j in S} grad f_j / (N p_j).
  TopKGradient(k or ratio)           g = Top-k(grad f(x))      (fedkern.ops.topk_compress)
  RandKGradient(k or ratio, biased=True)
                                     g = Rand-k(grad f(x)), biased: unscaled, unbiased: times d/k
                                     (fedkern.ops.randk_compress, mask keyed by (seed, step))
  ZerothOrder(directions, h)         g = (1/D) sum_u (f(x + h u) - f(x)) / h u over D seeded
                                     Gaussian directions u ~ N(0, I)

Each gives ``theory_gamma(problem, T)``, the step size of its theory for a budget of T iterations
(BiasedSGD multiplies it by ``factor``):
  independent, biased:   1 / sqrt(L A T),  A = max_j L_j / min_j p_j
  independent, unbiased: min(1 / L, 1 / sqrt(L A T)),  A = max_j (1 - p_j) L_j / (N p_j)
  Top-k, biased Rand-k:  1 / L  (<grad f, g> = ||g||^2: the descent lemma at 1/L)
  unbiased Rand-k:       k / (d L)  (E ||g||^2 = (d / k) ||grad f||^2)
  zeroth order:          1 / (L (1 + (d + 2) / D))  (E ||u u^T v||^2 = (d + 2) ||v||^2)
(L = ``Problem.sample_smoothness_mean``, L_j = ``Problem.sample_smoothness``.) The first two are
ALGORITHMS.md's; the others are fedkern's choice. ``cost`` of an estimate counts sample-gradient
evaluations (N for a full gradient; function evaluations times N for zeroth order).
"""

from __future__ import annotations

import abc
import math

import torch

from fedkern import sampling
from fedkern import validation as v
from fedkern.random import STREAM_GAUSSIAN, uniforms

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "IndependentSampling",
    "RandKGradient",
    "TopKGradient",
    "ZerothOrder",
    "build",
]

F64 = torch.float64


def _k(name: str, k, ratio, d: int) -> int:
    if (k is None) == (ratio is None):
        raise ValueError(f"{name}: give exactly one of k and ratio")
    if k is not None:
        return v.integer("k", k, 1, d)
    r = v.probability("ratio", ratio)
    return max(1, min(d, round(r * d)))


class Estimator(abc.ABC):
    """Abstract base: ``estimate(problem, x, seed=, step=) -> (g float64 [p] CPU, cost)`` and
    ``theory_gamma(problem, T) -> float``. Estimators hold no state (draws are keyed)."""

    name = "estimator"
    biased = True

    @abc.abstractmethod
    def estimate(self, problem, x: torch.Tensor, *, seed: int, step: int):
        """The estimate of grad f(x) [p] (float64, CPU) and its cost in gradient evaluations."""

    @abc.abstractmethod
    def theory_gamma(self, problem, T: int) -> float:
        """The step size the estimator's theory gives for a budget of T iterations."""

    def config(self) -> dict:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={val!r}" for k, val in self.config().items())
        return f"{type(self).__name__}({args})"


class IndependentSampling(Estimator):
    """Independent sampling of the samples (the official experiments' estimator; module docstring).

    Args:
        p: the probability in (0, 1] (uniform), or the expected fraction b / N (importance).
        biased: average over the realized set (True) or the unbiased sum / (N p_j).
        importance: p_j proportional to L_j with sum_j p_j = p N, capped at 1
            (``fedkern.sampling.importance(L, p N)``: p_j = p N L_j / sum_i L_i while no p_j
            reaches 1; otherwise the capped samples get 1 and the rest of the mass is shared in
            proportion to L_j, so the expected size stays p N) instead of p_j = p.
    """

    name = "independent"

    def __init__(self, p: float, biased: bool = True, importance: bool = False):
        self.p = v.probability("p", p)
        self.biased = v.boolean("biased", biased)
        self.importance = v.boolean("importance", importance)

    def probs(self, problem) -> torch.Tensor:
        """[N] float64 CPU inclusion probabilities in (0, 1] (a new tensor; the problem is not
        modified)."""
        N = problem.samples
        if not self.importance:
            return torch.full((N,), self.p, dtype=F64)
        return sampling.importance(problem.sample_smoothness(), self.p * N)

    def estimate(self, problem, x, *, seed, step):
        q = self.probs(problem)
        S = sampling.independent(q, seed=seed, step=step)
        if S.numel() == 0:
            return torch.zeros(problem.p, dtype=F64), 0
        if self.biased:
            w = torch.full((S.numel(),), 1.0 / S.numel(), dtype=F64)
        else:
            w = 1.0 / (problem.samples * q[S])
        return problem.sample_grad_sum(x, S, w), int(S.numel())

    def theory_gamma(self, problem, T):
        q = self.probs(problem)
        Lj = problem.sample_smoothness()
        L = problem.sample_smoothness_mean()
        T = v.integer("T", T, 1)
        if self.biased:
            A = float(Lj.max() / q.min())
            return 1.0 / math.sqrt(L * A * T)
        A = float(((1 - q) * Lj / (problem.samples * q)).max())
        return 1.0 / L if A == 0 else min(1.0 / L, 1.0 / math.sqrt(L * A * T))


class _Compressed(Estimator):
    def _full(self, problem, x):
        return problem.mean_grad(x), problem.samples


class TopKGradient(_Compressed):
    """g = Top-k of the full gradient (ties to the lower index; fedkern.ops.topk_compress on the
    float32 copy selects, the float64 values are kept). Args: k or ratio (k = round(ratio d))."""

    name = "topk"

    def __init__(self, k: int | None = None, ratio: float | None = None):
        if k is not None:
            v.integer("k", k, 1)
        elif ratio is not None:
            v.probability("ratio", ratio)
        self.k, self.ratio = k, ratio
        if (k is None) == (ratio is None):
            raise ValueError("TopKGradient: give exactly one of k and ratio")

    def estimate(self, problem, x, *, seed, step):
        from fedkern.ops import topk_compress

        g, cost = self._full(problem, x)
        k = _k("TopKGradient", self.k, self.ratio, g.numel())
        _, idx = topk_compress(g.float(), k)
        out = torch.zeros_like(g)
        out[idx] = g[idx]
        return out, cost

    def theory_gamma(self, problem, T):
        return 1.0 / problem.sample_smoothness_mean()


class RandKGradient(_Compressed):
    """g = Rand-k of the full gradient, the mask keyed by (seed, step) (fedkern.ops.randk_compress
    picks the indices); biased: unscaled, unbiased: times d / k. Args: k or ratio, biased."""

    name = "randk"

    def __init__(self, k: int | None = None, ratio: float | None = None, biased: bool = True):
        if k is not None:
            v.integer("k", k, 1)
        elif ratio is not None:
            v.probability("ratio", ratio)
        self.k, self.ratio = k, ratio
        if (k is None) == (ratio is None):
            raise ValueError("RandKGradient: give exactly one of k and ratio")
        self.biased = v.boolean("biased", biased)

    def estimate(self, problem, x, *, seed, step):
        from fedkern.ops import randk_compress

        g, cost = self._full(problem, x)
        d = g.numel()
        k = _k("RandKGradient", self.k, self.ratio, d)
        _, idx = randk_compress(g.float(), k, seed=seed, step=step, unbiased=False)
        out = torch.zeros_like(g)
        out[idx] = g[idx] * (1.0 if self.biased else d / k)
        return out, cost

    def theory_gamma(self, problem, T):
        L = problem.sample_smoothness_mean()
        if self.biased:
            return 1.0 / L
        d = problem.p
        return _k("RandKGradient", self.k, self.ratio, d) / (d * L)


def gaussians(n: int, *, seed: int, step: int) -> torch.Tensor:
    """n independent N(0, 1) floats (float64) for (seed, step): Box-Muller on the uniforms of
    stream STREAM_GAUSSIAN, in torch's float64 log / cos / sin.

    Not ``fedkern.random.gaussian``: that one is the cross-backend draw (fp32 values from fedkern's
    own exactly specified fp32 transcendentals, identical on the reference, C++ and Triton, tail
    cut at |z| <= 5.77). The estimators run in float64 on the host only and want full float64
    normals (a zeroth-order direction's scale enters the difference quotient), so they keep
    this host-side float64 draw."""
    u = uniforms(2 * ((n + 1) // 2), seed=seed, step=step, stream=STREAM_GAUSSIAN)
    u1, u2 = u[0::2], u[1::2]
    r = torch.sqrt(-2 * torch.log1p(-u1))  # 1 - u1 in (0, 1]: finite
    z = torch.cat([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)])
    return z[:n]


class ZerothOrder(Estimator):
    """Forward finite differences along seeded Gaussian directions (module docstring).

    Args:
        directions: D >= 1 directions per estimate. h: the difference step (a float > 0).
    """

    name = "zo"

    def __init__(self, directions: int = 10, h: float = 1e-6):
        self.directions = v.integer("directions", directions, 1)
        self.h = v.positive("h", h)

    def estimate(self, problem, x, *, seed, step):
        d, D = problem.p, self.directions
        U = gaussians(D * d, seed=seed, step=step).reshape(D, d)
        x = x.to(F64).cpu()
        f0 = problem.mean_loss(x)
        diffs = torch.tensor([(problem.mean_loss(x + self.h * u) - f0) / self.h for u in U],
                             dtype=F64)  # fmt: skip
        return (diffs[:, None] * U).mean(0), (D + 1) * problem.samples

    def theory_gamma(self, problem, T):
        return 1.0 / (problem.sample_smoothness_mean() * (1 + (problem.p + 2) / self.directions))


ESTIMATORS = {
    "independent": IndependentSampling,
    "topk": TopKGradient,
    "randk": RandKGradient,
    "zo": ZerothOrder,
}


def build(name: str, **kw) -> Estimator:
    """An estimator by name ("independent", "topk", "randk", "zo") with its keyword arguments."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; available: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](**kw)
