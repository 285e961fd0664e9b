"""fedkern's federated methods as Flower strategies (Message API): Scaffnew, ProxSkip, TAMUNA.

``MethodStrategy`` is the base every method strategy shares: the round counter, the seed and the
round's draws (cohort, local-step count, TAMUNA's pattern; ``fedkern.sampling`` at the keys of
``fedkern.algorithms.base.Method.key``, so a run draws what the simulator draws), the server model,
the handshake that maps Flower nodes to global client ids, the per-round floats-sent metrics,
reply validation, and ``state_dict`` / ``load_state_dict``. ``ScaffnewStrategy`` and
``TamunaStrategy`` add the aggregation. The clients run ``method_client.MethodClient``.

``strategy.start(grid=..., initial_arrays=..., num_rounds=...)`` (the ``Strategy.start`` contract,
returning a ``Result``) runs, once, the handshake (``query.fedkern_hello`` to every node: each
replies with its client id, protocol version and methods; nodes that fail the checks are left out
with a warning), then per round (method round t = ``strategy.rounds``, 0-based; Flower round
t + 1):

1. draws K ~ Geometric(p) at key(0), the cohort S of c clients at key(1) and (TAMUNA, s < c) the
   slot permutation at key(2) -- exactly ``fedkern.algorithms.Scaffnew`` / ``TAMUNA``;
2. ``train.fedkern`` to each cohort client: the model x (p floats), and in the ``fedkern``
   ConfigRecord the seed, t, the key, K, gamma, coef, n, c, s, the client's cohort row and pattern
   slot, and ``agg_round`` (the last round whose reply of this client the server aggregated);
3. the replies (values at the held coordinates, stacked in cohort-row order) are aggregated with
   the simulator's op: Scaffnew the cohort mean (``fedkern::scaffnew_sync_``), TAMUNA the mean of
   the s holders of every coordinate (``fedkern::tamuna_aggregate_``);
4. sync mode "exchange" (partial participation, exact): ``train.fedkern_sync`` sends each
   aggregated client the new model at its held coordinates, for its control-variate update
   h_i += coef q_i (x+ - x_i) in the same round. Sync mode "next" (full participation, or TAMUNA's
   ``deferred`` option): the client applies that update when it next receives the model, which
   under full participation is x+ itself (exact, no second message).

Failures (an error reply, no reply, a node that is not connected) and rejected replies (wrong
protocol version, another method, seed or round, wrong shape or dtype, non-finite values; each
logged as a warning) are left out of the round: the client's control variate does not move
(``MethodClient`` drops an update the server did not aggregate). Rule for the rest: Scaffnew
averages the live clients; TAMUNA averages, per coordinate, its live holders, and a coordinate
whose holders all failed keeps its value. Both keep sum_i h_i = 0, because the h updates of a
coordinate's live holders sum to zero. With no live reply the round changes nothing (metric
``skipped`` = 1).

Catch-up: when the server cannot be sure that an aggregated client received the model its update
needs -- its sync message failed (metric ``sync_failures``), or, in sync mode "next" under full
participation, its next train message failed -- it keeps that model's values at the client's
held coordinates and resends them (ArrayRecord ``protocol.CATCHUP``, counted in floats_down) with
the client's next train message, until a reply of the client is aggregated again. The client
completes its pending update with them, so failures never make the control variates inexact.
(With ``deferred`` the later model is the method's definition: no catch-up.)

Metrics (per round, ``Result.train_metrics_clientapp`` keyed by the Flower round t + 1 counted
across restarts, and ``strategy.history``): round, local_steps (K), cohort (c), clients (live
replies), failures, rejected, skipped, sync_failures, floats_up / floats_down (model values the
clients sent / received this round, all cohort clients together) and floats_up_per_client /
floats_down_per_client (divided by c: the simulator's "floats_up" / "floats_down").
"""

from __future__ import annotations

import abc
import copy
import math
import time
from logging import INFO, WARNING

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg, Result
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

from fedkern import sampling
from fedkern import validation as v
from fedkern.algorithms.base import SLOTS
from fedkern.algorithms.federated import SLOT_COHORT, SLOT_COIN, SLOT_PATTERN, soft_threshold
from fedkern.algorithms.tamuna import chi
from fedkern.integrations.flower import protocol as P
from fedkern.ops import clients as client_ops
from fedkern.ops import tamuna as tamuna_ops
from fedkern.reference.tamuna import holders

__all__ = [
    "BaseMethodStrategy",
    "MethodStrategy",
    "ProxSkipStrategy",
    "ScaffnewStrategy",
    "TamunaStrategy",
]


def _client_id(cid, n: int) -> bool:
    return isinstance(cid, int) and not isinstance(cid, bool) and 0 <= cid < n


class _Plan:
    """One round's draws and bookkeeping (built by ``configure_train``)."""

    def __init__(self, rnd, K, cohort, perm, s):
        self.round, self.K, self.s = rnd, K, s
        self.cohort = [int(i) for i in cohort]  # row -> client id
        self.perm = perm  # slot -> row, int64 [c]
        slot = torch.empty_like(perm)
        slot[perm] = torch.arange(perm.numel(), dtype=torch.int64)
        self.slot = [int(j) for j in slot]  # row -> slot
        self.node = {}  # row -> node id (rows whose client is connected)
        self.held = {}  # slot -> int64 [k] held coordinates (None: all, s = c)
        self.values: dict = {}  # row -> float32 ndarray [k]: the checked reply values
        self.live: list[int] = []  # rows aggregated
        self.x_start: torch.Tensor | None = None  # the model sent this round
        self.metrics: dict = {}
        self.sync: dict = {}  # row -> float32 values to send back


class BaseMethodStrategy(FedAvg):
    """What every fedkern method strategy shares, without a round of its own.

    The handshake (``connect``), the round counter and the keyed draws (``key``, ``cohort``,
    ``coin``, ``geometric``: ``fedkern.algorithms.base.Method``'s keys), the server model and its
    layout (``set_initial_arrays``, ``global_arrays``), the ``start`` loop (``Strategy.start``'s
    contract) and checkpoints (``state_dict`` / ``load_state_dict``). A subclass defines
    ``run_round(grid, *, timeout, train_config) -> (ArrayRecord, MetricRecord)``, which must advance
    ``rounds`` and append the round's metrics to ``history``. ``MethodStrategy`` (Scaffnew,
    ProxSkip, TAMUNA: a model-averaging round), ``FiveGCSStrategy``, ``CompressedStrategy`` and
    ``ByzVRMarinaPPStrategy`` are the subclasses. A round is not Flower's FedAvg round, so
    ``configure_train`` / ``aggregate_train`` raise TypeError unless a subclass gives them.

    Args:
        num_clients: n, the number of clients (global ids 0..n-1 that the clients report in the
            handshake; ``MethodClient`` reads node_config "partition-id" by default).
        cohort: c, clients per round (default n), drawn uniformly without replacement.
        p: the probability of communicating after a local step (K ~ Geometric(p)), in (0, 1].
        gamma: the local step size (> 0). (The simulator defaults these from the problem; a
            strategy does not know the problem, so they are required.)
        seed: keys every draw (an int in [0, 2**63)).
        device: where the server aggregation runs ("cpu" default).
        **kwargs: Flower FedAvg's evaluation options (fraction_evaluate, default 0.0: no
            federated evaluation; min_evaluate_nodes, evaluate_metrics_aggr_fn, arrayrecord_key,
            configrecord_key, min_available_nodes, default n).

    Attributes: rounds (completed method rounds), x (the server model, float32 [p] or None before
    ``start`` / ``load_state_dict``), history (per-round metrics, lists), nodes (client id -> node
    id, from the handshake).
    """

    method = "method"
    #: Hyperparameters stored in ``state_dict`` and checked on load.
    config_attrs: tuple[str, ...] = ("seed", "num_clients", "cohort_size", "p", "gamma")
    #: The dtype of the server model ``x`` (checked by ``load_state_dict``).
    model_dtype = torch.float32

    def __init__(self, *, num_clients: int, cohort: int | None = None, p: float, gamma: float,
                 seed: int = 0, device="cpu", min_cohort: int = 1, **kwargs):  # fmt: skip
        self.num_clients = v.integer("num_clients", num_clients, max(min_cohort, 1))
        n = self.num_clients
        self.cohort_size = v.integer("cohort", n if cohort is None else cohort, min_cohort, n)
        self.p = v.probability("p", p)
        self.gamma = v.positive("gamma", gamma)
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self.device = torch.device(device)
        for bad in ("fraction_train", "min_train_nodes"):
            if bad in kwargs:
                raise TypeError(f"{bad} is not an option of {type(self).__name__}: the method "
                                f"draws its cohort (cohort=)")  # fmt: skip
        kwargs.setdefault("min_available_nodes", n)
        evaluate = kwargs.pop("fraction_evaluate", 0.0)
        super().__init__(fraction_evaluate=1.0, **kwargs)  # (0.0 here would log a warning)
        self.fraction_evaluate = evaluate
        if evaluate == 0.0:
            self.min_evaluate_nodes = 0
        self.rounds = 0
        self.x: torch.Tensor | None = None
        self.layout: list[tuple[str, tuple]] | None = None
        self.last_agg: dict[int, int] = {}  # client -> last round its reply was aggregated
        self.history: dict[str, list] = {}
        self.nodes: dict[int, int] = {}

    # ---- draws (fedkern.algorithms.base.Method's keys) -----------------------------------------

    def key(self, slot: int = 0) -> int:
        """The stream position of draw ``slot`` of the current round: (rounds + 1) * 16 + slot,
        as ``fedkern.algorithms.base.Method.key``."""
        return (self.rounds + 1) * SLOTS + v.integer("slot", slot, 0, SLOTS - 1)

    def cohort(self, n: int, c: int, slot: int = SLOT_COHORT) -> torch.Tensor:
        """``fedkern.sampling.uniform(n, c)`` at this round's ``key(slot)``: int64 [c] CPU,
        ascending (``Method.cohort``)."""
        return sampling.uniform(n, c, seed=self.seed, step=self.key(slot))

    def coin(self, p: float, slot: int = SLOT_COIN) -> bool:
        """``fedkern.sampling.coin(p)`` at this round's ``key(slot)`` (``Method.coin``)."""
        return sampling.coin(p, seed=self.seed, step=self.key(slot))

    def geometric(self, p: float, slot: int = SLOT_COIN) -> int:
        """``fedkern.sampling.geometric(p)`` at this round's ``key(slot)``
        (``Method.geometric``)."""
        return sampling.geometric(p, seed=self.seed, step=self.key(slot))

    # ---- the model and its layout --------------------------------------------------------------

    @property
    def dim(self) -> int:
        """p, the number of model parameters (0 before the model is known)."""
        return 0 if self.x is None else self.x.numel()

    @property
    def global_arrays(self) -> ArrayRecord | None:
        """The server model as an ArrayRecord (the initial arrays' names and shapes, float32), or
        None before ``start``."""
        if self.x is None:
            return None
        rec, off, x = ArrayRecord(), 0, self.x.cpu().numpy()
        for k, shape in self.layout:
            m = math.prod(shape)
            rec[k] = Array(np.ascontiguousarray(x[off : off + m].reshape(shape)))
            off += m
        return rec

    def set_initial_arrays(self, arrays: ArrayRecord) -> None:
        """Adopt ``arrays`` (an ArrayRecord of floating-point arrays) as the model: names and
        shapes, values as float32. When the strategy already has a model (``load_state_dict``,
        or an earlier ``start``) the arrays must have its names and shapes and their values are
        ignored: the run continues from the strategy's model."""
        if not isinstance(arrays, ArrayRecord):
            raise TypeError(f"arrays must be a flwr.app.ArrayRecord, got {type(arrays).__name__}")
        layout = [(k, tuple(arrays[k].shape)) for k in arrays.keys()]
        for k in arrays.keys():
            if np.dtype(arrays[k].numpy().dtype).kind != "f":
                raise TypeError(f"arrays[{k!r}] must be floating point, got {arrays[k].dtype}")
        if self.x is not None:
            if layout != self.layout:
                raise ValueError(f"initial_arrays have the layout {layout}; the strategy's model "
                                 f"(checkpoint) has {self.layout}")  # fmt: skip
            log(INFO, "%s: resuming after round %s with the checkpoint's model", self.method,
                self.rounds)  # fmt: skip
            return
        self.layout = layout
        self.x = P.flatten(arrays, [k for k, _ in layout]).to(self.device)

    # ---- handshake ---------------------------------------------------------------------------

    def connect(self, grid: Grid, timeout: float = 3600) -> dict[int, int]:
        """The handshake (``query.fedkern_hello``): maps client ids to node ids. Waits (up to
        ``timeout`` seconds) for ``min_available_nodes`` nodes, asks every node, keeps the valid
        replies (protocol version, this method served, id in [0, n), the seed if the client
        states one; a repeated id keeps the first node). Returns and sets ``nodes``."""
        deadline = time.time() + timeout
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            if time.time() > deadline:
                break
            log(INFO, "%s: waiting for nodes: %s of %s connected", self.method, len(nodes),
                self.min_available_nodes)  # fmt: skip
            time.sleep(1)
        hello = ConfigRecord({"protocol": P.PROTOCOL, "method": self.method, "seed": self.seed})
        msgs = [Message(RecordDict({P.RECORD: hello}), dst_node_id=int(nid),
                        message_type=P.ACTION_HELLO) for nid in nodes]  # fmt: skip
        found: dict[int, int] = {}
        for msg in grid.send_and_receive(msgs, timeout=timeout) if msgs else []:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "%s: node %s left out: hello failed (%s)", self.method, node,
                    msg.error.reason)  # fmt: skip
                continue
            cfg = msg.content.config_records.get(P.RECORD, {})
            cid = cfg.get("client_id")
            why = None
            if cfg.get("protocol") != P.PROTOCOL:
                why = f"protocol version {cfg.get('protocol')!r}, expected {P.PROTOCOL}"
            elif self.method not in (cfg.get("methods") or []):
                why = f"it serves {cfg.get('methods')!r}, not {self.method!r}"
            elif not _client_id(cid, self.num_clients):
                why = f"client id {cid!r} is not in [0, {self.num_clients})"
            elif "seed" in cfg and cfg["seed"] != self.seed:
                why = f"its seed {cfg['seed']} differs from the strategy's {self.seed}"
            elif cid in found:
                why = f"client id {cid} is already node {found[cid]}'s"
            if why is not None:
                log(WARNING, "%s: node %s left out: %s", self.method, node, why)
                continue
            found[cid] = node
        missing = self.num_clients - len(found)
        if missing:
            log(WARNING, "%s: %s of %s clients have no node; they fail whenever drawn",
                self.method, missing, self.num_clients)  # fmt: skip
        self.nodes = found
        return found

    # ---- a round (the subclass's) ----------------------------------------------------------------

    @abc.abstractmethod
    def run_round(self, grid: Grid, *, timeout: float = 3600,
                  train_config: ConfigRecord | None = None):  # fmt: skip
        """One method round over ``grid`` (after ``connect``): returns (the model after the round
        as an ArrayRecord, the round's MetricRecord); advances ``rounds`` and appends the metrics
        to ``history``."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid):  # fmt: skip
        """Not FedAvg's: this strategy's rounds are ``run_round`` (driven by ``start``)."""
        raise TypeError(f"{type(self).__name__} runs its rounds with run_round / start")

    def aggregate_train(self, server_round: int, replies):
        """Not FedAvg's (see ``configure_train``)."""
        raise TypeError(f"{type(self).__name__} runs its rounds with run_round / start")

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:  # fmt: skip
        """Run ``num_rounds`` more rounds (``Strategy.start``'s contract; module docstring).

        After ``load_state_dict`` the run continues from the checkpoint (``initial_arrays`` must
        match its layout). Results are keyed by the Flower round counted across restarts.
        ``train_config`` reaches the clients' trainers; evaluation is FedAvg's (off by default,
        ``fraction_evaluate``) and ``evaluate_fn(round, arrays)`` runs at the server.
        """
        num_rounds = v.integer("num_rounds", num_rounds, 0)
        self.set_initial_arrays(initial_arrays)
        log(INFO, "Starting %s (rounds %s..%s):", type(self).__name__, self.rounds + 1,
            self.rounds + num_rounds)  # fmt: skip
        self.summary()
        self.connect(grid, timeout)
        result = Result()
        self.before_rounds(grid, timeout=timeout, train_config=train_config, result=result)
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        if evaluate_fn:
            res = evaluate_fn(self.rounds, self.global_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[self.rounds] = res
        for _ in range(num_rounds):
            arrays, metrics = self.run_round(grid, timeout=timeout, train_config=train_config)
            t = self.rounds
            result.train_metrics_clientapp[t] = metrics
            msgs = self.configure_evaluate(t, arrays, evaluate_config, grid)
            if msgs:
                agg = self.aggregate_evaluate(t, grid.send_and_receive(msgs, timeout=timeout))
                if agg is not None:
                    result.evaluate_metrics_clientapp[t] = agg
            if evaluate_fn:
                res = evaluate_fn(t, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[t] = res
        result.arrays = self.global_arrays
        return result

    def before_rounds(self, grid: Grid, *, timeout: float, train_config: ConfigRecord | None,
                      result: Result) -> None:  # fmt: skip
        """Called by ``start`` after the handshake, before the first of its rounds (default:
        nothing). A method with a one-time initialization round runs it here and books its
        metrics in ``result``."""

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t└──> %r", self)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.num_clients}, cohort={self.cohort_size}, "
                f"p={self.p:.4g}, gamma={self.gamma:.4g}, rounds={self.rounds})")  # fmt: skip

    # ---- checkpoints ----------------------------------------------------------------------------

    def config(self) -> dict:
        """The hyperparameters named by ``config_attrs``."""
        return {k: getattr(self, k) for k in self.config_attrs}

    def state_dict(self) -> dict:
        """Everything a restarted server needs to continue exactly: the method and protocol, the
        round counter (the draws are keyed by it and the seed), the hyperparameters, the model and
        its layout, the clients' last aggregated rounds and the history. Copies."""
        return {"method": self.method, "protocol": P.PROTOCOL, "rounds": self.rounds,
                "config": self.config(),
                "x": None if self.x is None else self.x.detach().cpu().clone(),
                "layout": copy.deepcopy(self.layout), "last_agg": dict(self.last_agg),
                "history": copy.deepcopy(self.history)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` of a strategy built with the same arguments. Raises
        TypeError / ValueError (before changing anything) on another method, protocol or
        hyperparameter, or a malformed model."""
        if not isinstance(state, dict) or "config" not in state:
            raise TypeError(f"state must be a dict from {type(self).__name__}.state_dict()")
        if state.get("method") != self.method:
            raise ValueError(f"state is of method {state.get('method')!r}, not {self.method!r}")
        if state.get("protocol") != P.PROTOCOL:
            raise ValueError(f"state has protocol version {state.get('protocol')!r}, expected "
                             f"{P.PROTOCOL}")  # fmt: skip
        mine = self.config()
        for k, val in state["config"].items():
            if k in mine and mine[k] != val:
                raise ValueError(f"state was saved with {k} = {val!r}; this strategy has "
                                 f"{k} = {mine[k]!r}")  # fmt: skip
        x, layout = state["x"], state["layout"]
        if x is not None:
            if not isinstance(x, torch.Tensor) or x.dtype != self.model_dtype or x.dim() != 1:
                raise ValueError(f"state's x must be a {self.model_dtype} [p] tensor")
            if layout is None or sum(math.prod(s) for _, s in layout) != x.numel():
                raise ValueError("state's layout does not match its model x")
        self.rounds = v.integer("rounds", state["rounds"], 0)
        self.x = None if x is None else x.clone().to(self.device)
        self.layout = None if layout is None else [(k, tuple(s)) for k, s in layout]
        self.last_agg = {int(k): int(r) for k, r in state["last_agg"].items()}
        self.history = copy.deepcopy(state["history"])


class MethodStrategy(BaseMethodStrategy):
    """The model-averaging round of Scaffnew, ProxSkip and TAMUNA (module docstring: the round, the
    failure rules, the catch-up, the metrics). Arguments and attributes as ``BaseMethodStrategy``;
    a subclass defines ``coef`` and ``aggregate_values`` (and may change ``s``, ``shift``,
    ``sync_mode``, ``pattern``, ``aggregate_replies``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.last_slot: dict[int, int] = {}  # client -> its slot in its last aggregated round
        self.catchup: dict[int, tuple[int, torch.Tensor]] = {}  # client -> (round, values)
        self._plan: _Plan | None = None

    # ---- what a subclass defines -------------------------------------------------------------

    @property
    def s(self) -> int:
        """Holders per coordinate (c: every cohort client holds every coordinate)."""
        return self.cohort_size

    @property
    @abc.abstractmethod
    def coef(self) -> float:
        """The control-variate coefficient of the clients' update h += coef (x+ - x_i)."""

    @property
    def shift(self) -> float:
        """sigma of the clients' replies: a client sends x_i - sigma h_i at its held coordinates
        (0 here: the trained model itself; ProxSkip's L1 prox: gamma / p)."""
        return 0.0

    @property
    def sync_mode(self) -> str:
        """``protocol.SYNC_EXCHANGE`` or ``SYNC_NEXT`` (module docstring, step 4)."""
        return P.SYNC_NEXT if self.cohort_size == self.num_clients else P.SYNC_EXCHANGE

    def pattern(self) -> torch.Tensor:
        """This round's slot -> cohort-row permutation (int64 [c] CPU; identity by default)."""
        return torch.arange(self.cohort_size, dtype=torch.int64)

    @abc.abstractmethod
    def aggregate_values(self, X: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """The new server model [p] float32 from X [c, p] (row r = cohort row r's trained model
        at its held coordinates; other entries unspecified) and the live rows ``plan.live``."""

    def draw(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """This round's (K, cohort ids int64 [c] ascending, slot -> row permutation [c])."""
        K = self.geometric(self.p, SLOT_COIN)
        S = self.cohort(self.num_clients, self.cohort_size, SLOT_COHORT)
        return K, S, self.pattern()

    # ---- a round -----------------------------------------------------------------------------

    def _held(self, plan: _Plan, row: int) -> torch.Tensor | None:
        """Row ``row``'s held coordinates this round: int64 [k] ascending, None for all (s = c)."""
        if plan.s == self.cohort_size:
            return None
        slot = plan.slot[row]
        if slot not in plan.held:
            plan.held[slot] = P.held_index(self.dim, self.cohort_size, plan.s, slot)
        return plan.held[slot]

    def _take(self, x: torch.Tensor, plan: _Plan, row: int) -> torch.Tensor:
        """x [p] at row ``row``'s held coordinates (a contiguous copy)."""
        idx = self._held(plan, row)
        return x.clone() if idx is None else x[idx]

    def _fields(self, plan: _Plan, row: int) -> dict:
        cid = plan.cohort[row]
        return {"protocol": P.PROTOCOL, "method": self.method, "seed": self.seed,
                "round": plan.round, "client_id": cid, "row": row}  # fmt: skip

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid):  # fmt: skip
        """The round's ``train.fedkern`` messages (module docstring, steps 1-2). The model sent
        is the strategy's own ``x`` (``arrays`` is what ``start`` passes: the same values)."""
        if self.x is None:
            raise RuntimeError(f"{type(self).__name__} has no model: run it with strategy.start "
                               "or call set_initial_arrays / load_state_dict first")  # fmt: skip
        K, S, perm = self.draw()
        plan = self._plan = _Plan(self.rounds, K, S, perm, self.s)
        plan.x_start = self.x.detach().cpu().clone()
        model = self.global_arrays
        config = ConfigRecord() if config is None else config
        config["server-round"] = server_round
        keys = [k for k, _ in self.layout]
        msgs, down = [], 0
        for row, cid in enumerate(plan.cohort):
            node = self.nodes.get(cid)
            if node is None:
                continue
            plan.node[row] = node
            fk = self._fields(plan, row)
            fk.update({"key": self.key(0), "K": K, "gamma": self.gamma, "coef": self.coef,
                       "n": self.num_clients, "c": self.cohort_size, "s": plan.s,
                       "slot": plan.slot[row], "agg_round": self.last_agg.get(cid, -1),
                       "sync": self.sync_mode, "layout": keys, "arrays": self.arrayrecord_key,
                       "config": self.configrecord_key, "catchup_round": -1,
                       "shift": self.shift})  # fmt: skip
            content = RecordDict({self.arrayrecord_key: model, self.configrecord_key: config})
            if cid in self.catchup:
                fk["catchup_round"], vals = self.catchup[cid]
                content[P.CATCHUP] = ArrayRecord({"values": Array(vals.numpy())})
                down += vals.numel()
            content[P.RECORD] = ConfigRecord(fk)
            msgs.append(Message(content, dst_node_id=int(node), message_type=P.ACTION_TRAIN,
                                group_id=str(server_round)))  # fmt: skip
            down += self.dim
        plan.metrics.update({"round": server_round, "local_steps": K, "cohort": self.cohort_size,
                             "floats_down": down, "floats_up": 0, "sync_failures": 0})  # fmt: skip
        return msgs

    def _check_reply(self, msg: Message, plan: _Plan, row: int) -> str | None:
        """Why a reply to ``row`` is rejected (None: fine)."""
        fields = self._fields(plan, row)
        want = {k: fields[k] for k in ("seed", "round", "client_id", "row")}
        return P.header_problem(msg, self.method, want)

    def _replies(self, replies, plan: _Plan, rows, what: str):
        """(row -> reply) of the valid non-error replies; counts failures and rejections."""
        node_row = {plan.node[r]: r for r in rows if r in plan.node}
        got, failures, rejected = {}, 0, 0
        for msg in replies:
            node = msg.metadata.src_node_id
            row = node_row.get(node)
            if row is None or row in got:
                why = "not asked" if row is None else "repeated"
                log(WARNING, "%s: round %s: %s reply from node %s ignored (%s)", self.method,
                    plan.round + 1, what, node, why)  # fmt: skip
                continue
            if msg.has_error():
                failures += 1
                log(INFO, "%s: round %s: client %s failed (%s): %s", self.method, plan.round + 1,
                    plan.cohort[row], what, msg.error.reason)  # fmt: skip
                got[row] = None
                continue
            why = self._check_reply(msg, plan, row)
            if why is None and what == "train":
                why = self._values_problem(msg, plan, row)
            if why is not None:
                rejected += 1
                log(WARNING, "%s: round %s: %s reply of client %s skipped: %s", self.method,
                    plan.round + 1, what, plan.cohort[row], why)  # fmt: skip
                got[row] = None
                continue
            got[row] = msg
        failures += sum(1 for r in rows if r not in got)  # no reply (or no node) at all
        return {r: m for r, m in got.items() if m is not None}, failures, rejected

    def _values_problem(self, msg: Message, plan: _Plan, row: int) -> str | None:
        k = P.held_count(self.dim, self.cohort_size, plan.s, plan.slot[row])
        why = P.values_problem(msg, k)
        if why is None:
            plan.values[row] = msg.content.array_records[P.VALUES]["values"].numpy()
        return why

    @staticmethod
    def stream_mean(plan: _Plan) -> torch.Tensor:
        """The mean [p] float32 of the live rows' full replies (s = c) without a stack: summed
        in cohort-row order in float32 and divided by their number -- the bits of
        ``fedkern::scaffnew_sync_``'s mean (and of ``tamuna_aggregate_`` at s = c) on every
        backend, in one pass over the replies."""
        acc = torch.from_numpy(plan.values[plan.live[0]]).clone()
        for row in plan.live[1:]:
            acc.add_(torch.from_numpy(plan.values[row]))
        return acc.div_(torch.tensor(float(len(plan.live)), dtype=torch.float32))

    def aggregate_replies(self, plan: _Plan) -> torch.Tensor:
        """The new server model [p] float32 from the live rows' values ``plan.values`` (row ->
        float32 ndarray [k] at its held coordinates): stacks them into X [c, p] (entries no row
        holds are left unset) and calls ``aggregate_values``. A subclass may aggregate the
        values without the stack."""
        X = torch.empty(self.cohort_size, self.dim, dtype=torch.float32)
        for row in plan.live:
            idx, vals = self._held(plan, row), torch.from_numpy(plan.values[row])
            if idx is None:
                X[row].copy_(vals)
            else:
                X[row].index_copy_(0, idx, vals)
        return self.aggregate_values(X.to(self.device), plan)

    def aggregate_train(self, server_round: int, replies):
        """Aggregate the round's replies (module docstring, step 3): the new model ArrayRecord
        (None when no reply was usable) and the round's MetricRecord so far."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("aggregate_train needs the round's configure_train first (use "
                               "strategy.start or run_round)")  # fmt: skip
        rows = list(range(self.cohort_size))
        good, failures, rejected = self._replies(list(replies), plan, rows, "train")
        up = sum(plan.values[row].size for row in good)
        plan.live = sorted(good)
        plan.metrics.update({"clients": len(plan.live), "failures": failures,
                             "rejected": rejected, "floats_up": up,
                             "skipped": int(not plan.live)})  # fmt: skip
        if not plan.live:
            log(WARNING, "%s: round %s: no usable reply; the model is unchanged", self.method,
                server_round)  # fmt: skip
            return None, MetricRecord(plan.metrics)
        x_new = self.aggregate_replies(plan).to(self.device)
        plan.values = {}
        self.x = x_new
        if self.sync_mode == P.SYNC_NEXT and self.cohort_size == self.num_clients:
            # a client aggregated last round whose message failed may have missed x+ of that
            # round (= the model sent this round): keep it for its catch-up
            for row in set(range(self.cohort_size)) - set(plan.live):
                cid = plan.cohort[row]
                if self.last_agg.get(cid) == plan.round - 1 and cid not in self.catchup:
                    held = P.held_index(self.dim, self.cohort_size, plan.s, self.last_slot[cid])
                    self.catchup[cid] = (plan.round - 1, plan.x_start[held].contiguous())
        for row in plan.live:
            cid = plan.cohort[row]
            self.last_agg[cid], self.last_slot[cid] = plan.round, plan.slot[row]
            self.catchup.pop(cid, None)
        if self.sync_mode == P.SYNC_EXCHANGE:
            xc = x_new.cpu()
            plan.sync = {row: self._take(xc, plan, row) for row in plan.live}
        return self.global_arrays, MetricRecord(plan.metrics)

    def configure_sync(self, server_round: int):
        """The round's ``train.fedkern_sync`` messages (step 4; empty unless sync "exchange")."""
        plan = self._plan
        msgs = []
        for row, vals in plan.sync.items():
            rec = ArrayRecord({"values": Array(vals.numpy())})
            content = RecordDict({P.RECORD: ConfigRecord(self._fields(plan, row)), P.VALUES: rec})
            msgs.append(Message(content, dst_node_id=int(plan.node[row]),
                                message_type=P.ACTION_SYNC,
                                group_id=str(server_round)))  # fmt: skip
            plan.metrics["floats_down"] += vals.numel()
        return msgs

    def aggregate_sync(self, server_round: int, replies) -> None:
        """Count the sync messages that failed and keep their values for the catch-up."""
        plan = self._plan
        rows = sorted(plan.sync)
        good, _, _ = self._replies(list(replies), plan, rows, "sync")
        bad = [r for r in rows if r not in good]
        for row in bad:
            self.catchup[plan.cohort[row]] = (plan.round, plan.sync[row])
        if bad:
            log(WARNING, "%s: round %s: %s sync messages failed; resent with those clients' "
                "next train message", self.method, server_round, len(bad))  # fmt: skip
        plan.metrics["sync_failures"] = len(bad)

    def run_round(self, grid: Grid, *, timeout: float = 3600,
                  train_config: ConfigRecord | None = None):  # fmt: skip
        """One method round over ``grid`` (after ``connect``): train, aggregate, sync. Returns
        (the model after the round as an ArrayRecord, the round's MetricRecord); advances
        ``rounds``."""
        server_round = self.rounds + 1
        config = ConfigRecord(dict(train_config or {}))
        msgs = self.configure_train(server_round, self.global_arrays, config, grid)
        replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
        self.aggregate_train(server_round, replies)
        plan = self._plan
        if plan.sync:
            msgs = self.configure_sync(server_round)
            self.aggregate_sync(server_round, grid.send_and_receive(msgs, timeout=timeout))
        c = self.cohort_size
        plan.metrics["floats_up_per_client"] = plan.metrics["floats_up"] / c
        plan.metrics["floats_down_per_client"] = plan.metrics["floats_down"] / c
        for k, val in plan.metrics.items():
            self.history.setdefault(k, []).append(val)
        self.rounds += 1
        self._plan = None
        return self.global_arrays, MetricRecord(plan.metrics)

    def before_rounds(self, grid: Grid, *, timeout: float, train_config: ConfigRecord | None,
                      result: Result) -> None:  # fmt: skip
        """Called by ``start`` after the handshake, before the first of its rounds (default:
        nothing). A method with a one-time initialization round runs it here and books its
        metrics in ``result``."""

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> %r", self)
        log(INFO, "\t└──> sync: %s", self.sync_mode)

    def state_dict(self) -> dict:
        """``BaseMethodStrategy.state_dict`` plus the clients' pattern slots of their last
        aggregated round and the pending catch-up values (copies)."""
        state = super().state_dict()
        state["last_slot"] = dict(self.last_slot)
        state["catchup"] = {k: (r, t.clone()) for k, (r, t) in self.catchup.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` (errors as ``BaseMethodStrategy.load_state_dict``, raised
        before anything changes)."""
        if not isinstance(state, dict) or "last_slot" not in state or "catchup" not in state:
            raise TypeError(f"state must be a dict from {type(self).__name__}.state_dict()")
        try:
            last_slot = {int(k): int(r) for k, r in state["last_slot"].items()}
            catchup = {int(k): (int(r), t.clone()) for k, (r, t) in state["catchup"].items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"state's last_slot / catchup are malformed: {exc}") from None
        super().load_state_dict(state)
        self.last_slot, self.catchup, self._plan = last_slot, catchup, None


class ScaffnewStrategy(MethodStrategy):
    """Scaffnew (ProxSkip's FL form) with partial participation, on Flower.

    Equals ``fedkern.algorithms.Scaffnew(batch, cohort=c, p=p, gamma=gamma, seed=seed)`` with the
    clients running ``ConvexTrainer`` (bit for bit on the CPU). A round: K ~ Geometric(p) local
    steps from x with h_i on the cohort, x+ = the mean of the cohort's models (summed in cohort-row
    order, ``fedkern::scaffnew_sync_``), h_i += (p / gamma)(x+ - x_i). Floats per cohort client:
    p up, p down under full participation (the h update uses the next round's model, which is
    x+); with c < n the same-round exchange sends x+ back (2p down).

    Args: ``MethodStrategy``'s (num_clients, cohort, p, gamma, seed, device, FedAvg's evaluation
    options).
    """

    method = "scaffnew"

    @property
    def coef(self) -> float:
        return self.p / self.gamma

    def aggregate_replies(self, plan: _Plan) -> torch.Tensor:
        """On the CPU, the mean of the live replies without a stack (``stream_mean``).
        Elsewhere: the stack and the op."""
        if self.device.type != "cpu":
            return super().aggregate_replies(plan)
        return self.stream_mean(plan)

    def aggregate_values(self, X: torch.Tensor, plan: _Plan) -> torch.Tensor:
        live = plan.live
        Xl = X if len(live) == X.shape[0] else X[live].contiguous()
        scratch = torch.zeros_like(Xl)  # the op's h update is the clients' business
        return client_ops.scaffnew_sync_(Xl, scratch, float(self.p) / float(self.gamma))


class ProxSkipStrategy(ScaffnewStrategy):
    """ProxSkip (federated form) on Flower: Scaffnew's round with the consensus or the L1 prox.

    Equals ``fedkern.algorithms.ProxSkip(batch, prox=prox, lam=lam, cohort=c, p=p, gamma=gamma,
    seed=seed)`` with ``ConvexTrainer`` clients (bit for bit on the CPU). prox "consensus" is
    Scaffnew (the server averages the models). prox "l1" (psi = consensus + lam ||x||_1): every
    cohort client sends z_i = x_i - (gamma / p) h_i (p floats; ``shift``), the server sets
    x+ = soft_threshold(mean_i z_i, gamma lam / p) (the mean over the live replies, summed in
    cohort-row order with float64 accumulation, as the simulator's ``ClientBatch.mean``), and
    the client's update h_i += (p / gamma)(x+ - x_i) uses its trained x_i (kept on the client),
    with x+ from the same-round exchange (c < n) or the next round's model (c = n). Unlike the
    consensus prox, sum_i h_i is not kept at 0 by the L1 prox; nothing here relies on it.

    Args:
        num_clients, cohort, p, gamma, seed, device: ``MethodStrategy``'s.
        prox: "consensus" (default) or "l1".
        lam: the L1 weight (>= 0; prox "l1").
    """

    method = "proxskip"
    config_attrs = MethodStrategy.config_attrs + ("prox", "lam")

    def __init__(self, *, num_clients: int, prox: str = "consensus", lam: float = 0.0,
                 **kwargs):  # fmt: skip
        if prox not in ("consensus", "l1"):
            raise ValueError(f"prox must be 'consensus' or 'l1', got {prox!r}")
        lam = v.fp32_scalar("lam", lam, nonneg=True)
        super().__init__(num_clients=num_clients, **kwargs)
        self.prox, self.lam = prox, lam

    @property
    def shift(self) -> float:
        return self.gamma / self.p if self.prox == "l1" else 0.0

    def aggregate_replies(self, plan: _Plan) -> torch.Tensor:
        if self.prox == "l1":  # the float64-accumulated mean of the op: the stack
            return MethodStrategy.aggregate_replies(self, plan)
        return super().aggregate_replies(plan)

    def aggregate_values(self, X: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if self.prox == "consensus":
            return super().aggregate_values(X, plan)
        live = plan.live
        Xl = X if len(live) == X.shape[0] else X[live].contiguous()
        w = torch.full((Xl.shape[0],), 1.0 / Xl.shape[0], dtype=torch.float64, device=X.device)
        return soft_threshold(client_ops.weighted_sum(Xl, w), self.gamma * self.lam / self.p)

    def __repr__(self) -> str:
        return (f"ProxSkipStrategy(n={self.num_clients}, cohort={self.cohort_size}, "
                f"prox={self.prox!r}, lam={self.lam:.4g}, p={self.p:.4g}, "
                f"gamma={self.gamma:.4g}, rounds={self.rounds})")  # fmt: skip


class TamunaStrategy(MethodStrategy):
    """TAMUNA (local training, compression, partial participation) on Flower.

    Equals ``fedkern.algorithms.TAMUNA(batch, cohort=c, s=s, p=p, gamma=gamma, eta=eta,
    deferred=deferred, seed=seed)`` with ``ConvexTrainer`` clients (bit for bit on the CPU). Each
    cohort client sends only the values of the coordinates it holds (about s p / c floats; it
    rebuilds its set from its slot, s, c and p); x+[r] = the mean of coordinate r's s holders
    (``fedkern::tamuna_aggregate_``); step 5 (h_i += (eta / gamma) q_i (x+ - x_i)) gets x+'s held
    coordinates back in the same round (sync "exchange", c < n), or with the next round's model
    under full participation (exact), or -- ``deferred=True``, the authors' Flower code -- at the
    client's next participation with that round's model (sum_i h_i = 0 is then lost).

    Args:
        num_clients, cohort (c in [2, n]), p, gamma, seed, device: ``MethodStrategy``'s.
        s: holders per coordinate, in [2, c] (default c: no compression, = Scaffnew).
        eta: the control-variate step (default p * chi(c, s)).
        deferred: the authors' deferred control-variate update (an option; not the algorithm).
    """

    method = "tamuna"
    config_attrs = MethodStrategy.config_attrs + ("s", "eta", "deferred")

    def __init__(self, *, num_clients: int, cohort: int | None = None, s: int | None = None,
                 p: float, gamma: float, eta: float | None = None, deferred: bool = False,
                 **kwargs):  # fmt: skip
        super().__init__(num_clients=num_clients, cohort=cohort, p=p, gamma=gamma, min_cohort=2,
                         **kwargs)  # fmt: skip
        c = self.cohort_size
        self._s = v.integer("s", c if s is None else s, 2, c)
        self.eta = v.positive("eta", self.p * chi(c, self._s) if eta is None else eta)
        self.deferred = v.boolean("deferred", deferred)

    @property
    def s(self) -> int:
        return self._s

    @property
    def coef(self) -> float:
        return self.eta / self.gamma

    @property
    def sync_mode(self) -> str:
        return P.SYNC_NEXT if self.deferred else super().sync_mode

    def pattern(self) -> torch.Tensor:
        c = self.cohort_size
        if self._s == c:
            return torch.arange(c, dtype=torch.int64)
        return sampling.slot_permutation(c, seed=self.seed, step=self.key(SLOT_PATTERN))

    def aggregate_replies(self, plan: _Plan) -> torch.Tensor:
        """On the CPU: s = c, the streamed mean (Scaffnew's bits, which ``tamuna_aggregate_``
        gives at s = c); s < c with every reply live, the holders' values gathered from the
        compact replies (no [c, p] stack); otherwise the stack and the fused op."""
        c, s = self.cohort_size, self._s
        if self.device.type != "cpu":
            return super().aggregate_replies(plan)
        if s == c:
            return self.stream_mean(plan)
        if len(plan.live) < c:  # failures: the stack's per-coordinate live-holder rule
            return super().aggregate_replies(plan)
        # no stack: coordinate r's holders' values straight from their compact replies, summed
        # in holder order j and divided by s (the op's arithmetic, so its bits)
        V = torch.from_numpy(np.concatenate([plan.values[int(plan.perm[q])] for q in range(c)]))
        counts = [P.held_count(self.dim, c, s, q) for q in range(c)]
        offs = torch.tensor([0, *np.cumsum(counts)[:-1].tolist()], dtype=torch.int64)
        acc = None
        for j in range(s):
            slot, pos = P.held_positions(self.dim, c, s, j)
            vals = V[offs[slot] + pos]
            acc = vals if acc is None else acc.add_(vals)
        return acc.div_(torch.tensor(float(s), dtype=torch.float32))

    def aggregate_values(self, X: torch.Tensor, plan: _Plan) -> torch.Tensor:
        perm = plan.perm.to(X.device)
        if len(plan.live) == X.shape[0]:
            return tamuna_ops.tamuna_aggregate_(X, None, perm, self._s, self.coef,
                                                check_perm=False)  # fmt: skip
        # failures: per coordinate, the mean of its live holders (slot order); none: keep x
        c, p = X.shape
        live = torch.zeros(c, dtype=torch.bool, device=X.device)
        live[plan.live] = True
        rows = holders(p, c, self._s, perm)
        cols = torch.arange(p, device=X.device)
        acc = torch.zeros(p, dtype=torch.float32, device=X.device)
        cnt = torch.zeros(p, dtype=torch.float32, device=X.device)
        for j in range(self._s):
            ok = live[rows[j]]
            acc = acc + torch.where(ok, X[rows[j], cols], torch.zeros_like(acc))
            cnt = cnt + ok.to(torch.float32)
        return torch.where(cnt > 0, acc / cnt.clamp_min(1), self.x.to(X.device))

    def __repr__(self) -> str:
        return (f"TamunaStrategy(n={self.num_clients}, cohort={self.cohort_size}, s={self._s}, "
                f"p={self.p:.4g}, gamma={self.gamma:.4g}, eta={self.eta:.4g}, "
                f"deferred={self.deferred}, rounds={self.rounds})")  # fmt: skip
