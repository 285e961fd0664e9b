"""5GCS and 5GCS-CC (client sampling, importance sampling, Rand-k uplink) on Flower.

``FiveGCSStrategy`` (server) and ``FiveGCSClient`` (client helper) run the round of
``fedkern.algorithms.FiveGCS`` (its module docstring: the updates and conventions) over Flower's
Message API, equal to the simulator on the same seeds (bit for bit on the CPU with
``ConvexSolver`` clients).

A round (method round t = ``strategy.rounds``, 0-based; Flower round t + 1), server state x, v:

1. y_hat = (x - gamma v) / (1 + gamma mu); the cohort S is drawn at ``key(1)``: C clients
   uniformly without replacement ("uniform"), or independent participation with probabilities
   p_m (``fedkern.sampling.independent``; "importance": p = ``sampling.importance(L, C, alpha)``,
   or a tensor of p_m given);
2. ``train.fedkern_5gcs`` to each client of S: y_hat (d floats, in the model's layout) and the
   ``fedkern`` ConfigRecord (protocol, method "fivegcs", seed, round, the mask key ``key(4)``,
   client_id, row, mu, tau, K, local_lr, local_solver, k (0: no compression), compressor_seed,
   agg_round: the last round whose reply of this client the server aggregated);
3. the client commits its pending dual if the server confirms it (``agg_round``), runs the solver
   from y_hat on psi_m(y) + (tau/2)||y - y_hat - u_m/tau||^2, gets u_m+ = grad psi_m(y_m) and
   replies with Delta_m = u_m+ - u_m (d floats), or, 5GCS-CC, the k values of the unbiased Rand-k
   Q(Delta_m) (the mask is rebuilt on both sides from (compressor_seed, key(4), client id) as the
   simulator's ``RowCompressor`` does; indices never travel). Its new dual (u_m+, or u_m + D_m
   with D_m = Q(Delta_m) / (1 + omega)) is kept as pending;
4. the server: v += sum_{m live} D_m / M, x = y_hat - gamma sum_{m live} D_m / (M p_m) (both with
   ``fedkern.ops.clients.weighted_sum``, rows in ascending client order, as the simulator).

Failure rule: a sampled client whose reply fails (error reply, no reply, no node) or is rejected
(wrong protocol / method / seed / round / client / row, wrong shape or dtype, non-finite values;
a warning) is left out of the round exactly as if it had not been drawn: the sums above run over
the live clients only (none live: x = y_hat, metric ``skipped`` = 1). Its dual u_m does not move:
the client commits a pending dual only when a later message's ``agg_round`` names that round, so
v = (1/M) sum_m u_m holds for every client state (in exact arithmetic; the float32 sums are the
simulator's). A run with failures equals ``FiveGCS`` whose cohort of each round is the live set.

Hyperparameters: the strategy does not know the problem, so mu (= the problem's l2) is required,
and the simulator's problem-based defaults (gamma, tau, local_lr, K, the importance
probabilities) come from ``smoothness`` (the clients' constants L_m, float [M], e.g.
``fedkern.algorithms.fivegcs.client_smoothness(problem)``) with the simulator's formulas; without
``smoothness``, gamma (or tau), local_lr and local_steps must be given and sampling must be
"uniform" or a probability tensor.

Metrics (per round, ``strategy.history`` and ``Result.train_metrics_clientapp``): round, cohort
(|S|), clients (live), failures, rejected, skipped, local_steps (K), floats_up / floats_down
(all cohort clients together) and floats_up_per_client / floats_down_per_client (k or d, and d:
the simulator's "floats_up" / "floats_down").
"""

from __future__ import annotations

import copy
import math
from logging import INFO, WARNING

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

from fedkern import sampling as smp
from fedkern import validation as v
from fedkern.algorithms.federated import SLOT_COHORT
from fedkern.algorithms.fivegcs import GAMMA_SCALE, SOLVERS, cohort_probabilities
from fedkern.algorithms.messages import RowCompressor
from fedkern.algorithms.vr import SLOT_MASK
from fedkern.integrations.flower import protocol as P
from fedkern.integrations.flower.method_client import (
    MethodClient,
    _ConvexLocal,
    _float,
    _int,
    _Reject,
)
from fedkern.integrations.flower.methods import BaseMethodStrategy
from fedkern.ops import clients as client_ops

__all__ = ["ACTION_5GCS", "ConvexSolver", "FiveGCSClient", "FiveGCSStrategy", "ModuleSolver"]

#: The message type of a 5GCS round (server -> each cohort client).
ACTION_5GCS = "train.fedkern_5gcs"
METHOD = "fivegcs"


def _smoothness(L, M: int) -> torch.Tensor:
    if not isinstance(L, torch.Tensor) or L.dim() != 1 or L.numel() != M:
        got = tuple(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__
        raise ValueError(f"smoothness must be a float tensor of {M} constants L_m, got {got}")
    q = L.detach().to("cpu", torch.float64).contiguous()
    if not bool((torch.isfinite(q) & (q > 0)).all()):
        raise ValueError("smoothness must hold finite constants L_m > 0")
    return q


class FiveGCSStrategy(BaseMethodStrategy):
    """5GCS / 5GCS-CC as a Flower strategy (module docstring: the round, failures, metrics).

    Equals ``fedkern.algorithms.FiveGCS(batch, ...)`` with the same arguments and seed when the
    clients run ``FiveGCSClient(ConvexSolver(batch))`` (bit for bit on the CPU).

    Args:
        num_clients: M (global ids 0..M-1 reported in the handshake).
        mu: the problem's l2 (> 0; the simulator's ``problem.mu``).
        cohort: C, clients per round ("uniform") or the expected cohort ("importance"), an int in
            [1, M] (default M); must be None with a probability tensor.
        sampling: "uniform", "importance" or a float tensor of M probabilities in (0, 1].
        smoothness: None or the clients' L_m (float tensor [M], > 0): the source of the
            importance probabilities and of the defaults of gamma, tau, local_lr, local_steps.
        alpha: the importance exponent (finite).
        gamma, tau: the server step and the local proximal weight (> 0); one of them, or
            smoothness, is needed; given one, the other is q / it (q = C / M).
        local_lr: the local step (default 1 / (max L_m - mu + tau), needs smoothness).
        local_steps: K >= 1 (default from smoothness, as the simulator).
        local_solver: "gd" or "agd" (sent to the clients).
        k: None (5GCS) or the Rand-k size in [1, d] (5GCS-CC; checked against d at ``start``).
        compressor_seed: keys the masks (default: seed, as ``FiveGCS(k=...)``).
        seed: keys the cohorts (``Method.key``); device: where the server sums run.
        **kwargs: FedAvg's evaluation options (as ``BaseMethodStrategy``).

    Attributes: x, v (float32 [d] on device, None before ``start``), probs (float64 [M]), q,
    gamma, tau, local_lr, K, rounds, history, nodes, last_agg.

    Errors (ValueError / TypeError naming the argument, before any state exists).
    """

    method = METHOD
    config_attrs = ("seed", "num_clients", "cohort_size", "mu", "gamma", "tau", "K", "local_lr",
                    "local_solver", "sampling", "probs", "alpha", "compressor_k",
                    "compressor_seed")  # fmt: skip

    def __init__(self, *, num_clients: int, mu: float, cohort: int | None = None,
                 sampling="uniform", smoothness=None, alpha: float = 1.0,
                 gamma: float | None = None, tau: float | None = None,
                 local_lr: float | None = None, local_steps: int | None = None,
                 local_solver: str = "gd", k: int | None = None,
                 compressor_seed: int | None = None, seed: int = 0, **kwargs):  # fmt: skip
        M = v.integer("num_clients", num_clients, 1)
        self.mu = v.positive("mu", mu)
        self.alpha = v.finite("alpha", alpha)
        L = None if smoothness is None else _smoothness(smoothness, M)
        self.sampling, self.probs, C, c_int = cohort_probabilities(sampling, M, cohort, L,
                                                                   self.alpha)  # fmt: skip
        if local_solver not in SOLVERS:
            raise ValueError(f"local_solver must be 'gd' or 'agd', got {local_solver!r}")
        self.local_solver = local_solver
        self.expected_cohort = C
        self.q = C / M
        if gamma is not None:
            gamma = v.positive("gamma", gamma)
        if tau is not None:
            tau = v.positive("tau", tau)
        if gamma is None and tau is None:
            if L is None:
                raise ValueError("give gamma or tau, or smoothness for the simulator's defaults")
            L_eff = float((L * (C / M) / self.probs).max())
            gamma = GAMMA_SCALE * math.sqrt(self.q / (self.mu * L_eff))
        gamma = v.positive("gamma", gamma if gamma is not None else self.q / tau)
        self.tau = v.positive("tau", tau if tau is not None else self.q / gamma)
        if local_lr is None or local_steps is None:
            if L is None:
                raise ValueError("give local_lr and local_steps, or smoothness for the "
                                 "simulator's defaults")  # fmt: skip
            smooth = float(L.max()) - self.mu + self.tau
        self.local_lr = v.positive("local_lr", 1.0 / smooth if local_lr is None else local_lr)
        if local_steps is None:
            kappa_loc = smooth / self.tau
            grow = 1.0 if local_solver == "gd" else math.sqrt(kappa_loc)
            local_steps = max(1, math.ceil(grow * math.log(kappa_loc)))
        self.K = v.integer("local_steps", local_steps, 1)
        self.compressor_k = None if k is None else v.integer("k", k, 1)
        seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        cs = seed if compressor_seed is None else compressor_seed
        self.compressor_seed = None if k is None else v.integer("compressor_seed", cs, 0,
                                                                (1 << 63) - 1)  # fmt: skip
        super().__init__(num_clients=M, cohort=c_int, p=1.0, gamma=gamma, seed=seed, **kwargs)
        self.v: torch.Tensor | None = None
        self.comp: RowCompressor | None = None
        self._probs_dev = self.probs.to(self.device)

    def config(self) -> dict:
        out = super().config()
        out["probs"] = [float(p) for p in self.probs]
        return out

    # ---- the model -------------------------------------------------------------------------

    def set_initial_arrays(self, arrays: ArrayRecord) -> None:
        """``BaseMethodStrategy.set_initial_arrays``; also sets v = 0 (first start) and checks k."""
        super().set_initial_arrays(arrays)
        d = self.dim
        if self.compressor_k is not None:
            if self.compressor_k > d:
                raise ValueError(f"k = {self.compressor_k} exceeds the model size d = {d}")
            self.comp = RowCompressor("randk", d=d, k=self.compressor_k,
                                      seed=self.compressor_seed)  # fmt: skip
        if self.v is None:
            self.v = torch.zeros(d, device=self.device)

    def draw(self) -> torch.Tensor:
        """This round's cohort S: ascending int64 CPU ids (possibly empty with independent
        sampling), ``FiveGCS.draw``'s."""
        if self.sampling == "uniform":
            return self.cohort(self.num_clients, self.cohort_size, SLOT_COHORT)
        return smp.independent(self.probs, seed=self.seed, step=self.key(SLOT_COHORT))

    def y_hat(self) -> torch.Tensor:
        """(x - gamma v) / (1 + gamma mu): float32 [d] on the device."""
        return (self.x - self.gamma * self.v) / (1.0 + self.gamma * self.mu)

    def _arrays(self, flat: torch.Tensor) -> ArrayRecord:
        rec, off, x = ArrayRecord(), 0, flat.cpu().numpy()
        for name, shape in self.layout:
            m = math.prod(shape)
            rec[name] = Array(np.ascontiguousarray(x[off : off + m].reshape(shape)))
            off += m
        return rec

    # ---- a round -------------------------------------------------------------------------

    def _fields(self, rnd: int, cid: int, row: int) -> dict:
        return {"protocol": P.PROTOCOL, "method": self.method, "seed": self.seed, "round": rnd,
                "client_id": cid, "row": row}  # fmt: skip

    def run_round(self, grid, *, timeout: float = 3600, train_config=None):
        """One 5GCS round over ``grid`` (after ``connect``; module docstring). Returns (the model
        x after the round as an ArrayRecord, the round's MetricRecord); advances ``rounds``."""
        from flwr.app import MetricRecord

        if self.x is None:
            raise RuntimeError("FiveGCSStrategy has no model: run it with strategy.start or call "
                               "set_initial_arrays / load_state_dict first")  # fmt: skip
        rnd, M, d = self.rounds, self.num_clients, self.dim
        server_round = rnd + 1
        y_hat = self.y_hat()
        S = [int(i) for i in self.draw()]
        model = self._arrays(y_hat)
        config = ConfigRecord(dict(train_config or {}))
        config["server-round"] = server_round
        keys = [name for name, _ in self.layout]
        mkey = self.key(SLOT_MASK)
        k = self.compressor_k
        msgs, node_row = [], {}
        for row, cid in enumerate(S):
            node = self.nodes.get(cid)
            if node is None:
                continue
            node_row[node] = row
            fk = self._fields(rnd, cid, row)
            fk.update({"key": mkey, "mu": self.mu, "tau": self.tau, "K": self.K,
                       "local_lr": self.local_lr, "local_solver": self.local_solver,
                       "k": 0 if k is None else k,
                       "compressor_seed": 0 if k is None else self.compressor_seed,
                       "agg_round": self.last_agg.get(cid, -1), "layout": keys,
                       "arrays": self.arrayrecord_key,
                       "config": self.configrecord_key})  # fmt: skip
            content = RecordDict({self.arrayrecord_key: model, self.configrecord_key: config,
                                  P.RECORD: ConfigRecord(fk)})  # fmt: skip
            msgs.append(Message(content, dst_node_id=int(node), message_type=ACTION_5GCS,
                                group_id=str(server_round)))  # fmt: skip
        replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
        width = d if k is None else k
        got, failures, rejected = {}, 0, 0
        for msg in replies:
            row = node_row.get(msg.metadata.src_node_id)
            if row is None or row in got:
                why = "not asked" if row is None else "repeated"
                log(WARNING, "%s: round %s: reply from node %s ignored (%s)", self.method,
                    server_round, msg.metadata.src_node_id, why)  # fmt: skip
                continue
            if msg.has_error():
                failures += 1
                log(INFO, "%s: round %s: client %s failed: %s", self.method, server_round,
                    S[row], msg.error.reason)  # fmt: skip
                got[row] = None
                continue
            why = self._problem(msg, rnd, S[row], row, width)
            if why is not None:
                rejected += 1
                log(WARNING, "%s: round %s: reply of client %s skipped: %s", self.method,
                    server_round, S[row], why)  # fmt: skip
                got[row] = None
                continue
            got[row] = torch.from_numpy(np.array(msg.content[P.VALUES]["values"].numpy()))
        failures += sum(1 for r in range(len(S)) if r not in got)
        live = sorted(r for r, val in got.items() if val is not None)
        if live:
            vals = torch.stack([got[r] for r in live]).to(self.device)
            ids = torch.tensor([S[r] for r in live], dtype=torch.int64)
            if self.comp is None:
                D = vals
            else:
                zero = torch.zeros(len(live), d, device=self.device)
                _, idx = self.comp.diff(zero, zero, clients=ids.to(self.device), step=mkey)
                D = self.comp.dense((vals, idx)) * (1.0 / (1.0 + self.comp.omega))
            w_v = torch.full((len(live),), 1.0 / M, dtype=torch.float64, device=self.device)
            self.v = self.v + client_ops.weighted_sum(D, w_v)
            w_x = 1.0 / (M * self._probs_dev[ids.to(self.device)])
            self.x = y_hat - self.gamma * client_ops.weighted_sum(D, w_x)
            for r in live:
                self.last_agg[S[r]] = rnd
        else:
            if S:
                log(WARNING, "%s: round %s: no usable reply; x = y_hat", self.method,
                    server_round)  # fmt: skip
            self.x = y_hat.clone()
        metrics = {"round": server_round, "cohort": len(S), "clients": len(live),
                   "failures": failures, "rejected": rejected,
                   "skipped": int(bool(S) and not live), "local_steps": self.K,
                   "floats_up": width * len(live), "floats_down": d * len(msgs),
                   "floats_up_per_client": width, "floats_down_per_client": d}  # fmt: skip
        for key_, val in metrics.items():
            self.history.setdefault(key_, []).append(val)
        self.rounds += 1
        return self.global_arrays, MetricRecord(metrics)

    def _problem(self, msg: Message, rnd: int, cid: int, row: int, width: int) -> str | None:
        fields = self._fields(rnd, cid, row)
        want = {k: fields[k] for k in ("seed", "round", "client_id", "row")}
        return P.header_problem(msg, self.method, want) or P.values_problem(msg, width)

    def summary(self) -> None:
        log(INFO, "\t└──> %r", self)

    def __repr__(self) -> str:
        cc = "" if self.compressor_k is None else f", randk k={self.compressor_k}"
        return (f"FiveGCSStrategy(n={self.num_clients}, sampling={self.sampling!r}, "
                f"gamma={self.gamma:.4g}, tau={self.tau:.4g}, K={self.K}{cc}, "
                f"rounds={self.rounds})")  # fmt: skip

    # ---- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``BaseMethodStrategy.state_dict`` plus v (a copy)."""
        out = super().state_dict()
        out["v"] = None if self.v is None else self.v.detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` of a strategy built with the same arguments (errors as
        ``BaseMethodStrategy.load_state_dict``, raised before anything changes)."""
        if not isinstance(state, dict) or "v" not in state:
            raise TypeError("state must be a dict from FiveGCSStrategy.state_dict()")
        vv, x = state["v"], state.get("x")
        if (vv is None) != (x is None) or (vv is not None and (
                not isinstance(vv, torch.Tensor) or vv.dtype != torch.float32
                or not isinstance(x, torch.Tensor) or vv.shape != x.shape)):  # fmt: skip
            raise ValueError("state's v must be a float32 tensor of the model's shape")
        super().load_state_dict(copy.copy(state))
        self.v = None if vv is None else vv.clone().to(self.device)
        if self.x is not None and self.compressor_k is not None:
            self.comp = RowCompressor("randk", d=self.dim, k=self.compressor_k,
                                      seed=self.compressor_seed)  # fmt: skip


# ---- the client side --------------------------------------------------------------------------


class FiveGCSClient(MethodClient):
    """The client side of 5GCS / 5GCS-CC (module docstring: the round and the failure rule).

    Args:
        solver: ``solver(y_hat, u, config) -> u_plus``: y_hat, u float32 [d] CPU copies (the
            broadcast point and this client's dual), config the round's train ConfigRecord as a
            dict plus ``config["fedkern"]`` (client_id, round, seed, key, mu, tau, K, local_lr,
            local_solver, layout [(name, shape)]); returns grad psi_m at the local solution
            (float [d], tensor or ndarray), e.g. ``ConvexSolver`` or ``ModuleSolver``.
        client_id, seed: as ``MethodClient``.

    State (``context.state``): ArrayRecord "fedkern.fivegcs.arrays" with the dual "u" (float32
    [d]) and, while a reply awaits the server's confirmation, "u_new"; ConfigRecord
    "fedkern.fivegcs" with the pending round. Use: ``FiveGCSClient(solver).register(app)``
    (handlers ``query.fedkern_hello`` and ``train.fedkern_5gcs``; one fedkern client helper per
    ClientApp).
    """

    served = (METHOD,)

    def __init__(self, solver, *, client_id=None, seed: int | None = None):
        if not callable(solver):
            raise TypeError(f"solver must be callable, got {type(solver).__name__}")
        super().__init__(solver, client_id=client_id, seed=seed)  # serves ``served``
        self.solver = solver

    def __repr__(self) -> str:
        return f"FiveGCSClient({self.solver!r})"

    def register(self, app) -> None:
        """Register ``@app.query("fedkern_hello")`` and ``@app.train("fedkern_5gcs")``."""
        app.query(P.ACTION_HELLO.split(".")[1])(self.hello)
        app.train(ACTION_5GCS.split(".")[1])(self.train)

    @staticmethod
    def _state(context: Context, d: int):
        """(u float32 [d] (zeros before the first round), pending (round, u_new) or None)."""
        arrays = context.state.array_records.get(f"fedkern.{METHOD}.arrays")
        conf = context.state.config_records.get(f"fedkern.{METHOD}")
        if arrays is None:
            return torch.zeros(d), None
        u = torch.from_numpy(np.array(arrays["u"].numpy(), dtype=np.float32).reshape(-1))
        if u.numel() != d:
            raise _Reject(P.ERR_STATE, f"the stored dual has {u.numel()} entries, the model {d}")
        pending = None
        if conf is not None and conf.get("pending"):
            pending = (int(conf["round"]), torch.from_numpy(np.array(arrays["u_new"].numpy())))
        return u, pending

    @staticmethod
    def _put(context: Context, u: torch.Tensor, pending=None) -> None:
        arrays = {"u": Array(u.numpy().astype(np.float32, copy=True))}
        conf = {"protocol": P.PROTOCOL, "pending": pending is not None}
        if pending is not None:
            arrays["u_new"] = Array(pending[1].numpy().astype(np.float32, copy=True))
            conf["round"] = pending[0]
        context.state[f"fedkern.{METHOD}.arrays"] = ArrayRecord(arrays)
        context.state[f"fedkern.{METHOD}"] = ConfigRecord(conf)

    def dual(self, context: Context, agg_round: int | None = None) -> torch.Tensor:
        """This node's dual u_m (float32 [d] CPU; size 0 before its first round), with a pending
        dual applied when ``agg_round`` (the strategy's ``last_agg`` of this client; None: as if
        confirmed) names its round. For inspection; the state is not changed."""
        arrays = context.state.array_records.get(f"fedkern.{METHOD}.arrays")
        if arrays is None:
            return torch.zeros(0)
        u, pending = self._state(context, int(arrays["u"].numpy().size))
        if pending is not None and agg_round in (None, pending[0]):
            return pending[1]
        return u

    def train(self, msg: Message, context: Context) -> Message:
        """One round (module docstring, step 3): check, commit, solve, reply."""
        try:
            cfg, _, cid = self._common(msg, context)
            rnd = _int(cfg, "round", 0)
            key = _int(cfg, "key", 0)
            _int(cfg, "row", 0)
            mu = _float(cfg, "mu", positive=True)
            tau = _float(cfg, "tau", positive=True)
            K = _int(cfg, "K", 1)
            lr = _float(cfg, "local_lr", positive=True)
            solver = cfg.get("local_solver")
            if solver not in SOLVERS:
                raise _Reject(P.ERR_PROTOCOL, f"field 'local_solver' must be 'gd' or 'agd', "
                              f"got {solver!r}")  # fmt: skip
            k = _int(cfg, "k", 0)
            cseed = _int(cfg, "compressor_seed", 0)
            agg_round = _int(cfg, "agg_round", -1)
            y_hat, layout, shapes = self._model(msg, cfg)
            d = y_hat.numel()
            if k > d:
                raise _Reject(P.ERR_PROTOCOL, f"field 'k' = {k} exceeds the model size {d}")
            if not bool(torch.isfinite(y_hat).all()):
                raise _Reject(P.ERR_PROTOCOL, "the model y_hat is not finite")
            u, pending = self._state(context, d)
        except _Reject as exc:
            return self._error(msg, exc)
        if pending is not None:
            if pending[0] == agg_round and pending[0] < rnd:
                u = pending[1]
            else:
                log(INFO, "fedkern client %s: dropped the pending 5GCS dual of round %s (the "
                    "server aggregated round %s)", cid, pending[0], agg_round)  # fmt: skip
            self._put(context, u)
        user = msg.content.config_records.get(cfg.get("config", ""), ConfigRecord())
        config = dict(user)
        config["fedkern"] = {"client_id": cid, "round": rnd, "seed": cfg["seed"], "key": key,
                             "method": METHOD, "mu": mu, "tau": tau, "K": K, "local_lr": lr,
                             "local_solver": solver,
                             "layout": list(zip(layout, shapes, strict=True))}  # fmt: skip
        try:
            G = self.solver(y_hat.clone(), u.clone(), config)
            if isinstance(G, torch.Tensor):
                G = G.detach().cpu()
            G = torch.as_tensor(np.asarray(G), dtype=torch.float32).reshape(-1)
            if G.numel() != d:
                raise ValueError(f"the solver returned {G.numel()} values for a model of {d}")
            if not bool(torch.isfinite(G).all()):
                raise ValueError("the solver returned non-finite values")
        except Exception as exc:  # the solver's failure is this round's error reply
            return self._error(msg, _Reject(P.ERR_TRAIN, f"solver failed: {exc!r}"))
        if k == 0:
            values, u_new = G - u, G
        else:
            comp = RowCompressor("randk", d=d, k=k, seed=cseed)
            ids = torch.tensor([cid], dtype=torch.int64)
            vals, idx = comp.diff(G[None], u[None], clients=ids, step=key)
            D = comp.dense((vals, idx)) * (1.0 / (1.0 + comp.omega))
            values, u_new = vals[0], (u[None] + D)[0]
        self._put(context, u, (rnd, u_new.contiguous()))
        reply = ArrayRecord({"values": Array(values.contiguous().numpy())})
        echo = ConfigRecord({"protocol": P.PROTOCOL, "method": METHOD, "seed": cfg["seed"],
                             "round": rnd, "client_id": cid, "row": cfg["row"]})  # fmt: skip
        return Message(RecordDict({P.RECORD: echo, P.VALUES: reply}), reply_to=msg)

    def sync(self, msg: Message, context: Context) -> Message:  # pragma: no cover - not registered
        return Message(Error(code=P.ERR_METHOD, reason="5GCS has no sync message"), reply_to=msg)


# ---- solvers --------------------------------------------------------------------------------


class ConvexSolver(_ConvexLocal):
    """5GCS's local solver for fedkern's convex problems, on the client's row of a ClientBatch.

    K steps ("gd": one ``local_steps_`` call; "agd": Nesterov, K one-step calls with the
    extrapolation) on psi_m(y) + (tau/2)||y - a||^2, a = y_hat + u / tau (``local_steps_`` with
    mu = tau, anchor = a, l2 = 0) from y_hat, then u_plus = grad f_m(y) - mu y: the calls
    ``FiveGCS.local_solve_`` / ``client_updates`` make for the cohort stack, on a one-row stack
    (rows are independent in the kernels), so a Flower run equals the simulator bit for bit.

    Args:
        batch: the ``ClientBatch`` holding the client's data (the client id picks its rows).
        mode, batch_size: the local gradient, as given to the simulator.

    The round's mu must equal the batch's problem mu (else the solver raises: an error reply).
    """

    def __call__(self, y_hat, u, config) -> torch.Tensor:
        fk = config["fedkern"]
        mu, tau, K, lr = fk["mu"], fk["tau"], fk["K"], fk["local_lr"]
        if mu != float(self.batch.problem.mu):
            raise ValueError(f"the server's mu = {mu} is not this problem's l2 = "
                             f"{self.batch.problem.mu}")  # fmt: skip
        dev = self.batch.device
        y_hat = y_hat.to(dev, torch.float32)
        U = u.reshape(1, -1).to(dev, torch.float32)
        S = torch.tensor([int(fk["client_id"])], dtype=torch.int64, device=dev)
        rnd = int(fk["round"])
        Y = y_hat.repeat(1, 1)
        anchor = y_hat + U / tau
        common = dict(gamma=lr, clients=S, mode=self.mode, batch_size=self.batch_size, mu=tau,
                      anchor=anchor, l2=0.0)  # fmt: skip
        if fk["local_solver"] == "gd":
            self.batch.local_steps_(Y, steps=K, round=rnd, **common)
        else:
            kappa = max(1.0, 1.0 / (lr * tau))
            momentum = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
            prev, Z = Y.clone(), Y.clone()
            for t in range(K):
                self.batch.local_steps_(Z, steps=1, round=rnd * K + t, **common)
                nxt = Z
                Z = nxt + min(momentum, t / (t + 3)) * (nxt - prev)
                prev = nxt
            Y.copy_(prev)
        G = self.batch.grads(Y, clients=S) - mu * Y
        return G[0].cpu()

    def __repr__(self) -> str:
        return f"ConvexSolver(n={self.batch.n}, p={self.batch.p}, mode={self.mode!r})"


class ModuleSolver:
    """5GCS's local solver for a PyTorch module: K prox-GD steps, then u_plus = grad psi_m.

    psi_m(y) = the module's mean loss on the client's data (no L2 term: the server's mu is the
    strong convexity that 5GCS splits off). Steps y <- y - local_lr (grad psi_m(y) + tau (y - a)),
    a = y_hat + u / tau, from y_hat (``local_solver`` "gd"; "agd" is refused). The flat model is
    split by the layout as ``ModuleTrainer`` does (build the initial arrays with
    ``module_arrays(module)``); the module's parameters are not modified.

    Args: module, loss (``loss(outputs, targets) -> scalar``), inputs, targets (tensors, first
    dimension = samples).
    """

    def __init__(self, module: torch.nn.Module, loss, inputs: torch.Tensor,
                 targets: torch.Tensor):  # fmt: skip
        from fedkern.integrations.flower.method_client import ModuleTrainer

        self._t = ModuleTrainer(module, loss, inputs, targets)

    def _grad(self, y: torch.Tensor, layout) -> torch.Tensor:
        from torch.func import functional_call

        t = self._t
        leaf = y.clone().requires_grad_(True)
        with torch.enable_grad():
            out = functional_call(t.module, t._params(leaf, layout), (t.inputs,))
            (g,) = torch.autograd.grad(t.loss(out, t.targets), leaf)
        return g.detach()

    def __call__(self, y_hat, u, config) -> torch.Tensor:
        fk = config["fedkern"]
        if fk["local_solver"] != "gd":
            raise ValueError("ModuleSolver runs local_solver 'gd' only")
        tau, lr, layout = fk["tau"], fk["local_lr"], fk["layout"]
        anchor = y_hat + u / tau
        y = y_hat.detach().clone()
        for _ in range(int(fk["K"])):
            y = y - lr * (self._grad(y, layout) + tau * (y - anchor))
        return self._grad(y, layout)

    def __repr__(self) -> str:
        return f"ModuleSolver({type(self._t.module).__name__}, samples={len(self._t.inputs)})"
