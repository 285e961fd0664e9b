"""TAMUNA's fused server step ``fedkern::tamuna_aggregate_`` on every backend.

Oracles written here from the math (ALGORITHMS.md section 2), never from fedkern's code: the pattern
q [c, p] is materialized by a loop over each coordinate's s slots (the op never builds it), then
float64 gives xbar = (X q).sum(0) / s and H + coef q (xbar - X) to compare within rounding, and a
NumPy float32 transcription of the documented order (slot order from X[h_0], IEEE division, one
subtraction, multiply and add) gives the exact bits every backend must return. Sizes: 1, odd,
s = 1, s = c, s * p < c (cohort rows that hold nothing), c > p, large p. Invariants: every
coordinate has exactly s holders, only held entries are read (un-held X poisoned with NaN) or
written, the holders' H changes sum to zero. Then opcheck, bad input of every argument (H unchanged)
and a hypothesis property against the float32 transcription.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BACKEND_PARAMS,
    EPS,
    backend_fixture,
    device_for,
    fresh_seed,
    interpreted,
    same_bits,
)
from hypothesis import given
from hypothesis import strategies as st

import fedkern
from fedkern.ops import tamuna as T

backend = backend_fixture(T.IMPLS)
agg = torch.ops.fedkern.tamuna_aggregate_
F32 = np.float32
EPS32 = EPS[torch.float32]


# ---- oracles ------------------------------------------------------------------------------------


def holder_rows(c: int, p: int, s: int, perm) -> np.ndarray:
    """int64 [p, s]: the j-th holder of coordinate r is the row of slot (s r + j) mod c."""
    perm = np.asarray(perm, np.int64)
    out = np.empty((p, s), np.int64)
    for r in range(p):
        first = (s * r) % c
        for j in range(s):
            out[r, j] = perm[(first + j) % c]
    return out


def mask(c: int, p: int, s: int, perm) -> np.ndarray:
    """The pattern q, bool [c, p] (q[i, r]: row i holds coordinate r)."""
    q = np.zeros((c, p), bool)
    rows = holder_rows(c, p, s, perm)
    for j in range(s):
        q[rows[:, j], np.arange(p)] = True
    return q


def oracle64(X, H, q, s, coef):
    """float64 (xbar [p], new H [c, p] or None) from the materialized pattern."""
    X64 = X.double().numpy()
    xbar = (X64 * q).sum(0) / s
    if H is None:
        return xbar, None
    return xbar, H.double().numpy() + coef * q * (xbar[None, :] - X64)


def exact32(X, H, perm, s, coef):
    """float32 (xbar, new H or None) in the documented order: the bits every backend returns."""
    c, p = X.shape
    x = X.numpy().astype(F32)
    rows = holder_rows(c, p, s, perm.numpy())
    cols = np.arange(p)
    with np.errstate(all="ignore"):
        acc = x[rows[:, 0], cols].copy()
        for j in range(1, s):
            acc = (acc + x[rows[:, j], cols]).astype(F32)
        xbar = (acc / F32(s)).astype(F32)
        if H is None:
            return xbar, None
        h = H.numpy().astype(F32).copy()
        k = F32(coef)
        for j in range(s):
            step = (k * (xbar - x[rows[:, j], cols]).astype(F32)).astype(F32)
            h[rows[:, j], cols] = (h[rows[:, j], cols] + step).astype(F32)
    return xbar, h


def bits_equal(got: torch.Tensor, want: np.ndarray) -> bool:
    return same_bits(got, torch.from_numpy(np.ascontiguousarray(want, F32)))


def call(backend, X, H, perm, s, coef, check_perm=True):
    """The op on the backend's device (CUDA for Triton when a GPU exists) on copies of the CPU
    inputs; H's update is copied back into H. Returns xbar on the CPU."""
    dev = device_for(backend)
    if dev == "cpu":
        return agg(X, H, perm, s, coef, check_perm)
    Hd = None if H is None else H.to(dev)
    xbar = agg(X.to(dev), Hd, perm.to(dev), s, coef, check_perm)
    assert xbar.device.type == "cuda"
    if H is not None:
        H.copy_(Hd.cpu())
    return xbar.cpu()


def inputs(c, p, gen, with_h=True):
    X = torch.randn(c, p, generator=gen) * 3
    H = torch.randn(c, p, generator=gen) if with_h else None
    perm = torch.randperm(c, generator=gen)
    return X, H, perm


# ---- values -------------------------------------------------------------------------------------

# (c, p, s): sizes 1, odd, s = 1, s = c, s * p < c (rows holding nothing), c > p, large p; the
# pattern's period c / gcd(s, c) both small (the C++ core walks residues) and large (coordinates)
SHAPES = [(1, 1, 1), (2, 1, 1), (3, 7, 2), (5, 37, 5), (7, 13, 1), (100, 10, 4), (9, 4, 2),
          (10, 41, 4), (6, 5000, 3), (64, 2049, 7), (101, 700, 3), (250, 3001, 6),
          (100, 10_000, 4)]  # fmt: skip


def shrink(backend, c, p):
    """Triton's interpreter: at most ~600 coordinates."""
    return (c, min(p, 600)) if interpreted(backend) else (c, p)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda t: "c{}-p{}-s{}".format(*t))
@pytest.mark.parametrize("with_h", [True, False], ids=["H", "noH"])
def test_matches_oracles(backend, shape, with_h):
    c, p, s = shape
    c, p = shrink(backend, c, p)
    gen = torch.Generator().manual_seed(fresh_seed())
    X, H, perm = inputs(c, p, gen, with_h)
    coef = 0.37
    X0 = X.clone()
    H0 = None if H is None else H.clone()
    xbar = call(backend, X, H, perm, s, coef)
    assert xbar.dtype == torch.float32 and xbar.shape == (p,)
    assert torch.equal(X, X0)  # X is read only
    q = mask(c, p, s, perm.numpy())
    want_x, want_h = oracle64(X0, H0, q, s, coef)
    amax = float(X0.abs().max())
    # s fp32 adds and one division: (s + 1) roundings of at most max|X| each
    tol = {"rtol": 2 * EPS32, "atol": 2 * (s + 1) * EPS32 * amax}
    torch.testing.assert_close(xbar.double(), torch.from_numpy(want_x), **tol)
    ex_x, ex_h = exact32(X0, H0, perm, s, coef)
    assert bits_equal(xbar, ex_x)
    if with_h:
        hmax = float(H0.abs().max())
        tol_h = {"rtol": 2 * EPS32, "atol": 4 * EPS32 * (hmax + coef * (s + 3) * 2 * amax)}
        torch.testing.assert_close(H.double(), torch.from_numpy(want_h), **tol_h)
        assert bits_equal(H, ex_h)
        idle = ~q.any(1)  # cohort rows holding no coordinate (s * p < c) keep their H bit for bit
        assert same_bits(H[torch.from_numpy(idle)], H0[torch.from_numpy(idle)])
        if s * p < c:
            assert idle.sum() == c - s * p


def test_bit_identical_to_reference(backend):
    """Every backend returns the reference's bits (xbar and H), on values with cancellation."""
    c, p = shrink(backend, 23, 3001)
    gen = torch.Generator().manual_seed(fresh_seed())
    X, H, perm = inputs(c, p, gen)
    X[::3] *= 1e4
    H2 = H.clone()
    for s in (1, 4, c):
        got = call(backend, X, H, perm, s, 2.5)
        with fedkern.backend("reference"):
            ref = call(backend, X, H2, perm, s, 2.5)
        assert same_bits(got, ref) and same_bits(H, H2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf in Triton's interpreter
def test_signed_zeros_and_specials(backend):
    """The sum starts from the first holder's value: s = 1 keeps -0.0 (a sum from +0.0 would
    not); inf and NaN propagate as IEEE arithmetic says, with the same bits everywhere."""
    c, p = 4, 9
    X = torch.full((c, p), -0.0)
    H = torch.zeros(c, p)
    perm = torch.tensor([2, 0, 3, 1])
    xbar = call(backend, X, H, perm, 1, 1.0)
    assert bool(torch.signbit(xbar).all())
    assert bits_equal(xbar, exact32(X, None, perm, 1, 1.0)[0])
    X = torch.tensor([[1.0, float("inf"), -0.0, float("nan"), 2.0, -0.0]] * 3)
    X[1, 1] = -float("inf")
    for s in (1, 2, 3):
        H = torch.ones(3, 6)
        want_x, want_h = exact32(X, H, torch.tensor([1, 2, 0]), s, 0.5)
        xbar = call(backend, X, H, torch.tensor([1, 2, 0]), s, 0.5)
        assert bits_equal(xbar, want_x) and bits_equal(H, want_h)


# ---- the invariants of the pattern and of the update --------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_only_held_entries_are_read_and_written(backend):
    """Un-held entries of X are NaN and un-held entries of H hold a sentinel: xbar stays finite
    and every un-held H entry keeps its bits. Negative control: the eager masked sum over the whole
    stack ((X * q).sum(0), which reads every entry) turns the same poison into NaN."""
    c, p, s = 12, 301, 5
    c, p = shrink(backend, c, p)
    gen = torch.Generator().manual_seed(fresh_seed())
    X, H, perm = inputs(c, p, gen)
    q = torch.from_numpy(mask(c, p, s, perm.numpy()))
    assert bool((q.sum(0) == s).all())  # every coordinate has exactly s holders
    X[~q] = float("nan")
    H[~q] = 7.0
    H0 = H.clone()
    xbar = call(backend, X, H, perm, s, 0.8)
    assert bool(torch.isfinite(xbar).all())
    assert bool(torch.isfinite(H).all())
    assert same_bits(H[~q], H0[~q])
    assert not bool(torch.isfinite((X * q).sum(0)).all())  # the negative control sees the poison


@pytest.mark.parametrize("cps", [(10, 1000, 4), (7, 50, 7), (13, 200, 1), (100, 30, 3)])
def test_every_coordinate_has_exactly_s_holders(backend, cps):
    """The round's pattern: exactly s holders per coordinate, and balanced rows: per period of
    c / g coordinates (g = gcd(s, c)) every slot holds s / g of them, so row counts differ by at
    most s / g. And the op reads exactly these: X = 1 at held entries, NaN elsewhere, gives 1."""
    c, p, s = cps
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(fresh_seed()))
    q = mask(c, p, s, perm.numpy())
    assert (q.sum(0) == s).all()
    per_row = q.sum(1)
    assert per_row.sum() == s * p
    assert per_row.max() - per_row.min() <= s // np.gcd(s, c)
    X = torch.from_numpy(np.where(q, 1.0, np.nan).astype(F32))
    assert torch.equal(call(backend, X, None, perm, s, 1.0), torch.ones(p))


def test_holders_changes_sum_to_zero(backend):
    """sum over the holders of coordinate r of (xbar - x) = 0 up to the rounding of xbar, so the
    H changes of a round sum to zero per coordinate (sum_i h_i stays 0). Negative control: with the
    mean over the whole cohort in place of the holders' average (Scaffnew's xbar on a compressed
    round) the same sums are far from zero."""
    c, p, s = 10, 500, 4
    c, p = shrink(backend, c, p)
    gen = torch.Generator().manual_seed(fresh_seed())
    X, _, perm = inputs(c, p, gen)
    H = torch.zeros(c, p)
    coef = 1.25
    xbar = call(backend, X, H, perm, s, coef)
    q = torch.from_numpy(mask(c, p, s, perm.numpy()))
    col = H.double().sum(0)
    scale = (X.abs() * q).double().sum(0)  # sum of |x| over the holders
    bound = 4 * (s + 2) * EPS32 * coef * scale + 1e-30
    assert bool((col.abs() <= bound).all())
    assert bool((xbar.double() * s - (X.double() * q).sum(0)).abs().le(bound / coef).all())
    wrong = (q * (X.double().mean(0) - X.double())).sum(0) * coef  # negative control
    assert not bool((wrong.abs() <= bound).all())


@pytest.mark.parametrize("grain, blocks", [(1, 3), (7, 5), (100, 64)])
@pytest.mark.parametrize("c, s", [(13, 5), (101, 3)], ids=["residues", "coordinates"])
def test_cpu_blocking_does_not_change_bits(grain, blocks, c, s):
    """The C++ core split over several threads' blocks of tiles (its test hook: minimum block size
    and block count) gives the bits of one block, for both of its walks (period 13: by residue,
    101: coordinate by coordinate); each tile starts its slot walk at (s * r0) mod c."""
    C = pytest.importorskip("fedkern._C")
    gen = torch.Generator().manual_seed(fresh_seed())
    p = 3 * 1024 + 17  # several tiles of 1024 coordinates
    X, H, perm = inputs(c, p, gen)
    H0, H2 = H.clone(), H.clone()
    with fedkern.backend("cpu"):
        C._blocking(grain, blocks)
        try:
            got = agg(X, H, perm, s, 0.3)
        finally:
            C._blocking(0, 0)
        want = agg(X, H2, perm, s, 0.3)
    assert same_bits(got, want) and same_bits(H, H2)
    ex_x, ex_h = exact32(X, H0, perm, s, 0.3)
    assert bits_equal(got, ex_x) and bits_equal(H, ex_h)


def test_check_perm_false_gives_the_same_result(backend):
    gen = torch.Generator().manual_seed(fresh_seed())
    X, H, perm = inputs(6, 50, gen)
    H2 = H.clone()
    a = call(backend, X, H, perm, 3, 0.5, True)
    b = call(backend, X, H2, perm, 3, 0.5, False)
    assert same_bits(a, b) and same_bits(H, H2)


def test_opcheck(backend):
    gen = torch.Generator().manual_seed(fresh_seed())
    X, H, perm = (t.to(device_for(backend)) for t in inputs(5, 23, gen))
    torch.library.opcheck(agg, (X, H, perm, 2, 0.75, True))
    torch.library.opcheck(agg, (X, None, perm, 5, 0.75, False))


# ---- bad input ----------------------------------------------------------------------------------


C_BAD, P_BAD = 4, 6
META = torch.device("meta")

# name -> (change of the valid arguments X, H, perm, s = 2, coef = 0.5, exception, message)
BAD = {
    "X-dtype": (lambda a: {"X": a["X"].double()}, ValueError, "X must be a non-empty float32"),
    "X-shape": (lambda a: {"X": a["X"].reshape(-1)}, ValueError, "X must be a non-empty float32"),
    "X-empty": (lambda a: {"X": torch.zeros(4, 0), "H": None}, ValueError, "non-empty float32"),
    "X-noncontig": (lambda a: {"X": torch.randn(6, 4).t()}, ValueError, "X must be contiguous"),
    "X-device": (
        lambda a: {"X": a["X"].to(META)},
        ValueError,
        "H must be a float32 \\[4, 6\\] tensor on meta",
    ),
    "H-dtype": (lambda a: {"H": a["H"].double()}, ValueError, "H must be a float32 \\[4, 6\\]"),
    "H-shape": (lambda a: {"H": torch.zeros(4, 7)}, ValueError, "H must be a float32 \\[4, 6\\]"),
    "H-device": (lambda a: {"H": a["H"].to(META)}, ValueError, "tensor on cpu, got .* on meta"),
    "H-noncontig": (lambda a: {"H": torch.zeros(6, 4).t()}, ValueError, "H must be contiguous"),
    "H-aliases-X": (lambda a: {"H": a["X"]}, ValueError, "H and X must not share memory"),
    "H-view-of-X": (lambda a: {"H": a["X"][:, :]}, ValueError, "H and X must not share memory"),
    "perm-dtype": (lambda a: {"perm": a["perm"].int()}, ValueError, "perm must be an int64"),
    "perm-shape": (lambda a: {"perm": torch.arange(5)}, ValueError, "of shape \\(4,\\)"),
    "perm-device": (lambda a: {"perm": a["perm"].to(META)}, ValueError, "on cpu, got .* on meta"),
    "perm-noncontig": (
        lambda a: {"perm": torch.arange(4).repeat_interleave(2)[::2]},
        ValueError,
        "perm must be contiguous",
    ),
    "perm-repeat": (
        lambda a: {"perm": torch.tensor([0, 1, 1, 2])},
        ValueError,
        "a row appears twice",
    ),
    "perm-range": (lambda a: {"perm": torch.tensor([0, 1, 4, 2])}, ValueError, "values outside"),
    "perm-negative": (
        lambda a: {"perm": torch.tensor([0, -1, 3, 2])},
        ValueError,
        "values outside",
    ),
    "s-zero": (lambda a: {"s": 0}, ValueError, "s must be in \\[1, 4\\], got 0"),
    "s-above-c": (lambda a: {"s": 5}, ValueError, "s must be in \\[1, 4\\], got 5"),
    "coef-nan": (lambda a: {"coef": float("nan")}, ValueError, "coef must be finite"),
    "coef-inf": (lambda a: {"coef": float("-inf")}, ValueError, "coef must be finite"),
    "coef-overflow": (lambda a: {"coef": 1e39}, ValueError, "coef must fit in float32"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    """Each bad argument raises naming it, before anything is modified (H and X keep their bits).

    A meta tensor among the arguments sends the op to its fake (meta) kernel, so the device cases
    call the op's validation, check_aggregate, directly (the op runs it first)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    args = {"X": torch.randn(C_BAD, P_BAD, generator=gen),
            "H": torch.randn(C_BAD, P_BAD, generator=gen),
            "perm": torch.randperm(C_BAD, generator=gen), "s": 2, "coef": 0.5}  # fmt: skip
    change, exc, match = BAD[name]
    args.update(change(args))
    X, H = args["X"], args["H"]
    on_meta = any(isinstance(v, torch.Tensor) and v.device == META for v in args.values())
    keep = [(t, t.clone()) for t in (X, H) if t is not None and t.device != META]
    fn = T.check_aggregate if on_meta else agg
    with pytest.raises(exc, match=match):
        fn(X, H, args["perm"], args["s"], args["coef"], True)
    for t, before in keep:
        assert torch.equal(t, before)


def test_bad_input_types():
    """Arguments of the wrong Python type: the schema (or the op) names them."""
    X, H, perm = torch.zeros(3, 4), torch.zeros(3, 4), torch.arange(3)
    with pytest.raises((TypeError, RuntimeError), match="s"):
        agg(X, H, perm, 1.5, 0.5, True)
    with pytest.raises((TypeError, RuntimeError), match="coef"):
        agg(X, H, perm, 1, "0.5", True)
    with pytest.raises(TypeError, match="s must be an int"):
        T.check_aggregate(X, H, perm, True, 0.5)
    with pytest.raises(TypeError, match="coef must be a real number"):
        T.check_aggregate(X, H, perm, 1, None)
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        T.check_aggregate(X.numpy(), H, perm, 1, 0.5)
    assert torch.equal(H, torch.zeros(3, 4))


# ---- property -----------------------------------------------------------------------------------


PROP_BACKENDS = [p for p in BACKEND_PARAMS if p.values[0] in ("reference", "cpu")]


@pytest.fixture(params=PROP_BACKENDS)
def prop_backend(request):
    with fedkern.backend(request.param):
        yield request.param


SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e-30], F32)


@given(data=st.data())
def test_aggregate_property(prop_backend, data):
    """Random cohort sizes, s, p (with s p < c), permutations, coef and values (ties, signed
    zeros, infinities, NaN): the bits of the float32 transcription, X untouched."""
    c = data.draw(st.integers(1, 17), label="c")
    s = data.draw(st.integers(1, c), label="s")
    p = data.draw(st.sampled_from([1, 2, 3, 5, 16, 17, 63, 130]), label="p")
    perm = torch.tensor(data.draw(st.permutations(list(range(c))), label="perm"), dtype=torch.int64)
    coef = data.draw(st.sampled_from([0.0, 1.0, -0.5, 0.246 / 0.01, 3e-7]), label="coef")
    kind = data.draw(st.sampled_from(["normal", "ties", "special"]), label="kind")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = rng.standard_normal((c, p)).astype(F32)
    if kind == "ties":
        x = rng.integers(-2, 3, (c, p)).astype(F32) * F32(0.5)
    elif kind == "special":
        x = np.where(rng.random((c, p)) < 0.3, SPECIALS[rng.integers(0, 7, (c, p))], x)
    X = torch.from_numpy(x.astype(F32))
    with_h = data.draw(st.booleans(), label="with_h")
    H = torch.from_numpy(rng.standard_normal((c, p)).astype(F32)) if with_h else None
    X0, H0 = X.clone(), (None if H is None else H.clone())
    xbar = agg(X, H, perm, s, coef, True)
    want_x, want_h = exact32(X0, H0, perm, s, coef)
    assert bits_equal(xbar, want_x)
    if H is not None:
        assert bits_equal(H, want_h)
    assert same_bits(X, X0)


# ---- the benchmark's two sides ------------------------------------------------------------------


def test_benchmark_sides_agree():
    """bench/bench_tamuna.py's fedkern call and eager baseline compute the same step (to rounding:
    the eager masked sum adds in row order, the op in slot order)."""
    from fedkern import benchmarks as B

    case = B.Case("tamuna_aggregate_", 3001, 4, torch.float32, 10)
    p = case.setup("cpu")
    p.rearm_fedkern()
    p.rearm_eager()
    a, b = p.fedkern(), p.eager()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.tensors["H_fedkern"], p.tensors["H_eager"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(p.tensors["H_fedkern"], p.tensors["H0"])  # both sides did update H


@pytest.mark.parametrize("op", ["tamuna_round_vs_loop", "fivegcs_round_vs_loop"])
def test_round_benchmark_sides_agree(op):
    """The round benchmarks' fedkern side (batched local steps + the fused server step) and their
    eager client loop compute the same round (to float32 rounding)."""
    from fedkern import benchmarks as B

    p = B.Case(op, 30, 3, torch.float32, 10).setup("cpu")
    p.rearm_fedkern()
    p.rearm_eager()
    a, b = p.fedkern(), p.eager()
    pairs = zip(
        a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True
    )
    for u, w in pairs:
        torch.testing.assert_close(u, w, rtol=1e-5, atol=1e-6)
    if op.startswith("tamuna"):
        torch.testing.assert_close(p.tensors["H_fedkern"], p.tensors["H_eager"], rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
