"""The CUDA C++ top-k kernels (csrc/cuda/topk.cu) on the CPU, through their real launcher.

tests/cuda_emu is a CPU twin of the GPU: a SIMT emulator (one fiber per CUDA thread, random
interleaving between barriers, blocks in a random order; emu.h says what it cannot check) under
which topk.cu compiles unmodified as host C++. g++ builds it once per session into a temporary
directory. fedkern.cuda.runtime.kernel / on_torch_stream and the SM count are monkeypatched so that
fedkern/cuda/topk.py runs unchanged on CPU tensors (their data_ptr()s are host pointers) and every
launch goes to the emulator; the launcher's buffers get poisoned guard zones (GuardedTorch). The
results are compared bit for bit with a brute-force reference of SPEC.md ops 1-3.

Without g++ (or off Linux) the module is skipped, an error on CI (CI=true). CuPy is never imported.
Inputs and thread interleavings are fresh each run, drawn from the `gen` fixture's printed seed.
"""

from __future__ import annotations

import contextlib
import ctypes

import pytest
import torch
from conftest import DTYPES, GuardedTorch, emu_launch, oracle_topk, rand, same_bits

import fedkern.cuda.runtime as fc
import fedkern.cuda.topk as ft

OPS = ["topk", "ef14", "ef21"]
MODE_CAND, MODE_FULL = 1, 2  # ctrl[kMode] after pass 1 (topk.cu)
LR = 0.37


class Emulator:
    """What fedkern.cuda.runtime.kernel returns under the `emu` fixture; a test's launch log."""

    def __init__(self, dll, seed):
        self.dll = dll
        self.seed = seed  # one per launch, counting up: thread interleaving and block order
        self.modes: list[int] = []  # ctrl[kMode] after each pass 1
        self.launches: list[tuple[str, int]] = []  # (kernel, grid size)
        self.memory = GuardedTorch()  # the launcher's buffers

    def kernel(self, name, func, device_index, defines=()):
        assert name == "topk" and device_index == 0
        d = dict(x[2:].split("=") for x in defines)
        if func != "fk_topk_tile_reduce":  # the module built with these defines has this kernel
            op = OPS[int(d["FK_TOPK_OP"])]
            dt = "bf16" if d["FK_TOPK_BF16"] == "1" else "f32"
            assert func.endswith(f"_{op}_{dt}_v{d['FK_TOPK_VEC']}"), (func, defines)
        return lambda grid, block, args: self.launch(func, grid, block, args)

    def launch(self, func, grid, block, args):
        self.seed += 1
        emu_launch(self.dll, func, grid, block, args, self.seed)
        self.launches.append((func, grid[0]))
        if func.startswith("fk_topk_pass1_"):
            self.modes.append(ctypes.c_uint64.from_address(int(args[7])).value)


@pytest.fixture
def emu(libemu, monkeypatch, gen):
    """Routes fedkern.cuda.topk's launches to the emulator and its buffers through GuardedTorch;
    returns configure(sm, min_tile, cap), which returns the Emulator.

    sm: the SM count (tiles = min(4 sm, ceil(n / min_tile))); cap: None for the launcher's candidate
    capacity, else a function (n, k) -> capacity (0 forces the slow path)."""
    emulator = Emulator(libemu, int(torch.randint(0, 2**62, (1,), generator=gen)))
    monkeypatch.setattr(fc, "kernel", emulator.kernel)
    monkeypatch.setattr(ft, "torch", emulator.memory)
    monkeypatch.setattr(fc, "on_torch_stream", lambda device: contextlib.nullcontext(0))
    plan = ft._plan

    def configure(sm=2, min_tile=1 << 14, cap=None):
        monkeypatch.setattr(ft, "_sm_count", lambda device_index: sm)
        monkeypatch.setattr(ft, "_MIN_TILE", min_tile)

        def capped_plan(n, k, vec, sm_count):
            tiles, chunk, c = plan(n, k, vec, sm_count)
            return tiles, chunk, c if cap is None else cap(n, k)

        monkeypatch.setattr(ft, "_plan", capped_plan)
        return emulator

    return configure


# ---- inputs and the reference --------------------------------------------------------------------


def make(kind, n, dtype, gen):
    """conftest.rand's kinds, plus "zeros" (95% zeros of both signs), "denorm" (all subnormal, and
    so are EF14's and EF21's results) and "wild" (NaNs of both signs and random payloads, +-inf,
    +-0, subnormals, values near the fp32 maximum, small and unit-size normals)."""
    if kind in ("normal", "ties", "special", "equal"):
        return rand(n, dtype, gen, kind=kind)
    if kind == "zeros":
        x = torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0).double()
        some = torch.rand(n, generator=gen) < 0.05
        x[some] = torch.randn(int(some.sum()), generator=gen, dtype=torch.float64)
        return x.to(dtype)
    if kind == "denorm":
        return (torch.randn(n, generator=gen, dtype=torch.float64) * 1e-39).to(dtype)
    assert kind == "wild", kind
    pick = torch.randint(0, 6, (n,), generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    choices = [r * 1e-3, r * 1e-40, r.sign() * 3e38, sign * float("inf"), sign * 0.0, r]
    x = torch.stack(choices)[pick, torch.arange(n)].to(dtype)
    nan = torch.rand(n, generator=gen) < 0.1
    wide = dtype == torch.float32
    exp, top, sign_bit = (0x7F800000, 1 << 23, 1 << 31) if wide else (0x7F80, 1 << 7, 1 << 15)
    payload = torch.randint(1, top, (n,), generator=gen) | exp
    negative = torch.rand(n, generator=gen) < 0.5
    bits = torch.where(negative, payload - sign_bit, payload)  # as the signed integer view
    view = x.view(torch.int32 if wide else torch.int16)
    view[nan] = bits[nan].to(view.dtype)
    return x


def inputs(op, kind, n, dtype, aligned, gen):
    """(p0, p1) as the op takes them; unaligned: one element past a 16-byte boundary (V = 1)."""

    def one():
        x = make(kind, n + 1, dtype, gen)
        return x[:n].clone() if aligned else x[1:]

    p0 = one()
    p1 = None if op == "topk" else one()
    for p in (p0, p1):
        assert p is None or (p.data_ptr() % 16 == 0) == aligned
    return p0, p1


def selected(op, p0, p1):
    """The tensor whose keys are ranked: x, a = round(e + lr g) or d = round(g - s), fp32 math."""
    if op == "topk":
        return p0
    if op == "ef14":
        return (p1.float() + torch.tensor(LR, dtype=torch.float32) * p0.float()).to(p0.dtype)
    return (p0.float() - p1.float()).to(p0.dtype)


def reference(op, p0, p1, k):
    """(values, indices, p1 after the op) of SPEC.md ops 1-3; p0 and p1 are left as they are."""
    a = selected(op, p0, p1)
    idx = oracle_topk(a, k)
    values = a[idx].clone()
    if op == "topk":
        return values, idx, None
    if op == "ef14":
        a = a.clone()
        a[idx] = 0
        return values, idx, a
    s = p1.clone()
    s[idx] = (p1[idx].float() + values.float()).to(p0.dtype)
    return values, idx, s


def run(op, p0, p1, k):
    if op == "topk":
        return ft.topk_compress(p0, k)
    if op == "ef14":
        return ft.ef14_topk_(p0, p1, k, LR)
    return ft.ef21_topk_(p0, p1, k)


def verify(emulator, op, p0, p1, k, what):
    """Runs one op through the emulator against the reference; returns the mode pass 1 chose."""
    want_v, want_i, want_p1 = reference(op, p0, p1, k)
    p0_before = p0.clone()
    got_v, got_i = run(op, p0, p1, k)
    emulator.memory.check(what)
    assert got_i.dtype == torch.int64 and got_i.shape == (k,), what
    assert torch.equal(got_i, want_i), f"{what}: indices differ at {(got_i != want_i).nonzero()}"
    assert same_bits(got_v, want_v), f"{what}: values"
    assert same_bits(p0, p0_before), f"{what}: input 0 changed"
    if want_p1 is not None:
        assert same_bits(p1, want_p1), f"{what}: error / state"
    return emulator.modes[-1]


def check(emulator, op, kind, n, k, dtype, aligned, gen):
    """verify() on fresh inputs of one kind."""
    p0, p1 = inputs(op, kind, n, dtype, aligned, gen)
    what = f"{op} {kind} n={n} k={k} {dtype} {'aligned' if aligned else 'unaligned'}"
    return verify(emulator, op, p0, p1, k, what)


# ---- cases ---------------------------------------------------------------------------------------

VARIANTS = [
    pytest.param(op, dtype, aligned, id=f"{op}-{str(dtype)[6:]}-{'vec' if aligned else 'scalar'}")
    for op in OPS
    for dtype in DTYPES
    for aligned in (True, False)
]


def forced_full(n, k):
    return 0  # candidate capacity 0: pass 1 always picks the slow path


@pytest.mark.parametrize("op,dtype,aligned", VARIANTS)
def test_variant(emu, op, dtype, aligned, gen):
    """Each compiled variant (op x dtype x vector width) on every kind of input, in both modes.

    n = 2053 over 8 tiles of ~256 elements: a partial last vector, tie ranks and candidate slots
    carried across tiles, few candidates over 8 tiles for small k (empty tiles in count / write).
    Candidate mode is what the launcher picks at this size; the slow path is forced."""
    n = 2053
    emulator = emu(sm=2, min_tile=256)
    for kind, k in [
        ("wild", 1), ("special", 2), ("normal", 5), ("ties", 700), ("zeros", 400),
        ("denorm", 1500), ("equal", 1000), ("wild", n - 1), ("normal", n),
    ]:  # fmt: skip
        assert check(emulator, op, kind, n, k, dtype, aligned, gen) == MODE_CAND
    emulator = emu(sm=2, min_tile=256, cap=forced_full)
    for kind, k in [("special", 1), ("zeros", 300), ("ties", 1234), ("denorm", 64), ("wild", n)]:
        assert check(emulator, op, kind, n, k, dtype, aligned, gen) == MODE_FULL


@pytest.mark.parametrize("op,dtype,aligned", VARIANTS)
def test_multiround_tiles(emu, op, dtype, aligned, gen):
    """The launcher's own tiling (3 tiles of >= 13335 elements): several kUnroll rounds per tile
    with counts carried from round to round, in both modes; candidate buffers of the real size."""
    n = 40_003
    emulator = emu(sm=2)
    for kind, k in [("normal", 4000), ("ties", 20_000), ("zeros", 3000)]:
        assert check(emulator, op, kind, n, k, dtype, aligned, gen) == MODE_CAND
    emulator = emu(sm=2, cap=forced_full)
    for kind, k in [("wild", 1), ("ties", 20_000)]:
        assert check(emulator, op, kind, n, k, dtype, aligned, gen) == MODE_FULL
    assert {grid for _, grid in emulator.launches} == {3}


@pytest.mark.parametrize("op", OPS)
def test_tiny(emu, op, gen):
    """n from 1 to a few vectors over up to 8 tiles of 2+ elements (tiles shorter than a vector,
    empty tiles), every dtype and alignment, k = 1, n / 2 and n, in both modes."""
    for cap in (None, forced_full):
        emulator = emu(sm=2, min_tile=2, cap=cap)
        for n in (1, 2, 3, 5, 8, 9, 31, 33):
            for dtype in DTYPES:
                for aligned in (True, False):
                    for k in sorted({1, max(1, n // 2), n}):
                        kind = "wild" if (k + n) % 2 else "ties"
                        mode = check(emulator, op, kind, n, k, dtype, aligned, gen)
                        assert mode == (MODE_CAND if cap is None else MODE_FULL)


@pytest.mark.parametrize(
    "op,dtype,aligned",
    [
        ("topk", torch.float32, True),
        ("ef14", torch.bfloat16, False),
        ("ef21", torch.bfloat16, True),
    ],
    ids=["topk-float32-vec", "ef14-bfloat16-scalar", "ef21-bfloat16-vec"],
)
def test_more_than_256_tiles(emu, op, dtype, aligned, gen):
    """260 tiles: the last-block scans over the tiles (tile_reduce, count) run two 256-tile chunks
    with carries, in both modes, and k = 1 leaves most of the 260 candidate tiles empty."""
    n = 260 * 16 - 5
    emulator = emu(sm=65, min_tile=16)
    assert check(emulator, op, "ties", n, n // 3, dtype, aligned, gen) == MODE_CAND
    assert check(emulator, op, "normal", n, 1, dtype, aligned, gen) == MODE_CAND
    emulator = emu(sm=65, min_tile=16, cap=forced_full)
    assert check(emulator, op, "ties", n, n // 2, dtype, aligned, gen) == MODE_FULL
    assert {grid for _, grid in emulator.launches} == {260}


@pytest.mark.parametrize(
    "op,dtype", [("topk", torch.bfloat16), ("ef14", torch.float32), ("ef21", torch.float32)]
)
def test_capacity_boundary(emu, op, dtype, gen):
    """Candidate mode iff M = #{keys whose top 12 bits are >= those of the k-th key} <= cap: with
    cap = M the candidate buffer is filled exactly, with cap = M - 1 the slow path runs."""
    n, k = 3001, 500
    p0, p1 = inputs(op, "normal", n, dtype, True, gen)
    key = selected(op, p0, p1).float().view(torch.int32) & 0x7FFFFFFF
    top = key >> 19
    m = int((top >= top.sort(descending=True).values[k - 1]).sum())
    assert k <= m < n
    for cap, mode in [(m, MODE_CAND), (m - 1, MODE_FULL)]:
        emulator = emu(sm=2, min_tile=512, cap=lambda n_, k_, cap=cap: cap)
        q0, q1 = p0.clone(), None if p1 is None else p1.clone()
        assert verify(emulator, op, q0, q1, k, f"{op} {dtype} cap={cap}") == mode


@pytest.mark.parametrize("op,dtype", [(op, dt) for op in OPS for dt in DTYPES])
def test_modes_taken_naturally(emu, op, dtype, gen):
    """With the launcher's real capacity (k + max(n / 16, 65536) < n): smooth data takes the
    candidate path, mostly zeros with k > #nonzero the slow path. EF14's e + lr g and EF21's
    g - s have the union of two 5% supports as nonzeros (9.75% of n = 9753 expected, sd 94): k =
    15,000 exceeds it by over 50 sd for every draw, and k + 65536 < n keeps the real capacity."""
    n = 100_003
    emulator = emu(sm=2)
    for kind, k, mode in [("normal", 40, MODE_CAND), ("zeros", 15_000, MODE_FULL)]:
        assert ft._plan(n, k, 1, 2)[2] < n
        assert check(emulator, op, kind, n, k, dtype, True, gen) == mode
