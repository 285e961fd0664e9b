"""fedkern.lora: the fused merge on every backend, RACLoRALinear / wrap, projected_step, and the
RAC-LoRA claims (the 3 x 3 quadratic, digits transfer, FedRACLoRA = the centralized chain)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import backend_fixture, close64, device_for, fresh_seed, interpreted, same_bits
from torch import nn

import fedkern
from fedkern import lora
from fedkern.algorithms.raclora import (
    COLA,
    FPFT,
    AsymmLoRA,
    FedRACLoRA,
    LoRA,
    QuadraticTask,
    RACLoRA,
    TransferTask,
)
from fedkern.ops import lora as ops
from fedkern.ops.lora import IMPLS
from fedkern.random import gaussian

backend = backend_fixture(IMPLS)
F64 = torch.float64


def shapes(backend):
    out = [(1, 1, 1), (5, 3, 2), (37, 29, 3)]
    return out if interpreted(backend) else out + [(70, 130, 8), (300, 17, 17)]


def test_merge_matches_oracle(backend, gen):
    dev = device_for(backend)
    seed = fresh_seed("merge seed")
    for m, n, r in shapes(backend):
        W = torch.randn(m, n, generator=gen)
        B = torch.randn(m, r, generator=gen)
        A = torch.randn(r, n, generator=gen)
        GA = gaussian((r, n), seed=seed, step=4, std=0.5)
        GB = gaussian((m, r), seed=seed, step=4, std=0.5)
        for b, a, b64, a64 in ((B, None, B, GA), (None, A, GB, A), (B, A, B, A)):
            Wd = W.clone().to(dev)
            ops.lora_merge_(Wd, None if b is None else b.to(dev), None if a is None else a.to(dev),
                            seed, 4, 0.5, 0.7)  # fmt: skip
            want = W.double() + 0.7 * b64.double() @ a64.double()
            scale = 1 + 0.7 * float(b64.abs().max() * a64.abs().max()) * r
            close64(Wd.cpu(), want, torch.float32, scale=2 * scale)
            if backend != "reference":
                Wr = W.clone()
                with fedkern.backend("reference"):
                    ops.lora_merge_(Wr, b, a, seed, 4, 0.5, 0.7)
                assert same_bits(Wd.cpu(), Wr)


def test_merge_float64_is_exact_arithmetic():
    W = torch.randn(4, 6, dtype=F64)
    B = torch.randn(4, 2, dtype=F64)
    W1 = W.clone()
    ops.lora_merge_(W1, B, None, 3, 1, 1.0, 2.0)
    A = gaussian((2, 6), seed=3, step=1, dtype=F64)
    torch.testing.assert_close(W1, W + 2.0 * B @ A, rtol=1e-15, atol=1e-15)


def test_merge_opcheck():
    W = torch.randn(6, 5)
    torch.library.opcheck(torch.ops.fedkern.lora_merge_, (W, torch.randn(6, 2), None, 1, 0, 1.0,
                                                            0.5))  # fmt: skip
    torch.library.opcheck(torch.ops.fedkern.lora_merge_, (W, None, torch.randn(2, 5), 1, 0, 1.0,
                                                            0.5))  # fmt: skip


def _layer(m=6, n=8, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    base = nn.Linear(n, m, dtype=dtype)
    return lora.RACLoRALinear(base, kw.pop("r", 2), kw.pop("alpha", 3.0), **kw)


@pytest.mark.parametrize("mode_side", [("rac", "A"), ("rac", "B"), ("asymm", "coin"),
                                       ("cola", "A"), ("lora", "A")])  # fmt: skip
def test_forward_is_the_effective_weight(mode_side):
    mode, side = mode_side
    L = _layer(dtype=F64, mode=mode, frozen=side, seed=fresh_seed())
    with torch.no_grad():
        for p in L.free_parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(5, 8, dtype=F64)
    torch.testing.assert_close(L(x), nn.functional.linear(x, L.merged_weight(), L.base.bias))
    names = {n for n, _ in L.named_parameters() if n.startswith("lora")}
    if mode in ("rac", "asymm"):
        assert names == {"lora_B" if L.side == "A" else "lora_A"}  # the frozen one is no param


def test_frozen_factor_is_not_saved_for_backward():
    """The frozen A [r, n] is regenerated in backward: no saved tensor has its size."""
    L = _layer(m=40, n=50, r=3)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        L(torch.randn(7, 50)).sum().backward()
    assert (3, 50) not in saved and L.lora_B.grad is not None
    # and the gradient is the one of the stored-factor formula
    A = L.frozen_factor()
    x = torch.randn(7, 50, requires_grad=True)
    g1 = torch.autograd.grad(L(x).square().sum(), x)[0]
    y = L.base(x) + L.scaling * (x @ A.T) @ L.lora_B.T
    g2 = torch.autograd.grad(y.square().sum(), x)[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("side", ["A", "B"])
def test_preconditioned_step_is_the_projected_step(side):
    """One SGD step of the zero free factor with the (Gram)^+ preconditioner, then the merge, is
    exactly W - gamma H grad f(W) (float64); without the preconditioner it is not."""
    seed = fresh_seed()
    T = torch.randn(4, 6, dtype=F64)
    results = {}
    for pre in (True, False):
        base = nn.Linear(6, 4, bias=False, dtype=F64)
        W = base.weight.detach().clone()
        L = lora.RACLoRALinear(base, 2, 3.0, frozen=side, seed=seed, precondition=pre,
                               init_std=0.7)  # fmt: skip
        F = L.frozen_factor()
        (0.5 * (L(torch.eye(6, dtype=F64)).T - T).square().sum()).backward()
        with torch.no_grad():
            for p in L.free_parameters():
                p -= 0.3 * p.grad
        L.merge_()
        want = lora.projected_step(W, W - T, F, side=side, gamma=0.3)
        results[pre] = float((L.base.weight - want).abs().max())
    assert results[True] < 1e-12 and results[False] > 1e-3


def test_projected_step_is_a_projection():
    G = torch.randn(5, 7, dtype=F64)
    W = torch.randn(5, 7, dtype=F64)
    B = torch.randn(5, 2, dtype=F64)
    step = W - lora.projected_step(W, G, B, side="B", gamma=1.0)  # H_B G
    torch.testing.assert_close(lora.projected_step(W, step, B, side="B", gamma=1.0), W - step)
    A = torch.randn(2, 7, dtype=F64)
    step = W - lora.projected_step(W, G, A, side="A", gamma=1.0)
    assert torch.linalg.matrix_rank(step) <= 2


def test_chain_modes_and_links():
    seed = fresh_seed()
    for mode in lora.MODES:
        L = _layer(mode=mode, seed=seed)
        F0 = L.frozen_factor() if L.side else L.lora_A.detach().clone()
        with torch.no_grad():
            for p in L.free_parameters():
                p.add_(1.0)
        Weff = L.merged_weight()
        merged = L.merge_()
        assert merged == (mode != "lora")
        if mode == "lora":
            assert L.link == 0 and torch.equal(L.merged_weight(), Weff)
            continue
        assert L.link == 1
        torch.testing.assert_close(L.base.weight, Weff)
        F1 = L.frozen_factor() if L.side else L.lora_A.detach()
        assert torch.equal(F0, F1) == (mode == "asymm")
        assert bool((L.lora_B == 0).all()) if "lora_B" in L._parameters else True


def _train(net, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=gen)
    opt = torch.optim.SGD(lora.free_parameters(net), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return x


def test_state_dict_resumes_a_coin_chain_exactly():
    def fresh():
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        return lora.wrap(net, 2, 2.0, frozen="coin", seed=5)

    a = fresh()
    for link in range(6):
        if link == 3:
            saved = copy.deepcopy(a.state_dict())  # torch's state_dict shares the live storage
        _train(a, 3, link)
        lora.merge_all_(a)
    b = fresh()
    b.load_state_dict(saved)
    for link in range(3, 6):
        _train(b, 3, link)
        lora.merge_all_(b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert va == vb if ka.endswith("_extra_state") else torch.equal(va, vb)
    sides = []
    layer = lora.lora_layers(a)[0]
    for _ in range(12):
        sides.append(layer.side)
        layer.merge_()
    assert set(sides) == {"A", "B"}


def test_wrap_targets():
    net = nn.Sequential()
    net.add_module("enc", nn.Sequential(nn.Linear(4, 5), nn.ReLU()))
    net.add_module("q_proj", nn.Linear(5, 5))
    net.add_module("head", nn.Linear(5, 2))
    lora.wrap(net, 1, target_modules=["q_proj", "head"], seed=2)
    assert isinstance(net.q_proj, lora.RACLoRALinear) and isinstance(net.head, lora.RACLoRALinear)
    assert isinstance(net.enc[0], nn.Linear)
    assert net.q_proj.seed != net.head.seed
    assert all(not p.requires_grad for n, p in net.named_parameters() if "lora" not in n)
    lora.wrap(net, 1, target_modules=r"enc\.0")
    assert isinstance(net.enc[0], lora.RACLoRALinear)
    assert len(lora.lora_layers(net)) == 3
    with pytest.raises(ValueError, match="no nn.Linear"):  # None: the adapted ones are skipped
        lora.wrap(net, 1)
    with pytest.raises(TypeError, match="already adapted"):
        lora.wrap(net, 1, target_modules=["head"])


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda net: lora.wrap(net, 1, target_modules=["act"]), TypeError, "not an nn.Linear"),
        (lambda net: lora.wrap(net, 1, target_modules=["nothing"]), ValueError, "no nn.Linear"),
        (lambda net: lora.wrap(net, 0), ValueError, "r"),
        (lambda net: lora.wrap(net, 5), ValueError, "r"),
        (lambda net: lora.wrap(net, 1, math.nan), ValueError, "alpha"),
        (lambda net: lora.wrap(net, 1, mode="dora"), ValueError, "mode"),
        (lambda net: lora.wrap(net, 1, frozen="C"), ValueError, "frozen"),
        (lambda net: lora.wrap(net, 1, mode="cola", precondition=True), ValueError,
         "precondition"),
        (lambda net: lora.wrap(net, 1, init_std=-1.0), ValueError, "init_std"),
        (lambda net: lora.RACLoRALinear(nn.Conv1d(2, 2, 1), 1), TypeError, "Linear"),
    ],
)  # fmt: skip
def test_bad_input_changes_nothing(call, exc, match):
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    net.act = nn.ReLU()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(exc, match=match):
        call(net)
    assert not lora.lora_layers(net)
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: ops.lora_merge_(torch.zeros(3, 4), None, None, 0), ValueError, "None"),
        (lambda: ops.lora_merge_(torch.zeros(3, 4), torch.zeros(2, 1), None, 0), ValueError, "B"),
        (lambda: ops.lora_merge_(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(1, 4), 0),
         ValueError, "rank"),
        (lambda: ops.lora_merge_(torch.zeros(3, 4), torch.zeros(3, 5), None, 0), ValueError,
         "rank"),
        (lambda: ops.lora_merge_(torch.zeros(3, 4, dtype=torch.int32), None, torch.zeros(1, 4),
         0), TypeError, "W"),
        (lambda: ops.lora_merge_(torch.zeros(3, 4), torch.zeros(3, 1), None, 0, 0, math.inf),
         ValueError, "std"),
        (lambda: lora.projected_step(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 1),
         side="C", gamma=1.0), ValueError, "side"),
        (lambda: lora.projected_step(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 1),
         side="B", gamma=1.0), ValueError, "factor"),
    ],
)  # fmt: skip
def test_bad_merge_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- the paper's claims --------------------------------------------------------------------------


def test_quadratic_rac_reaches_w_star_where_lora_cola_asymm_fail():
    """RAC-LoRA's 3 x 3 quadratic, Hessian diag(10, 1, 1), rank 1, gamma = 1/L, the paper's
    Gaussian init (std 1): RAC-LoRA (exact projected steps) reaches W* to 1e-8; LoRA and COLA
    diverge at gamma = 1/L, and AsymmLoRA converges to a suboptimal point. Same assertion for all:
    ||W - W*|| <= 1e-8 after the run."""
    task = QuadraticTask()
    assert task.L == 10.0
    dist, hist = {}, {}
    for cls in (RACLoRA, LoRA, COLA, AsymmLoRA):
        m = cls(task, seed=0, lr=1 / task.L)
        m.run(200)
        dist[cls.name] = m.history["dist"][-1]
        hist[cls.name] = m
    print({k: f"{v:.3g}" for k, v in dist.items()})
    assert dist["raclora"] <= 1e-8
    for name in ("lora", "cola", "asymmlora"):
        assert not dist[name] <= 1e-8
    assert hist["lora"].diverged_at is not None and hist["cola"].diverged_at is not None
    asym = hist["asymmlora"].history["dist"]
    assert abs(asym[-1] - asym[-20]) < 1e-9 * asym[-1] and asym[-1] > 0.1  # stopped, suboptimal


@pytest.fixture(scope="module")
def transfer():
    return TransferTask(pretrain_epochs=15, pretrain_lr=2e-2)


def test_transfer_rac_near_cola_and_far_above_asymm(transfer):
    """Digits 0-4 -> 5-9, rank 1 on every layer, AdamW, 40 links (one epoch each): RAC-LoRA within
    5 points of COLA (the paper: 92.0-96.1 vs 92.6-96.2 on MNIST); AsymmLoRA fails the same
    assertion (paper: 62.3-81.6) at the better of RAC-LoRA's learning rate and COLA's. Full
    fine-tuning and LoRA are reported next to them."""
    acc = {}
    runs = ((FPFT, 1e-2), (LoRA, 3e-2), (COLA, 3e-2), (AsymmLoRA, 3e-2), (AsymmLoRA, 1e-1),
            (RACLoRA, 1e-1))  # fmt: skip
    for cls, lr in runs:
        m = cls(transfer, seed=0, lr=lr)
        m.run(40)
        acc[cls.name] = max(acc.get(cls.name, 0.0), m.history["test_accuracy"][-1])
    print({k: round(100 * v, 1) for k, v in acc.items()})
    assert acc["raclora"] >= acc["cola"] - 0.05
    assert not acc["asymmlora"] >= acc["cola"] - 0.05
    assert acc["raclora"] >= acc["asymmlora"] + 0.2
    assert acc["fpft"] >= acc["raclora"] - 0.05


def test_fedraclora_equals_the_centralized_chain(transfer):
    """Every client holds the same data: averaging the clients' free factors is the centralized
    chain's (SGD, full batch, the same local steps): equal up to float32 rounding; the clients send
    r (m or n) floats per layer (B [m, 1]: 64 + 64 + 5), not m n."""
    fed = FedRACLoRA(transfer, clients=3, same_data=True, lr=0.5, steps=3, seed=0)
    fed.run(2)
    cen = RACLoRA(transfer, lr=0.5, steps=3, optimizer="sgd", batch_size=transfer.train.numel(),
                  seed=0)  # fmt: skip
    cen.run(2)
    for (ka, va), (kb, vb) in zip(fed.model.state_dict().items(), cen.model.state_dict().items(),
                                  strict=True):  # fmt: skip
        assert ka == kb
        if isinstance(va, torch.Tensor):
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
    assert fed.history["floats_up"][1:] == [133, 133]
    assert fed.history["floats_dense"][-1] == 64 * 64 + 64 * 64 + 5 * 64
    # a heterogeneous cohort run moves away from the start and is reproducible
    a = FedRACLoRA(transfer, clients=6, split="label_sorted", cohort=3, lr=0.5, steps=2, seed=1)
    a.run(2)
    state = a.state_dict()
    a.run(1)
    b = FedRACLoRA(transfer, clients=6, split="label_sorted", cohort=3, lr=0.5, steps=2, seed=1)
    b.load_state_dict(state)
    b.run(1)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


@pytest.mark.parametrize("cls", [RACLoRA, AsymmLoRA, COLA, LoRA, FPFT])
def test_chain_methods_resume_exactly(cls, transfer):
    kw = {"seed": 3, "lr": 3e-2, "steps": 2, "frozen": "coin"}
    a = cls(transfer, **kw)
    a.run(2)
    state = a.state_dict()
    a.run(2)
    b = cls(transfer, **kw)
    b.load_state_dict(state)
    b.run(2)
    assert a.history == b.history
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
