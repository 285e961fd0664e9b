"""TopK / RandK / ErrorFeedback building blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, close64, same_bits

import fedkern
from fedkern.compress import Compressor, ErrorFeedback, RandK, TopK


def test_k_and_ratio():
    assert TopK(5).k_for(3) == 3 and TopK(5).k_for(100) == 5
    assert TopK(ratio=0.01).k_for(1000) == 10 and TopK(ratio=0.01).k_for(50) == 1
    assert RandK(ratio=1.0, seed=1).k_for(7) == 7
    for bad, exc in [({}, ValueError), ({"k": 2, "ratio": 0.1}, ValueError),
                     ({"k": 0}, ValueError), ({"k": 1.5}, TypeError),
                     ({"ratio": 0.0}, ValueError), ({"ratio": 1.5}, ValueError),
                     ({"ratio": "x"}, TypeError)]:  # fmt: skip
        with pytest.raises(exc):
            TopK(**bad)
    with pytest.raises(ValueError, match="seed"):
        RandK(3, seed=-1)


def test_topk_roundtrip():
    x = torch.randn(4, 25)
    c = TopK(ratio=0.2)
    values, indices = c.compress(x)
    dense = c.decompress(values, indices, x)
    assert dense.shape == x.shape and int((dense != 0).sum()) == 20
    assert torch.equal(dense.flatten()[indices], x.flatten()[indices])


def test_randk_steps_advance_and_checkpoint():
    x = torch.randn(1000)
    c = RandK(10, seed=4)
    first = c.compress(x)[1]
    second = c.compress(x)[1]
    assert not torch.equal(first, second) and c.step == 2
    saved = c.state_dict()
    c2 = RandK(10, seed=4)
    c2.load_state_dict(saved)
    assert torch.equal(c.compress(x)[1], c2.compress(x)[1])
    assert torch.equal(c.compress(x, step=0)[1], first)
    with pytest.raises(ValueError, match="seed"):
        RandK(10, seed=5).load_state_dict(saved)


def _compressors():
    return [TopK(ratio=0.05), RandK(ratio=0.05, seed=9, unbiased=False)]


@pytest.mark.parametrize("make", range(2))
@pytest.mark.parametrize("dtype", DTYPES)
def test_ef14_accounts_for_everything(make, dtype):
    """sum of sent messages + residual == lr * sum of gradients (EF14's conservation law)."""
    ef = ErrorFeedback(_compressors()[make], "ef14", lr=0.5)
    g_sum = torch.zeros(40, 10, dtype=torch.float64)
    sent = torch.zeros(400, dtype=torch.float64)
    for _ in range(6):
        g = torch.randn(40, 10).to(dtype)
        g_sum += g.double()
        values, indices = ef.step(g)
        sent.index_add_(0, indices, values.double())
    scale = float(g_sum.abs().max()) * 6
    close64(sent + ef.buffer.double().flatten(), 0.5 * g_sum.flatten(), dtype, scale)


@pytest.mark.parametrize("make", range(2))
def test_ef21_state_tracks_messages(make):
    ef = ErrorFeedback(_compressors()[make], "ef21")
    s = torch.zeros(300, dtype=torch.float64)
    for _ in range(5):
        values, indices = ef.step(torch.randn(300))
        s.index_add_(0, indices, values.double())
    close64(ef.buffer, s, torch.float32, float(s.abs().max()))


@pytest.mark.parametrize("kind", ["ef14", "ef21"])
@pytest.mark.parametrize("make", range(2))
def test_state_dict_resume_is_exact(kind, make):
    grads = [torch.randn(500).bfloat16() for _ in range(6)]
    ref = ErrorFeedback(_compressors()[make], kind)
    ref_out = [ref.step(g) for g in grads]
    a = ErrorFeedback(_compressors()[make], kind)
    for g in grads[:3]:
        a.step(g)
    saved = a.state_dict()
    b = ErrorFeedback(_compressors()[make], kind)
    b.load_state_dict(saved)
    assert b.buffer.dtype == torch.bfloat16
    saved["buffer"].zero_()  # the loaded buffer is a copy, not an alias
    for g, (rv, ri) in zip(grads[3:], ref_out[3:], strict=True):
        v, i = b.step(g)
        assert torch.equal(i, ri) and same_bits(v, rv)
    assert same_bits(b.buffer, ref.buffer)


def test_error_feedback_bad_args():
    with pytest.raises(TypeError, match="compressor must be"):
        ErrorFeedback("topk")
    with pytest.raises(ValueError, match="kind must be one of"):
        ErrorFeedback(TopK(3), "ef22")
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ErrorFeedback(TopK(3), lr=-1)
    with pytest.raises(ValueError, match="lr applies to kind='ef14' only"):
        ErrorFeedback(TopK(3), "ef21", lr=0.5)
    ef = ErrorFeedback(TopK(3))
    with pytest.raises(TypeError, match="grad must be a float32 or bfloat16"):
        ef.step(torch.arange(10))
    ef.step(torch.randn(10))
    with pytest.raises(ValueError, match="must have grad's shape"):
        ef.step(torch.randn(11))
    with pytest.raises(ValueError, match="state_dict is for kind"):
        ErrorFeedback(TopK(3), "ef21").load_state_dict(ef.state_dict())


class _Scaled(Compressor):
    """A compressor without a fused op: exercises the generic EF path."""

    def compress(self, x):
        values, indices = fedkern.topk_compress(x, self.k_for(x.numel()))
        return values * 0.5, indices


@pytest.mark.parametrize("kind", ["ef14", "ef21"])
def test_generic_feedback_path(kind):
    ef = ErrorFeedback(_Scaled(ratio=0.1), kind)
    g = torch.randn(200)
    values, indices = ef.step(g)
    assert torch.equal(indices, fedkern.topk_compress(g, 20)[1])
    close64(values, g.double()[indices] * 0.5, torch.float32)
    expect = g.double() - Compressor.decompress(values, indices, g).double()
    if kind == "ef21":
        expect = g.double() - expect
    close64(ef.buffer, expect, torch.float32, 1.0)
