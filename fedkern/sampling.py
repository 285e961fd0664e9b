"""Client sampling and the shared coins of federated methods, from counter-based streams.

Every draw here is a pure function of (seed, step) (``fedkern.random``: Philox4x32-10 and the keyed
Feistel permutation), never of torch's or NumPy's global generator. So a method that keys its round
r by ``step=r`` is reproducible on any machine, resumes exactly from a checkpoint that holds r, and
can tell remote clients what was drawn by sending (seed, step) instead of the cohort or the coin.
Each function draws from its own stream tag: a cohort and a coin of the same (seed, step) are
independent.

Cohorts:
  uniform(n, c, seed=, step=)          c distinct clients, uniformly without replacement
  independent(probs, seed=, step=)     client m joins with probability probs[m] (size varies)
  importance(L, c, alpha=)             probabilities proportional to L_m**alpha, summing to c,
                                       capped at 1 (the input of ``independent``)
  reshuffled(n, c, seed=, epoch=)      a meta-epoch: every client exactly once, in cohorts of c
  slot_permutation(c, seed=, step=)    a uniform permutation of the c cohort slots (TAMUNA's
                                       compression pattern: slot j -> cohort row)
Coins and counts:
  coin(p, seed=, step=)                True with probability p
  geometric(p, seed=, step=)           K >= 1 with P(K = k) = (1 - p)^(k - 1) p
  uniform_floats(n, seed=, step=)      n floats in [0, 1) (float64)
"""

from __future__ import annotations

import math

import torch

from fedkern import validation as v
from fedkern.random import (
    STREAM_COHORT,
    STREAM_PATTERN,
    STREAM_RESHUFFLE,
    STREAM_UNIFORM,
    permutation_tensor,
    uniforms,
)

__all__ = [
    "coin",
    "geometric",
    "importance",
    "independent",
    "reshuffled",
    "slot_permutation",
    "uniform",
    "uniform_floats",
]

#: Offsets of the uniform-float draws inside STREAM_UNIFORM, so that a coin, a geometric count
#: and the independent-participation floats of one (seed, step) are distinct words.
_COIN, _GEOMETRIC, _INDEPENDENT = 0, 1, 2
_MAX_KEY = (1 << 63) - 1
#: The largest population of ``uniform`` / ``reshuffled``: the Feistel network works on int64
#: values of 2h <= 62 bits (a larger n would need 64-bit values, which overflow int64).
MAX_CLIENTS = 1 << 62


def _uniform_stream(which: int) -> int:
    return (STREAM_UNIFORM + which) & 0xFFFFFFFF


def _key(name: str, value) -> int:
    """A seed / step / epoch: an int in [0, 2**63) (numpy integers accepted), as a Python int;
    checked here so that every function rejects a bad key, including on its fast paths."""
    return v.integer(name, value, 0, _MAX_KEY)


def uniform(n: int, c: int, *, seed: int, step: int) -> torch.Tensor:
    """A cohort of c distinct clients out of n, uniformly without replacement.

    The cohort is the image of 0..c-1 under the keyed permutation of [0, n) (the Feistel network
    of ``fedkern.random.permutation_tensor``, stream STREAM_COHORT at (seed, step)): O(c) work.

    Args:
        n: number of clients, int in [1, 2**62].
        c: cohort size, int in [1, n].
        seed, step: ints in [0, 2**63).

    Returns:
        int64 CPU tensor [c], ascending client ids.
    """
    n = v.integer("n", n, 1, MAX_CLIENTS)
    c = v.integer("c", c, 1, n)
    seed, step = _key("seed", seed), _key("step", step)
    if c == n:
        return torch.arange(n, dtype=torch.int64)
    ids = permutation_tensor(n, seed, step, stream=STREAM_COHORT, count=c)
    return torch.sort(ids).values


def uniform_floats(n: int, *, seed: int, step: int) -> torch.Tensor:
    """n independent uniform floats in [0, 1): float64 CPU tensor [n] (``fedkern.random.uniforms``
    on the participation stream; entry m is client m's draw in ``independent``). n: int >= 0;
    seed, step: ints in [0, 2**63)."""
    n = v.integer("n", n, 0)
    seed, step = _key("seed", seed), _key("step", step)
    return uniforms(n, seed=seed, step=step, stream=_uniform_stream(_INDEPENDENT))


def _client_vector(name: str, x, what: str, items: str) -> torch.Tensor:
    """x as a float64 CPU vector with one ``what`` per client (a 1-D tensor or sequence of
    ``items``); ValueError / TypeError naming ``name`` otherwise."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one {what} per client), got shape "
                             f"{tuple(x.shape)}")  # fmt: skip
        out = x.detach().to("cpu", torch.float64)
    else:
        try:
            out = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a 1-D sequence or tensor of {items}") from exc
        if out.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one {what} per client), got shape "
                             f"{tuple(out.shape)}")  # fmt: skip
    if out.numel() < 1:
        raise ValueError(f"{name} must hold at least one {what}")
    return out


def _probabilities(name: str, probs) -> torch.Tensor:
    q = _client_vector(name, probs, "probability", "floats")
    bad = ~((q > 0) & (q <= 1))  # also catches NaN
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name} must be in (0, 1], got {name}[{i}] = {float(q[i])}")
    return q


def independent(probs, *, seed: int, step: int) -> torch.Tensor:
    """Independent participation: client m joins with probability probs[m].

    Client m joins when its uniform float (``uniform_floats``, entry m) is below probs[m]. The
    cohort size is random (expected sum(probs)); an empty cohort is a valid outcome.

    Args:
        probs: n probabilities in (0, 1] (a 1-D tensor or sequence).
        seed, step: ints in [0, 2**63).

    Returns:
        int64 CPU tensor of the ascending ids that joined (possibly empty).
    """
    q = _probabilities("probs", probs)
    seed, step = _key("seed", seed), _key("step", step)
    u = uniform_floats(q.numel(), seed=seed, step=step)
    return torch.nonzero(u < q).flatten()


def _weights(name: str, L) -> torch.Tensor:
    w = _client_vector(name, L, "weight", "real numbers")
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise ValueError(f"{name} must hold positive finite values")
    return w


def importance(L, c: float, alpha: float = 1.0) -> torch.Tensor:
    """Importance-sampling probabilities: p_m proportional to L_m**alpha, sum p_m = c, p_m <= 1.

    Capping: when the proportional value of some clients exceeds 1, they get exactly 1 and the
    remaining mass c - (number capped) is shared by the others in proportion to L_m**alpha, repeated
    until no value exceeds 1 (water-filling; at most n passes). The result is the unique capped
    proportional allocation, so ``independent(importance(L, c), ...)`` has expected size c.

    The powers are formed in log space relative to the largest (alpha < 0: smallest) free weight,
    so any finite alpha works (L**alpha itself may overflow float64). A share too small for float64
    (below about 1e-308 of the largest) is stored as the smallest normal float64, 2**-1022, so
    every probability stays positive and the result is always a valid input of ``independent``.

    Args:
        L: n positive finite weights (smoothness constants L_m), a 1-D tensor or sequence (not
            modified).
        c: expected cohort size, a real number in (0, n] (c = n gives all ones).
        alpha: the exponent, a finite real number (0 gives uniform probabilities c / n).

    Returns:
        float64 CPU tensor [n] of probabilities in (0, 1].
    """
    logw = torch.log(_weights("L", L))
    n = logw.numel()
    alpha = v.finite("alpha", alpha)
    c = v.finite("c", c)
    if not 0 < c <= n:
        raise ValueError(f"c must be in (0, n={n}], got {c}")
    if c == n:
        return torch.ones(n, dtype=torch.float64)
    capped = torch.zeros(n, dtype=torch.bool)
    for _ in range(n):
        free = ~capped
        # alpha * (log L - the extreme free log L) <= 0, 0 at the heaviest free client: the
        # powers relative to it, in [0, 1], without overflow (alpha = 0 gives exactly 1)
        ref = logw[free].max() if alpha >= 0 else logw[free].min()
        w = torch.where(free, torch.exp(alpha * (logw - ref)), torch.zeros_like(logw))
        mass = c - float(capped.sum())
        p = torch.where(capped, torch.ones_like(w), mass * w / float(w.sum()))
        over = free & (p > 1)
        if not bool(over.any()):
            break
        capped |= over
    return p.clamp(min=2.0**-1022, max=1.0)


def reshuffled(n: int, c: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """One meta-epoch of cohorts: a fresh permutation of the n clients cut into cohorts of c.

    Every client appears exactly once per meta-epoch. When c does not divide n the last cohort
    holds the n mod c clients left over (a documented rule: no client is dropped or repeated).

    Args:
        n: number of clients, int in [1, 2**62].
        c: cohort size, int in [1, n].
        seed, epoch: ints in [0, 2**63) (the permutation of stream STREAM_RESHUFFLE).

    Returns:
        A list of ceil(n / c) int64 CPU tensors, each ascending.
    """
    n = v.integer("n", n, 1, MAX_CLIENTS)
    c = v.integer("c", c, 1, n)
    seed, epoch = _key("seed", seed), _key("epoch", epoch)
    perm = permutation_tensor(n, seed, epoch, stream=STREAM_RESHUFFLE)
    return [torch.sort(part).values for part in torch.split(perm, c)]


def slot_permutation(c: int, *, seed: int, step: int) -> torch.Tensor:
    """A uniform permutation of 0..c-1: entry j is the cohort row that takes pattern slot j.

    TAMUNA's compression pattern gives coordinate r to the slots (s*r + j) mod c, j < s; this
    permutation assigns the slots to the cohort's rows afresh each round (stream STREAM_PATTERN at
    (seed, step), so the clients can rebuild their pattern from (seed, step) alone).

    Args:
        c: cohort size, int >= 1.
        seed, step: ints in [0, 2**63).

    Returns:
        int64 CPU tensor [c].
    """
    c = v.integer("c", c, 1)
    return permutation_tensor(c, seed, step, stream=STREAM_PATTERN)


def coin(p: float, *, seed: int, step: int) -> bool:
    """A Bernoulli(p) coin for (seed, step): True with probability p (always when p = 1).

    Args:
        p: a probability in [0, 1].
        seed, step: ints in [0, 2**63).
    """
    p = v.finite("p", p)
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    seed, step = _key("seed", seed), _key("step", step)
    u = float(uniforms(1, seed=seed, step=step, stream=_uniform_stream(_COIN))[0])
    return u < p


def geometric(p: float, *, seed: int, step: int) -> int:
    """K ~ Geometric(p) on {1, 2, ...}: P(K = k) = (1 - p)^(k - 1) p, for (seed, step).

    Inverse transform of one uniform u in [0, 1): K = max(1, ceil(log(1 - u) / log(1 - p))); p = 1
    gives 1. This is the number of local steps until the first heads of a p-coin (ProxSkip's
    communication round).

    Args:
        p: a probability in [1e-300, 1] (below, the counts exceed the float64 range).
        seed, step: ints in [0, 2**63).
    """
    p = v.probability("p", p)
    if p < 1e-300:
        raise ValueError(f"p must be >= 1e-300 (smaller p gives counts beyond float64), got {p}")
    seed, step = _key("seed", seed), _key("step", step)
    if p == 1.0:
        return 1
    u = float(uniforms(1, seed=seed, step=step, stream=_uniform_stream(_GEOMETRIC))[0])
    return max(1, math.ceil(math.log1p(-u) / math.log1p(-p)))
