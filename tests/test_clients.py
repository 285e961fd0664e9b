"""ClientBatch's fused local steps and server ops against a float64 loop over clients (every
backend), ModuleClients against torch.optim.SGD, and the LibSVM loader."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_fixture, interpreted

from fedkern import data
from fedkern.clients import ClientBatch, ModuleClients
from fedkern.ops.clients import IMPLS
from fedkern.problems import Problem
from fedkern.random import client_seed, randk_keys
from fedkern.reference.clients import permutation

backend = backend_fixture(IMPLS)

F64 = torch.float64


def make_problem(kind, sizes, d, gen, classes=3):
    """Random data with the given ragged client sizes (0 allowed)."""
    N = sum(sizes)
    A = torch.randn(N, d, generator=gen, dtype=F64)
    if kind == "logistic":
        y = (torch.rand(N, generator=gen) < 0.5).to(F64)
    elif kind == "multinomial":
        y = torch.randint(0, classes, (N,), generator=gen).to(F64)
        y[:classes] = torch.arange(classes, dtype=F64)  # every class present
    else:
        y = torch.randn(N, generator=gen, dtype=F64)
    starts = torch.cumsum(torch.tensor([0, *sizes]), 0)
    parts = [torch.arange(int(starts[i]), int(starts[i + 1])) for i in range(len(sizes))]
    return Problem(A, y, parts, kind, 0.05, allow_empty=True)


def oracle(P, X0, cohort, *, gamma, K, H=None, mode="gd", b=1, clip=None, mu=0.0, anchor=None,
           seed=0, rnd=0):  # fmt: skip
    """float64 loop over clients and steps, the permutations from the scalar key functions."""
    X = X0.double().clone()
    for r, i in enumerate(cohort):
        m = int(P.sizes[i])
        x = X[r].clone()
        for t in range(K):
            if mode == "gd" or m == 0:
                batches = [None]
            else:
                perm = permutation(m, randk_keys(client_seed(seed, i), rnd * K + t))
                batches = [perm[: min(b, m)]] if mode == "sgd" else list(torch.split(perm, b))
            for B in batches:
                if m == 0:
                    g = P.l2 * x
                else:
                    g = P.grads(x, [i], None if B is None else [B])[0]
                if mu:
                    g = g + mu * (x - anchor[r].double())
                u = g - H[r].double() if H is not None else g
                if clip is not None and float(u.norm()) > clip:
                    u = u * (clip / float(u.norm()))
                x = x - gamma * u
        X[r] = x
    return X


CASES = [
    ("logistic", "gd", {}),
    ("logistic", "sgd", {"b": 3}),
    ("logistic", "rr", {"b": 4}),
    ("multinomial", "gd", {}),
    ("multinomial", "rr", {"b": 2}),
    ("least_squares", "gd", {}),
    ("least_squares", "sgd", {"b": 1}),
    ("logistic", "gd", {"H": True, "clip": 0.05}),
    ("least_squares", "rr", {"b": 3, "H": True, "mu": 0.5}),
    ("multinomial", "sgd", {"b": 5, "clip": 0.1, "mu": 0.2, "H": True}),
]


IDS = [f"{k}-{m}-{'+'.join(sorted(o)) or 'plain'}" for k, m, o in CASES]


@pytest.mark.parametrize("kind, mode, opts", CASES, ids=IDS)
def test_local_steps_match_the_float64_loop(backend, kind, mode, opts, gen):
    small = interpreted(backend)
    sizes = [5, 0, 12, 1, 3, 9] if small else [17, 0, 50, 1, 3, 40, 8, 25]
    d = 6 if small else 13
    P = make_problem(kind, sizes, d, gen)
    B = ClientBatch(P, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    cohort = [4, 1, 0, 2] if small else [6, 1, 0, 2, 7, 3]
    c = len(cohort)
    X0 = (torch.randn(c, P.p, generator=gen) * 0.3).float()
    H = (torch.randn(c, P.p, generator=gen) * 0.1).float() if opts.get("H") else None
    anchor = torch.randn(c, P.p, generator=gen).float() if opts.get("mu") else None
    K, gamma, rnd = 3, 0.2, 2
    X = X0.clone()
    B.local_steps_(X, gamma=gamma, steps=K, clients=cohort, H=H, mode=mode,
                   batch_size=opts.get("b", 1), clip=opts.get("clip"), mu=opts.get("mu", 0.0),
                   anchor=anchor, round=rnd)  # fmt: skip
    want = oracle(P, X0, cohort, gamma=gamma, K=K, H=H, mode=mode, b=opts.get("b", 1),
                  clip=opts.get("clip"), mu=opts.get("mu", 0.0), anchor=anchor, seed=B.seed,
                  rnd=rnd)  # fmt: skip
    torch.testing.assert_close(X.double(), want, rtol=2e-4, atol=2e-5)
    # deterministic, and a client's result does not depend on the rest of the cohort
    again = X0[[1, 3]].clone()
    B.local_steps_(again, gamma=gamma, steps=K, clients=[cohort[1], cohort[3]], H=None if H is None
                   else H[[1, 3]].contiguous(), mode=mode, batch_size=opts.get("b", 1),
                   clip=opts.get("clip"), mu=opts.get("mu", 0.0),
                   anchor=None if anchor is None else anchor[[1, 3]].contiguous(),
                   round=rnd)  # fmt: skip
    assert torch.equal(again, X[[1, 3]])


def test_server_ops(backend, gen):
    c, p = (5, 40) if interpreted(backend) else (37, 301)
    P = make_problem("least_squares", [3] * c, p, gen)
    B = ClientBatch(P)
    X = torch.randn(c, p, generator=gen)
    w = torch.rand(c, generator=gen, dtype=F64)
    torch.testing.assert_close(B.weighted_sum(X, w).double(), (w[:, None] * X.double()).sum(0),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(B.mean(X).double(), X.double().mean(0), rtol=1e-6, atol=1e-6)
    H = torch.randn(c, p, generator=gen)
    H -= H.mean(0)
    X0, H0 = X.clone(), H.clone()
    xbar = B.scaffnew_sync_(X, H, p=0.25, gamma=0.5)
    want = X0.double().mean(0)
    torch.testing.assert_close(xbar.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(X, xbar.expand(c, -1))
    torch.testing.assert_close(H.double(), H0.double() + 0.5 * (want - X0.double()), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert float(H.double().sum(0).abs().max()) < 1e-4  # sum_i h_i stays 0


def test_scaffnew_sync_bits_match_the_row_order_sum(backend, gen):
    """Every backend's scaffnew_sync_ returns the bits of the documented order: the rows added in
    fp32 one after the other, then one division by c (NumPy float32 here, independent of torch's
    reduction order); H += coef (xbar - X) rounded per operation."""
    import numpy as np

    c, p = (6, 33) if interpreted(backend) else (257, 301)
    P = make_problem("least_squares", [2] * c, p, gen)
    B = ClientBatch(P)
    X = torch.randn(c, p, generator=gen) * 10
    H = torch.randn(c, p, generator=gen)
    Xn, Hn = X.numpy().copy(), H.numpy().copy()
    acc = Xn[0].copy()
    for r in range(1, c):
        acc = (acc + Xn[r]).astype(np.float32)
    want = (acc / np.float32(c)).astype(np.float32)
    coef = np.float32(0.25 / 0.5)
    want_h = (Hn + (coef * (want[None, :] - Xn)).astype(np.float32)).astype(np.float32)
    xbar = B.scaffnew_sync_(X, H, p=0.25, gamma=0.5)
    assert np.array_equal(xbar.numpy().view(np.int32), want.view(np.int32))
    assert np.array_equal(H.numpy().view(np.int32), want_h.view(np.int32))


def test_bad_input(gen):
    P = make_problem("logistic", [4, 5, 6], 3, gen)
    B = ClientBatch(P)
    X = B.zeros()
    with pytest.raises(ValueError, match="mode must be one of"):
        B.local_steps_(X, gamma=0.1, steps=1, mode="adam")
    with pytest.raises(ValueError, match="clients must be ids"):
        B.local_steps_(X[:1], gamma=0.1, steps=1, clients=[3])
    with pytest.raises(ValueError, match="must not repeat"):
        B.local_steps_(X[:2], gamma=0.1, steps=1, clients=[1, 1])
    with pytest.raises(ValueError, match="X must have one row per cohort client"):
        B.local_steps_(X, gamma=0.1, steps=1, clients=[0, 1])
    with pytest.raises(ValueError, match="gamma must be finite"):
        B.local_steps_(X, gamma=float("inf"), steps=1)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        B.local_steps_(X, gamma=0.0, steps=1)
    with pytest.raises(ValueError, match="clip must be > 0"):
        B.local_steps_(X, gamma=0.1, steps=1, clip=-1.0)
    with pytest.raises(ValueError, match="needs anchor"):
        B.local_steps_(X, gamma=0.1, steps=1, mu=0.1)
    with pytest.raises(TypeError, match="X must be a float32"):
        B.local_steps_(X.double(), gamma=0.1, steps=1)
    with pytest.raises(ValueError, match="H must have shape"):
        B.local_steps_(X, gamma=0.1, steps=1, H=torch.zeros(3, 2))
    before = X.clone()
    with pytest.raises(ValueError):
        B.local_steps_(X, gamma=0.1, steps=1, H=torch.zeros(2, P.p))
    assert torch.equal(X, before)
    with pytest.raises(ValueError, match="p in \\(0, 1\\]"):
        B.scaffnew_sync_(X, torch.zeros_like(X), p=0.0, gamma=1.0)
    with pytest.raises(ValueError, match="every client needs a sample"):
        Problem(P.A, (P.y > 0).double(), [torch.arange(3), torch.arange(0)])
    with pytest.raises(ValueError, match="unknown problem kind"):
        Problem(P.A, P.y, [torch.arange(3)], "svm")


def test_module_clients_match_a_loop_of_sgd(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    inputs = torch.randn(40, 5, generator=gen)
    targets = torch.randint(0, 3, (40,), generator=gen)
    parts = [torch.arange(0, 7), torch.arange(7, 30), torch.arange(30, 40)]

    def loss(out, tgt):
        return torch.nn.functional.cross_entropy(out, tgt, reduction="none")

    mc = ModuleClients(model, loss, inputs, targets, parts)
    X = mc.flat().expand(3, -1).contiguous()
    mc.local_steps_(X, gamma=0.1, steps=4)
    for i, part in enumerate(parts):
        local = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        local.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(local.parameters(), lr=0.1)
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(local(inputs[part]), targets[part]).backward()
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in local.parameters()])
        torch.testing.assert_close(X[i], flat, rtol=1e-5, atol=1e-6)


def test_libsvm_loader(tmp_path):
    f = tmp_path / "tiny.libsvm"
    f.write_text("+1 1:0.5 3:2\n-1 2:1.0\n+1 1:-1 2:3 3:1 # comment\n\n")
    A, y = data.load_libsvm(f, standardize=False)
    assert torch.equal(y, torch.tensor([1, 0, 1]))
    expected = torch.tensor([[0.5, 0, 2, 1], [0, 1, 0, 1], [-1, 3, 1, 1]], dtype=F64)
    assert torch.equal(A, expected)
    bad = tmp_path / "bad.libsvm"
    bad.write_text("+1 1:x\n")
    with pytest.raises(ValueError, match="bad.libsvm:1: not LibSVM format"):
        data.load_libsvm(bad)


def test_client_batch_reads_no_device_values(gen, host_reads):
    """ClientBatch.local_steps_ / grads call the ops with check=False (offsets from the Problem,
    the cohort checked on the host), so a round reads no tensor value (on CUDA each read is a
    host synchronization); calling the op with its default check=True is the control, and gives
    the same result bit for bit. The default still rejects bad offsets, naming them."""
    from fedkern.ops import clients as ops

    P = make_problem("logistic", [5, 0, 7, 3], 6, gen)
    B = ClientBatch(P, seed=3)
    X0 = torch.randn(4, B.p, generator=gen)
    before = host_reads()
    X1 = B.local_steps_(X0.clone(), gamma=0.1, steps=3)
    G1 = B.grads(X0)
    assert host_reads() == before
    c = torch.arange(4)
    args = (c, B.A, B.y, B.offsets, 0, 1, 3, 0.1, float(P.l2), None, 0, 1, None, 0.0, 0.0, None)
    X2 = X0.clone()
    ops.local_steps_(X2, *args)
    G2 = ops.client_grads(X0, c, B.A, B.y, B.offsets, 0, 1, float(P.l2), 0, 1, None, None)
    assert host_reads() > before  # the control reads offsets and clients
    assert torch.equal(X1, X2) and torch.equal(G1, G2)
    bad = B.offsets.clone()
    bad[-1] += 1
    with pytest.raises(ValueError, match="offsets must rise from 0"):
        ops.local_steps_(X0.clone(), c, B.A, B.y, bad, *args[4:])
