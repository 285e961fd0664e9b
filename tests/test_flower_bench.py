"""The flower_methods benchmark (``fedkern.benchmarks.flower_methods``): its NumPy twins of
``ScaffnewStrategy`` / ``TamunaStrategy`` compute the same round as fedkern's strategies (to float32
rounding) and as a float64 oracle of the method's rule written here; the held index equals the
protocol's mask; the cases are registered in the suites. No timing is asserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict  # noqa: E402

from fedkern import benchmarks as B  # noqa: E402
from fedkern.benchmarks import flower_methods as FM  # noqa: E402
from fedkern.integrations.flower import protocol as P  # noqa: E402


def oracle(method, X, x0, perm, s, live):
    """float64: Scaffnew the mean of the live rows; TAMUNA per coordinate r the mean of its live
    holders perm[(s r + j) % c] (a loop over coordinates), x0[r] when none is live."""
    c, p = X.shape
    X = X.astype(np.float64)
    if method == "scaffnew":
        return X[sorted(live)].mean(axis=0)
    out = x0.astype(np.float64).copy()
    for r in range(p):
        hs = [int(perm[(s * r + j) % c]) for j in range(s)]
        hs = [h for h in hs if h in live]
        if hs:
            out[r] = X[hs, r].mean()
    return out


def run_round(method, c, p, s, seed, replies_of=None):
    """(fedkern model, twin model, oracle model, the strategies, X, x0) after one round on fresh
    data X [c, p], x0 [p];
    ``replies_of(replies) -> replies`` alters the replies (both sides get the same list)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((c, p)).astype(np.float32)
    x0 = rng.standard_normal(p).astype(np.float32)
    fk = FM.make_strategy(method, c, s, seed=seed)
    tw = FM.make_strategy(method, c, s, numpy=True, seed=seed)
    replies = FM.make_round(fk, X, x0)
    FM.make_round(tw, X, x0)
    perm = fk._plan.perm.numpy()
    assert np.array_equal(perm, tw._plan.perm.numpy())
    if replies_of is not None:
        with FM.task_identity():
            replies = replies_of(replies)
    a_fk, _ = fk.aggregate_train(1, replies)
    a_tw, _ = tw.aggregate_train(1, replies)
    live = set(fk._plan.live)
    assert live == set(tw._plan.live)
    ref = oracle(method, X, x0, perm, fk.s, live) if live else x0.astype(np.float64)
    got_fk = fk.x.numpy() if a_fk is not None else None
    got_tw = tw.x.numpy() if a_tw is not None else None
    if a_fk is not None:
        assert np.array_equal(a_fk["x"].numpy(), got_fk)
        assert np.array_equal(a_tw["x"].numpy(), got_tw)
    return got_fk, got_tw, ref, fk, tw, X, x0


CASES = [("scaffnew", 7, 300, 7), ("tamuna", 10, 257, 2), ("tamuna", 6, 100, 4),
         ("tamuna", 5, 64, 5), ("tamuna", 4, 1, 2)]  # fmt: skip


@pytest.mark.parametrize("method,c,p,s", CASES)
def test_twins_equal_fedkern_and_oracle(method, c, p, s):
    seed = int(np.random.default_rng().integers(2**31))
    got_fk, got_tw, ref, fk, tw, X, x0 = run_round(method, c, p, s, seed)
    np.testing.assert_allclose(got_tw, got_fk, rtol=2e-6, atol=2e-6, err_msg=f"seed {seed}")
    np.testing.assert_allclose(got_tw, ref, rtol=2e-6, atol=2e-6, err_msg=f"seed {seed}")
    np.testing.assert_allclose(got_fk, ref, rtol=2e-6, atol=2e-6, err_msg=f"seed {seed}")
    assert tw._plan.metrics["floats_up"] == fk._plan.metrics["floats_up"]
    assert tw.last_agg == fk.last_agg == {i: 0 for i in range(c)}
    # negative control: the mean of all c rows (TAMUNA with s < c: not the holders' mean), or
    # of all but one row (Scaffnew, s = c), fails the same check against the oracle
    wrong = X.mean(axis=0) if s < c else X[1:].mean(axis=0)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(wrong, ref, rtol=2e-6, atol=2e-6)


def _fail(rows):
    def alter(replies):
        out = []
        for m in replies:
            if m.content[P.RECORD]["row"] in rows:
                out.append(Message(Error(code=1, reason="lost"), reply_to=_request_of(m)))
            else:
                out.append(m)
        return out

    return alter


def _request_of(reply):
    """A stand-in request that a reply can answer again (same nodes, round group)."""
    req = Message(RecordDict({}), dst_node_id=reply.metadata.src_node_id,
                  message_type=P.ACTION_TRAIN, group_id=reply.metadata.group_id)  # fmt: skip
    return req


def _nan(row):
    def alter(replies):
        out = []
        for m in replies:
            if m.content[P.RECORD]["row"] == row:
                vals = m.content[P.VALUES]["values"].numpy().copy()
                vals[0] = np.nan
                content = RecordDict({P.RECORD: ConfigRecord(dict(m.content[P.RECORD])),
                                      P.VALUES: ArrayRecord({"values": Array(vals)})})  # fmt: skip
                out.append(Message(content, reply_to=_request_of(m)))
            else:
                out.append(m)
        return out

    return alter


@pytest.mark.parametrize(
    "method,c,p,s", [("scaffnew", 6, 50, 6), ("tamuna", 6, 50, 2), ("tamuna", 6, 40, 6)]
)
def test_twins_skip_failed_and_bad_replies_as_fedkern(method, c, p, s):
    """Failed replies and a reply with a NaN are left out on both sides; TAMUNA coordinates
    whose holders all failed keep their value."""
    seed = int(np.random.default_rng().integers(2**31))
    for alter in (_fail({0, 1}), _nan(2), _fail({0, 1, 2, 3, 4, 5})):
        got_fk, got_tw, ref, fk, tw, X, x0 = run_round(method, c, p, s, seed, alter)
        if got_fk is None:  # every reply failed: no model on either side
            assert got_tw is None and fk._plan.metrics["skipped"] == 1
            assert tw._plan.metrics["skipped"] == 1
            continue
        assert len(fk._plan.live) < c
        np.testing.assert_allclose(got_tw, got_fk, rtol=2e-6, atol=2e-6, err_msg=f"seed {seed}")
        np.testing.assert_allclose(got_tw, ref, rtol=2e-6, atol=2e-6, err_msg=f"seed {seed}")
        for k in ("failures", "rejected", "clients", "floats_up"):
            assert tw._plan.metrics[k] == fk._plan.metrics[k], k
        # negative control: the rule with every row live (the NaN / failed replies' true
        # values included) fails the same check
        everyone = oracle(method, X, x0, fk._plan.perm.numpy(), s, set(range(c)))
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(got_tw, everyone, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("c,s", [(10, 2), (6, 4), (7, 3), (100, 2), (8, 8)])
def test_held_index_is_the_protocol_mask(c, s):
    p = 1 + int(np.random.default_rng().integers(1, 700))
    for slot in range(c):
        idx = FM.held_index(p, c, s, slot)
        mask = P.held_mask(p, c, s, slot).numpy()
        if s == c:
            assert idx is None and mask.all()
        else:
            assert np.array_equal(idx, np.flatnonzero(mask))
    # negative control: slot s (the first slot of coordinate 1's holders) holds another set
    if s < c:
        assert not np.array_equal(FM.held_index(p, c, s, 0),
                                  np.flatnonzero(P.held_mask(p, c, s, s).numpy()))  # fmt: skip


def test_bad_method_is_named():
    with pytest.raises(ValueError, match="method"):
        FM.make_strategy("fedavg", 4, 2)


def test_cases_registered_and_setup_runs():
    quick = [c.id for c in B.suite() if c.family == "flower_methods"]
    assert quick == ["flower_scaffnew_round-n1e4-m100-k100-fp32",
                     "flower_tamuna_round-n1e4-m100-k2-fp32"]  # fmt: skip
    full = [c.id for c in B.suite(full=True) if c.family == "flower_methods"]
    assert full[2:] == ["flower_scaffnew_round-n1e6-m100-k100-fp32",
                        "flower_tamuna_round-n1e6-m100-k2-fp32",
                        "flower_tamuna_round-n1e6-m100-k100-fp32"]  # fmt: skip
    for case in [c for c in B.suite(sizes=[200]) if c.family == "flower_methods"]:
        prep = case.setup("cpu")
        outs = []
        for side in ("fedkern", "eager"):  # two calls each: the re-arm restores the round
            for _ in range(2):
                getattr(prep, f"rearm_{side}")()
                arrays, metrics = getattr(prep, side)()
                outs.append(arrays["x"].numpy().copy())
                assert metrics["clients"] == case.m
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_array_equal(outs[2], outs[3])
        np.testing.assert_allclose(outs[0], outs[2], rtol=2e-6, atol=2e-6)
        # the re-arm puts the round's starting model back (the call had changed it)
        fk = prep.tensors["fedkern"]
        x_after = fk.x.clone()
        prep.rearm_fedkern()
        assert not torch.equal(fk.x, x_after) and fk._plan.live == []
