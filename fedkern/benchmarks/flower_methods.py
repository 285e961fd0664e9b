"""Benchmarks of the flower_methods family: a Flower round's server cost, fedkern against NumPy.

  flower_scaffnew_round  ``ScaffnewStrategy.aggregate_train`` on the cohort's c reply Messages
                         (validate, decode each reply into the stack X [c, p], the cohort mean by
                         ``fedkern::scaffnew_sync_``, the outgoing model ArrayRecord), against
                         ``NumpyScaffnewStrategy``: the same strategy with the stack and the mean
                         written in NumPy (``np.empty`` + row copies, ``X.mean(axis=0)``), as
                         Flower's own strategies aggregate.
  flower_tamuna_round    ``TamunaStrategy.aggregate_train`` (decode the held values into X [c, p],
                         the mean of every coordinate's s holders by ``fedkern::tamuna_aggregate_``,
                         the outgoing model), against ``NumpyTamunaStrategy``: the held index of a
                         slot from its period c / gcd(s, c), the values scattered into X, and the
                         holders' mean gathered with one fancy index X[perm[(s r + j) % c], r]
                         (no loop over coordinates; s = c: ``X.mean(axis=0)``).

Both sides get the same c reply Messages, built once at setup (a round of n = c clients, full
participation, so no sync values are built: sync mode "next"); before every timed call the
strategy's round plan and model are restored, untimed, so each call does one round's work,
held masks included. Reply validation (``MethodStrategy._replies``: the fields, the shapes, finite
values) is the same code on both sides and is timed. Case fields: n = p (parameters), m = c
(cohort = clients), k = s (holders per coordinate; c for Scaffnew). Cases: c = 100 at p = 1e4
(quick; TAMUNA with s = 2) and p = 1e6 (full; TAMUNA with s = 2 and s = c). Custom sizes: c = 10,
s = 2.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch

from fedkern.benchmarks.core import Case, Prepared, cases, min_bytes, register

QUICK = (10**4, 100)  # p, c
FULL = 10**6
TAMUNA_S = 2
P_LOCAL, GAMMA = 0.2, 0.1  # the strategies' p and gamma (they do not change the server's work)


def held_index(p: int, c: int, s: int, slot: int) -> np.ndarray | None:
    """int64 [k] ascending: the coordinates pattern slot ``slot`` holds ((slot - s r) mod c < s);
    None when s = c (every coordinate). Built from one period of the pattern (c / gcd(s, c)
    coordinates), so the cost is O(k), not O(p)."""
    if s == c:
        return None
    period = c // math.gcd(s, c)
    base = np.flatnonzero((slot - s * np.arange(period)) % c < s)
    idx = (base[None, :] + period * np.arange(-(-p // period))[:, None]).ravel()
    return idx[: np.searchsorted(idx, p)]


def _numpy_twins():
    from flwr.app import MetricRecord

    from fedkern.integrations.flower import protocol as P
    from fedkern.integrations.flower.methods import ScaffnewStrategy, TamunaStrategy

    class _NumpyRound:
        """``aggregate_train`` written in NumPy (mixin over a fedkern strategy; the rest of the
        strategy -- draws, messages, validation fields, checkpoints -- is the strategy's own).
        A benchmark baseline: it keeps no catch-up values for clients whose message failed."""

        def _np_held(self, plan, row):
            cache = plan.__dict__.setdefault("np_held", {})
            slot = plan.slot[row]
            if slot not in cache:
                cache[slot] = held_index(self.dim, self.cohort_size, plan.s, slot)
            return cache[slot]

        def _values_problem(self, msg, plan, row):
            rec = msg.content.array_records.get(P.VALUES)
            if rec is None or "values" not in rec:
                return f"no {P.VALUES!r} ArrayRecord with 'values'"
            a = rec["values"].numpy()
            idx = self._np_held(plan, row)
            k = self.dim if idx is None else idx.size
            if a.dtype != np.float32 or a.shape != (k,):
                return f"values are {a.dtype} {a.shape}, expected float32 ({k},)"
            if not np.isfinite(a).all():
                return "values are not finite"
            return None

        def aggregate_train(self, server_round, replies):
            plan = self._plan
            if plan is None:
                raise RuntimeError("aggregate_train needs the round's configure_train first")
            rows = list(range(self.cohort_size))
            good, failures, rejected = self._replies(list(replies), plan, rows, "train")
            c, p = self.cohort_size, self.dim
            X = np.empty((c, p), np.float32) if plan.s == c else np.zeros((c, p), np.float32)
            up = 0
            for row, msg in good.items():
                vals = msg.content[P.VALUES]["values"].numpy()
                idx = self._np_held(plan, row)
                if idx is None:
                    X[row] = vals
                else:
                    X[row, idx] = vals
                up += vals.size
            plan.live = sorted(good)
            plan.metrics.update({"clients": len(plan.live), "failures": failures,
                                 "rejected": rejected, "floats_up": up,
                                 "skipped": int(not plan.live)})  # fmt: skip
            if not plan.live:
                return None, MetricRecord(plan.metrics)
            self.x = torch.from_numpy(self.np_aggregate(X, plan))
            for row in plan.live:
                cid = plan.cohort[row]
                self.last_agg[cid], self.last_slot[cid] = plan.round, plan.slot[row]
            if self.sync_mode == P.SYNC_EXCHANGE:
                x = self.x.numpy()
                plan.sync = {row: torch.from_numpy(x if self._np_held(plan, row) is None
                                                   else x[self._np_held(plan, row)])
                             for row in plan.live}  # fmt: skip
            return self.global_arrays, MetricRecord(plan.metrics)

    class NumpyScaffnewStrategy(_NumpyRound, ScaffnewStrategy):
        """``ScaffnewStrategy`` with its round aggregation in NumPy: the cohort mean of the live
        rows, ``X.mean(axis=0)`` (float32, summed row by row). The benchmark's baseline."""

        def np_aggregate(self, X, plan):
            live = plan.live
            return (X if len(live) == X.shape[0] else X[live]).mean(axis=0)

    class NumpyTamunaStrategy(_NumpyRound, TamunaStrategy):
        """``TamunaStrategy`` with its round aggregation in NumPy: per coordinate r, the mean of
        its s holders X[perm[(s r + j) % c], r] (one gather [s, p]; s = c: the rows' mean); with
        failures, the mean of the live holders, a coordinate without one keeps its value. The
        benchmark's baseline."""

        def np_aggregate(self, X, plan):
            c, p = X.shape
            s = self.s
            if s == c:  # every row holds every coordinate: the mean of the live rows
                live = plan.live
                return (X if len(live) == c else X[live]).mean(axis=0)
            perm = plan.perm.numpy()
            r = np.arange(p)
            rows = perm[(s * r[None, :] + np.arange(s)[:, None]) % c]
            G = X[rows, r]
            if len(plan.live) == c:
                return G.mean(axis=0)
            live = np.zeros(c, bool)
            live[plan.live] = True
            ok = live[rows]
            cnt = ok.sum(axis=0)
            acc = np.where(ok, G, np.float32(0)).sum(axis=0)
            x = self.x.numpy()
            return np.where(cnt > 0, acc / np.maximum(cnt, 1).astype(np.float32), x)

    return NumpyScaffnewStrategy, NumpyTamunaStrategy


@contextlib.contextmanager
def task_identity():
    """The process identity Flower's runtime sets before a ServerApp runs (``Message`` needs it
    to build messages outside a run); restored on exit."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def make_strategy(method: str, c: int, s: int, *, numpy: bool = False, seed: int = 0,
                  device="cpu"):  # fmt: skip
    """A strategy of ``method`` ("scaffnew" / "tamuna") for n = c clients (full participation),
    fedkern's or (``numpy=True``) its NumPy twin."""
    from fedkern.integrations.flower.methods import ScaffnewStrategy, TamunaStrategy

    np_scaffnew, np_tamuna = _numpy_twins()
    kw = {"num_clients": c, "p": P_LOCAL, "gamma": GAMMA, "seed": seed}
    if method == "scaffnew":
        cls = np_scaffnew if numpy else ScaffnewStrategy
    elif method == "tamuna":
        cls, kw = (np_tamuna if numpy else TamunaStrategy), {**kw, "s": s}
    else:
        raise ValueError(f"method must be 'scaffnew' or 'tamuna', got {method!r}")
    if not numpy:
        kw["device"] = device
    return cls(**kw)


def make_round(strategy, X_true: np.ndarray, x0: np.ndarray):
    """Start ``strategy``'s first round from model ``x0`` (float32 [p]) and build its c reply
    Messages: client i replies with row i of ``X_true`` (float32 [c, p]) at its held
    coordinates. Returns the replies (list of Message); the strategy is left ready for
    ``aggregate_train``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from fedkern.integrations.flower import protocol as P

    c, p = X_true.shape
    with task_identity():
        strategy.set_initial_arrays(ArrayRecord({"x": Array(x0)}))
        strategy.nodes = {i: 1000 + i for i in range(c)}
        msgs = strategy.configure_train(1, strategy.global_arrays, ConfigRecord(), None)
        replies = []
        for msg in msgs:
            cfg = msg.content[P.RECORD]
            cid, slot = cfg["client_id"], cfg["slot"]
            idx = held_index(p, c, cfg["s"], slot)
            vals = X_true[cid] if idx is None else X_true[cid, idx]
            echo = {k: cfg[k] for k in ("protocol", "method", "seed", "round", "client_id", "row")}
            content = RecordDict({P.RECORD: ConfigRecord(echo),
                                  P.VALUES: ArrayRecord({"values": Array(
                                      np.ascontiguousarray(vals))})})  # fmt: skip
            replies.append(Message(content, reply_to=msg))
    return replies


def _rearm(strategy, x0: torch.Tensor):
    plan0 = copy.copy(strategy._plan)
    metrics0 = dict(plan0.metrics)

    def rearm():
        plan = copy.copy(plan0)
        plan.held, plan.live, plan.sync, plan.metrics = {}, [], {}, dict(metrics0)
        plan.__dict__.pop("np_held", None)
        strategy._plan, strategy.x = plan, x0.clone().to(strategy.device)
        strategy.last_agg, strategy.last_slot, strategy.catchup = {}, {}, {}

    return rearm


def _setup(case, device, gen):
    import fedkern.ops.clients  # noqa: F401  (registers the ops)
    import fedkern.ops.tamuna  # noqa: F401

    p, c, s = case.n, case.m, case.k
    method = "scaffnew" if case.op == "flower_scaffnew_round" else "tamuna"
    X_true = torch.randn(c, p, generator=gen, device=device).cpu().numpy()
    x0 = torch.randn(p, generator=gen, device=device).cpu().numpy()
    fk = make_strategy(method, c, s, device=device)
    tw = make_strategy(method, c, s, numpy=True)
    replies = make_round(fk, X_true, x0)
    make_round(tw, X_true, x0)  # the twin's plan (the same draws); it decodes fk's replies
    rearm_fk, rearm_tw = _rearm(fk, torch.from_numpy(x0)), _rearm(tw, torch.from_numpy(x0))
    return Prepared(
        fedkern=lambda: fk.aggregate_train(1, replies),
        eager=lambda: tw.aggregate_train(1, replies),
        rearm_fedkern=rearm_fk,
        rearm_eager=rearm_tw,
        nbytes=min_bytes(case),
        tensors={"fedkern": fk, "numpy": tw, "replies": replies},
    )


def _bytes(case):
    """The replies' values read (s p floats in all), the stack's held entries written and read
    back, the model written."""
    return 4 * (3 * case.k * case.n + case.n)


def _footprint(case):  # the replies, the two stacks, the op's scratch and temporaries
    return 5 * 4 * case.m * case.n


for _op, _pos, _impl, _module, _eager in (
    ("flower_scaffnew_round", 940, "scaffnew_sync_", "fedkern.ops.clients",
     "NumPy twin: X = np.empty((c, p)); X[row] = reply values; X.mean(axis=0)"),
    ("flower_tamuna_round", 950, "tamuna_aggregate_", "fedkern.ops.tamuna",
     "NumPy twin: X[row, held] = reply values; X[perm[(s r + j) % c], r].mean(axis=0) "
     "(s = c: X.mean(axis=0))"),
):  # fmt: skip
    register(_op, family="flower_methods", setup=_setup, eager=_eager, position=_pos,
             by_size=False, stacked=True, footprint=_footprint, nbytes=_bytes, impl_op=_impl,
             ops_module=_module)  # fmt: skip


@cases("flower_methods")
def _cases(suite, device, sizes):
    try:
        import flwr  # noqa: F401
    except ImportError:  # Flower is optional: no cases without it
        return []
    f32 = torch.float32
    if suite == "custom":
        return [Case(op, n, 10 if "scaffnew" in op else TAMUNA_S, f32, 10) for n in sizes
                for op in ("flower_scaffnew_round", "flower_tamuna_round")]  # fmt: skip
    p, c = QUICK if suite == "quick" else (FULL, QUICK[1])
    out = [Case("flower_scaffnew_round", p, c, f32, c), Case("flower_tamuna_round", p, TAMUNA_S,
                                                             f32, c)]  # fmt: skip
    if suite == "full":
        out.append(Case("flower_tamuna_round", p, c, f32, c))
    return out
