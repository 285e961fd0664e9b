"""Helpers shared by the Triton kernel files: dtype conversion, keyed permutations, launch sizes.

Every kernel file loads and stores its fp32 / bf16 tensors through these, so the numerics of the
spec hold in one place:

    load_f32(ptr, offs, mask, IS_BF16)      fp32 or bf16 -> fp32 (bf16 widened by a 16-bit shift:
                                            exact, NaN payload kept)
    round_to(v, IS_BF16)                    fp32 -> nearest value of the tensor dtype (ties to
                                            even), returned as fp32; NaN -> the quiet NaN 0x7fc0
    store_f32(ptr, offs, v, mask, IS_BF16)  store a value already rounded by round_to

bf16 is converted with integer bit operations, which are exact in Triton's interpreter too (its own
fp32->bf16 cast does not round to nearest even); NaN rounds to 0x7fc0, as in torch.

Keyed permutations (rand-k, the sketches, the clients' sampling; the construction is described in
randk.py's docstring): ``feistel(x, h, mask, k0..k7)`` is one pass of the 8-round Feistel network
on x < 2^(2h); ``feistel_perm(pos, valid, n, h, k0..k7)`` is perm(pos) of [0, n) with cycle
walking (masked lanes: 0); ``sample_index(..., MODE)`` the same, or the identity for MODE 0 (full
batch); ``load_round_keys(kp)`` the 8 round keys stored as int64 at kp; ``half_width(m)`` (device)
and ``half_bits(n)`` (host) the half width h: the smallest h >= 1 with 4^h >= n.

``block_for(count, device)`` is the elements per program of a 1-D pass; ``row_tiles(n, rows,
device, tiling)`` cuts a pass over `rows` rows of n elements into (tile, row) programs.  Both use
large blocks on CPU tensors, where the kernels run in Triton's interpreter and every program costs
milliseconds.
"""

from typing import NamedTuple

import triton
import triton.language as tl

BLOCK = 1024  # elements per program of a 1-D pass (GPU)
BLOCK_INTERPRETED = 16384  # the same in the interpreter (CPU tensors)


@triton.jit
def load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """Load fp32 or bf16 as fp32 (bf16 widened by a 16-bit shift: exact, NaN payload kept)."""
    if IS_BF16:
        h = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def round_to(v, IS_BF16: tl.constexpr):
    """fp32 -> nearest value of the tensor dtype (ties to even), returned as fp32; NaN -> 0x7fc0."""
    if IS_BF16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        r = tl.where(v != v, 0x7FC00000, r)
        return r.to(tl.float32, bitcast=True)
    else:
        return v


@triton.jit
def store_f32(ptr, offs, v, mask, IS_BF16: tl.constexpr):
    """Store a value already rounded by round_to (so dropping the low 16 bits is exact for bf16)."""
    if IS_BF16:
        h = (v.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(ptr + offs, h.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v, mask=mask)


@triton.jit
def mix32(x):
    """The 32-bit finalizer of the Feistel round function (uint32, wrapping)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def feistel(x, h, mask, k0, k1, k2, k3, k4, k5, k6, k7):
    """One pass of the 8-round network on uint64 x < 2^(2h); mask = 2^h - 1 as uint32."""
    left = (x >> h).to(tl.uint32)
    right = (x & mask.to(tl.uint64)).to(tl.uint32)
    left, right = right, left ^ (mix32(right ^ k0) & mask)
    left, right = right, left ^ (mix32(right ^ k1) & mask)
    left, right = right, left ^ (mix32(right ^ k2) & mask)
    left, right = right, left ^ (mix32(right ^ k3) & mask)
    left, right = right, left ^ (mix32(right ^ k4) & mask)
    left, right = right, left ^ (mix32(right ^ k5) & mask)
    left, right = right, left ^ (mix32(right ^ k6) & mask)
    left, right = right, left ^ (mix32(right ^ k7) & mask)
    return (left.to(tl.uint64) << h) | right.to(tl.uint64)


@triton.jit
def feistel_perm(pos, valid, n, h, k0, k1, k2, k3, k4, k5, k6, k7):
    """perm(pos) (int64) of the keyed permutation of [0, n) for int64 lanes pos < 2^(2h) where
    valid (0 elsewhere); keys uint32 (scalars, or one per lane). Cycle walking: a value >= n goes
    through the network again, and every walk ends (randk.py's docstring)."""
    mask = (tl.zeros_like(pos) + 0xFFFFFFFF).to(tl.uint32) >> (32 - h)
    limit = n.to(tl.uint64)
    x = feistel(tl.where(valid, pos, 0).to(tl.uint64), h, mask, k0, k1, k2, k3, k4, k5, k6, k7)
    walking = valid & (x >= limit)
    while tl.max(walking.to(tl.int32), 0) > 0:
        y = feistel(x, h, mask, k0, k1, k2, k3, k4, k5, k6, k7)
        x = tl.where(walking, y, x)
        walking = walking & (x >= limit)
    return tl.where(valid, x.to(tl.int64), 0)


@triton.jit
def sample_index(pos, valid, h, k0, k1, k2, k3, k4, k5, k6, k7, m, MODE: tl.constexpr):
    """Index within a client's m samples at batch positions pos: the identity for MODE 0 (the
    full batch), else feistel_perm of [0, m) (masked lanes: 0)."""
    if MODE == 0:
        return tl.where(valid, pos, 0)
    else:
        return feistel_perm(pos, valid, m, h, k0, k1, k2, k3, k4, k5, k6, k7)


@triton.jit
def load_round_keys(kp):
    """The 8 round keys stored as int64 (uint32 values) at kp, as uint32 scalars."""
    k0, k1 = tl.load(kp).to(tl.uint32), tl.load(kp + 1).to(tl.uint32)
    k2, k3 = tl.load(kp + 2).to(tl.uint32), tl.load(kp + 3).to(tl.uint32)
    k4, k5 = tl.load(kp + 4).to(tl.uint32), tl.load(kp + 5).to(tl.uint32)
    k6, k7 = tl.load(kp + 6).to(tl.uint32), tl.load(kp + 7).to(tl.uint32)
    return k0, k1, k2, k3, k4, k5, k6, k7


@triton.jit
def half_width(m):
    """The Feistel half width for a permutation of [0, m) on the device: the smallest h >= 1 with
    4^h >= m (int32)."""
    h = tl.full([], 1, tl.int32)
    span = tl.full([], 4, tl.int64)
    while span < m:
        span *= 4
        h += 1
    return h


def half_bits(n):
    """The Feistel half width for a permutation of [0, n) on the host (as half_width)."""
    b = max((n - 1).bit_length(), 2)
    return (b + 1) // 2


def block_for(count, device):
    """Elements per program for a pass over ``count`` elements (large programs when interpreted)."""
    block = BLOCK_INTERPRETED if device.type == "cpu" else BLOCK
    return min(block, triton.next_power_of_2(max(count, 16)))


class Tiling(NamedTuple):
    """Launch shape of a tiled pass over rows of n elements (see ``row_tiles``)."""

    block: int = BLOCK  # elements per inner iteration of a program (GPU)
    programs: int = 1024  # programs of a pass over all rows, about (GPU)
    min_tile_blocks: int = 4  # blocks per tile at least (GPU): small per-tile bookkeeping
    block_interpreted: int = BLOCK_INTERPRETED  # the same in the interpreter (CPU tensors)
    tiles_interpreted: int = 8  # tiles per row in the interpreter


def row_tiles(n, rows, device, tiling):
    """(BLOCK, tile, tiles per row) of a pass over n elements in each of `rows` rows: whole-block
    tiles, about ``tiling.programs`` programs in all on a GPU."""
    if device.type == "cpu":
        block = min(tiling.block_interpreted, triton.next_power_of_2(max(n, 16)))
        per_tile = triton.cdiv(triton.cdiv(n, block), tiling.tiles_interpreted)
    else:
        block = min(tiling.block, triton.next_power_of_2(max(n, 16)))
        per_row = max(1, tiling.programs // rows)
        per_tile = max(tiling.min_tile_blocks, triton.cdiv(triton.cdiv(n, block), per_row))
    tile = block * per_tile
    return block, tile, triton.cdiv(n, tile)
