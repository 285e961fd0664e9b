"""Tests that kill the planted bugs earlier campaigns found surviving (issue 18) and those of this
campaign (docs/testing.md lists every mutant and the test that kills it).

Each test checks a rule against a value derived independently of the code under test:
- MicroAdam's step constants (window weights, bias corrections) against Adam's definition;
- FedAvg's server step size against the relation it defines between two runs;
- the top-k NaN ordering with NaNs of many payloads against the float64 oracle;
- Byz-VR-MARINA-PP's clipping radius alpha * ||x+ - x|| on the messages the server receives.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPES, backend_fixture, device_for, interpreted, oracle_topk, same_bits

import fedkern
from fedkern import data
from fedkern import robust as R
from fedkern.algorithms import ByzVRMarinaPP, FedAvg, FedProx, Scaffnew, Scaffold
from fedkern.clients import ClientBatch
from fedkern.ops.microadam import IMPLS as MICROADAM_IMPLS
from fedkern.problems import LogisticRegression, Problem
from fedkern.reference.microadam import new_state

# ---- MicroAdam: the step constants from Adam's definition ---------------------------------------

microadam_backend = backend_fixture(MICROADAM_IMPLS)


def adam_window_oracle(p0, grads, lr, b1, b2, eps, wd, m):
    """float64 AdamW whose moments only remember the last m gradients, from the definition:
    m_t = sum_{a < min(t, m)} (1 - b1) b1^a g_{t-a} (v_t likewise with b2 and g^2), bias
    corrections 1 - b^t, decoupled decay. The gradients are rounded to bfloat16 first (MicroAdam
    stores its window in bfloat16). Written without fedkern's ``constants``."""
    p = p0.double().clone()
    gs = [g.bfloat16().double() for g in grads]
    out = []
    for t in range(1, len(gs) + 1):
        m1 = torch.zeros_like(p)
        m2 = torch.zeros_like(p)
        for a in range(min(t, m)):
            g = gs[t - 1 - a]
            m1 += (1 - b1) * b1**a * g
            m2 += (1 - b2) * b2**a * g * g
        m_hat = m1 / (1 - b1**t)
        v_hat = m2 / (1 - b2**t)
        p = p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        out.append(p.clone())
    return out


def test_microadam_step_constants_match_adams_definition(microadam_backend, gen):
    """Density 1 (every entry selected, so the error feedback stays exactly 0): MicroAdam is AdamW
    on the bfloat16-rounded gradients over a window of m steps. betas far from 1 make a weight off
    by one power of beta (or a bias correction off by one step) a change of several percent."""
    dev = device_for(microadam_backend)
    n, D, m = (70, 64, 3) if interpreted(microadam_backend) else (300, 128, 3)
    lr, b1, b2, eps, wd = 0.01, 0.7, 0.8, 1e-8, 0.05
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(6)]  # 6 > m: the window truncates
    want = adam_window_oracle(p0, grads, lr, b1, b2, eps, wd, m)
    p = p0.clone().to(dev)
    st = new_state(n, D, D, 16, m, dev)
    for t, (g, w) in enumerate(zip(grads, want, strict=True), start=1):
        fedkern.ops.microadam.microadam_step_(
            [p], [g.to(dev)], [st], [t], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
            block_size=D, k=D, quant_bucket=16,
        )  # fmt: skip
        assert bool((st["ef_scale"] == 0).all())  # nothing left for the error feedback
        # float32 arithmetic: per step, relative 1e-5 of the step (lr) and two roundings of p
        # (the decay and the update), accumulated over the t steps so far. A wrong power of beta
        # or bias correction moves p by several percent of lr (1e-4), far above this bound.
        err = float((p.cpu().double() - w).abs().max())
        assert err <= t * (1e-5 * lr + 2 * 2**-24 * float(w.abs().max())), (t, err)


# ---- FedAvg / Scaffold: the server step size -------------------------------------------------


@pytest.fixture(scope="module")
def cancer_batch():
    A, y = data.load("breast_cancer")
    return ClientBatch(Problem(A, y, data.split(y, 8, "label_sorted"), "logistic", 0.05), seed=1)


@pytest.mark.parametrize("cls", [FedAvg, Scaffold])
@pytest.mark.parametrize("eta", [0.5, 1.7])
def test_server_lr_scales_the_server_step(cancer_batch, cls, eta):
    """One round from the same x and the same cohort: x_eta - x = eta (x_1 - x) (the clients'
    local runs do not depend on eta in round one)."""
    kw = {"local_steps": 3, "cohort": 5, "seed": 4, "mode": "sgd", "batch_size": 4}
    x0 = torch.full((cancer_batch.p,), 0.1)
    one = cls(cancer_batch, server_lr=1.0, x0=x0, **kw)
    scaled = cls(cancer_batch, server_lr=eta, x0=x0, **kw)
    one.step()
    scaled.step()
    want = x0.double() + eta * (one.x.double() - x0.double())
    torch.testing.assert_close(scaled.x.double(), want, rtol=0, atol=4e-7 * (1 + eta))
    assert float((one.x - x0).abs().max()) > 1e-3  # the step is not trivially small


# ---- top-k: NaNs of several payloads tie ------------------------------------------------------

backend = backend_fixture({"all": dict.fromkeys(("reference", "cpu", "triton", "cuda"))})

F32_NANS = [0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0xFFC00000, 0xFFF00001, 0x7FFFFFFF, 0x7FC12345]
BF16_NANS = [0x7FC0, 0x7F81, 0x7FBF, 0xFFC0, 0xFF81, 0x7FFF, 0x7FD3]


def nan_payload_vector(dtype, gen, n=97):
    """Finite values, infinities and NaNs of many payloads, the NaNs with ascending payload keys
    at descending positions: an order by raw bits (instead of 'all NaNs tie, lower index wins')
    picks different indices."""
    x = torch.randn(n, generator=gen).to(dtype)
    x[[3, 50]] = float("inf")
    x[7] = -float("inf")
    pos = torch.randperm(n, generator=gen)[: len(F32_NANS)].sort().values.flip(0)
    bits = x.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
    pool = BF16_NANS if dtype == torch.bfloat16 else F32_NANS
    pool = sorted(pool, key=lambda u: u & (0x7FFF if dtype == torch.bfloat16 else 0x7FFFFFFF))
    width = 16 if dtype == torch.bfloat16 else 32
    for i, u in zip(pos.tolist(), pool, strict=True):
        bits[i] = u - (1 << width) if u >= 1 << (width - 1) else u
    assert int(torch.isnan(x.float()).sum()) == len(pool)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_nans_of_every_payload_tie(backend, dtype, gen):
    dev = device_for(backend)
    x = nan_payload_vector(dtype, gen)
    for k in range(1, 12):
        values, indices = fedkern.topk_compress(x.to(dev), k)
        assert torch.equal(indices.cpu(), oracle_topk(x, k)), k
        assert same_bits(values.cpu(), x[indices.cpu()])
        s = torch.zeros_like(x).to(dev)
        _, idx21 = fedkern.ef21_topk_(x.to(dev), s, k)  # d = x - 0 keeps x's NaNs
        assert torch.equal(idx21.cpu(), oracle_topk(x, k)), k


# ---- Byz-VR-MARINA-PP: the clipping radius is alpha * ||x+ - x|| --------------------------------


class Recorder:
    """An aggregator callable that records every stack it receives and returns the mean."""

    def __init__(self):
        self.stacks = []

    def __call__(self, X):
        self.stacks.append(X.detach().double().clone())
        return X.float().mean(0)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 3.0])
def test_marina_clips_messages_at_alpha_times_the_step(alpha):
    """In every compressed round the messages reaching the aggregator have norm at most
    alpha * ||x+ - x||, and with a small alpha the bound is attained (clipping is active)."""
    A, y = data.load("breast_cancer")
    problem = LogisticRegression(A, y, data.split(y, 10, "iid", seed=0), l2=0.1)
    agg = Recorder()
    m = ByzVRMarinaPP(problem, byzantine=[8, 9], cohort=4, batch_size=4, p=0.3, alpha=alpha,
                      aggregator=agg, attack="bit_flip", bit_flip_scale=50.0, seed=3)  # fmt: skip
    xs, full = [m.x.clone()], []
    for _ in range(25):
        before = len(agg.stacks)
        m.step()
        xs.append(m.x.clone())
        full.append(m.history["full"][-1])
        assert len(agg.stacks) == before + 1
    attained = 0
    for r, is_full in enumerate(full):
        if is_full:
            continue
        lam = alpha * float((xs[r + 1] - xs[r]).norm())  # x+ - x of round r
        norms = agg.stacks[r + 1].norm(dim=1)  # stack 0 is the initial full round
        assert float(norms.max()) <= lam * (1 + 1e-5) + 1e-30, (r, float(norms.max()), lam)
        attained += int(bool((norms >= lam * (1 - 1e-4)).any()))
    assert sum(not f for f in full) >= 10
    if alpha < 1:
        assert attained >= 5  # the bound binds: a radius without alpha would be visible
    assert math.isfinite(m.history["gap"][-1])


def test_alpha_changes_the_trajectory():
    """The same run with alpha 0.1 and 1 differs (alpha reaches the update, not only a check)."""
    A, y = data.load("breast_cancer")
    problem = LogisticRegression(A, y, data.split(y, 10, "iid", seed=0), l2=0.1)
    kw = {"byzantine": [9], "cohort": 4, "batch_size": 4, "p": 0.3, "attack": "bit_flip"}
    runs = [ByzVRMarinaPP(problem, alpha=a, seed=2, **kw).run(15)["gap"] for a in (0.1, 1.0)]
    assert runs[0][0] == runs[1][0] and not np.allclose(runs[0][5:], runs[1][5:], rtol=1e-6)


# ---- federated update rules against float64 oracles written from their definitions ------------


def local_gd(problem, X, S, K, gamma, H=None, mu=0.0, anchor=None):
    """K full-batch float64 GD steps: x_i <- x_i - gamma (g_i(x_i) - h_i + mu (x_i - a_i))."""
    X = X.double().clone()
    for _ in range(K):
        G = problem.grads(X, S)
        if H is not None:
            G = G - H.double()
        if mu:
            G = G + mu * (X - anchor.double())
        X = X - gamma * G
    return X


def test_scaffold_round_against_its_definition(cancer_batch):
    """Two Scaffold rounds (option II) with a cohort of 5 of 8: y_i by K local steps with the
    correction c - c_i, c_i+ = c_i - c + (x - y_i) / (K gamma), x += eta mean(y_i - x),
    c += (|S| / n) mean(c_i+ - c_i)."""
    B, P = cancer_batch, cancer_batch.problem
    m = Scaffold(B, local_steps=3, cohort=5, server_lr=0.8, seed=7)
    x = m.x.double().clone()
    c, C = torch.zeros(B.p, dtype=torch.float64), torch.zeros(B.n, B.p, dtype=torch.float64)
    for _ in range(2):
        S = m._cohort(5)  # this round's cohort (a pure function of the round)
        m.step()
        H = C[S] - c
        Y = local_gd(P, x.expand(5, -1), S.tolist(), 3, m.gamma, H=H)
        c_new = H + (x - Y) / (3 * m.gamma)
        dc = c_new - C[S]
        C[S] = c_new
        x = x + 0.8 * (Y.mean(0) - x)
        c = c + (5 / B.n) * dc.mean(0)
        torch.testing.assert_close(m.x.double(), x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.c.double(), c, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.C.double(), C, rtol=1e-4, atol=1e-6)
        x, c, C = m.x.double(), m.c.double(), m.C.double()


def test_fedprox_round_against_its_definition(cancer_batch):
    B, P = cancer_batch, cancer_batch.problem
    x0 = torch.full((B.p,), 0.2)
    m = FedProx(B, local_steps=4, mu=0.5, x0=x0, seed=1)
    m.step()
    Y = local_gd(P, x0.expand(B.n, -1), list(range(B.n)), 4, m.gamma, mu=0.5,
                 anchor=x0.expand(B.n, -1))  # fmt: skip
    torch.testing.assert_close(m.x.double(), Y.mean(0), rtol=1e-5, atol=1e-6)


def test_proxskip_l1_rounds_against_their_definition(cancer_batch, monkeypatch):
    """ProxSkip with the L1 prox, partial participation: K local steps with h_i, then
    x = soft(mean_S(x_i - (gamma/p) h_i), gamma lam / p), h_i += (p / gamma)(x - x_i)."""
    from fedkern.algorithms import ProxSkip, federated

    monkeypatch.setattr(federated, "l1_optimum", lambda problem, lam: (torch.zeros(problem.p,
                        dtype=torch.float64), 0.0))  # fmt: skip
    B, P = cancer_batch, cancer_batch.problem
    m = ProxSkip(B, prox="l1", lam=0.05, p=0.5, cohort=6, seed=3)
    g, p, lam = m.gamma, 0.5, 0.05
    x, H = m.x.double().clone(), torch.zeros(B.n, B.p, dtype=torch.float64)
    for _ in range(3):
        S = m._cohort(6)
        m.step()
        K = m.history["local_steps"][-1]
        X = local_gd(P, x.expand(6, -1), S.tolist(), K, g, H=H[S])
        z = (X - (g / p) * H[S]).mean(0)
        x = torch.sign(z) * (z.abs() - g * lam / p).clamp_min(0)
        H[S] = H[S] + (p / g) * (x - X)
        torch.testing.assert_close(m.x.double(), x, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.H.double(), H, rtol=1e-4, atol=1e-5)
        x, H = m.x.double(), m.H.double()


def test_draws_follow_the_slot_convention(cancer_batch):
    """Round r draws its local-step count from sampling.geometric at key (r + 1) * 16 + 0 (slot 0)
    and its cohort at key (r + 1) * 16 + 1: the convention that lets two methods agree draw for
    draw (TAMUNA with s = c and Scaffnew) and a remote client be told (seed, key)."""
    from fedkern import sampling

    m = Scaffnew(cancer_batch, p=0.3, cohort=5, seed=11)
    for r in range(6):
        want_S = sampling.uniform(cancer_batch.n, 5, seed=11, step=(r + 1) * 16 + 1)
        assert torch.equal(m._cohort(5).cpu(), want_S)
        m.step()
        assert m.history["local_steps"][-1] == sampling.geometric(0.3, seed=11,
                                                                  step=(r + 1) * 16)  # fmt: skip


def test_shift_back_sends_the_model_back_to_x0():
    """Unclipped, one client per round, 8 of 10 Byzantine: after a compressed round whose client is
    Byzantine, the next round's iterate is x0 (the attack's definition: the aggregate that moves
    the server back), up to the float32 rounding of the message."""
    A, y = data.load("breast_cancer")
    problem = LogisticRegression(A, y, data.split(y, 10, "iid", seed=0), l2=0.1)
    m = ByzVRMarinaPP(problem, byzantine=range(2, 10), cohort=1, full_cohort=10, p=0.2, clip=False,
                      aggregator=R.Aggregator("coordinate_median"), x0=torch.full((problem.d,),
                      0.3, dtype=torch.float64), seed=5)  # fmt: skip
    hits = 0
    for _ in range(30):
        m.step()
        if not m.history["full"][-1] and m.history["byzantine_majority"][-1]:
            x_next = m.x - m.gamma * m.g  # the next round's x+
            err = float((x_next - m.x0).norm())
            assert err <= 1e-5 * (1 + float(m.x.norm())), err
            hits += 1
    assert hits >= 5


def test_aggregator_f_override(gen):
    """Aggregator(rule, f)(X, f=g) is the rule with g for that call only."""
    X = torch.randn(11, 30, generator=gen)
    agg = R.Aggregator("trimmed_mean", 5)
    assert torch.equal(agg(X, f=1), R.trimmed_mean(X, 1))
    assert torch.equal(agg(X), R.trimmed_mean(X, 5))
    k = R.Aggregator("krum", 4)
    assert torch.equal(k(X, f=2), R.krum(X, 2))
