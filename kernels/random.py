"""Counter-based Gaussian and Bernoulli draws (Triton): Philox4x32-10 and Box-Muller.

A draw is keyed by four uint32 words (w0, w1, w2, w3) (``fedkern.random.draw_key``). Entry i of
the flattened output is lane i & 3 of

    Philox4x32((g_lo, g_hi, w2, w3), (w0, w1)),   g = i >> 2,

ten rounds of  (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))
with M0 = 0xD2511F53, M1 = 0xCD9E8D57 and the key bumped by (0x9E3779B9, 0xBB67AE85) between
rounds.

    gaussian:  pair (a, b) = words (0, 1) for lanes 0, 1 and (2, 3) for lanes 2, 3;
               u = ((a >> 8) + 1) 2^-24;  R = sqrt_rn(max(-2 log(u), 0));  angle 2 pi (b >> 8)/2^24;
               even lane R cos, odd lane R sin;  out = round(std * z)
    bernoulli: keep iff (word >> 8) < ceil(p 2^24)

log, sin and cos are fedkern's fixed fp32 polynomials (``fedkern.reference.random`` defines them
step by step; the constants are exact fp32 values), evaluated here in the same order with
enable_fp_fusion=False and IEEE sqrt (sqrt_rn), so the bits equal the reference and the C++ core
(tl.log / tl.cos would use the GPU's approximate instructions).  Each program evaluates BLOCK
entries, one Philox call per entry (the group's other lanes are recomputed by their own entries:
simple, and the GPU has compute to spare).  The jit functions ``philox``, ``gaussian_at`` and
``keep_threshold`` are shared with kernels/sketch.py and kernels/lora.py.
"""

import torch
import triton
import triton.language as tl

from ._common import block_for, round_to, store_f32


@triton.jit
def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counter words under uint32 key words: four uint32 words."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def entry_word(i, w0, w1, w2, w3):
    """The Philox word of entries i (uint64 tensor) of the draw keyed by uint32 (w0, w1, w2, w3)."""
    g = i >> 2
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    o0, o1, o2, o3 = philox(c0, c1, c2_of(c0, w2), c2_of(c0, w3), w0, w1)
    lane = (i & 3).to(tl.int32)
    return tl.where(lane == 0, o0, tl.where(lane == 1, o1, tl.where(lane == 2, o2, o3)))


@triton.jit
def c2_of(like, w):
    """A key word broadcast to the shape of ``like`` (a uint32 tensor)."""
    return tl.zeros_like(like) + w


@triton.jit
def log_f32(u):
    """fedkern's fp32 log of u in [2^-126, 1]."""
    bits = u.to(tl.uint32, bitcast=True)
    e = ((bits >> 23).to(tl.int32) - 126).to(tl.float32)
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.7071067690849304
    e = tl.where(small, e - 1.0, e)
    x = tl.where(small, (m + m) - 1.0, m - 1.0)
    z = x * x
    y = x * 0.07037683576345444 + -0.11514610052108765
    y = y * x + 0.11676998436450958
    y = y * x + -0.12420140951871872
    y = y * x + 0.14249323308467865
    y = y * x + -0.16668057441711426
    y = y * x + 0.2000071406364441
    y = y * x + -0.24999994039535522
    y = y * x + 0.3333333134651184
    y = y * x
    y = y * z
    y = y + e * -0.00021219444170128554
    y = y - z * 0.5
    r = x + y
    return r + e * 0.693359375


@triton.jit
def sincos_turns(c):
    """(cos, sin) of 2 pi c 2^-24 for c in [0, 2^24) (int32 tensor): exact octant reduction."""
    j = c >> 21
    j2 = (j + 1) & 14
    q = (j2 >> 1) & 3
    t = (c - (j2 << 21)).to(tl.float32) * 3.7450703871400037e-07
    z = t * t
    s = (z * -0.00019515295571181923 + 0.008332161232829094) * z + -0.16666655242443085
    s = s * z
    s = s * t
    s = s + t
    k = (z * 2.44331567955669e-05 + -0.0013887316454201937) * z + 0.04166664555668831
    k = k * z
    k = k * z
    k = k - z * 0.5
    k = k + 1.0
    cos = tl.where(q == 0, k, tl.where(q == 1, -s, tl.where(q == 2, -k, s)))
    sin = tl.where(q == 0, s, tl.where(q == 1, k, tl.where(q == 2, -s, -k)))
    return cos, sin


@triton.jit
def gaussian_at(i, w0, w1, w2, w3):
    """Entries i (uint64 tensor) of the standard Gaussian draw keyed by (w0, w1, w2, w3): fp32."""
    g = i >> 2
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    o0, o1, o2, o3 = philox(c0, c1, c2_of(c0, w2), c2_of(c0, w3), w0, w1)
    lane = (i & 3).to(tl.int32)
    a = tl.where(lane < 2, o0, o2)
    b = tl.where(lane < 2, o1, o3)
    u = ((a >> 8) + 1).to(tl.float32) * 5.960464477539063e-08
    t = log_f32(u) * -2.0
    R = tl.sqrt_rn(tl.maximum(t, 0.0))
    cos, sin = sincos_turns((b >> 8).to(tl.int32))
    return tl.where((lane & 1) == 0, R * cos, R * sin)


@triton.jit
def keep_threshold(p):
    """T = ceil(p 2^24) of fp32 probabilities (exact)."""
    return tl.math.ceil(p * 16777216.0)


@triton.jit
def key_words(k0, k1, k2, k3):
    """The int32 kernel arguments of a key as uint32 (bit patterns)."""
    return k0.to(tl.uint32), k1.to(tl.uint32), k2.to(tl.uint32), k3.to(tl.uint32)


@triton.jit(do_not_specialize=["n", "k0", "k1", "k2", "k3"])
def _gaussian_kernel(out_ptr, n, k0, k1, k2, k3, std, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w0, w1, w2, w3 = key_words(k0, k1, k2, k3)
    z = gaussian_at(offs.to(tl.uint64), w0, w1, w2, w3) * std
    store_f32(out_ptr, offs, round_to(z, IS_BF16), mask, IS_BF16)


@triton.jit(do_not_specialize=["n", "k0", "k1", "k2", "k3"])
def _bernoulli_kernel(out_ptr, p_ptr, n, k0, k1, k2, k3, p_scalar, PER_ENTRY: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w0, w1, w2, w3 = key_words(k0, k1, k2, k3)
    word = entry_word(offs.to(tl.uint64), w0, w1, w2, w3)
    if PER_ENTRY:
        t = keep_threshold(tl.load(p_ptr + offs, mask=mask, other=1.0))
    else:
        t = keep_threshold(tl.zeros([BLOCK], tl.float32) + p_scalar)
    keep = (word >> 8).to(tl.float32) < t
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=mask)


def as_int32(word):
    """A uint32 as the int32 with the same bits (kernel arguments keep one type: no recompiles)."""
    word = int(word) & 0xFFFFFFFF
    return word - (1 << 32) if word >= 1 << 31 else word


def gaussian_fill_(out, key, std):
    """out (contiguous float32/bfloat16, CUDA or interpreted CPU) = round(std * z); returns out."""
    n = out.numel()
    block = block_for(n, out.device)
    _gaussian_kernel[(triton.cdiv(n, block),)](
        out, n, *(as_int32(w) for w in key), float(std), out.dtype == torch.bfloat16, block,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


def bernoulli_fill_(out, p, key):
    """out (contiguous bool) = keep flags; p a float or a float32 tensor of out's size."""
    n = out.numel()
    block = block_for(n, out.device)
    per_entry = isinstance(p, torch.Tensor)
    _bernoulli_kernel[(triton.cdiv(n, block),)](
        out.view(torch.uint8), p if per_entry else out, n, *(as_int32(w) for w in key),
        0.0 if per_entry else float(p), per_entry, block, enable_fp_fusion=False,
    )  # fmt: skip
    return out
