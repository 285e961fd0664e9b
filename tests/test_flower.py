"""fedkern.integrations.flower with the real flwr package (flwr==1.42.0, with Ray).

Both strategies -- the Message-API ``FedkernStrategy`` (``aggregate_train`` over reply Messages)
and the legacy ``LegacyFedkernStrategy`` (``aggregate_fit`` over ``FitRes``) -- are checked on
constructed replies against fedkern.robust called directly (and NumPy for median / trimmed mean);
the client mod through real ``ClientApp`` s (a Message-API ``@app.train()`` function and a legacy
``NumPyClient``) with a persistent ``Context``. End to end: ``strategy.start`` and Flower's legacy
``Server`` loop drive ClientApps over a small in-process ``Grid``, and Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray backend) runs the strategy and the mod on 6 virtual nodes.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import in_process_grid  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import Server, SimpleClientManager  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import fedkern.robust as R  # noqa: E402
from fedkern.compress import RandK, TopK  # noqa: E402
from fedkern.integrations import flower as F  # noqa: E402
from fedkern.random import client_seed, randk_keys  # noqa: E402
from fedkern.reference.randk import randk_indices  # noqa: E402

SHAPES = [(3, 4), (5,), (2, 3, 2)]  # d = 29


@pytest.fixture(autouse=True)
def _flwr_process():
    """Quiet logs, and the process identity that Flower's runtime sets before a ServerApp runs
    (``Message`` reads it; ``flwr.server.compat.start_grid`` sets the same values)."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _params(rng, scale=1.0):
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


def _fitres(arrays, num_examples=10):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {})


def _flat(arrays):
    return np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])


def _unflat(v):
    out, off = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        out.append(v[off : off + n].reshape(s))
        off += n
    return out


KEYS = ["w0", "b0", "w1"]  # the Message API's named arrays (one per SHAPES entry)


def _record(arrays, keys=None):
    """An ArrayRecord of the arrays: named by KEYS (a model), or "0", "1", ... (a codec list)."""
    if keys is None:
        return ArrayRecord(list(arrays))
    rec = ArrayRecord()
    for k, a in zip(keys, arrays, strict=True):
        rec[k] = flwr.app.Array(np.ascontiguousarray(a))
    return rec


def _train_msg(glob, node_id=3):
    content = RecordDict({"arrays": _record(glob, KEYS[: len(glob)]), "config": ConfigRecord()})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def _reply(request, arrays, num_examples=10):
    """A client's reply: dense arrays (a model, named like the request) or a compressed list."""
    keys = None if F.is_compressed(arrays) else KEYS[: len(arrays)]
    content = RecordDict({"arrays": _record(arrays, keys),
                          "metrics": MetricRecord({"num-examples": num_examples})})  # fmt: skip
    return Message(content, reply_to=request)


class API:
    """The strategy tests run on both strategy APIs through this adapter."""

    def __init__(self, kind):
        self.kind = kind
        self.cls = F.FedkernStrategy if kind == "message" else F.LegacyFedkernStrategy

    def make(self, **kw):
        return self.cls(**kw)

    def round(self, strategy, glob, replies, server_round=1):
        """(new arrays in order or None, metrics dict) of one aggregation round."""
        if self.kind == "legacy":
            strategy.set_global_parameters(glob)
            params, metrics = strategy.aggregate_fit(
                server_round, [(None, _fitres(r)) for r in replies], []
            )
            return (None if params is None else parameters_to_ndarrays(params)), metrics
        strategy.set_global_arrays(_record(glob, KEYS[: len(glob)]))
        request = _train_msg(glob)
        rec, metrics = strategy.aggregate_train(server_round,
                                                [_reply(request, r) for r in replies])  # fmt: skip
        metrics = {} if metrics is None else dict(metrics)
        if rec is None:
            return None, metrics
        assert list(rec.keys()) == KEYS[: len(glob)]
        return [rec[k].numpy() for k in KEYS[: len(glob)]], metrics

    def global_arrays(self, strategy):
        if self.kind == "legacy":
            return strategy.global_parameters
        rec = strategy.global_arrays
        return [rec[k].numpy() for k in rec.keys()]


@pytest.fixture(params=["message", "legacy"])
def api(request):
    return API(request.param)


def _setup(n=7, seed=0):
    rng = np.random.default_rng(seed)
    glob = _params(rng)
    replies = [[g + u for g, u in zip(glob, _params(rng, 0.1), strict=True)] for _ in range(n)]
    X = np.stack([_flat(r) - _flat(glob) for r in replies])  # the updates, float32
    return glob, replies, X


# ---------------------------------------------------------------------------------------------
# the strategy against fedkern.robust
# ---------------------------------------------------------------------------------------------

CASES = [
    ("mean", 0, None, {}),
    ("coordinate_median", 0, None, {}),
    ("trimmed_mean", 2, None, {}),
    ("krum", 1, None, {}),
    ("krum", 1, None, {"m": 3}),
    ("bulyan", 1, None, {}),
    ("coordinate_median", 1, "bucketing", {}),
    ("krum", 1, "nnm", {}),
    ("geometric_median", 0, None, {"iters": 4}),
    ("centered_clip", 0, None, {"tau": 0.5}),
]


def _reference(rule, f, pre, opts, X, *, bucket_size=2, seed=0, step=0):
    X = torch.from_numpy(X.copy())
    if pre == "bucketing":
        X = R.bucketing(X, bucket_size, seed=seed, step=step)
    elif pre == "nnm":
        X = R.nnm(X, f)
    if rule == "mean":
        return X.mean(0).numpy()
    fn = getattr(R, rule)
    args = (f,) if rule in ("trimmed_mean", "krum", "bulyan") else ()
    return fn(X, *args, **opts).numpy()


@pytest.mark.parametrize("rule,f,pre,opts", CASES, ids=lambda c: str(c))
def test_strategy_matches_fedkern_robust(api, rule, f, pre, opts):
    glob, replies, X = _setup()
    s = api.make(rule=rule, f=f, pre=pre, seed=3, rule_options=opts, device="cpu")
    new, metrics = api.round(s, glob, replies)
    agg = _reference(rule, f, pre, opts, X, seed=3)
    expect = [g + a for g, a in zip(glob, _unflat(agg), strict=True)]
    for got, exp in zip(new, expect, strict=True):
        assert got.dtype == np.float32 and got.shape == exp.shape
        np.testing.assert_array_equal(got, exp)
    assert metrics["fedkern_clients"] == 7 and metrics["fedkern_nonfinite"] == 0
    assert metrics["fedkern_step_norm"] == pytest.approx(float(np.linalg.norm(agg)), rel=1e-6)
    assert api.global_arrays(s) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule,f,pre,opts", CASES, ids=lambda c: str(c))
def test_strategy_on_cuda_matches_cpu(api, rule, f, pre, opts):
    """Every rule and pre-aggregation with X on CUDA, two of the replies compressed (rand-k,
    top-k) and a fixed clip: the CPU result."""
    glob, replies, _ = _setup()
    replies[1] = F.compress_update(
        [r - g for r, g in zip(replies[1], glob, strict=True)], RandK(k=4, seed=2, unbiased=False)
    )
    replies[2] = F.compress_update(
        [r - g for r, g in zip(replies[2], glob, strict=True)], TopK(k=3)
    )
    out = {}
    for dev in ("cpu", "cuda"):
        s = api.make(rule=rule, f=f, pre=pre, rule_options=opts, clip=1.0, device=dev)
        out[dev], m = api.round(s, glob, replies)
        assert m["fedkern_compressed"] == 2 and m["fedkern_malformed"] == 0
    np.testing.assert_allclose(_flat(out["cuda"]), _flat(out["cpu"]), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule,f,opts", [("mean", 0, {}), ("krum", 1, {}),
                                         ("centered_clip", 0, {"tau": 0.5})])  # fmt: skip
def test_strategy_adaptive_clip_on_cuda_matches_cpu(api, rule, f, opts):
    """Adaptive clipping (the radius from the last step's norm, kept on the strategy) over two
    rounds with X on CUDA: the CPU rounds, models and radii."""
    glob, replies, _ = _setup(seed=6)
    out = {}
    for dev in ("cpu", "cuda"):
        s = api.make(rule=rule, f=f, rule_options=opts, clip=0.05, clip_alpha=3.0, device=dev)
        new1, m1 = api.round(s, glob, replies)
        new2, m2 = api.round(s, new1, replies, server_round=2)
        out[dev] = (_flat(new1), _flat(new2), m1["fedkern_clip"], m2["fedkern_clip"])
    for got, want in zip(out["cuda"], out["cpu"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_strategy_median_and_trimmed_mean_vs_numpy(api):
    glob, replies, X = _setup(n=7, seed=1)
    new, _ = api.round(api.make(rule="coordinate_median", device="cpu"), glob, replies)
    exp = _flat(glob) + np.median(X.astype(np.float64), axis=0)
    np.testing.assert_allclose(_flat(new), exp, rtol=1e-6, atol=1e-6)
    new, _ = api.round(api.make(rule="trimmed_mean", f=2, device="cpu"), glob, replies)
    exp = _flat(glob) + np.sort(X.astype(np.float64), axis=0)[2:-2].mean(0)
    np.testing.assert_allclose(_flat(new), exp, rtol=1e-6, atol=1e-6)


def test_strategy_bucketing_reshuffles_every_round(api):
    glob, replies, X = _setup(n=6, seed=2)
    s = api.make(rule="mean", pre="bucketing", bucket_size=2, seed=5, device="cpu")
    for step in range(3):  # the aggregator's call counter keys the shuffle
        new, _ = api.round(s, glob, replies, server_round=step + 1)
        agg = _reference("mean", 0, "bucketing", {}, X, seed=5, step=step)
        np.testing.assert_array_equal(_flat(new), _flat(glob) + agg)


def test_strategy_fixed_clipping(api):
    glob, replies, X = _setup(seed=3)
    c = 0.3
    new, metrics = api.round(api.make(rule="mean", clip=c, device="cpu"), glob, replies)
    Xc = torch.from_numpy(X.copy())
    R.clip_rows_(Xc, c)
    np.testing.assert_array_equal(_flat(new), _flat(glob) + Xc.mean(0).numpy())
    # independent check: every clipped row has norm <= c and the direction of the update
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    scaled = X * np.minimum(1.0, c / norms)[:, None]
    np.testing.assert_allclose(_flat(new), _flat(glob) + scaled.mean(0), rtol=1e-5, atol=1e-6)
    assert metrics["fedkern_clip"] == c


def test_strategy_adaptive_clipping(api):
    glob, replies, X = _setup(seed=4)
    alpha = 2.0
    s = api.make(rule="mean", clip_alpha=alpha, device="cpu")
    new1, m1 = api.round(s, glob, replies)  # no step yet and no clip: not clipped
    np.testing.assert_array_equal(_flat(new1), _flat(glob) + torch.from_numpy(X).mean(0).numpy())
    assert m1["fedkern_clip"] == 0.0
    step1 = np.linalg.norm(X.mean(0).astype(np.float64))
    assert s.last_step_norm == pytest.approx(step1, rel=1e-6)
    # round 2 from the new model, updates 10x larger: radius = alpha * ||step 1||
    rng = np.random.default_rng(40)
    replies2 = [[g + u for g, u in zip(new1, _params(rng), strict=True)] for _ in range(7)]
    X2 = np.stack([_flat(r) - _flat(new1) for r in replies2])
    new2, m2 = api.round(s, new1, replies2, server_round=2)
    lam = m2["fedkern_clip"]
    assert lam == pytest.approx(alpha * step1, rel=1e-6)
    X2c = torch.from_numpy(X2.copy())
    R.clip_rows_(X2c, lam)
    assert float(torch.linalg.vector_norm(X2c, dim=1).max()) <= lam * (1 + 1e-6)
    np.testing.assert_array_equal(_flat(new2), _flat(new1) + X2c.mean(0).numpy())


def test_strategy_adaptive_clipping_first_round_uses_clip(api):
    glob, replies, X = _setup(seed=5)
    s = api.make(rule="mean", clip=0.05, clip_alpha=3.0, device="cpu")
    _, m = api.round(s, glob, replies)
    assert m["fedkern_clip"] == 0.05
    step1 = s.last_step_norm
    _, m = api.round(s, api.global_arrays(s), replies, server_round=2)
    assert m["fedkern_clip"] == pytest.approx(3.0 * step1, rel=1e-6)


def _with_nan_client(replies, i=2):
    bad = [r.copy() for r in replies]
    bad[i] = [np.full_like(a, np.nan) for a in replies[i]]
    return bad


def test_strategy_nan_client(api):
    glob, replies, X = _setup(seed=6)
    bad = _with_nan_client(replies)
    Xn = X.copy()
    Xn[2] = np.nan
    # median: a minority of NaN rows cannot poison it; result = fedkern.robust on the NaN stack
    new, m = api.round(api.make(rule="coordinate_median", device="cpu"), glob, bad)
    assert m["fedkern_nonfinite"] == 1
    assert np.isfinite(_flat(new)).all()
    exp = R.coordinate_median(torch.from_numpy(Xn)).numpy()
    np.testing.assert_array_equal(_flat(new), _flat(glob) + exp)
    # independent: NaN ranks above +inf, so the median of the other 6 shifted by one rank
    np.testing.assert_array_equal(exp, np.sort(Xn, axis=0)[3])
    # krum never picks the NaN row
    new, _ = api.round(api.make(rule="krum", f=1, device="cpu"), glob, bad)
    np.testing.assert_array_equal(_flat(new), _flat(glob) + R.krum(torch.from_numpy(Xn), 1).numpy())
    assert np.isfinite(_flat(new)).all()
    # mean: the NaN propagates (the rule's behaviour) ...
    new, _ = api.round(api.make(rule="mean", device="cpu"), glob, bad)
    assert np.isnan(_flat(new)).all()
    # ... unless clipping zeroes the NaN row first
    new, _ = api.round(api.make(rule="mean", clip=100.0, device="cpu"), glob, bad)
    Xz = X.copy()
    Xz[2] = 0
    np.testing.assert_allclose(_flat(new), _flat(glob) + Xz.mean(0), rtol=1e-6, atol=1e-7)


def test_strategy_malformed_reply_is_a_nan_row(api):
    glob, replies, X = _setup(seed=7)
    bad = [r for r in replies]
    bad[0] = replies[0][:2]  # a tensor missing
    bad[1] = [np.array([F.MAGIC, 1, 1, 3], np.int64), np.array([12, 5, 12]), np.zeros(1)]
    s = api.make(rule="coordinate_median", device="cpu")
    new, m = api.round(s, glob, bad)
    assert m["fedkern_malformed"] == 2 and m["fedkern_nonfinite"] == 2
    Xn = X.copy()
    Xn[:2] = np.nan
    np.testing.assert_array_equal(
        _flat(new), _flat(glob) + R.coordinate_median(torch.from_numpy(Xn)).numpy()
    )


def test_strategy_skips_a_round_the_rule_cannot_run(api):
    glob, replies, _ = _setup(n=4)
    s = api.make(rule="krum", f=1, device="cpu")  # krum needs n > 4
    new, m = api.round(s, glob, replies)
    assert new is None and m["fedkern_skipped"] == (
        1 if api.kind == "message" else m["fedkern_skipped"]
    )
    if api.kind == "legacy":
        assert "krum" in m["fedkern_skipped"]


def test_strategy_keeps_dtypes_and_integer_tensors(api):
    glob = [np.zeros((2, 2), np.float64), np.array([5], np.int64)]
    replies = [[np.full((2, 2), 0.5), np.array([6 + i], np.int64)] for i in range(3)]
    s = api.make(rule="coordinate_median", device="cpu")
    new, _ = api.round(s, glob, replies)
    assert new[0].dtype == np.float64 and new[1].dtype == np.int64
    np.testing.assert_array_equal(new[0], np.full((2, 2), 0.5))
    np.testing.assert_array_equal(new[1], [7])


def test_strategy_bad_input(api):
    with pytest.raises(ValueError, match="rule must be one of"):
        api.make(rule="average")
    with pytest.raises(ValueError, match="pre must be"):
        api.make(pre="buckets")
    with pytest.raises(ValueError, match="clip must be a finite float > 0"):
        api.make(clip=-1.0)
    with pytest.raises(ValueError, match="clip_alpha must be a finite float > 0"):
        api.make(clip_alpha=math.nan)
    with pytest.raises(TypeError, match="clip must be None or a float"):
        api.make(clip="1")
    with pytest.raises(TypeError, match="centered_clip' needs the option tau"):
        api.make(rule="centered_clip")
    with pytest.raises(ValueError, match="f must be in"):
        api.make(f=-1)
    with pytest.raises(ValueError, match="give f, pre"):
        api.make(rule=R.Aggregator("krum", 1), f=1)
    with pytest.raises(TypeError, match="fraction_fitt"):
        api.make(fraction_fitt=0.5)
    glob, replies, _ = _setup()
    if api.kind == "legacy":
        with pytest.raises(RuntimeError, match="set_global_parameters"):
            api.make().aggregate_fit(1, [(None, _fitres(r)) for r in replies], [])
        assert api.make().aggregate_fit(1, [], []) == (None, {})
    else:
        request = _train_msg(glob)
        with pytest.raises(RuntimeError, match="set_global_arrays"):
            api.make().aggregate_train(1, [_reply(request, r) for r in replies])
        assert api.make().aggregate_train(1, []) == (None, None)
        with pytest.raises(TypeError, match="ArrayRecord"):
            api.make().set_global_arrays(glob)


def test_legacy_strategy_passes_fedavg_options_through():
    calls = []

    def agg_metrics(m):
        calls.append(m)
        return {"n": len(m)}

    glob, replies, _ = _setup(n=3)
    s = F.LegacyFedkernStrategy(rule="mean", fraction_fit=0.5, min_fit_clients=3,
                                accept_failures=False, fit_metrics_aggregation_fn=agg_metrics,
                                initial_parameters=ndarrays_to_parameters(glob))  # fmt: skip
    assert s.fraction_fit == 0.5 and s.min_fit_clients == 3
    assert [a.shape for a in s.global_parameters] == SHAPES
    res = [(None, _fitres(r)) for r in replies]
    params, m = s.aggregate_fit(1, res, [])
    assert params is not None and m["n"] == 3 and len(calls) == 1
    assert s.aggregate_fit(2, res, [RuntimeError("x")]) == (None, {})  # accept_failures=False


# ---------------------------------------------------------------------------------------------
def test_message_strategy_options_failures_and_client_metrics():
    seen = []

    def agg_metrics(records, key):
        seen.append((len(records), key))
        return MetricRecord({"loss": 0.5})

    glob, replies, X = _setup(n=4)
    s = F.FedkernStrategy(rule="mean", fraction_train=0.5, min_train_nodes=3,
                          train_metrics_aggr_fn=agg_metrics, device="cpu")  # fmt: skip
    assert s.fraction_train == 0.5 and s.min_train_nodes == 3
    s.set_global_arrays(_record(glob, KEYS))
    request = _train_msg(glob)
    msgs = [_reply(request, r) for r in replies]
    msgs.append(Message(Error(code=1, reason="client crashed"), reply_to=request))
    rec, m = s.aggregate_train(1, msgs)
    assert seen == [(4, "num-examples")] and m["loss"] == 0.5
    assert m["fedkern_failures"] == 1 and m["fedkern_clients"] == 4  # the failure is left out
    np.testing.assert_array_equal(
        _flat([rec[k].numpy() for k in KEYS]), _flat(glob) + torch.from_numpy(X).mean(0).numpy()
    )


def test_message_strategy_reply_with_other_keys_is_malformed():
    glob, replies, X = _setup(n=5)
    s = F.FedkernStrategy(rule="coordinate_median", device="cpu")
    s.set_global_arrays(_record(glob, KEYS))
    request = _train_msg(glob)
    msgs = [_reply(request, r) for r in replies]
    renamed = RecordDict({"arrays": _record(replies[0], ["a", "b", "c"])})
    msgs[0] = Message(renamed, reply_to=request)
    msgs[1] = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=request)
    rec, m = s.aggregate_train(1, msgs)
    assert m["fedkern_malformed"] == 2
    Xn = X.copy()
    Xn[:2] = np.nan
    np.testing.assert_array_equal(
        _flat([rec[k].numpy() for k in KEYS]),
        _flat(glob) + R.coordinate_median(torch.from_numpy(Xn)).numpy(),
    )


def test_message_strategy_state_dict_resumes_exactly():
    """A server restarted from the strategy's state_dict continues bit for bit (bucketing's call
    counter and adaptive clipping's memory included)."""
    rng = np.random.default_rng(11)
    glob0 = _params(rng)
    rounds = [[[g + u for g, u in zip(glob0, _params(rng, 0.1), strict=True)] for _ in range(6)]
              for _ in range(4)]  # fmt: skip

    def make():
        return F.FedkernStrategy(rule="coordinate_median", pre="bucketing", clip=0.5,
                                 clip_alpha=2.0, seed=9, device="cpu")  # fmt: skip

    def run(s, start, stop, glob):
        for r in range(start, stop):
            s.set_global_arrays(_record(glob, KEYS))
            request = _train_msg(glob)
            rec, _ = s.aggregate_train(r + 1, [_reply(request, a) for a in rounds[r]])
            glob = [rec[k].numpy() for k in KEYS]
        return glob

    whole = run(make(), 0, 4, glob0)
    first = make()
    mid = run(first, 0, 2, glob0)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    np.testing.assert_array_equal(_flat(run(resumed, 2, 4, mid)), _flat(whole))
    fresh = run(make(), 2, 4, mid)  # control: without the state the continuation differs
    assert not np.array_equal(_flat(fresh), _flat(whole))


# ---------------------------------------------------------------------------------------------
# the client mod
# ---------------------------------------------------------------------------------------------


class _Client(NumPyClient):
    """Returns the received parameters plus a fixed update per round (from `updates`)."""

    def __init__(self, updates):
        self.updates = updates

    def fit(self, parameters, config):
        u = self.updates.pop(0)
        return [p + d for p, d in zip(parameters, u, strict=True)], 10, {"loss": 1.0}


def _train_message(glob, node_id):
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(glob), {}), keep_input=True)
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def _message_app(mod, updates):
    """A Message-API ClientApp (an @app.train() function) that returns received + update."""
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg, context):
        rec = msg.content["arrays"]
        u = updates.pop(0)
        new = [rec[k].numpy() + d for k, d in zip(rec.keys(), u, strict=True)]
        content = RecordDict(
            {
                "arrays": _record(new, list(rec.keys())),
                "metrics": MetricRecord({"num-examples": 10, "loss": 1.0}),
            }
        )
        return Message(content, reply_to=msg)  # fmt: skip

    return app


def _run_mod(mod, glob, updates, *, node_id=7, ctx=None, kind="legacy"):
    """Run the mod for len(updates) rounds on one node; (reply ndarray lists, context)."""
    if kind == "legacy":
        app = ClientApp(client_fn=lambda context: _Client(updates).to_client(), mods=[mod])
    else:
        app = _message_app(mod, updates)
    ctx = ctx or Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(),
                         run_config={})  # fmt: skip
    replies = []
    for _ in range(len(updates)):
        if kind == "legacy":
            out = app(_train_message(glob, node_id), ctx)
            assert not out.has_error()
            res = compat.recorddict_to_fitres(out.content, keep_input=True)
            assert res.num_examples == 10 and res.metrics == {"loss": 1.0}
            replies.append(parameters_to_ndarrays(res.parameters))
        else:
            out = app(_train_msg(glob, node_id), ctx)
            assert not out.has_error()
            assert dict(out.content["metrics"]) == {"num-examples": 10, "loss": 1.0}
            replies.append(out.content["arrays"].to_numpy_ndarrays())
    return replies, ctx


def _np_topk(a, k):
    """Indices of the k largest |a| (no ties in the random test data), ascending."""
    return np.sort(np.argsort(-np.abs(a), kind="stable")[:k])


def test_mod_topk_round_trip_with_error_feedback(api):
    rng = np.random.default_rng(10)
    glob = _params(rng)
    updates = [_params(rng), _params(rng)]
    expected_updates = [[u.copy() for u in r] for r in updates]
    comp = TopK(ratio=0.25)
    replies, ctx = _run_mod(F.make_compress_mod(comp), glob, updates, kind=api.kind)
    errors = [np.zeros(int(np.prod(s)), np.float32) for s in SHAPES]
    for reply, upd in zip(replies, expected_updates, strict=True):
        assert F.is_compressed(reply) and len(reply) == 2 + 2 * len(SHAPES)
        dense = F.decompress(reply, glob)
        for t, (u, e) in enumerate(zip(upd, errors, strict=True)):
            # the received update, as the mod computes it in float32
            a = e + ((glob[t] + u) - glob[t]).ravel()
            k = comp.k_for(a.size)
            idx = _np_topk(a, k)
            c = np.zeros_like(a)
            c[idx] = a[idx]
            np.testing.assert_array_equal(dense[t].ravel(), c)  # compress -> decompress
            np.testing.assert_array_equal(reply[3 + 2 * t], idx)
            assert reply[2 + 2 * t].size == k  # only k values travel
            errors[t] = a - c
    # the residual after round 2 is in context.state
    saved = ctx.state.array_records["fedkern.compress.ef"].to_numpy_ndarrays()
    for s, e, shape in zip(saved, errors, SHAPES, strict=True):
        assert s.shape == shape
        np.testing.assert_array_equal(s.ravel(), e)
    assert ctx.state.config_records["fedkern.compress"]["step"] == 2


def test_mod_randk_sends_seed_not_indices(api):
    rng = np.random.default_rng(11)
    glob = _params(rng)
    updates = [_params(rng), _params(rng)]
    expected_updates = [[u.copy() for u in r] for r in updates]
    comp = RandK(k=3, seed=9, unbiased=False)
    replies, ctx = _run_mod(F.make_compress_mod(comp), glob, updates, node_id=12, kind=api.kind)
    errors = [np.zeros(int(np.prod(s)), np.float32) for s in SHAPES]
    cseed = client_seed(9, 12)
    for step, (reply, upd) in enumerate(zip(replies, expected_updates, strict=True)):
        assert reply[0][2] == F.KIND_RANDK
        dense = F.decompress(reply, glob)
        for t, u in enumerate(upd):
            seed_t, got_step = reply[3 + 2 * t]
            assert (seed_t, got_step) == (client_seed(cseed, t), step)
            a = errors[t] + ((glob[t] + u) - glob[t]).ravel()
            idx = randk_indices(a.size, 3, randk_keys(int(seed_t), step)).numpy()
            c = np.zeros_like(a)
            c[idx] = a[idx]
            np.testing.assert_array_equal(dense[t].ravel(), c)
            errors[t] = a - c
    saved = ctx.state.array_records["fedkern.compress.ef"].to_numpy_ndarrays()
    for s, e in zip(saved, errors, strict=True):
        np.testing.assert_array_equal(s.ravel(), e)


def test_mod_without_error_feedback_and_unbiased_randk(api):
    rng = np.random.default_rng(12)
    glob = _params(rng)
    updates = [_params(rng)]
    u0 = [u.copy() for u in updates[0]]
    comp = RandK(ratio=0.5, seed=1, unbiased=True)
    replies, ctx = _run_mod(
        F.make_compress_mod(comp, error_feedback=False), glob, updates, kind=api.kind
    )
    assert "fedkern.compress.ef" not in ctx.state.array_records
    dense = F.decompress(replies[0], glob)
    for t, u in enumerate(u0):
        a = ((glob[t] + u) - glob[t]).ravel()
        seed_t, step = replies[0][3 + 2 * t]
        k = comp.k_for(a.size)
        idx = randk_indices(a.size, k, randk_keys(int(seed_t), int(step))).numpy()
        c = np.zeros_like(a)
        c[idx] = (a[idx] * np.float32(a.size / k)).astype(np.float32)
        np.testing.assert_allclose(dense[t].ravel(), c, rtol=1e-6)


def test_mod_replies_aggregate_in_the_strategy(api):
    """Compressed replies of 5 clients (one round) + a dense one, through the strategy."""
    rng = np.random.default_rng(13)
    glob = _params(rng)
    comp = TopK(k=4)
    mod = F.make_compress_mod(comp)
    replies, rows = [], []
    for node in range(5):
        upd = [_params(rng, 0.1)]
        replies += _run_mod(mod, glob, upd, node_id=node, kind=api.kind)[0]
        rows.append(_flat(F.decompress(replies[-1], glob)))
    dense_reply = [g + u for g, u in zip(glob, _params(rng, 0.1), strict=True)]
    replies.append(dense_reply)
    rows.append(_flat(dense_reply) - _flat(glob))
    s = api.make(rule="trimmed_mean", f=1, device="cpu")
    new, m = api.round(s, glob, replies)
    assert m["fedkern_compressed"] == 5 and m["fedkern_malformed"] == 0
    exp = R.trimmed_mean(torch.from_numpy(np.stack(rows)), 1).numpy()
    np.testing.assert_array_equal(_flat(new), _flat(glob) + exp)


def test_mod_passes_other_messages_and_errors_through():
    mod = F.make_compress_mod(TopK(k=1))
    seen = []

    def inner(msg, ctx):
        seen.append(msg)
        return msg

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    assert mod(msg, ctx, inner) is msg and len(ctx.state) == 0


def test_decompress_and_mod_bad_input():
    with pytest.raises(TypeError, match="compressor must be a fedkern.compress.Compressor"):
        F.make_compress_mod("topk")
    with pytest.raises(ValueError, match="unbiased=False"):
        F.make_compress_mod(RandK(k=2))
    with pytest.raises(TypeError, match="error_feedback must be a bool"):
        F.make_compress_mod(TopK(k=2), error_feedback=1)
    rng = np.random.default_rng(14)
    glob = _params(rng)
    good = F.compress_update(_params(rng), TopK(k=2))
    assert [int((a != 0).sum()) for a in F.decompress(good, glob)] == [2, 2, 2]
    with pytest.raises(ValueError, match="not a compressed reply"):
        F.decompress(glob, glob)
    with pytest.raises(ValueError, match="sizes"):
        F.decompress(good, [np.zeros(3)] * 3)
    bad = list(good)
    bad[3] = bad[3][::-1].copy()  # descending indices
    with pytest.raises(ValueError, match="strictly ascending"):
        F.decompress(bad, glob)
    bad = list(good)
    bad[3] = np.array([0, 99], np.int64)
    with pytest.raises(ValueError, match="indices must be in"):
        F.decompress(bad, glob)
    bad = list(good)
    bad[0] = np.array([F.MAGIC, 2, 1, 3], np.int64)
    with pytest.raises(ValueError, match="format version 2"):
        F.decompress(bad, glob)
    # a client whose fit changes the model's shapes is a client-side error
    app = ClientApp(client_fn=lambda c: _BadShapeClient().to_client(),
                    mods=[F.make_compress_mod(TopK(k=1))])  # fmt: skip
    ctx = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="shape"):
        app(_train_message(glob, 3), ctx)


class _BadShapeClient(NumPyClient):
    def fit(self, parameters, config):
        return [p.ravel() for p in parameters], 1, {}


# ---------------------------------------------------------------------------------------------
# end to end: Flower's Server loop, ClientApps with the mod, FedkernStrategy
# ---------------------------------------------------------------------------------------------


_InProcessGrid = in_process_grid()


def _regression(num_clients=6, dim=20, seed=0):
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(dim).astype(np.float32)
    data = []
    for _ in range(num_clients):
        A = rng.standard_normal((40, dim)).astype(np.float32)
        data.append((A, A @ w_true + 0.01 * rng.standard_normal(40).astype(np.float32)))
    return data, w_true


class _LinRegClient(NumPyClient):
    """Least squares, a few local gradient steps; parameters = [w [dim-5], w_tail [5]]."""

    def __init__(self, A, b, byzantine=False):
        self.A, self.b, self.byzantine = A, b, byzantine

    def fit(self, parameters, config):
        if self.byzantine:
            return [np.full_like(p, 1e4) for p in parameters], 40, {}
        w = np.concatenate(parameters)
        for _ in range(5):
            w = w - 0.02 * self.A.T @ (self.A @ w - self.b) / len(self.b)
        return [w[:-5].astype(np.float32), w[-5:].astype(np.float32)], len(self.b), {}


def _simulate(strategy, mod, rounds, num_clients=6, byzantine=()):
    data, w_true = _regression(num_clients)
    node_ids = [1000 + 17 * i for i in range(num_clients)]
    by_node = dict(zip(node_ids, range(num_clients), strict=True))

    def client_fn(context):
        i = by_node[context.node_id]
        return _LinRegClient(*data[i], byzantine=i in byzantine).to_client()

    grid = _InProcessGrid(ClientApp(client_fn=client_fn, mods=[mod] if mod else []), node_ids)
    manager = SimpleClientManager()
    for n in node_ids:
        manager.register(GridClientProxy(n, grid, run_id=1))
    server = Server(client_manager=manager, strategy=strategy)
    server.set_max_workers(2)
    server.fit(num_rounds=rounds, timeout=None)
    w = np.concatenate(strategy.global_parameters)
    loss = np.mean([np.mean((A @ w - b) ** 2) for A, b in data])
    return loss, w, w_true, grid


def _strategy(**kw):
    init = ndarrays_to_parameters([np.zeros(15, np.float32), np.zeros(5, np.float32)])
    return F.LegacyFedkernStrategy(min_fit_clients=6, min_available_clients=6,
                                   fraction_evaluate=0.0, initial_parameters=init, device="cpu",
                                   **kw)  # fmt: skip


def test_legacy_end_to_end_server_loop_with_compression_and_a_byzantine_client():
    loss0 = np.mean([np.mean(b**2) for _, b in _regression()[0]])
    mod = F.make_compress_mod(TopK(ratio=0.25))
    # honest clients: top-k 25% with error feedback keeps up with dense FedAvg-style averaging
    base, *_ = _simulate(_strategy(rule="mean"), None, rounds=30)
    comp, *_ = _simulate(_strategy(rule="mean"), mod, rounds=30)
    assert base < 1e-2 * loss0 and comp < 2 * base
    # one Byzantine client (parameters 1e4) against the trimmed mean, with compression
    loss, w, w_true, grid = _simulate(_strategy(rule="trimmed_mean", f=1), mod, rounds=60,
                                      byzantine=(2,))  # fmt: skip
    assert loss < 1e-2 * loss0 and np.linalg.norm(w - w_true) < 0.2 * np.linalg.norm(w_true)
    for ctx in grid.contexts.values():  # every node kept its residual and counted its replies
        assert ctx.state.config_records["fedkern.compress"]["step"] == 60
        ef = ctx.state.array_records["fedkern.compress.ef"].to_numpy_ndarrays()
        assert [a.shape for a in ef] == [(15,), (5,)]
    # the same attack against the plain mean ruins the model
    bad, *_ = _simulate(_strategy(rule="mean"), mod, rounds=3, byzantine=(2,))
    assert bad > 100 * loss0


# ---- the Message API end to end: strategy.start over the in-process Grid, and Flower's engine


def _linreg_train_app(data, mod, byzantine=(), node_of=None):
    """A Message-API ClientApp: least squares, 5 local gradient steps on the node's data.

    The node's data is ``data[node_of(context)]``; Byzantine nodes return 1e4 everywhere.
    """
    app = ClientApp(mods=[mod] if mod else [])

    @app.train()
    def train(msg, context):
        i = node_of(context)
        rec = msg.content["arrays"]
        if i in byzantine:
            new = [np.full_like(rec[k].numpy(), 1e4) for k in rec.keys()]
        else:
            A, b = data[i]
            w = np.concatenate([rec[k].numpy() for k in rec.keys()])
            for _ in range(5):
                w = w - 0.02 * A.T @ (A @ w - b) / len(b)
            new = [w[:-5].astype(np.float32), w[-5:].astype(np.float32)]
        content = RecordDict(
            {
                "arrays": _record(new, list(rec.keys())),
                "metrics": MetricRecord({"num-examples": 40}),
            }
        )
        return Message(content, reply_to=msg)  # fmt: skip

    return app


def _initial_arrays():
    return _record([np.zeros(15, np.float32), np.zeros(5, np.float32)], ["w", "w_tail"])


def _message_strategy(**kw):
    return F.FedkernStrategy(fraction_evaluate=0.0, min_train_nodes=6, min_available_nodes=6,
                             device="cpu", **kw)  # fmt: skip


def _linreg_loss(data, rec):
    w = np.concatenate([rec[k].numpy() for k in ("w", "w_tail")])
    return np.mean([np.mean((A @ w - b) ** 2) for A, b in data])


def _message_simulate(strategy, mod, rounds, byzantine=()):
    data, w_true = _regression()
    node_ids = [1000 + 17 * i for i in range(6)]
    index = {n: i for i, n in enumerate(node_ids)}
    app = _linreg_train_app(data, mod, byzantine, node_of=lambda ctx: index[ctx.node_id])
    grid = _InProcessGrid(app, node_ids)
    result = strategy.start(grid=grid, initial_arrays=_initial_arrays(), num_rounds=rounds)
    return _linreg_loss(data, result.arrays), result, grid


def test_message_api_end_to_end_with_compression_and_a_byzantine_client():
    """strategy.start drives Message-API ClientApps with the mod: top-k with error feedback keeps
    up with dense averaging; the trimmed mean survives a Byzantine node that ruins the mean."""
    loss0 = np.mean([np.mean(b**2) for _, b in _regression()[0]])
    mod = F.make_compress_mod(TopK(ratio=0.25))
    base, _, _ = _message_simulate(_message_strategy(rule="mean"), None, rounds=30)
    comp, res, _ = _message_simulate(_message_strategy(rule="mean"), mod, rounds=30)
    assert base < 1e-2 * loss0 and comp < 2 * base
    assert res.train_metrics_clientapp[30]["fedkern_compressed"] == 6
    loss, _, grid = _message_simulate(_message_strategy(rule="trimmed_mean", f=1), mod,
                                      rounds=60, byzantine=(2,))  # fmt: skip
    assert loss < 1e-2 * loss0
    for ctx in grid.contexts.values():  # every node kept its residual and counted its replies
        assert ctx.state.config_records["fedkern.compress"]["step"] == 60
    bad, _, _ = _message_simulate(_message_strategy(rule="mean"), mod, rounds=3, byzantine=(2,))
    assert bad > 100 * loss0  # the control: the plain mean is ruined by the same attack


SIMULATION = {}


def test_flower_simulation_engine_runs_the_strategy_and_the_mod():
    """Flower's simulation engine (Ray backend, ``flwr.simulation.run_simulation``): 6 virtual
    SuperNodes run the Message-API ClientApp with the compression mod, the ServerApp runs
    FedkernStrategy (trimmed mean) against one Byzantine node; 8 rounds."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation] (Ray)")
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    data, _ = _regression()
    loss0 = np.mean([np.mean(b**2) for _, b in data])
    client_app = _linreg_train_app(
        data,
        F.make_compress_mod(TopK(ratio=0.25)),
        byzantine=(2,),
        node_of=lambda ctx: int(ctx.node_config["partition-id"]),
    )
    server_app = ServerApp()  # fmt: skip

    @server_app.main()
    def main(grid, context):
        strategy = _message_strategy(rule="trimmed_mean", f=1)
        SIMULATION["result"] = strategy.start(grid=grid, initial_arrays=_initial_arrays(),
                                              num_rounds=8)  # fmt: skip

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=6,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    result = SIMULATION.pop("result")  # fmt: skip
    metrics = result.train_metrics_clientapp[8]
    assert metrics["fedkern_clients"] == 6 and metrics["fedkern_compressed"] == 6
    # the engine's run equals the same apps driven in this process, to float32 rounding (the
    # replies arrive in another order, and the trimmed mean sums its kept values in row order)
    local_app = _linreg_train_app(
        data,
        F.make_compress_mod(TopK(ratio=0.25)),
        byzantine=(2,),
        node_of=lambda ctx: int(ctx.node_config["partition-id"]),
    )
    grid = _InProcessGrid(local_app, [1000 + 17 * i for i in range(6)])
    local = _message_strategy(rule="trimmed_mean", f=1).start(
        grid=grid, initial_arrays=_initial_arrays(), num_rounds=8)  # fmt: skip
    for k in ("w", "w_tail"):
        np.testing.assert_allclose(
            result.arrays[k].numpy(), local.arrays[k].numpy(), rtol=1e-5, atol=1e-6
        )
    assert _linreg_loss(data, result.arrays) < 0.5 * loss0  # and it learns despite the attack
