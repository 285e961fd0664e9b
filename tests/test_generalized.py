"""The (L0, L1)-smooth local methods (fedkern.algorithms.generalized): the claims of 2412.02781 on
the official quartic setup, each against its negative control in the same test, plus exactness,
no-host-sync, resume and bad-input tests.

Setup (the official code's): N = 1000 points uniform in [-10, 10]^d, sorted by norm into 10
contiguous clients of 100, x0 = 100 * ones, d in {1, 100}. "Converges" = f - f* <= 1e-6 (f(x0) - f*)
within the round budget, without diverging.

The budget: on the data of seed 0 the clipped methods reach the bar at round 72 (d = 1) and 62
(d = 100); on the data of seeds 0..11 at rounds 71-85 (d = 1) and 60-64 (d = 100). 100 rounds
leave 15% to spare on the slowest of those; the controls diverge by round 4 or end above 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import same_bits

from fedkern.algorithms import (
    CLERR,
    NASTYA,
    ClipLocalGDJ,
    ClippedFedAvg,
    ClippedGD,
    ClippedRRCLI,
    FedAvg,
    LocalClippedSGD,
    LocalGD,
)
from fedkern.clients import ClientBatch
from fedkern.problems import Quartic

ROUNDS = 100


def quartic(d: int) -> ClientBatch:
    return ClientBatch(Quartic.sorted_split(Quartic.uniform_points(1000, d, seed=0), 10), seed=0)


_CACHE: dict[int, ClientBatch] = {}


def batch_for(d):
    if d not in _CACHE:
        _CACHE[d] = quartic(d)
    return _CACHE[d]


def converged(m) -> int | None:
    """The first round with f - f* <= 1e-6 gap0, or None (diverged or too slow)."""
    gap = m.history["gap"]
    hit = [i for i, g in enumerate(gap) if math.isfinite(g) and g <= 1e-6 * gap[0]]
    return hit[0] if hit and m.diverged_at is None else None


def report(name, m):
    print(f"{name}: converged at {converged(m)}, diverged at {m.diverged_at}, "
          f"final gap ratio {m.history['gap'][-1] / m.history['gap'][0]:.3g}")  # fmt: skip


@pytest.mark.parametrize("d", [1, 100])
@pytest.mark.parametrize("tau", [1, 10])
def test_clip_localgdj_converges_where_local_gd_and_unclipped_jump_fail(d, tau):
    b = batch_for(d)
    x0 = torch.full((d,), 100.0)
    theory = ClipLocalGDJ(b, local_steps=tau, x0=x0).gamma
    # tau = 1: a step 100x the theory's, where GD itself diverges; tau = 10: the theory step
    # (Local GD diverges only from ~1000x, where the shared first local phase of every method
    # overflows; from ~100x it reaches the bar too: docs/methods/generalized_smoothness_biased_sgd)
    gamma = theory * (100 if tau == 1 else 1)
    clip = ClipLocalGDJ(b, gamma=gamma, local_steps=tau, x0=x0)
    unclipped = ClipLocalGDJ(b, gamma=gamma, local_steps=tau, x0=x0, c1=0.0)
    local = LocalGD(b, gamma=gamma, local_steps=tau, x0=x0)
    for name, m in (("clip", clip), ("unclipped jump", unclipped), ("local gd", local)):
        m.run(ROUNDS)
        report(name, m)
    assert converged(clip) is not None
    assert converged(unclipped) is None and unclipped.diverged_at is not None
    assert converged(local) is None
    if tau == 1:
        assert local.diverged_at is not None


@pytest.mark.parametrize("d", [1, 100])
def test_clerr_and_clipped_rr_cli_converge_where_unclipped_twins_fail(d):
    b = batch_for(d)
    x0 = torch.full((d,), 100.0)
    clerr, nastya = CLERR(b, x0=x0), NASTYA(b, x0=x0)
    rr, rr_unclipped = ClippedRRCLI(b, x0=x0), ClippedRRCLI(b, x0=x0, c1=0.0)
    local = LocalGD(b, gamma=clerr.gamma, local_steps=clerr._epoch_steps, x0=x0)
    for name, m in (("clerr", clerr), ("nastya", nastya), ("clipped rr-cli", rr),
                    ("rr-cli unclipped", rr_unclipped), ("local gd", local)):  # fmt: skip
        m.run(ROUNDS)
        report(name, m)
    assert converged(clerr) is not None and converged(rr) is not None
    assert converged(nastya) is None and nastya.diverged_at is not None
    assert converged(rr_unclipped) is None and rr_unclipped.diverged_at is not None
    assert converged(local) is None


@pytest.mark.parametrize("tau", [1, 10])
def test_c1_zero_equals_local_gd_bit_for_bit(tau):
    """c1 = 0 and theta = gamma tau (c0 = 1 / (gamma tau)): Clip-LocalGDJ is Local GD; the
    clipped method (c1 = L1) is not."""
    b = batch_for(1)
    x0 = torch.full((1,), 3.0)
    gamma = 1e-4
    ref = FedAvg(b, gamma=gamma, local_steps=tau, x0=x0)
    same = ClipLocalGDJ(b, gamma=gamma, local_steps=tau, c0=1 / (gamma * tau), c1=0.0, x0=x0)
    clipped = ClipLocalGDJ(b, gamma=gamma, local_steps=tau, c0=1 / (gamma * tau), x0=x0)
    differs = False
    for _ in range(20):
        for m in (ref, same, clipped):
            m.step()
        assert same_bits(same.x, ref.x)
        differs |= not same_bits(clipped.x, ref.x)
    assert differs


def test_clipped_gd_is_one_step_clip_localgdj_and_matches_float64():
    b = batch_for(1)
    x0 = torch.full((1,), 50.0)
    m = ClippedGD(b, x0=x0)
    q = b.problem
    x = x0.double()
    for _ in range(5):
        m.step()
        g = q.grad(x)
        x = x - g / (m.c0 + m.c1 * float(g.norm()))
        torch.testing.assert_close(m.x.double(), x, rtol=1e-5, atol=1e-5)


def test_norm_full_uses_the_full_gradient():
    b = batch_for(1)
    x0 = torch.full((1,), 20.0)
    m = ClipLocalGDJ(b, local_steps=5, norm="full", x0=x0)
    m.step()
    g = b.problem.grad(x0.double())
    assert math.isclose(m.history["jump_norm"][-1], float(g.norm()), rel_tol=1e-5)
    assert math.isclose(m.history["theta"][-1], 1 / (m.c0 + m.c1 * float(g.norm())), rel_tol=1e-5)


def test_rr_cli_with_one_cohort_of_all_is_clerr():
    """C = M: R = 1 and the within-epoch server step cancels (g = (x - z) / eta): CLERR's jump."""
    b = batch_for(1)
    x0 = torch.full((1,), 30.0)
    a, c = CLERR(b, x0=x0), ClippedRRCLI(b, x0=x0, cohort=10)
    for _ in range(5):
        a.step()
        c.step()
    torch.testing.assert_close(a.x, c.x, rtol=1e-5, atol=1e-6)


def test_baselines_run_and_match_their_definitions():
    b = batch_for(1)
    x0 = torch.full((1,), 5.0)
    lc = LocalClippedSGD(b, local_steps=3, x0=x0, c0=1e4, c1=10.0)
    lc.step()
    assert lc.gamma == 1 / 2e4 and lc.lam == 1e3
    cf = ClippedFedAvg(b, clip=1.0, gamma=1e-5, local_steps=3, x0=x0, server_lr=0.5)
    Y = x0.expand(10, -1).contiguous()
    b.local_steps_(Y, gamma=1e-5, steps=3, round=0)
    U = (x0 - Y) / 3
    U = U * torch.clamp(1.0 / U.double().norm(dim=1, keepdim=True), max=1).float()
    cf.step()
    torch.testing.assert_close(cf.x, x0 - 0.5 * U.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda b, x0: ClipLocalGDJ(b, local_steps=3, x0=x0, record_every=10**6),
    lambda b, x0: ClipLocalGDJ(b, local_steps=3, x0=x0, norm="full", record_every=10**6),
    lambda b, x0: CLERR(b, x0=x0, record_every=10**6),
])  # fmt: skip
def test_round_reads_no_tensor_back(make, monkeypatch):
    """A round's step() never reads a tensor to the host (.item(), .cpu(), float(), bool(), ...):
    on a GPU none would synchronize. The counting hook patches every read-back entry point."""
    b = batch_for(3)
    m = make(b, torch.full((3,), 10.0))
    m.step()  # warm
    calls = []
    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def hook(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, hook)
    for _ in range(3):
        m.step()
    monkeypatch.undo()
    assert calls == []
    # the control: a recorded round reads the model
    m.record_every = 1
    calls.clear()
    orig_item = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__",
                        lambda self: calls.append("f") or orig_item(self))  # fmt: skip
    m.step()
    monkeypatch.undo()
    assert calls


@pytest.mark.parametrize("cls,kw", [(ClipLocalGDJ, {"local_steps": 3, "mode": "rr"}),
                                    (CLERR, {}), (ClippedRRCLI, {"cohort": 3}),
                                    (LocalClippedSGD, {"c0": 1e4, "c1": 1.0})])  # fmt: skip
def test_resume_bit_for_bit(cls, kw):
    b = batch_for(1)
    x0 = torch.full((1,), 40.0)
    full = cls(b, x0=x0, seed=5, **kw)
    full.run(8)
    part = cls(b, x0=x0, seed=5, **kw)
    part.run(4)
    state = part.state_dict()
    resumed = cls(b, x0=x0, seed=5, **kw)
    resumed.load_state_dict(state)
    resumed.run(4)
    assert same_bits(resumed.x, full.x)
    assert resumed.history["loss"] == full.history["loss"]
    other = cls(b, x0=x0, seed=5, **{**kw, "c0": 123.0})
    with pytest.raises(ValueError, match="c0"):
        other.load_state_dict(state)


def test_divergence_is_recorded_not_raised():
    b = batch_for(1)
    m = ClipLocalGDJ(b, gamma=1.0, local_steps=10, x0=torch.full((1,), 100.0))
    m.run(5)
    assert m.diverged_at == 1 and m.history["diverged"][-1] and len(m.history["loss"]) == 2


def test_bad_input():
    b = batch_for(1)
    with pytest.raises(ValueError, match="c0 must be > 0"):
        ClipLocalGDJ(b, c0=0.0)
    with pytest.raises(ValueError, match="c1 must be >= 0"):
        CLERR(b, c1=-1.0)
    with pytest.raises(ValueError, match="gamma must be finite"):
        ClipLocalGDJ(b, gamma=math.nan)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        ClippedRRCLI(b, gamma=-1.0)
    with pytest.raises(ValueError, match="cohort must be in"):
        ClippedRRCLI(b, cohort=11)
    with pytest.raises(ValueError, match="norm must be"):
        CLERR(b, norm="max")
    with pytest.raises(ValueError, match="mode must be"):
        ClipLocalGDJ(b, mode="adam")
    with pytest.raises(ValueError, match="local_steps must be in"):
        ClipLocalGDJ(b, local_steps=0)
    with pytest.raises(ValueError, match="eta must be finite"):
        ClippedRRCLI(b, eta=math.inf)
    with pytest.raises(ValueError, match="clip"):
        ClippedFedAvg(b)
    with pytest.raises(TypeError, match="ClientBatch or ModuleBatch"):
        CLERR(b.problem)
    with pytest.raises(ValueError, match="x0 must have shape"):
        ClipLocalGDJ(b, x0=torch.zeros(2))


def test_rr_cli_remainder_cohort():
    """C not dividing M: the last cohort holds the remainder (every client once per epoch)."""
    b = batch_for(1)
    m = ClippedRRCLI(b, cohort=3, x0=torch.full((1,), 10.0))
    assert m._R == 4
    m.run(3)
    assert m.diverged_at is None and m.history["floats_down"][-1] == 4
