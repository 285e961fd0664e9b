"""fedkern.sketch: the MAST sketches, their fused ops on every backend, MASTWrapper."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from conftest import (
    backend_fixture,
    close64,
    device_for,
    fresh_seed,
    interpreted,
    require,
    same_bits,
)
from torch import nn

import fedkern
from fedkern import data
from fedkern import sketch as sk
from fedkern.ops import sketch as ops
from fedkern.ops.sketch import IMPLS
from fedkern.random import (
    STREAM_BERNOULLI,
    STREAM_PARTITION,
    STREAM_SKETCH,
    bernoulli,
    client_seed,
    draw_key,
    feistel_keys,
    permutation_tensor,
    philox4x32,
)
from fedkern.reference.randk import randk_indices

backend = backend_fixture(IMPLS)
DTYPES = [torch.float32, torch.bfloat16]


def sizes(backend):
    return [1, 7, 100] if interpreted(backend) else [1, 7, 1000, 4099]


def sketches(d, few: bool = False):
    """Every kind (RandK, Bernoulli scalar / per coordinate, Partition) and the edge cases (keep
    everything) unless ``few``."""
    gen = torch.Generator().manual_seed(d)
    out = [sk.RandK(max(1, d // 10)), sk.Bernoulli(0.2),
           sk.Bernoulli(torch.rand(d, generator=gen) * 0.9 + 0.05)]  # fmt: skip
    if not few:
        out += [sk.RandK(d), sk.RandK(ratio=0.5), sk.Bernoulli(1.0)]
    if d >= 3:
        out.append(sk.Partition(3))
    return out


def oracle_diag(sketch, d, seed, step, node) -> torch.Tensor:
    """float64 [d]: the sketch's diagonal from independent code (the rand-k reference, the
    public permutation and Bernoulli draws) and float64 scales."""
    diag = torch.zeros(d, dtype=torch.float64)
    if isinstance(sketch, sk.RandK):
        k = sketch.k_for(d)
        keys = feistel_keys(client_seed(seed, node), step, stream=STREAM_SKETCH)
        diag[randk_indices(d, k, keys)] = float(torch.tensor(d / k, dtype=torch.float32))
    elif isinstance(sketch, sk.Partition):
        lo, hi = node * d // sketch.nodes, (node + 1) * d // sketch.nodes
        perm = permutation_tensor(d, seed, step, stream=STREAM_PARTITION)
        diag[perm[lo:hi]] = float(torch.tensor(d / (hi - lo), dtype=torch.float32))
    else:
        keep = bernoulli((d,), sketch.p, seed=client_seed(seed, node), step=step)
        p = sketch.p if isinstance(sketch.p, torch.Tensor) else torch.full((d,), sketch.p)
        T = torch.ceil(p.double() * 2**24)
        scale = (2**24 / T).float().double()
        diag[keep] = scale[keep]
    return diag


def test_apply_matches_oracle(backend, gen):
    dev = device_for(backend)
    seed = fresh_seed("sketch seed")
    for d, dtype in itertools.product(sizes(backend), DTYPES):
        for s in sketches(d, few=interpreted(backend) or dtype == torch.bfloat16):
            node = 1 if not isinstance(s, sk.Partition) else 2
            x = torch.randn(d, generator=gen).to(dtype)
            v = torch.randn(d, generator=gen).to(dtype)
            D = oracle_diag(s, d, seed, 5, node)
            kept = D != 0
            for vv in (None, v):
                w = sk.apply(s, x.to(dev), None if vv is None else vv.to(dev), seed=seed, step=5,
                             node=node)  # fmt: skip
                assert w.dtype == dtype and w.shape == x.shape
                base = torch.zeros(d, dtype=torch.float64) if vv is None else vv.double()
                want = torch.where(kept, base + D * (x.double() - base), base)
                close64(w.cpu(), want, dtype, scale=float(x.double().abs().max() + base.abs().max())
                        * float(D.max()))  # fmt: skip
                if vv is not None:  # dropped coordinates are v exactly
                    assert same_bits(w.cpu()[~kept], vv[~kept])
                else:
                    assert bool((w.cpu()[~kept] == 0).all())


def test_grad_step_matches_oracle(backend, gen):
    dev = device_for(backend)
    seed = fresh_seed("sketch seed")
    for d in sizes(backend):
        for s in sketches(d, few=interpreted(backend)):
            x = torch.randn(d, generator=gen)
            g = torch.randn(d, generator=gen)
            D = oracle_diag(s, d, seed, 9, 0)
            y = x.clone().to(dev)
            sk.grad_step_(s, y, g.to(dev), 0.3, seed=seed, step=9, node=0)
            want = x.double() - 0.3 * D * g.double()
            close64(y.cpu(), want, torch.float32, scale=1 + 0.3 * float(D.max()) * 4)
            assert same_bits(y.cpu()[D == 0], x[D == 0])  # untouched where dropped


def test_native_same_bits_as_reference(backend, gen):
    """Batched over R = 20 nodes (the vectorized key path; 4 in the interpreter), shared and
    per-node x, both dtypes."""
    if backend == "reference":
        pytest.skip("the reference is what the native backends are compared with")
    dev = device_for(backend)
    seed = fresh_seed("sketch seed")
    R = 4 if interpreted(backend) else 20
    cases = [(7, torch.bfloat16), (7, torch.float32), (100 if interpreted(backend) else 1000,
                                                        torch.float32)]  # fmt: skip
    for d, dtype in cases:
        for s in sketches(d, few=True):
            ids = torch.arange(R) % 3 if isinstance(s, sk.Partition) else torch.arange(R) * 7 + 1
            X = torch.randn(R, d, generator=gen).to(dtype)
            G = torch.randn(R, d, generator=gen).to(dtype)
            v = torch.randn(d, generator=gen).to(dtype)

            def run(X=X, G=G, v=v, s=s, ids=ids, dev=dev):
                out = [sk.apply(s, X.to(dev), v.to(dev), seed=seed, step=2, node=ids),
                       sk.apply(s, v.to(dev), None, seed=seed, step=2, node=ids)]  # fmt: skip
                Y = X.clone().to(dev)
                sk.grad_step_(s, Y, G.to(dev), 0.1, seed=seed, step=2, node=ids)
                y = v.clone().to(dev)
                sk.grad_step_(s, y, G.to(dev), 0.1, seed=seed, step=2, node=ids)
                return [t.cpu() for t in (*out, Y, y)]

            got = run()
            with fedkern.backend("reference"):
                want = run(dev="cpu")
            for a, b in zip(got, want, strict=True):
                assert same_bits(a, b)


def test_bernoulli_cpu_blocks_threads_and_isa(gen):
    """The C++ Bernoulli kernels over several 4096-coordinate work items and a ragged last mask
    word: every thread split (1, 2, 5 blocks of items), the AVX2 build on an AVX-512 CPU and the
    baseline-ISA build (scalar Philox) give the default build's bits, which equal the
    reference's, and the kept set is the independent oracle's (``fedkern.random.bernoulli``).
    Probabilities: tiny (T = 1, 2), 1 % and 1 (T = 2^24, the keep limit 2^32 itself), and one per
    coordinate; apply with / without v, steps on per-node and shared x."""
    C = require("fedkern._C", in_ci=True)
    seed = fresh_seed("sketch seed")
    d, R = 3 * 4096 + 37, 3
    ids = torch.tensor([0, 5, 2])
    p_vec = torch.rand(d, generator=gen) * 0.9 + 0.05
    p_vec[:7] = torch.tensor([1.0, 2**-24, 1e-7, 0.5, 1.0, 0.01, 2**-23])
    X = torch.randn(R, d, generator=gen)
    G = torch.randn(R, d, generator=gen)
    v = torch.randn(d, generator=gen)
    for s in (sk.Bernoulli(2**-24), sk.Bernoulli(1e-7), sk.Bernoulli(0.01), sk.Bernoulli(1.0),
              sk.Bernoulli(p_vec)):  # fmt: skip

        def run(s=s):
            Y = X.clone()
            sk.grad_step_(s, Y, G, 0.1, seed=seed, step=3, node=ids)
            y = v.clone()
            sk.grad_step_(s, y, G, 0.1, seed=seed, step=3, node=ids)
            return [sk.apply(s, X, v, seed=seed, step=3, node=ids),
                    sk.apply(s, v, None, seed=seed, step=3, node=ids), Y, y]  # fmt: skip

        with fedkern.backend("reference"):
            want = run()
        with fedkern.backend("cpu"):
            got = [run()]
            try:
                for grain, blocks in ((1, 1), (1, 2), (1, 5)):
                    C._blocking(grain, blocks)
                    got.append(run())
            finally:
                C._blocking(0, 0)
            was = C._force_no_avx512(True)  # the AVX2 build (on an AVX-512 CPU)
            try:
                got.append(run())
            finally:
                C._force_no_avx512(was)
            was = C._force_baseline(True)
            try:
                got.append(run())
            finally:
                C._force_baseline(was)
        for outs in got:
            assert all(same_bits(a, b) for a, b in zip(outs, want, strict=True))
        for r in range(R):
            D = oracle_diag(s, d, seed, 3, int(ids[r]))
            assert torch.equal(want[1][r] != 0, D != 0)  # kept where the oracle keeps (v != 0)
            assert same_bits(want[0][r][D == 0], v[D == 0])


def test_bernoulli_cpu_apply_streamed_output(gen):
    """A dense apply output of 16 MiB or more is written through an L1 buffer with non-temporal
    stores (csrc/cpu/sketch.cpp): the same bits as the reference backend, on a 16-byte aligned row
    and on rows whose start is not (they take the plain path), with and without v, fp32 and bf16,
    scalar and per-coordinate p; the kept set is the oracle's and every dropped coordinate is v."""
    require("fedkern._C", in_ci=True)
    seed = fresh_seed("sketch seed")
    d = (1 << 21) + 37  # rows after the first start 148 (fp32) / 74 (bf16) bytes off alignment
    p_vec = torch.rand(d, generator=gen) * 0.02 + 1e-4  # in (0, 1]: rand can give 0
    for dtype, R in ((torch.float32, 2), (torch.bfloat16, 4)):
        X = torch.randn(R, d, generator=gen).to(dtype)
        V = torch.randn(R, d, generator=gen).to(dtype)
        assert X.numel() * X.element_size() >= 16 << 20
        ids = torch.arange(R) * 3 + 1
        for s in (sk.Bernoulli(0.01), sk.Bernoulli(p_vec)):
            outs = {}
            for name in ("reference", "cpu"):
                with fedkern.backend(name):
                    outs[name] = [sk.apply(s, X, V, seed=seed, step=4, node=ids),
                                  sk.apply(s, X, None, seed=seed, step=4, node=ids)]  # fmt: skip
            assert all(same_bits(a, b) for a, b in zip(outs["cpu"], outs["reference"], strict=True))
            for r in (0, R - 1):
                D = oracle_diag(s, d, seed, 4, int(ids[r]))
                assert same_bits(outs["cpu"][0][r][D == 0], V[r][D == 0])
                assert torch.equal(outs["cpu"][1][r] != 0, (D != 0) & (X[r] != 0))


def _oracle_bern_words(d, seed, step, node):
    """The Philox words of node's Bernoulli draw, entry j = lane j % 4 of group j // 4, from the
    scalar Python Philox (``fedkern.random.philox4x32``): int64 [d]."""
    k = draw_key(client_seed(seed, node), step, stream=STREAM_BERNOULLI)
    out = []
    for g in range((d + 3) // 4):
        out += philox4x32((g & 0xFFFFFFFF, g >> 32, k[2], k[3]), (k[0], k[1]))
    return torch.tensor(out[:d], dtype=torch.int64)


@contextlib.contextmanager
def _isa(name: str):
    """Run the C++ kernels' default build, or their AVX2 ("avx2") or baseline ("baseline") one."""
    if name == "default":
        yield
        return
    C = require("fedkern._C", in_ci=True)
    hook = C._force_baseline if name == "baseline" else C._force_no_avx512
    was = hook(True)
    try:
        yield
    finally:
        hook(was)


def test_bernoulli_keep_test_is_strict(backend):
    """keep iff (word >> 8) < ceil(p 2^24), strictly: with p = (word_j >> 8) 2^-24 coordinate j
    is dropped, with one more 2^-24 it is kept (scalar p at a few chosen coordinates, among them
    words whose low byte is 0, i.e. word = 256 T exactly; and a per-coordinate p at every
    coordinate, alternately on and just past the boundary). The C++ backend in each of its
    builds (default, AVX2, baseline)."""
    dev = device_for(backend)
    seed = fresh_seed("sketch seed")
    d = 100 if interpreted(backend) else 4096
    words = _oracle_bern_words(d, seed, 4, 1)
    top = words >> 8
    low_zero = torch.nonzero((words & 0xFF) == 0).flatten()[:4].tolist()  # ~16 in 4096
    ones = torch.ones(d, device=dev)
    on = (torch.arange(d) % 2 == 0) & (top > 0)  # p_j on the boundary: dropped
    p = (top + (~on).long()).double() / 2**24
    for isa in ("default", "avx2", "baseline") if backend == "cpu" else ("default",):
        with _isa(isa):
            for j in (0, 3, 4, d - 1, 517 % d, *low_zero):
                for extra in (0, 1):
                    if top[j] + extra == 0:
                        continue  # p = 0 is not a probability (2^-24 odds)
                    s = sk.Bernoulli(float(top[j] + extra) / 2**24)
                    w = sk.apply(s, ones, seed=seed, step=4, node=1).cpu()
                    assert bool(w[j] != 0) == bool(extra), (isa, j, extra)
            w = sk.apply(sk.Bernoulli(p), ones, seed=seed, step=4, node=1).cpu()
            assert torch.equal(w != 0, ~on), isa


def test_batched_equals_one_node_at_a_time(gen):
    seed = fresh_seed()
    d, R = 501, 20
    for s in sketches(d, few=True):
        ids = torch.arange(R) % 3 if isinstance(s, sk.Partition) else torch.arange(R) * 5 + 2
        X = torch.randn(R, d, generator=gen)
        G = torch.randn(R, d, generator=gen)
        W = sk.apply(s, X, seed=seed, step=4, node=ids)
        x = torch.randn(d, generator=gen)
        y = x.clone()
        sk.grad_step_(s, y, G, 0.2, seed=seed, step=4, node=ids)
        z = x.clone()
        for r in range(R):
            node = int(ids[r])
            assert torch.equal(W[r], sk.apply(s, X[r], seed=seed, step=4, node=node))
            sk.grad_step_(s, z, G[r], 0.2, seed=seed, step=4, node=node)  # rows in order
        assert torch.equal(y, z)


def test_only_kept_coordinates_are_read(backend, gen):
    dev = device_for(backend)
    seed = fresh_seed()
    d = 100
    for s in sketches(d, few=True):
        D = s.diagonal(d, seed=seed, step=1, node=0)
        x = torch.randn(d, generator=gen)
        g = torch.randn(d, generator=gen)
        x_nan = torch.where(D == 0, torch.nan, x)
        g_nan = torch.where(D == 0, torch.nan, g)
        v = torch.randn(d, generator=gen)
        w = sk.apply(s, x_nan.to(dev), v.to(dev), seed=seed, step=1, node=0)
        assert bool(torch.isfinite(w).all())
        y = x.clone().to(dev)
        sk.grad_step_(s, y, g_nan.to(dev), 0.5, seed=seed, step=1, node=0)
        assert bool(torch.isfinite(y).all())


def test_partition_blocks_are_disjoint_and_cover():
    seed = fresh_seed()
    for d, nodes in ((12, 4), (1000, 7), (5, 5)):
        s = sk.Partition(nodes)
        D = sk.apply(s, torch.ones(d), seed=seed, step=3, node=torch.arange(nodes))
        assert torch.equal((D != 0).sum(0), torch.ones(d, dtype=torch.int64))
        if d % nodes == 0:
            assert torch.equal(D.mean(0), torch.ones(d))  # mean_i S_i = I for every draw
            assert s.L_D(d) == pytest.approx(nodes) and s.L_S_max(d) == pytest.approx(nodes**2)


def test_constants_match_empirical_second_moment():
    """L_D = lambda_max E[S^T S] against 4000 draws (diagonal: E[s_j^2 keep_j]), within 6 standard
    errors of the empirical mean (failure rate < 1e-8)."""
    d, M = 40, 4000
    for s in (sk.RandK(8), sk.Bernoulli(0.25)):
        D = sk.apply(s, torch.ones(d), seed=fresh_seed(), step=0, node=torch.arange(M)).double()
        second = (D**2).mean(0)
        err = 6 * (D**2).std(0) / math.sqrt(M)
        assert bool(((second - s.L_D(d)).abs() <= err).all())
        assert float((D**2).max()) <= s.L_S_max(d) * (1 + 1e-6)
        assert bool(((D.mean(0) - 1).abs() <= 6 * D.std(0) / math.sqrt(M)).all())  # E[S] = I


def _logistic_grad(W: torch.Tensor, A: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Rows of W [R, d]: grad of mean log(1 + exp(-s a.w)) + l2/2 |w|^2, float64, from the math."""
    s = 2 * y - 1
    r = -s * torch.sigmoid(-s * (W @ A.T))
    return r @ A / A.shape[0] + l2 * W


def test_estimator_is_unbiased_for_grad_f_D():
    """The MAST claim: E[S^T grad f(v + S (x - v))] = grad f_D(x), over 40000 seeds, with grad f_D
    computed exactly by enumerating every Rand-K subset / every Bernoulli mask of d = 6 (real data:
    breast_cancer, 5 features + bias). Negative control: the sparsified gradient at the unsketched
    point, S^T grad f(x), is unbiased for grad f(x) and fails the same test against grad f_D."""
    A, y = data.load("breast_cancer")
    A = torch.cat([A[:, :5], A[:, -1:]], 1)
    y = y.double()
    d, l2, M = 6, 0.01, 20_000
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(d, generator=gen, dtype=torch.float64).float()
    v = (0.5 * torch.randn(d, generator=gen, dtype=torch.float64)).float()
    for s in (sk.RandK(2), sk.Bernoulli(0.5)):
        if isinstance(s, sk.RandK):
            masks = [torch.tensor([j in c for j in range(d)]) for c in itertools.combinations(
                range(d), 2)]  # fmt: skip
            weights = torch.full((len(masks),), 1 / len(masks), dtype=torch.float64)
            scale = d / 2
        else:
            masks = [torch.tensor([(m >> j) & 1 == 1 for j in range(d)]) for m in range(2**d)]
            weights = torch.full((len(masks),), 0.5**d, dtype=torch.float64)
            scale = 2.0
        Sd = torch.stack([m.double() * scale for m in masks])  # [masks, d]
        Wd = v.double() + Sd * (x.double() - v.double())
        exact = (weights[:, None] * Sd * _logistic_grad(Wd, A, y, l2)).sum(0)
        ids = torch.arange(M)
        W = sk.apply(s, x, v, seed=7, step=0, node=ids)
        G = _logistic_grad(W.double(), A, y, l2).float()
        est = torch.zeros(M, d)
        sk.grad_step_(s, est, G, -1.0, seed=7, step=0, node=ids)  # est_r = S_r^T g_r
        est = est.double()
        se = est.std(0) / math.sqrt(M)
        assert bool(((est.mean(0) - exact).abs() <= 6 * se + 1e-6).all())
        # control: S^T grad f(x) at the unsketched x
        gx = _logistic_grad(x.double()[None], A, y, l2).float().expand(M, d).contiguous()
        naive = torch.zeros(M, d)
        sk.grad_step_(s, naive, gx, -1.0, seed=7, step=0, node=ids)
        naive = naive.double()
        se_n = naive.std(0) / math.sqrt(M)
        assert not bool(((naive.mean(0) - exact).abs() <= 6 * se_n + 1e-6).all())


def test_mast_wrapper_is_double_sketched_sgd():
    """SGD on a wrapped Linear = x -= gamma S^T grad f(S x) computed with the ops directly."""
    gen = torch.Generator().manual_seed(fresh_seed())
    X = torch.randn(50, 10, generator=gen)
    y = (torch.rand(50, generator=gen) < 0.5).float()
    for s in (sk.Bernoulli(0.5), sk.RandK(ratio=0.3)):
        lin = nn.Linear(10, 1, bias=False)
        x = lin.weight.detach().clone().reshape(-1)
        wrapped = sk.MASTWrapper(lin, s, seed=3)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        for t in range(4):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(wrapped(X)[:, 0], y).backward()
            opt.step()
            seed = wrapped.seeds["weight"]
            w = sk.apply(s, x, seed=seed, step=t).requires_grad_()
            nn.functional.binary_cross_entropy_with_logits(X @ w, y).backward()
            sk.grad_step_(s, x, w.grad, 0.1, seed=seed, step=t)
        torch.testing.assert_close(lin.weight.detach().reshape(-1), x, rtol=1e-6, atol=1e-7)
        assert wrapped.step == 4
        wrapped.eval()
        assert torch.equal(wrapped(X), lin(X))  # eval: the unsketched model
        clone = sk.MASTWrapper(nn.Linear(10, 1, bias=False), s, seed=3)
        clone.load_state_dict(wrapped.state_dict())
        assert clone.step == 4 and torch.equal(clone.module.weight, lin.weight)


def test_mast_wrapper_pretrained_point():
    lin = nn.Linear(6, 3)
    wrapped = sk.MASTWrapper(lin, sk.Bernoulli(0.5), seed=1, v="initial")
    x_in = torch.randn(4, 6)
    with torch.no_grad():  # at x = v every sketch gives w = v: the output of the module itself
        assert torch.equal(wrapped(x_in), lin(x_in))


def test_opcheck():
    x = torch.randn(2, 50)
    g = torch.randn(2, 50)
    keys = torch.randint(0, 2**32, (2, 8))
    ranges = torch.tensor([[0, 5], [10, 20]])
    scale = torch.tensor([10.0, 5.0])
    torch.library.opcheck(torch.ops.fedkern.sketch_perm_apply, (x, None, keys, ranges, scale))
    torch.library.opcheck(torch.ops.fedkern.sketch_perm_apply, (x, x[:1], keys, ranges, scale))
    torch.library.opcheck(torch.ops.fedkern.sketch_perm_grad_step_,
                          (x.clone(), g, keys, ranges, scale, 0.5))  # fmt: skip
    k4 = keys[:, :4].contiguous()
    torch.library.opcheck(torch.ops.fedkern.sketch_bern_apply, (x, None, k4, 0.3, None))
    torch.library.opcheck(torch.ops.fedkern.sketch_bern_grad_step_,
                          (x.clone(), g, k4, 1.0, torch.rand(50) * 0.9 + 0.05, 0.5))  # fmt: skip


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: sk.RandK(0), ValueError, "k"),
        (lambda: sk.RandK(), ValueError, "k and ratio"),
        (lambda: sk.RandK(ratio=1.5), ValueError, "ratio"),
        (lambda: sk.Bernoulli(0.0), ValueError, "p"),
        (lambda: sk.Bernoulli(-0.1), ValueError, "p"),
        (lambda: sk.Bernoulli(math.inf), ValueError, "p"),
        (lambda: sk.Bernoulli(torch.tensor([0.5, 1.2])), ValueError, "p"),
        (lambda: sk.Partition(0), ValueError, "nodes"),
        (lambda: sk.apply(sk.RandK(11), torch.zeros(10), seed=0), ValueError, "k"),
        (lambda: sk.apply(sk.Partition(11), torch.zeros(10), seed=0), ValueError, "d >= 11"),
        (lambda: sk.apply(sk.Partition(3), torch.zeros(10), seed=0, node=3), ValueError, "node"),
        (lambda: sk.apply(sk.Bernoulli(torch.full((5,), .5)), torch.zeros(10), seed=0), ValueError,
         "entries"),
        (lambda: sk.apply("randk", torch.zeros(10), seed=0), TypeError, "sketch"),
        (lambda: sk.apply(sk.RandK(2), torch.zeros(10, dtype=torch.int32), seed=0), TypeError,
         "x"),
        (lambda: sk.apply(sk.RandK(2), torch.zeros(10), seed=-1), ValueError, "seed"),
        (lambda: sk.apply(sk.RandK(2), torch.zeros(10), seed=0, node=-2), ValueError, "node"),
        (lambda: sk.apply(sk.RandK(2), torch.zeros(10), torch.zeros(9), seed=0), ValueError, "v"),
        (lambda: sk.apply(sk.RandK(2), torch.zeros(3, 10), seed=0, node=torch.arange(2)),
         ValueError, "x"),
        (lambda: sk.grad_step_(sk.RandK(2), torch.zeros(10), torch.zeros(9), 0.1, seed=0),
         ValueError, "g"),
        (lambda: sk.grad_step_(sk.RandK(2), torch.zeros(10), torch.zeros(10), math.nan, seed=0),
         ValueError, "gamma"),
        (lambda: sk.grad_step_(sk.RandK(2), torch.zeros(20)[::2], torch.zeros(10), 0.1, seed=0),
         ValueError, "contiguous"),
        (lambda: sk.grad_step_(sk.Bernoulli(0.5), torch.zeros(10), torch.zeros(10,
         dtype=torch.bfloat16), 0.1, seed=0), TypeError, "dtype"),
        (lambda: ops.sketch_perm_apply(torch.zeros(2, 10), None, torch.zeros(2, 8,
         dtype=torch.int64), torch.tensor([[0, 11], [0, 1]]), torch.ones(2)), ValueError,
         "ranges"),
    ],
)  # fmt: skip
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_grad_step_bad_input_changes_nothing():
    x = torch.randn(10)
    x0 = x.clone()
    with pytest.raises(ValueError):
        sk.grad_step_(sk.RandK(2), x, x, 0.1, seed=0)  # aliasing
    with pytest.raises(ValueError):
        sk.grad_step_(sk.RandK(20), x, torch.ones(10), 0.1, seed=0)
    assert torch.equal(x, x0)
