"""Reference counter-based Gaussian and Bernoulli draws: the exact numerics of every backend.

A draw for (seed, step) first derives four key words from the stream's tag,

    (w0, w1, w2, w3) = Philox4x32((seed_lo, seed_hi, step_lo, step_hi), (STREAM, 0)),

then entry i of the flattened output (row-major) belongs to group g = i >> 2 and lane i & 3:

    (o0, o1, o2, o3) = Philox4x32((g_lo, g_hi, w2, w3), (w0, w1)).

Entry i never depends on the shape, so a longer draw extends a shorter one.

Gaussian (Box-Muller on each pair of words; lanes 0, 1 use (o0, o1), lanes 2, 3 use (o2, o3)):

    u     = ((a >> 8) + 1) * 2^-24                      in (0, 1], exact in fp32
    R     = sqrt_rn(max(-2 log(u), 0))                  R <= sqrt(48 ln 2) ~ 5.77
    theta = 2 pi (b >> 8) / 2^24
    z_even = R cos(theta),  z_odd = R sin(theta)        (lane 0 / 2 even, lane 1 / 3 odd)
    out   = round(std * z)                               (std = 1: out = z)

log, cos and sin are fedkern's own fixed sequences of fp32 additions and multiplications (the
Cephes single-precision polynomials, constants given as exact fp32 values), evaluated in the same
order without fused multiply-add on every backend; sqrt_rn and the integer operations are exactly
rounded. That is why the draws are bit-identical on the reference, C++ and Triton: libm's and the
GPU's transcendental functions differ in their last bits, IEEE +, -, *, / and sqrt do not.

  log(u), u = m 2^e with m in [1/2, 1) read from the bits: if m < sqrt(1/2): e -= 1, x = 2m - 1,
      else x = m - 1 (both exact); z = x^2; y = Horner(L0..L8; x) * x * z + e * LN2_LO - z / 2;
      log = (x + y) + e * LN2_HI.
  angle reduction, exact in integers: c = b >> 8 (24 bits), j = c >> 21 (octant), j2 = (j + 1) & 14,
      q = (j2 >> 1) & 3 (quadrant), t = float(c - (j2 << 21)) * (pi/4 * 2^-21) in [-pi/4, pi/4):
      theta = q pi/2 + t.
  sin t = ((S0 z + S1) z + S2) z t + t,  cos t = ((C0 z + C1) z + C2) z z - z/2 + 1,  z = t^2;
      rotated by the quadrant q.

Bernoulli(p): keep entry i iff (o_lane >> 8) < T, T = ceil(p * 2^24) (p a float32 in (0, 1]), so
P(keep) = T / 2^24 (the p rounded up to a multiple of 2^-24); the sketches scale kept entries by
2^24 / T (``keep_scale``), which makes them exactly unbiased.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkern.random import philox4x32_tensor

F32 = torch.float32
_MASK32 = 0xFFFFFFFF

# fp32 constants (exact values; the same hex literals are in csrc and kernels).
LOG_C = (
    float.fromhex("0x1.204376p-4"),
    float.fromhex("-0x1.d7a370p-4"),
    float.fromhex("0x1.de4a34p-4"),
    float.fromhex("-0x1.fcba9ep-4"),
    float.fromhex("0x1.23d37ep-3"),
    float.fromhex("-0x1.555ca0p-3"),
    float.fromhex("0x1.999d58p-3"),
    float.fromhex("-0x1.fffff8p-3"),
    float.fromhex("0x1.555554p-2"),
)
LN2_LO = float.fromhex("-0x1.bd0106p-13")
LN2_HI = float.fromhex("0x1.63p-1")  # 0.693359375: 9 significant bits, e * LN2_HI is exact
SQRT_HALF = float.fromhex("0x1.6a09e6p-1")
SIN_C = (float.fromhex("-0x1.9943f2p-13"), float.fromhex("0x1.11073cp-7"),
         float.fromhex("-0x1.555546p-3"))  # fmt: skip
COS_C = (float.fromhex("0x1.99eb9cp-16"), float.fromhex("-0x1.6c0c34p-10"),
         float.fromhex("0x1.55554ap-5"))  # fmt: skip
PI4_2M21 = float.fromhex("0x1.921fb6p-22")  # fp32(pi/4) * 2^-21, exact
TWO24 = 16777216.0


def words(n: int, key, device=None) -> torch.Tensor:
    """The n Philox words of a draw with key words ``key`` = (w0, w1, w2, w3): int64 [n]."""
    groups = (n + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    zero = torch.zeros_like(g)
    out = philox4x32_tensor(g & _MASK32, g >> 32, zero + key[2], zero + key[3], key[0], key[1])
    return torch.stack(out, 1).reshape(-1)[:n]


def log_f32(u: torch.Tensor) -> torch.Tensor:
    """fedkern's fp32 log of u in [2^-126, 1] (positive normal floats); see the module docstring."""
    bits = u.view(torch.int32)
    e = ((bits >> 23) - 126).to(F32)
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(F32)
    small = m < SQRT_HALF
    e = torch.where(small, e - 1, e)
    x = torch.where(small, (m + m) - 1, m - 1)
    z = x * x
    y = torch.full_like(x, LOG_C[0])
    for c in LOG_C[1:]:
        y = y * x + c
    y = y * x
    y = y * z
    y = y + e * LN2_LO
    y = y - z * 0.5
    r = x + y
    return r + e * LN2_HI


def sincos_turns(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of 2 pi c / 2^24 for int64 c in [0, 2^24): fp32; see the module docstring."""
    j = c >> 21
    j2 = (j + 1) & 14
    q = (j2 >> 1) & 3
    t = (c - (j2 << 21)).to(F32) * PI4_2M21
    z = t * t
    s = (z * SIN_C[0] + SIN_C[1]) * z + SIN_C[2]
    s = s * z
    s = s * t
    s = s + t
    k = (z * COS_C[0] + COS_C[1]) * z + COS_C[2]
    k = k * z
    k = k * z
    k = k - z * 0.5
    k = k + 1
    cos = torch.where(q == 0, k, torch.where(q == 1, -s, torch.where(q == 2, -k, s)))
    sin = torch.where(q == 0, s, torch.where(q == 1, k, torch.where(q == 2, -s, -k)))
    return cos, sin


def box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_even, z_odd) fp32 from int64 tensors a, b of uint32 words."""
    u = ((a >> 8) + 1).to(F32) * 2.0**-24
    t = log_f32(u) * -2.0
    # IEEE sqrt: in float64, rounded once to fp32 (exact rounding; torch's fp32 sqrt is not)
    R = torch.sqrt(torch.clamp_min(t, 0.0).double()).float()
    cos, sin = sincos_turns(b >> 8)
    return R * cos, R * sin


def gaussian(n: int, key, std: float = 1.0, device=None) -> torch.Tensor:
    """The first n entries of the Gaussian draw with key words ``key``, times ``std`` (an fp32
    number, rounded once): float32 [n]."""
    w = words(4 * ((n + 3) // 4), key, device).view(-1, 2, 2)
    z0, z1 = box_muller(w[..., 0], w[..., 1])
    z = torch.stack((z0, z1), -1).reshape(-1)[:n]
    if std != 1.0:
        z = z * std
    return z


def threshold(p: float) -> int:
    """T = ceil(p * 2^24) for an fp32 probability p in (0, 1] (exact)."""
    return int(np.ceil(np.float32(p) * np.float32(TWO24)))


def keep_scale(p: float) -> float:
    """The fp32 scale 2^24 / T of a kept entry: the inverse of its exact keep probability."""
    return float(np.float32(TWO24) / np.float32(threshold(p)))


def thresholds(p: torch.Tensor) -> torch.Tensor:
    """T_j = ceil(p_j * 2^24) as fp32 (exact) for a float32 tensor of probabilities."""
    return torch.ceil(p.to(F32) * TWO24)


def bernoulli(n: int, p, key, device=None) -> torch.Tensor:
    """Keep flags of the Bernoulli draw: bool [n]; p a float (fp32) or a float32 tensor [n]."""
    c = (words(n, key, device) >> 8).to(F32)
    if isinstance(p, torch.Tensor):
        return c < thresholds(p.reshape(-1))
    return c < float(threshold(p))


def gaussian_fill_(out: torch.Tensor, key, std: float) -> torch.Tensor:
    """out (contiguous float32/bfloat16) = the draw, rounded to out's dtype; returns out."""
    out.view(-1).copy_(gaussian(out.numel(), key, std, out.device).to(out.dtype))
    return out


def bernoulli_fill_(out: torch.Tensor, p, key) -> torch.Tensor:
    """out (contiguous bool) = the keep flags; p a float or a float32 tensor of out's size."""
    out.view(-1).copy_(bernoulli(out.numel(), p, key, out.device))
    return out
