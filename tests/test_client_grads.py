"""``fedkern::client_grads`` / ``ClientBatch.grads``: every cohort client's (minibatch) gradient at
its row of X in one call, on every backend, against float64 loops written from the math.

The oracle is ``fedkern.problems.Problem.grads`` (float64, per client, given sample lists) and, for
the keyed minibatch, the sgd batch of ``local_steps_`` (the first min(b, m_i) entries of the keyed
Feistel permutation, computed by the scalar key functions). Also: one local step of local_steps_
equals X - gamma * G bit for bit (the shared summation order), a client's row does not depend on
the rest of the cohort, the C++ kernel is deterministic across threads, ISA builds and the
panel-by-panel path, opcheck, and bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import backend_fixture, fresh_seed, interpreted, same_bits

import fedkern
from fedkern.clients import ClientBatch
from fedkern.ops.clients import IMPLS
from fedkern.problems import Problem
from fedkern.random import client_seed, randk_keys
from fedkern.reference.clients import permutation

backend = backend_fixture({"client_grads": IMPLS["client_grads"]})

F64 = torch.float64


def make_problem(kind, sizes, d, gen, classes=3, l2=0.05):
    N = sum(sizes)
    A = torch.randn(N, d, generator=gen, dtype=F64)
    if kind == "logistic":
        y = (torch.rand(N, generator=gen) < 0.5).to(F64)
    elif kind == "multinomial":
        y = torch.randint(0, classes, (N,), generator=gen).to(F64)
        y[:classes] = torch.arange(classes, dtype=F64)
    else:
        y = torch.randn(N, generator=gen, dtype=F64)
    starts = torch.cumsum(torch.tensor([0, *sizes]), 0)
    parts = [torch.arange(int(starts[i]), int(starts[i + 1])) for i in range(len(sizes))]
    return Problem(A, y, parts, kind, l2, allow_empty=True)


def oracle(P, X, cohort, batches):
    """float64: row r = grad f_i on batch batches[r] (None: all samples; []: the l2 term only)."""
    out = torch.zeros(len(cohort), P.p, dtype=F64)
    for r, (i, B) in enumerate(zip(cohort, batches, strict=True)):
        x = X[r].double()
        if B is not None and len(B) == 0 or int(P.sizes[i]) == 0:
            out[r] = P.l2 * x
        else:
            out[r] = P.grads(x, [i], None if B is None else [torch.as_tensor(B)])[0]
    return out


def sgd_batch(m, b, seed, client, step):
    if m == 0:
        return []
    return permutation(m, randk_keys(client_seed(seed, client), step))[: min(b, m)].tolist()


KINDS = ["logistic", "multinomial", "least_squares"]


@pytest.mark.parametrize("kind", KINDS)
def test_grads_match_the_float64_oracle(backend, kind, gen):
    small = interpreted(backend)
    sizes = [5, 0, 12, 1, 3, 9] if small else [17, 0, 50, 1, 3, 40, 8, 25]
    d = 6 if small else 13
    P = make_problem(kind, sizes, d, gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    B = ClientBatch(P, seed=seed)
    cohort = [4, 1, 0, 2] if small else [6, 1, 0, 2, 7, 3]
    X = (torch.randn(len(cohort), P.p, generator=gen) * 0.5).float()
    tol = {"rtol": 2e-5, "atol": 2e-6}
    # full batch
    G = B.grads(X, clients=cohort)
    assert G.dtype == torch.float32 and G.shape == X.shape
    torch.testing.assert_close(G.double(), oracle(P, X, cohort, [None] * len(cohort)), **tol)
    # keyed minibatch: local_steps_'s sgd batch at global step `step`
    b, step = 3, 11
    G = B.grads(X, clients=cohort, mode="sgd", batch_size=b, step=step)
    want = oracle(P, X, cohort, [sgd_batch(int(P.sizes[i]), b, seed, i, step) for i in cohort])
    torch.testing.assert_close(G.double(), want, **tol)
    # given samples: repeats count twice, an empty list leaves the l2 term
    smp = [[0, 2, 2], [], [4, 0, 1, 3], [0]]
    G = B.grads(X, clients=cohort, samples=smp + [[0]] * (len(cohort) - 4))
    want = oracle(P, X, cohort, smp + [[0]] * (len(cohort) - 4))
    torch.testing.assert_close(G.double(), want, **tol)
    # a shared point [p] for every client
    torch.testing.assert_close(B.grads(X[0], clients=cohort).double(),
                               oracle(P, X[0].expand(len(cohort), -1), cohort,
                                      [None] * len(cohort)), **tol)  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["gd", "sgd"])
def test_one_local_step_is_x_minus_gamma_g_bit_for_bit(backend, kind, mode, gen):
    """The gradient is the one local_steps_ uses: x - gamma * G[r] is its step, exactly."""
    sizes = [5, 0, 7, 1, 3] if interpreted(backend) else [17, 0, 50, 1, 3, 40]
    P = make_problem(kind, sizes, 5 if interpreted(backend) else 11, gen)
    B = ClientBatch(P, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    cohort = [3, 0, 1, 2]
    X = (torch.randn(4, P.p, generator=gen) * 0.5).float()
    gamma, rnd = 0.3, 4
    G = B.grads(X, clients=cohort, mode=mode, batch_size=2, step=rnd)
    X1 = X.clone()
    B.local_steps_(X1, gamma=gamma, steps=1, clients=cohort, mode=mode, batch_size=2, round=rnd)
    assert same_bits(X1, X - torch.tensor(gamma, dtype=torch.float32) * G)
    # a client's row does not depend on the rest of the cohort, and a second call agrees
    again = B.grads(X[[2, 0]].contiguous(), clients=[1, 3], mode=mode, batch_size=2, step=rnd)
    assert same_bits(again, G[[2, 0]])


def test_opcheck(gen):
    P = make_problem("logistic", [4, 0, 6], 5, gen)
    B = ClientBatch(P, seed=3)
    X = torch.randn(3, P.p, generator=gen)
    cl = torch.tensor([2, 0, 1])
    keys = torch.tensor([randk_keys(client_seed(3, i), 2) for i in (2, 0, 1)], dtype=torch.int64)
    smp = torch.tensor([[0, -1, 5], [1, 2, 3], [-1, -1, -1]])
    op = torch.ops.fedkern.client_grads.default
    for mode, k, s in ((0, None, None), (1, keys, None), (3, None, smp)):
        torch.library.opcheck(op, (X, cl, B.A, B.y, B.offsets, 0, 1, 0.05, mode, 2, k, s))


def test_cpu_kernel_deterministic_across_threads_isa_and_panels():
    C = pytest.importorskip("fedkern._C")
    gen = torch.Generator().manual_seed(fresh_seed())
    P = make_problem("multinomial", [40, 3, 0, 29, 64], 13, gen)
    B = ClientBatch(P, seed=9)
    X = torch.randn(5, P.p, generator=gen)
    with fedkern.backend("cpu"):

        def run():
            return [
                B.grads(X),
                B.grads(X, mode="sgd", batch_size=23, step=5),
                B.grads(X, samples=[[39, 0, 0] * 9, [2], [], [28, 1], list(range(64))]),
            ]

        first = run()
        checks = [run()]
        try:
            for grain, blocks in ((1, 1), (1, 2), (1, 5)):
                C._blocking(grain, blocks)
                checks.append(run())
        finally:
            C._blocking(0, 0)
        was = C._force_baseline(True)
        try:
            checks.append(run())
        finally:
            C._force_baseline(was)
        for floats in (8 * 16, 24 * 16):  # panels of 8 or 24 sample rows
            was = C._clients_cache_floats(floats)
            try:
                checks.append(run())
            finally:
                C._clients_cache_floats(was)
    for got in checks:
        assert all(same_bits(a, b) for a, b in zip(got, first, strict=True))
    want = oracle(P, X, range(5), [None] * 5)
    torch.testing.assert_close(first[0].double(), want, rtol=2e-5, atol=2e-6)


def test_binding_rejects_bad_tags():
    C = pytest.importorskip("fedkern._C")
    with pytest.raises(ValueError, match="mode must be 0, 1 or 3"):
        C.client_grads(0, 0, 0, 4, 0, 0, 0, 4, 0, 1, 0.0, 2, 1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="kind must be 0, 1 or 2"):
        C.client_grads(0, 0, 0, 4, 0, 0, 0, 4, 5, 1, 0.0, 0, 1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="p must be C \\* d"):
        C.client_grads(0, 0, 0, 4, 0, 0, 0, 4, 1, 3, 0.0, 0, 1, 0, 0, 0, 0)


def test_bad_input(gen):
    P = make_problem("logistic", [4, 5, 6], 3, gen)
    B = ClientBatch(P)
    X = B.zeros()
    with pytest.raises(ValueError, match="mode must be 'gd' or 'sgd'"):
        B.grads(X, mode="rr")
    with pytest.raises(ValueError, match="one row per cohort client"):
        B.grads(X, clients=[0, 1])
    with pytest.raises(ValueError, match="must not repeat"):
        B.grads(X[:2], clients=[1, 1])
    with pytest.raises(TypeError, match="X must be a float32"):
        B.grads(X.double())
    with pytest.raises(ValueError, match="local sample indices in \\[0, m_i\\)"):
        B.grads(X, samples=[[0], [5], [0]])  # client 1 has 5 samples
    with pytest.raises(ValueError, match="indices >= 0"):
        B.grads(X, samples=[[0], [-2], [0]])
    with pytest.raises(ValueError, match="one index list per cohort client"):
        B.grads(X, samples=[[0], [1]])
    with pytest.raises(ValueError, match="step must be"):
        B.grads(X, mode="sgd", step=-1)
    with pytest.raises(ValueError, match="batch_size must be"):
        B.grads(X, mode="sgd", batch_size=0)
    op = torch.ops.fedkern.client_grads.default
    cl = torch.arange(3)
    with pytest.raises(ValueError, match="keys must be an int64 tensor \\[3, 8\\]"):
        op(X, cl, B.A, B.y, B.offsets, 0, 1, 0.1, 1, 2, torch.zeros(3, 7, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="mode must be 0 \\(gd\\), 1 \\(sgd\\) or 3"):
        op(X, cl, B.A, B.y, B.offsets, 0, 1, 0.1, 2, 2, None, None)
    with pytest.raises(ValueError, match="l2 must be"):
        op(X, cl, B.A, B.y, B.offsets, 0, 1, float("nan"), 0, 2, None, None)
    with pytest.raises(ValueError, match="clients must be ids"):
        op(X, torch.tensor([0, 1, 3]), B.A, B.y, B.offsets, 0, 1, 0.1, 0, 2, None, None)
    np.testing.assert_array_equal(X.numpy(), 0)  # nothing was modified
