"""MARINA, DIANA and EF21 (``fedkern.algorithms.compressed``) as Flower strategies (Message API).

``CompressedStrategy`` (a ``BaseMethodStrategy``: its handshake, keyed draws, model layout and
checkpoints) runs the simulator's server side; the clients run ``gradient_client.GradientClient``.
Every round has all n clients (the simulator's methods have no cohort). Wire round r (the
ConfigRecord field "round", the Flower round and the history index) is 0 for the initialization
(MARINA: g = mean_i grad f_i(x0); EF21: g_i = C(grad f_i(x0)), g = mean_i g_i; DIANA has none and
books zeros, as the simulator's history index 0) and t + 1 for method round t.

A round r: the server draws what the simulator draws at the same keys (MARINA's coin at key(0);
the minibatch key key(3) and the mask key key(4), sent as numbers -- rand-k masks never travel: the
client and the server both derive them from (seed, mask key, client id) with ``RowCompressor``),
sends ``train.fedkern_grad`` with the model to every client, and aggregates with the simulator's
ops in client-id order (``RowCompressor.mean``: ``sparse_add_batched_`` for sparse messages, the
float64 mean for dense ones; ``ops.weighted_sum`` for MARINA's full gradients):

  MARINA  x+ = x - gamma g (sent); heads: g = mean of grad f_i(x+); tails: g += mean of
          Q_i(grad f_i(x+) - grad f_i(x)) (the client keeps the x it received);
  DIANA   m = mean of Q(g_i - h_i); g = h + m; h += alpha m; x -= gamma g;
  EF21    x+ = x - gamma g (sent); g += mean of C(grad f_i(x+) - g_i) (feedback=False: g = mean
          of C(grad f_i(x+))).

Messages: rand-k sends k values (the indices are the mask), top-k k values and k int64 indices,
"none" / full gradients p values. Train message fields (ConfigRecord RECORD): protocol, method,
seed, round, client_id, row (= client_id), agg_round (the last round whose reply of the client
the server aggregated, -1: none), full (a dense gradient is asked), batch_key, mask_key,
compressor, k, unbiased, alpha (DIANA's shift step; 1 for EF21's feedback), feedback, x_round
(MARINA: the round whose model is x), layout, arrays, config; plus ArrayRecord ``PREV`` (MARINA's
x, when the client may not hold it). Reply: RECORD {protocol, method, seed, round, client_id,
row} and ArrayRecord VALUES {"values": float32 [k or p], top-k: "indices": int64 [k] strictly
ascending in [0, p)}.

Failures (error replies, no reply, unknown nodes) and rejected replies (wrong fields, shapes,
dtypes, non-finite values, bad indices; a warning each) are left out. The rule: DIANA and EF21
(feedback) treat a missing message as zero -- the failed client's shift / feedback state does not
move either (the client commits a pending update only when a later ``agg_round`` confirms it), so
h = mean_i h_i and g = mean_i g_i stay exact; MARINA and EF21 without feedback average the live
messages. With no live reply the round changes nothing (metric ``skipped``; the round counter
moves on, so the next round draws afresh); an initialization without a live reply leaves g = 0.

Metrics per round (``history``, index 0 = the initialization; ``Result.train_metrics_clientapp``
keyed by the wire round): round, heads (MARINA; 1 for the initialization), clients, failures,
rejected, skipped, floats_up / floats_down (all clients together: values, top-k indices counted
as floats, models and resent models) and floats_up_per_client / floats_down_per_client (divided
by n: the simulator's "floats_up" / "floats_down", except that the initialization sends x0 to
the clients, p floats down, where the simulator books 0).
"""

from __future__ import annotations

import abc
import math
from logging import INFO, WARNING

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

from fedkern import validation as v
from fedkern.algorithms.base import SLOTS
from fedkern.algorithms.federated import SLOT_COIN
from fedkern.algorithms.messages import COMPRESSORS, RowCompressor
from fedkern.algorithms.vr import SLOT_MASK, SLOT_MINIBATCH
from fedkern.integrations.flower import protocol as P
from fedkern.integrations.flower.gradient_client import ACTION_GRAD, PREV
from fedkern.integrations.flower.methods import BaseMethodStrategy
from fedkern.ops import clients as client_ops

__all__ = ["CompressedStrategy", "DianaStrategy", "Ef21Strategy", "MarinaStrategy"]


class _Round:
    """One round's bookkeeping (wire round r)."""

    def __init__(self, r: int):
        self.round = r
        self.node: dict[int, int] = {}  # client id -> node id
        self.metrics: dict = {}
        self.full = False
        self.indices: torch.Tensor | None = None  # rand-k masks [n, k]
        self.x_send: torch.Tensor | None = None  # the model sent


class CompressedStrategy(BaseMethodStrategy):
    """Base of the MARINA / DIANA / EF21 strategies (module docstring: the round, the rules).

    Args:
        num_clients: n (global ids 0..n-1 from the handshake).
        gamma: the step size (> 0; required: the strategy does not know the problem's L).
        compressor: "randk", "topk" or "none"; k (1 <= k <= p) or ratio (default 0.1), as
            ``RowCompressor`` (checked against p when the model is known).
        seed: keys every draw and the rand-k masks (an int in [0, 2**63)).
        device: where the server's aggregation runs ("cpu" default).
        **kwargs: FedAvg's evaluation options (``BaseMethodStrategy``).

    Attributes: rounds (completed method rounds, without the initialization), initialized, x
    (float32 [p]), g (MARINA / EF21) or h (DIANA) (float32 [p]), comp (the ``RowCompressor``,
    once the model is known), history, nodes, last_agg.
    """

    method = "compressed"
    unbiased = True
    state_names: tuple[str, ...] = ("g",)
    config_attrs: tuple[str, ...] = ("seed", "num_clients", "gamma", "compressor", "k_arg",
                                     "ratio")  # fmt: skip

    def __init__(self, *, num_clients: int, gamma: float, compressor: str = "randk",
                 k: int | None = None, ratio: float | None = None, seed: int = 0,
                 p: float = 1.0, **kwargs):  # fmt: skip
        if "cohort" in kwargs:
            raise TypeError(f"cohort is not an option of {type(self).__name__}: every client "
                            "takes part in every round")  # fmt: skip
        if compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {', '.join(COMPRESSORS)}, got "
                             f"{compressor!r}")  # fmt: skip
        if compressor == "topk" and self.unbiased:
            raise ValueError(f"{self.method.upper()} needs an unbiased compressor: 'randk' or "
                             "'none', not 'topk'")  # fmt: skip
        if k is not None and ratio is not None:
            raise ValueError("give k or ratio, not both")
        super().__init__(num_clients=num_clients, p=p, gamma=gamma, seed=seed, **kwargs)
        if k is not None:
            k = v.integer("k", k, 1)
        if ratio is not None:
            RowCompressor(compressor, d=1, ratio=ratio, unbiased=self.unbiased)  # checks ratio
        self.compressor, self.k_arg, self.ratio = compressor, k, ratio
        self.comp: RowCompressor | None = None
        self.initialized = False
        self.x_round = 0  # the wire round whose broadcast model is x (MARINA's PREV)
        self._round: _Round | None = None

    # ---- model, compressor ----------------------------------------------------------------------

    def _compressor(self, d: int) -> RowCompressor:
        return RowCompressor(self.compressor, d=d, k=self.k_arg, ratio=self.ratio, seed=self.seed,
                             unbiased=self.unbiased)  # fmt: skip

    def set_initial_arrays(self, arrays: ArrayRecord) -> None:
        """``BaseMethodStrategy.set_initial_arrays``, and the compressor for that model size (k must
        be <= p; checked before anything changes). The method's server state starts at zeros."""
        if isinstance(arrays, ArrayRecord) and self.x is None:
            d = sum(math.prod(arrays[k].shape) for k in arrays.keys())
            comp = self._compressor(d)
            super().set_initial_arrays(arrays)
            self.comp = comp
            for name in self.state_names:
                setattr(self, name, torch.zeros(d, device=self.device))
            return
        super().set_initial_arrays(arrays)

    # ---- the round ------------------------------------------------------------------------------

    def wire_round(self) -> int:
        """The next round's number: 0 (initialization) or rounds + 1."""
        return self.rounds + 1 if self.initialized else 0

    def round_key(self, slot: int) -> int:
        """The key of draw ``slot`` in the next round: ``Method.initial_key`` for the
        initialization, ``Method.key`` otherwise."""
        return self.key(slot) if self.initialized else v.integer("slot", slot, 0, SLOTS - 1)

    def needs_init(self) -> bool:
        """Whether the method has an initialization round (MARINA, EF21)."""
        return True

    @abc.abstractmethod
    def plan(self) -> tuple[bool, torch.Tensor, int, int]:
        """The next round's (full gradients asked, model sent, batch key, mask key)."""

    def _fields(self, rnd: _Round, cid: int) -> dict:
        return {"protocol": P.PROTOCOL, "method": self.method, "seed": self.seed,
                "round": rnd.round, "client_id": cid, "row": cid}  # fmt: skip

    def extra_fields(self) -> dict:
        """Method fields of the train message (alpha, feedback)."""
        return {"alpha": 1.0, "feedback": True}

    def configure_round(self, config: ConfigRecord | None):
        """The round's ``train.fedkern_grad`` messages (one per connected client)."""
        if self.x is None:
            raise RuntimeError(f"{type(self).__name__} has no model: run it with strategy.start "
                               "or call set_initial_arrays / load_state_dict first")  # fmt: skip
        r = self.wire_round()
        rnd = self._round = _Round(r)
        full, x_send, bkey, mkey = self.plan()
        rnd.full, rnd.x_send = full, x_send
        if self.comp.kind == "randk" and not full:
            ids = torch.arange(self.num_clients)
            Z = torch.zeros(self.num_clients, self.dim)
            rnd.indices = self.comp.diff(Z, Z, clients=ids, step=mkey)[1]
        x_saved = self.x
        self.x = x_send.to(self.device)
        model = self.global_arrays
        self.x = x_saved
        config = ConfigRecord() if config is None else config
        config["server-round"] = r
        keys = [k for k, _ in self.layout]
        msgs, down = [], 0
        for cid in range(self.num_clients):
            node = self.nodes.get(cid)
            if node is None:
                continue
            rnd.node[cid] = node
            fk = self._fields(rnd, cid)
            fk.update({"agg_round": self.last_agg.get(cid, -1), "full": full, "batch_key": bkey,
                       "mask_key": mkey, "compressor": self.comp.kind, "k": self.comp.k,
                       "unbiased": self.comp.unbiased, "x_round": self.x_round, "layout": keys,
                       "arrays": self.arrayrecord_key, "config": self.configrecord_key,
                       **self.extra_fields()})  # fmt: skip
            content = RecordDict({self.arrayrecord_key: model, self.configrecord_key: config})
            if self._needs_prev(cid, full):
                content[PREV] = ArrayRecord({"values": Array(self.x.cpu().numpy().copy())})
                down += self.dim
            content[P.RECORD] = ConfigRecord(fk)
            msgs.append(Message(content, dst_node_id=int(node), message_type=ACTION_GRAD,
                                group_id=str(r)))  # fmt: skip
            down += self.dim
        rnd.metrics.update({"round": r, "floats_down": down, "floats_up": 0})
        return msgs

    def _needs_prev(self, cid: int, full: bool) -> bool:
        return False

    def _expected(self, rnd: _Round) -> tuple[int, bool]:
        """(values per reply, top-k indices expected)."""
        if rnd.full or self.comp.kind == "none":
            return self.dim, False
        return self.comp.k, self.comp.kind == "topk"

    def _check(self, msg: Message, rnd: _Round, cid: int) -> str | None:
        fields = self._fields(rnd, cid)
        want = {k: fields[k] for k in ("seed", "round", "client_id", "row")}
        k, topk = self._expected(rnd)
        why = P.header_problem(msg, self.method, want) or P.values_problem(msg, k)
        if why is None and topk:
            why = P.indices_problem(msg, k, self.dim)
        return why

    def collect(self, replies) -> dict:
        """client id -> (values float32 [k], indices int64 [k] or None) of the valid replies;
        counts failures and rejections in the round's metrics."""
        rnd = self._round
        node_cid = {n: c for c, n in rnd.node.items()}
        got, failures, rejected = {}, 0, 0
        for msg in replies:
            node = msg.metadata.src_node_id
            cid = node_cid.get(node)
            if cid is None or cid in got:
                why = "not asked" if cid is None else "repeated"
                log(WARNING, "%s: round %s: reply from node %s ignored (%s)", self.method,
                    rnd.round, node, why)  # fmt: skip
                continue
            if msg.has_error():
                failures += 1
                log(INFO, "%s: round %s: client %s failed: %s", self.method, rnd.round, cid,
                    msg.error.reason)  # fmt: skip
                got[cid] = None
                continue
            why = self._check(msg, rnd, cid)
            if why is not None:
                rejected += 1
                log(WARNING, "%s: round %s: reply of client %s skipped: %s", self.method,
                    rnd.round, cid, why)  # fmt: skip
                got[cid] = None
                continue
            rec = msg.content[P.VALUES]
            vals = torch.from_numpy(np.array(rec["values"].numpy()))
            idx = None
            if self._expected(rnd)[1]:
                idx = torch.from_numpy(np.array(rec["indices"].numpy()))
            elif rnd.indices is not None:
                idx = rnd.indices[cid]
            got[cid] = (vals, idx)
        failures += sum(1 for c in range(self.num_clients) if c not in got)
        good = {c: m for c, m in sorted(got.items()) if m is not None}
        up = sum(int(vl.numel()) + (int(ix.numel()) if self._expected(rnd)[1] else 0)
                 for vl, ix in good.values())  # fmt: skip
        rnd.metrics.update({"clients": len(good), "failures": failures, "rejected": rejected,
                            "floats_up": up, "skipped": int(not good)})  # fmt: skip
        return good

    def stack(self, good: dict, zeros: bool):
        """The messages in client-id order as ``RowCompressor`` messages on the server's device:
        the live clients only, or (``zeros``) all n with zero messages for the missing ones."""
        dev = self.device
        ids = list(range(self.num_clients)) if zeros else sorted(good)
        k, _ = self._expected(self._round)
        V = torch.zeros(len(ids), k, dtype=torch.float32)
        sparse = not self._round.full and self.comp.kind != "none"
        idx = torch.zeros(len(ids), k, dtype=torch.int64) if sparse else None
        for r, cid in enumerate(ids):
            if cid in good:
                V[r] = good[cid][0]
                if sparse:
                    idx[r] = good[cid][1]
            elif sparse:
                idx[r] = torch.arange(k)
        return (V.to(dev), idx.to(dev)) if sparse else V.to(dev)

    @abc.abstractmethod
    def aggregate_messages(self, good: dict) -> None:
        """The method's server update from the live messages (``good``, non-empty)."""

    def run_round(self, grid: Grid, *, timeout: float = 3600,
                  train_config: ConfigRecord | None = None):  # fmt: skip
        """One round over ``grid`` (after ``connect``): the initialization if not done yet, else
        method round ``rounds``. Returns (the model ArrayRecord, the round's MetricRecord)."""
        msgs = self.configure_round(ConfigRecord(dict(train_config or {})))
        replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
        good = self.collect(list(replies))
        rnd = self._round
        if good:
            self.aggregate_messages(good)
            for cid in good:
                self.last_agg[cid] = rnd.round
        else:
            log(WARNING, "%s: round %s: no usable reply; nothing changes", self.method,
                rnd.round)  # fmt: skip
        n = self.num_clients
        rnd.metrics["floats_up_per_client"] = rnd.metrics["floats_up"] / n
        rnd.metrics["floats_down_per_client"] = rnd.metrics["floats_down"] / n
        for k, val in rnd.metrics.items():
            self.history.setdefault(k, []).append(val)
        if self.initialized:
            self.rounds += 1
        self.initialized = True
        self._round = None
        return self.global_arrays, MetricRecord(rnd.metrics)

    def _book_empty_init(self) -> None:
        """History index 0 for a method without an initialization round (zeros)."""
        m = {"round": 0, "clients": 0, "failures": 0, "rejected": 0, "skipped": 0,
             "floats_up": 0, "floats_down": 0, "floats_up_per_client": 0.0,
             "floats_down_per_client": 0.0}  # fmt: skip
        m.update(self._empty_extra())
        for k, val in m.items():
            self.history.setdefault(k, []).append(val)
        self.initialized = True

    def _empty_extra(self) -> dict:
        return {}

    def before_rounds(self, grid: Grid, *, timeout: float, train_config: ConfigRecord | None,
                      result: Result) -> None:  # fmt: skip
        """The initialization, once per run (not again after a restart from a checkpoint): its
        round's metrics under round 0, so that ``start``'s ``num_rounds`` are the simulator's
        ``run(num_rounds)``."""
        if self.initialized:
            return
        if self.needs_init():
            _, metrics = self.run_round(grid, timeout=timeout, train_config=train_config)
            result.train_metrics_clientapp[0] = metrics
        else:
            self._book_empty_init()

    def __repr__(self) -> str:
        k = self.comp.k if self.comp is not None else (self.k_arg or self.ratio)
        return (f"{type(self).__name__}(n={self.num_clients}, gamma={self.gamma:.4g}, "
                f"compressor={self.compressor!r}, k={k}, rounds={self.rounds})")  # fmt: skip

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``BaseMethodStrategy.state_dict`` plus the method's server state (g / h), whether the
        initialization ran and MARINA's x_round. Copies."""
        state = super().state_dict()
        state["initialized"] = self.initialized
        state["x_round"] = self.x_round
        state["server"] = {name: getattr(self, name).detach().cpu().clone()
                           for name in self.state_names if self.x is not None}  # fmt: skip
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` of a strategy built with the same arguments (errors,
        before anything changes, as ``BaseMethodStrategy.load_state_dict``, and on a malformed
        server state)."""
        if not isinstance(state, dict) or "server" not in state:
            raise TypeError("state must be a dict from CompressedStrategy.state_dict()")
        if state.get("method") != self.method:
            raise ValueError(f"state is of method {state.get('method')!r}, not {self.method!r}")
        x = state.get("x")
        comp = None
        if isinstance(x, torch.Tensor):
            for name in self.state_names:
                t = state["server"].get(name)
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or \
                        t.shape != x.shape:  # fmt: skip
                    raise ValueError(f"state's {name} must be a float32 tensor shaped as x")
            comp = self._compressor(x.numel())
        super().load_state_dict(state)
        self.comp = comp
        self.initialized = bool(state["initialized"])
        self.x_round = v.integer("x_round", state["x_round"], 0)
        for name in self.state_names:
            if name in state["server"]:
                setattr(self, name, state["server"][name].clone().to(self.device))
        self._round = None


class MarinaStrategy(CompressedStrategy):
    """MARINA on Flower: equals ``fedkern.algorithms.MARINA(batch, gamma=gamma, p=p,
    compressor=..., k=..., ratio=..., seed=seed, mode=..., batch_size=...)`` with the clients
    running ``GradientClient(ConvexGradients(batch, mode=..., batch_size=...))`` (bit for bit on
    the CPU). A round: the shared coin (prob. p, key(0)); x+ = x - gamma g; heads: every client
    sends grad f_i(x+) (p floats) and g = their mean; tails: Q_i(grad f_i(x+) - grad f_i(x)) (k
    floats, the minibatch of key(3) at both points in mode sgd, the mask of key(4)) and g += their
    mean. The initialization sends x0 and averages the full gradients.

    Args: num_clients, gamma, p (the coin, in (0, 1]; required), compressor ("randk" default or
    "none"), k / ratio, seed, device: ``CompressedStrategy``'s.
    """

    method = "marina"
    config_attrs = CompressedStrategy.config_attrs + ("p",)

    def __init__(self, *, num_clients: int, gamma: float, p: float, compressor: str = "randk",
                 **kwargs):  # fmt: skip
        super().__init__(num_clients=num_clients, gamma=gamma, p=p, compressor=compressor,
                         **kwargs)  # fmt: skip

    def plan(self):
        if not self.initialized:
            self._x_new, self._heads = self.x, True
            return True, self.x, self.round_key(SLOT_MINIBATCH), self.round_key(SLOT_MASK)
        self._heads = self.coin(self.p, SLOT_COIN)
        self._x_new = self.x - self.gamma * self.g
        return self._heads, self._x_new, self.key(SLOT_MINIBATCH), self.key(SLOT_MASK)

    def _needs_prev(self, cid: int, full: bool) -> bool:
        return not full and self.last_agg.get(cid, -1) != self.x_round

    def configure_round(self, config):
        msgs = super().configure_round(config)
        self._round.metrics["heads"] = int(self._heads)
        return msgs

    def _empty_extra(self) -> dict:
        return {"heads": 0}

    def aggregate_messages(self, good: dict) -> None:
        rnd = self._round
        if rnd.full:
            G = self.stack(good, zeros=False)
            w = torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=torch.float64,
                           device=G.device)  # fmt: skip
            self.g = client_ops.weighted_sum(G, w)
        else:
            self.g = self.g + self.comp.mean(self.stack(good, zeros=False))
        self.x = self._x_new.to(self.device)
        self.x_round = rnd.round

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", p={self.p:.4g})"


class DianaStrategy(CompressedStrategy):
    """DIANA on Flower: equals ``fedkern.algorithms.DIANA(batch, gamma=gamma,
    shift_step=shift_step, compressor=..., k=..., seed=seed, mode=..., batch_size=...)`` with
    ``GradientClient(ConvexGradients(...))`` clients (bit for bit on the CPU). A round: every
    client sends m_i = Q(g_i - h_i) (k floats; its gradient at x, the mask of key(4)) and keeps
    h_i += alpha m_i pending until the server confirms it; m = the mean over all n (a missing
    message counts as zero); g = h + m; h += alpha m; x -= gamma g.

    Args: num_clients, gamma, shift_step (alpha in [0, 1]; default 1/(omega + 1), omega = p/k - 1
    once p is known; 0: compressed GD, the baseline), compressor ("randk" or "none"), k / ratio,
    seed, device.
    """

    method = "diana"
    state_names = ("h",)
    config_attrs = CompressedStrategy.config_attrs + ("shift_step",)

    def __init__(self, *, num_clients: int, gamma: float, shift_step: float | None = None,
                 compressor: str = "randk", **kwargs):  # fmt: skip
        super().__init__(num_clients=num_clients, gamma=gamma, compressor=compressor, **kwargs)
        if shift_step is not None:
            shift_step = v.fp32_scalar("shift_step", shift_step, nonneg=True)
            if shift_step > 1:
                raise ValueError(f"shift_step must be in [0, 1], got {shift_step}")
        self.shift_step = shift_step

    @property
    def alpha(self) -> float:
        """The shift step (the default needs the compressor, i.e. the model size)."""
        if self.shift_step is not None:
            return self.shift_step
        if self.comp is None:
            raise RuntimeError("the default shift_step needs the model size (start first)")
        return v.fp32_scalar("shift_step", 1 / (self.comp.omega + 1), nonneg=True)

    def needs_init(self) -> bool:
        return False

    def extra_fields(self) -> dict:
        return {"alpha": self.alpha, "feedback": True}

    def plan(self):
        return False, self.x, self.key(SLOT_MINIBATCH), self.key(SLOT_MASK)

    def aggregate_messages(self, good: dict) -> None:
        m = self.comp.mean(self.stack(good, zeros=True))
        g = self.h + m
        if self.alpha:
            self.h = self.h + self.alpha * m
        self.x = self.x - self.gamma * g


class Ef21Strategy(CompressedStrategy):
    """EF21 on Flower: equals ``fedkern.algorithms.EF21(batch, gamma=gamma, compressor=...,
    k=..., feedback=feedback, seed=seed, mode=..., batch_size=...)`` with
    ``GradientClient(ConvexGradients(...))`` clients (bit for bit on the CPU). The initialization:
    every client sends C(grad f_i(x0)) (its g_i); g = their mean. A round: x+ = x - gamma g (sent);
    c_i = C(grad f_i(x+) - g_i) (top-k: k values and k indices); g += the mean over all n (missing:
    zero); the client commits g_i += c_i once confirmed. feedback=False: c_i = C(grad f_i(x+)) and
    g = the mean of the live c_i (the biased baseline).

    Args: num_clients, gamma, compressor ("topk" default, "randk" (not scaled) or "none"),
    k / ratio, feedback (bool), seed, device.
    """

    method = "ef21"
    unbiased = False
    config_attrs = CompressedStrategy.config_attrs + ("feedback",)

    def __init__(self, *, num_clients: int, gamma: float, compressor: str = "topk",
                 feedback: bool = True, **kwargs):  # fmt: skip
        super().__init__(num_clients=num_clients, gamma=gamma, compressor=compressor, **kwargs)
        self.feedback = v.boolean("feedback", feedback)

    def extra_fields(self) -> dict:
        return {"alpha": 1.0, "feedback": self.feedback}

    def plan(self):
        if not self.initialized:
            self._x_new = self.x
            return False, self.x, self.key(SLOT_MINIBATCH), SLOT_MASK
        self._x_new = self.x - self.gamma * self.g
        return False, self._x_new, self.key(SLOT_MINIBATCH), self.key(SLOT_MASK)

    def aggregate_messages(self, good: dict) -> None:
        if not self.initialized:  # g_i = C(grad f_i(x0)); missing: g_i = 0
            self.g = self.comp.mean(self.stack(good, zeros=True))
            return
        if self.feedback:
            self.g = self.g + self.comp.mean(self.stack(good, zeros=True))
        else:
            self.g = self.comp.mean(self.stack(good, zeros=False))
        self.x = self._x_new.to(self.device)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", feedback={self.feedback})"
