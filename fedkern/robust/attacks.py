"""Byzantine attacks: the messages that f Byzantine clients send, for tests and benchmarks.

Every attack is omniscient (it sees the honest messages of the round, as in the papers' threat
model) and returns a [f, d] stack in the honest stack's dtype and device; the caller concatenates it
with the honest rows. Label flipping changes data, not messages: ``fedkern.data.flip_labels``.

- ``bit_flip(own, scale)``: each Byzantine client sends -scale times its own honest message.
- ``alie(honest, f)``: A Little Is Enough (Baruch et al. 2019): mean - z * std per coordinate.
- ``ipm(honest, f, eps)``: Inner Product Manipulation (Xie et al. 2020): -eps * mean.
- ``shift_back(target, f)``: every Byzantine client sends ``target``, the vector that moves the
  server back (Malinovsky et al. 2023: when the Byzantine clients are a majority of the sampled
  set, they send what returns the model to x0; the method computes target).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from fedkern import validation as v

__all__ = ["alie", "alie_z", "bit_flip", "ipm", "shift_back"]


def _count(f) -> int:
    return v.integer("f", f, 0)


def bit_flip(own: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """-scale * own: the sign-flipped (and scaled) honest messages of the Byzantine clients.

    Args:
        own: [f, d] float32/bfloat16, what the Byzantine clients would have sent honestly.
        scale: a finite float (default 1: plain sign flip, an exact negation; a scale above
            (n - f) / f reverses the plain mean of n messages).

    Returns:
        A new [f, d] tensor in own's dtype (the product rounded once).
    """
    scale = v.fp32_scalar("scale", scale)
    if own.dim() == 2 and own.shape[0] == 0:
        return own.clone()
    v.stack("own", own)
    return -own if scale == 1.0 else (own.double() * -scale).to(own.dtype)


def alie_z(n: int, f: int) -> float:
    """The z of A Little Is Enough for n clients of which f are Byzantine.

    s = floor(n/2 + 1) - f honest clients must be "won over"; z = Phi^{-1}((n - s) / n) (Baruch
    et al. 2019, Algorithm 3), and at least 0.
    """
    n, f = v.integer("n", n, 1), v.integer("f", f, 0, n)
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if p <= 0:
        return 0.0
    if p >= 1:
        p = 1 - 1e-12
    return max(0.0, NormalDist().inv_cdf(p))


def alie(honest: torch.Tensor, f: int, z: float | None = None) -> torch.Tensor:
    """A Little Is Enough: mean - z * std of the honest messages, per coordinate, f times.

    Args:
        honest: [h, d] float32/bfloat16 honest messages, h >= 2 (the std needs two).
        f: number of Byzantine rows to return (int >= 0).
        z: the shift in standard deviations; default ``alie_z(h + f, f)``.

    Returns:
        [f, d] in honest's dtype (mean and std over rows in float64, std with Bessel's correction).
    """
    v.stack("honest", honest)
    f = _count(f)
    if honest.shape[0] < 2:
        raise ValueError(f"honest must have at least 2 rows for a std, got {honest.shape[0]}")
    z = alie_z(honest.shape[0] + f, f) if z is None else v.fp32_scalar("z", z)
    h = honest.double()
    row = h.mean(0) - z * h.std(0)
    return row.to(honest.dtype).expand(f, -1).clone()


def ipm(honest: torch.Tensor, f: int, eps: float = 0.1) -> torch.Tensor:
    """Inner Product Manipulation: -eps * mean of the honest messages, f times.

    Args:
        honest: [h, d] float32/bfloat16, h >= 1.
        f: int >= 0.
        eps: a finite float (0.1 in the paper for a small-eps attack; eps > 1 with a mean
            aggregator reverses the mean).

    Returns:
        [f, d] in honest's dtype (mean in float64).
    """
    v.stack("honest", honest)
    f, eps = _count(f), v.fp32_scalar("eps", eps)
    row = -eps * honest.double().mean(0)
    return row.to(honest.dtype).expand(f, -1).clone()


def shift_back(target: torch.Tensor, f: int) -> torch.Tensor:
    """f copies of ``target`` (a [d] tensor): the message that moves the server back.

    Args:
        target: [d] float tensor, computed by the caller from the server state (for Byz-VR-MARINA:
            the aggregate that would make the next iterate x0).
        f: int >= 0.

    Returns:
        [f, d] tensor, target's dtype and device.
    """
    v.tensor("target", target)
    if target.dim() != 1 or not target.is_floating_point():
        raise ValueError(f"target must be a 1-D float tensor, got {target.dtype} "
                         f"{tuple(target.shape)}")  # fmt: skip
    return target.expand(_count(f), -1).clone()
