"""Helpers shared by the Triton kernel files: dtype conversion and launch sizes.

Every kernel file loads and stores its fp32 / bf16 tensors through these, so the numerics of the
spec hold in one place:

    load_f32(ptr, offs, mask, IS_BF16)      fp32 or bf16 -> fp32 (bf16 widened by a 16-bit shift:
                                            exact, NaN payload kept)
    round_to(v, IS_BF16)                    fp32 -> nearest value of the tensor dtype (ties to
                                            even), returned as fp32; NaN -> the quiet NaN 0x7fc0
    store_f32(ptr, offs, v, mask, IS_BF16)  store a value already rounded by round_to

bf16 is converted with integer bit operations, which are exact in Triton's interpreter too (its own
fp32->bf16 cast does not round to nearest even); NaN rounds to 0x7fc0, as in torch.

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
