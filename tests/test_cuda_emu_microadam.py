"""The CUDA C++ MicroAdam step (csrc/cuda/microadam.cu) on the CPU, through its real launcher.

The SIMT emulator of tests/cuda_emu (see test_cuda_emu.py and emu.h: one fiber per CUDA thread,
random interleaving between barriers, blocks in a random order) runs fedkern/cuda/microadam.py
unchanged on CPU tensors: fedkern.cuda.runtime.kernel / on_torch_stream are monkeypatched, the
launcher's buffers (table, block map) and every parameter and state tensor lie between poisoned
guard zones (GuardedTorch). Each step is compared bit for bit with fedkern.reference.microadam
from the same inputs -- the parameters and every state tensor, over consecutive steps so that the
window wraps -- NaN payloads aside (the GPU's add.rn returns the canonical NaN; see microadam.cu).

Without g++ (or off Linux) the module is skipped, an error on CI (CI=true). CuPy is never imported.
Inputs and thread interleavings are fresh each run, drawn from the `gen` fixture's printed seed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import GuardedTorch, emu_launch, rand, same_bits

import fedkern.cuda.microadam as fm
import fedkern.cuda.runtime as fc
from fedkern.ops.microadam import constants
from fedkern.reference import microadam as ref

F32, BF16 = torch.float32, torch.bfloat16
STATE = ("ef", "ef_min", "ef_scale", "idx", "val")
HYPER = {"lr": 3e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}


class ExactSqrtTorch:
    """`torch` for the reference with a correctly rounded float32 sqrt, as the spec, the C++ core
    and the GPU's sqrt.rn have: torch's CPU sqrt (vectorised) misrounds about 0.6% of float32
    inputs by one ulp, which changes the update of those parameters."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def sqrt(x):
        return torch.sqrt(x.double()).to(x.dtype)  # double rounding is exact for sqrt (53 >= 50)


class Emulator:
    """What fedkern.cuda.runtime.kernel returns under the `emu` fixture; a test's launch log.
    remap: kernel name -> the variant actually run (planted mutants)."""

    def __init__(self, dll, seed):
        self.dll = dll
        self.seed = seed
        self.launches: list[tuple[str, int, int]] = []  # (kernel, grid, threads)
        self.memory = GuardedTorch()
        self.remap: dict[str, str] = {}

    def kernel(self, name, func, device_index, defines=()):
        assert name == "microadam" and device_index == 0
        d = dict(x[2:].split("=") for x in defines)
        dt = "bf16" if d["FK_MA_BF16"] == "1" else "f32"
        assert func == f"fk_microadam_step_{dt}_d{d['FK_MA_D']}", (func, defines)
        return lambda grid, block, args: self.launch(self.remap.get(func, func), grid, block, args)

    def launch(self, func, grid, block, args):
        self.seed += 1
        emu_launch(self.dll, func, grid, block, args, self.seed)
        self.launches.append((func, grid[0], block[0]))


@pytest.fixture
def emu(libemu, monkeypatch, gen):
    """Routes fedkern.cuda.microadam's launches to the emulator; returns the Emulator."""
    emulator = Emulator(libemu, int(torch.randint(0, 2**62, (1,), generator=gen)))
    monkeypatch.setattr(fc, "kernel", emulator.kernel)
    monkeypatch.setattr(fc, "on_torch_stream", lambda device: contextlib.nullcontext(0))
    monkeypatch.setattr(fm, "torch", emulator.memory)
    monkeypatch.setattr(ref, "_OWNERS", {})  # block maps are built (and guarded) in each test
    monkeypatch.setattr(ref, "torch", ExactSqrtTorch())
    return emulator


def grad(kind, n, dtype, gen):
    """normal; ties (many equal |a|, zeros of both signs); special (+-0, +-inf, NaN in 30%);
    zeros (all +-0); equal (all 1.5); denorm (subnormal, so are the residuals and scales)."""
    if kind == "denorm":
        return (torch.randn(n, generator=gen, dtype=torch.float64) * 1e-39).to(dtype)
    if kind == "zeros":
        return torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0).to(dtype)
    if kind == "ties":
        g = torch.randint(-2, 3, (n,), generator=gen).double() * 0.5
        g[torch.rand(n, generator=gen) < 0.2] = -0.0
        return g.to(dtype)
    return rand(n, dtype, gen, kind=kind)


def same(got, want):
    if got.dtype in (torch.uint8, torch.int16):
        return torch.equal(got, want)
    return same_bits(got, want)


def dirty_window(state, n, D, K, gen):
    """The unused slots of a last block shorter than K hold distinct indices >= its length (never
    read as moments) and random values instead of -1 / 0: each step must overwrite its row's."""
    L = n - (-(-n // D) - 1) * D
    if L < K:
        cols = slice(state["idx"].shape[1] - (K - L), state["idx"].shape[1])
        state["idx"][:, cols] = torch.arange(L, K, dtype=torch.int16)
        state["val"][:, cols] = torch.randn(state["idx"].shape[0], K - L, generator=gen).bfloat16()
    return state


def run(
    emulator, specs, D, K, Q, m, steps, gen, kinds=("normal",), wd=0.1, offsets=None, ef_offset=0,
    p0="normal", grad_offsets=None,
):  # fmt: skip
    """specs: [(n, dtype)]; `steps` steps of all tensors in one call each (the step number t of
    tensor i is t + i, so that tensors sit at different window rows); the launcher against the
    reference from the same state, bit for bit, after every step. offsets[i]: tensor i's params and
    grads start that many elements past a 16-byte boundary (scalar loads), ef that many bytes;
    grad_offsets: the gradients' own (default: offsets); p0: the initial parameters (normal,
    zeros)."""
    offsets = offsets or [0] * len(specs)
    grad_offsets = grad_offsets or offsets
    params = [torch.randn(n, generator=gen).to(dt) for n, dt in specs]
    if p0 == "zeros":
        params = [torch.zeros_like(p) for p in params]
    states = [dirty_window(ref.new_state(n, D, K, Q, m, "cpu"), n, D, K, gen) for n, _ in specs]
    mem = emulator.memory
    for t in range(1, steps + 1):
        kind = kinds[(t - 1) % len(kinds)]
        grads = [grad(kind, n, dt, gen) for n, dt in specs]
        c = constants([t + i for i in range(len(specs))], m, weight_decay=wd * (t % 2), **HYPER)
        consts = [c[x] for x in ("rows", "c1", "c2", "decay", "eps", "w1", "w2")]

        want_p = [p.clone() for p in params]
        want_s = [{x: s[x].clone() for x in STATE} for s in states]
        ref.microadam_step_(want_p, grads, *[[s[x] for s in want_s] for x in STATE], *consts,
                            D, K, Q)  # fmt: skip

        got_p = [mem.wrap(p, offset=o) for p, o in zip(params, offsets, strict=True)]
        got_g = [mem.wrap(g, offset=o) for g, o in zip(grads, grad_offsets, strict=True)]
        got_s = [{x: mem.wrap(s[x], offset=ef_offset * (x == "ef")) for x in STATE} for s in states]
        grads_before = [g.clone() for g in got_g]
        fm.microadam_step_(got_p, got_g, *[[s[x] for s in got_s] for x in STATE], *consts,
                           D, K, Q)  # fmt: skip
        what = f"step {t} ({kind}) D={D} K={K} Q={Q} m={m}"
        mem.check(what)
        for i, (n, dt) in enumerate(specs):
            where = f"{what} tensor {i} (n={n}, {dt})"
            assert same(got_g[i], grads_before[i]), f"{where}: grads changed"
            for x in STATE:
                assert same(got_s[i][x], want_s[i][x]), f"{where}: {x}"
            assert same(got_p[i], want_p[i]), f"{where}: params"
        params = [p.clone() for p in got_p]
        states = [{x: s[x].clone() for x in STATE} for s in got_s]
    return emulator.launches


def test_many_tensors_both_dtypes(emu, gen):
    """Seven tensors of both dtypes in one call (n < D, n = D, n not a multiple of D, several
    blocks, a last block that ends where a bucket starts): one launch per dtype over all their
    blocks; 5 steps wrap the m = 3 window."""
    specs = [(1, F32), (37, BF16), (64, F32), (200, BF16), (261, F32), (130, BF16), (96, F32)]
    launches = run(emu, specs, 64, 5, 16, 3, 5, gen, kinds=("normal", "ties"))
    assert len(launches) == 10  # 2 per step
    want = {
        ("fk_microadam_step_f32_d64", 1 + 1 + 5 + 2, 32),
        ("fk_microadam_step_bf16_d64", 1 + 4 + 3, 32),
    }
    assert set(launches) == want


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,q", [(1, 2), (256, 256), (7, 256), (40, 4)])
def test_k_and_buckets(emu, dtype, k, q, gen):
    """D = 256 (32 threads of 8): k = 1 and k = D, buckets of 2 (four per thread), 4 and D (one
    bucket over the whole block, reduced across the warp); ties, zeros, +-inf, NaN, subnormals."""
    specs = [(3 * 256 - 17, dtype), (100, dtype)]
    run(emu, specs, 256, k, q, 2, 4, gen, kinds=("ties", "special", "denorm", "normal"))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "k,q,kinds",
    [(41, 256, ("normal", "special")), (41, 8, ("denorm", "ties")), (4096, 4096, ("zeros", "ties")),
     (1, 2, ("normal", "zeros"))],
    ids=["k41-q256", "k41-q8", "kD-qD", "k1-q2"],
)  # fmt: skip
def test_default_block(emu, dtype, k, q, kinds, gen):
    """D = 4096 (256 threads of 16): buckets of 2 and 8 (in a thread), 256 (16 threads) and 4096
    (8 warps, through shared memory); k = 1, 41 and D; a partial second block next to a tensor of
    exactly two blocks; all-zero gradients (every key ties at 0), +-inf, NaN and subnormals."""
    specs = [(4096 + 1000, dtype), (2 * 4096, dtype)]
    run(emu, specs, 4096, k, q, 2, 3, gen, kinds=kinds)


def test_large_block(emu, gen):
    """D = 32768 (1024 threads of 32, the moments in 4096-element chunks: 9 for the first tensor,
    2 for the short one): a bucket of D over 32 warps and small buckets, both dtypes."""
    for q, dtype in ((32768, F32), (64, BF16)):
        specs = [(32768 + 5000, dtype), (5000, dtype)]
        run(emu, specs, 32768, 300, q, 2, 2, gen, kinds=("ties", "normal"))


@pytest.mark.parametrize("m", [1, 4])
def test_window_lengths(emu, m, gen):
    """m = 1 (the window is the row just written) and m = 4 over 9 steps (two wraps)."""
    specs = [(150, F32), (150, BF16)]
    run(emu, specs, 64, 6, 32, m, 9, gen, kinds=("normal", "ties", "normal", "special"))


def test_unaligned_and_equal(emu, gen):
    """Parameters and gradients one element past a 16-byte boundary (scalar loads and stores) next
    to aligned ones; all |g| equal (every key ties), then the wrapped window; at D = 4096 also
    the error feedback off its alignment (byte loads); then parameters and gradients aligned
    differently. The emulator is built with -fsanitize=alignment: a vector access the GPU would
    fault on aborts the run."""
    specs = [(300, F32), (300, BF16), (129, F32)]
    run(emu, specs, 64, 9, 8, 2, 4, gen, kinds=("equal", "normal"), offsets=[1, 1, 0])
    run(emu, [(5000, BF16)], 4096, 41, 256, 2, 2, gen, offsets=[3], ef_offset=1)
    run(emu, specs, 64, 9, 8, 2, 2, gen, offsets=[0, 0, 1], grad_offsets=[1, 1, 0])


def test_underflowing_moments(emu, gen):
    """Zero parameters and subnormal gradients: v * v underflows, so mom2 = 0 where mom1 != 0 and
    the update -(c1 * mom1) / eps must still be taken (the kernel skips it only if both are 0)."""
    run(emu, [(100, F32), (100, BF16)], 64, 8, 16, 2, 3, gen, kinds=("denorm",), wd=0.0, p0="zeros")


def test_planted_mutant(emu, gen):
    """The D = 64 variant run for D = 256 (same thread count, wrong compiled D) is caught."""
    emu.remap = {"fk_microadam_step_f32_d256": "fk_microadam_step_f32_d64"}
    with pytest.raises(AssertionError, match="ef|idx|val|params"):
        run(emu, [(500, F32)], 256, 9, 16, 2, 1, gen)
