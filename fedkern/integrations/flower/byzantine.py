"""Byz-VR-MARINA-PP on Flower (Message API): ``ByzVRMarinaPPStrategy`` and ``ByzVRMarinaClient``.

The strategy runs ``fedkern.algorithms.ByzVRMarinaPP``'s round over real clients; with the same
seed, hyperparameters and start point, and the clients running ``ByzVRMarinaClient`` with
``ProblemSampleGradients(problem)``, the server's (x, g) equal the simulator's bit for bit on the
CPU (the server uses the simulator's ops, in its order; tests/test_flower_byzantine.py checks it).

A round (method round t = ``strategy.rounds``, 0-based; Flower round t + 1):

1. the coin c ~ Bernoulli(p) at key(0); the cohort S (``full_cohort`` clients if c = 1, else
   ``cohort``) at key(1), uniform without replacement over all n clients;
2. x+ = x - gamma g (float64) and lambda = alpha ||x+ - x||;
3. ``train.fedkern_byz`` to each client of S. Full round: the model x+ (d float64 values down);
   the client replies grad f_i(x+) (float32 [d]). Compressed round: x and x+ (2d float64 down;
   the client keeps no model between rounds, so it needs both: with partial participation it
   has usually not seen x), lambda, the sample key key(2), the batch size, the compressor's
   settings (kind, k, seed, unbiased, step = t); the client draws its minibatch
   (``fedkern.sampling.uniform(m_i, min(b, m_i))`` under ``client_seed(seed, i)`` at key(2)),
   and replies ``fedkern.robust.diff_compress_clip`` of its float32 gradients at x+ and x:
   d float32 values (dense), k (rand-k: the server rebuilds the mask from (seed, id, t); masks
   are never sent) or k values + k int64 indices (top-k);
4. the server stacks the replies in the simulator's order (the honest clients of S ascending,
   then those listed in ``byzantine``), densifies sparse ones, lets ``adversary`` (if given)
   replace the Byzantine rows, then: full round g+ = ARAgg(X); compressed round: every row
   clipped to lambda (``clip_rows_``; zero rows when lambda = 0; skipped with ``clip=False``),
   g+ = g + ARAgg(X), or g + mean(X) with ``plus=True``. x <- x+, g <- g+.

Before the first round an initial full round at x0 (cohort at key 1 of the initial keys, no
step) gives g0, as the simulator's constructor does (history row with round 0).

Failures: an error reply, no reply, a node that is not connected, and rejected replies (protocol,
method, seed, round, client id or kind wrong; wrong shape or dtype; non-finite values; top-k
indices out of range or not strictly ascending -- each logged as a warning) are left out: the
round aggregates the live rows only (the robust rule's f is capped to what the live stack
allows). With no live row the round changes nothing (x and g stay; metric ``skipped`` = 1) and
the next round draws afresh. Clients keep no state, so a failure never leaves a client out of
step, and a restarted server (``state_dict`` / ``load_state_dict``) resumes exactly.

Byzantine clients: the client-local attack ``bit_flip`` (-scale times the client's own honest
message) is ``ByzVRMarinaClient(..., byzantine=ids, attack="bit_flip")``. ``shift_back`` needs
x0, g and whether the Byzantine clients are a majority of S; ALIE and IPM need the round's honest
messages: none of this reaches a client, so these omniscient attacks are simulated at the server
through ``adversary`` (``SimulatedAttack`` reproduces the simulator's). The server never needs to
know who is Byzantine to run the method; ``byzantine`` only orders the stack as the simulator
does, feeds ``adversary`` and the ``byzantine_majority`` metric.

Differences from the simulator: messages are float32 only (no bfloat16 on the wire); a
non-finite reply is rejected (the simulator's clipping would zero it); a client-side bit flip of
a sparse message leaves +0.0 (not -0.0) at the unsent coordinates.
"""

from __future__ import annotations

import copy
import math
from logging import INFO, WARNING

import numpy as np
import torch

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.serverapp import Grid
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

from fedkern import robust as R
from fedkern import sampling
from fedkern import validation as v
from fedkern.algorithms.byzantine import capped_aggregate, rule_aggregator
from fedkern.compress import RandK, TopK
from fedkern.integrations.flower import protocol as P
from fedkern.integrations.flower.method_client import ClientIdentity, _int, _ModuleLoss, _Reject
from fedkern.integrations.flower.method_client import _float as _finite
from fedkern.integrations.flower.methods import BaseMethodStrategy
from fedkern.random import client_seed
from fedkern.robust import attacks

__all__ = ["ACTION_BYZ", "ByzVRMarinaClient", "ByzVRMarinaPPStrategy", "ProblemSampleGradients",
           "ModuleSampleGradients", "RoundView", "SimulatedAttack"]  # fmt: skip

#: The train message of Byz-VR-MARINA-PP (one per cohort client and round).
ACTION_BYZ = "train.fedkern_byz"
#: The ArrayRecords of the models sent: x+ (every round) and x (compressed rounds).
X_NEW, X_OLD = "fedkern.x_new", "fedkern.x"
METHOD = "byz_vr_marina_pp"
FULL, DIFF = "full", "diff"
LOCAL_ATTACKS = ("bit_flip",)
SIM_ATTACKS = ("none", "shift_back", "bit_flip", "alie", "ipm")


def _compressor_spec(compressor) -> tuple:
    """(kind, k, ratio, seed, unbiased) of None / TopK / RandK (what travels to the clients)."""
    if compressor is None:
        return ("none", None, None, 0, True)
    if isinstance(compressor, RandK):
        return ("randk", compressor.k, compressor.ratio, compressor.seed, compressor.unbiased)
    if isinstance(compressor, TopK):
        return ("topk", compressor.k, compressor.ratio, 0, True)
    raise TypeError(f"compressor must be None, a fedkern.compress.TopK or RandK, got "
                    f"{type(compressor).__name__}")  # fmt: skip


class RoundView:
    """What ``adversary`` sees of a round (read-only by convention; tensors are CPU).

    Attributes: round (method round t), full (the coin), cohort (S: client ids ascending),
    byzantine (the live Byzantine clients of S, ascending: one row each to return), honest
    (float32 [h, d]: the live honest messages, dense, clipped as the clients sent them, in S
    order), own (float32 [b, d]: what the Byzantine clients sent, dense), x, x_new, x0, g
    (float64 [d]), gamma, lam.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)


class SimulatedAttack:
    """The simulator's attacks as a server-side ``adversary`` (``ByzVRMarinaPP._byz_rows``).

    ``SimulatedAttack(attack)(view) -> float32 [b, d]`` (b = len(view.byzantine)), or None (keep
    what the Byzantine clients sent). attack: "shift_back" (when 2 b > |S|: every Byzantine row is
    the aggregate that sends the model back to x0, (x+ - x0) / gamma in full rounds and
    (x+ - x0) / gamma - g in compressed ones; else honest), "bit_flip" (-scale times own), "alie"
    (mean - z std of the honest rows; z default Baruch et al.'s for the cohort), "ipm" (-eps times
    their mean) or "none". ALIE needs 2 honest rows and IPM 1; with fewer the Byzantine clients
    send their own messages, as in the simulator.
    """

    def __init__(self, attack: str, *, ipm_eps: float = 0.1, alie_z: float | None = None,
                 bit_flip_scale: float = 1.0):  # fmt: skip
        if attack not in SIM_ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(SIM_ATTACKS)}, got {attack!r}")
        self.attack = attack
        self.ipm_eps = v.fp32_scalar("ipm_eps", ipm_eps)
        self.alie_z = None if alie_z is None else v.fp32_scalar("alie_z", alie_z)
        self.bit_flip_scale = v.fp32_scalar("bit_flip_scale", bit_flip_scale)

    def __call__(self, view: RoundView) -> torch.Tensor | None:
        nb, own, honest = len(view.byzantine), view.own, view.honest
        if nb == 0 or self.attack == "none":
            return None
        if self.attack == "shift_back":
            if 2 * nb <= len(view.cohort):
                return None
            target = (view.x_new - view.x0) / view.gamma
            if not view.full:
                target = target - view.g
            return attacks.shift_back(target.to(torch.float32), nb)
        if self.attack == "bit_flip":
            return attacks.bit_flip(own, self.bit_flip_scale)
        if honest is None or honest.shape[0] < (2 if self.attack == "alie" else 1):
            return None
        if self.attack == "alie":
            return attacks.alie(honest, nb, self.alie_z)
        return attacks.ipm(honest, nb, self.ipm_eps)

    def __repr__(self) -> str:
        return f"SimulatedAttack({self.attack!r})"


class ByzVRMarinaPPStrategy(BaseMethodStrategy):
    """Byz-VR-MARINA-PP as a Flower strategy (module docstring: the round, failures, attacks).

    Equals ``fedkern.algorithms.ByzVRMarinaPP(problem, byzantine=..., gamma=gamma, p=p, ...,
    x0=x0, seed=seed)`` bit for bit on the CPU when the clients run ``ByzVRMarinaClient`` with
    ``ProblemSampleGradients(problem)`` and ``initial_arrays`` hold x0 (as float64 arrays;
    float32 ones are widened). The model x and g are float64 [d] on the CPU, sent as float64 arrays.

    Args:
        num_clients: n (client ids 0..n-1 from the handshake).
        gamma: the step size (> 0; required: the simulator's default 1/L needs the problem).
        p: probability of a full round (default cohort / n, the simulator's).
        cohort: C, clients of a compressed round (default ceil(0.2 n)).
        full_cohort: C_hat, clients of a full round (default n).
        batch_size: b, samples per minibatch of a compressed round (capped by a client's size).
        alpha: the clipping multiplier (> 0); clip: clip the differences (False: the unclipped
            baseline); plus: Byz-VR-MARINA-PP+ (plain mean of the clipped differences).
        aggregator: None (coordinate median with bucketing 2, the simulator's default), a rule
            name of ``fedkern.robust.Aggregator`` (built as the simulator builds it, with f), an
            ``Aggregator`` or any callable [rows, d] float32 -> [d].
        aggregator_options, bucketing: for a rule name (the simulator's).
        compressor: None, ``fedkern.compress.TopK`` or ``RandK`` (its settings are sent to the
            clients; rand-k masks are keyed by (compressor.seed, client id, round)).
        byzantine: ids of the clients to stack last (the simulator's order), that ``adversary``
            replaces, and that the ``byzantine_majority`` metric counts; () in a deployment.
        f: the Byzantine count the rule tolerates (default len(byzantine)).
        adversary: None, or ``adversary(view: RoundView) -> float32 [b, d] | None`` replacing the
            live Byzantine rows (a simulation hook; ``SimulatedAttack``).
        seed, device, **kwargs: ``BaseMethodStrategy``'s (device is ignored: the server runs on the
            CPU, where the simulator's float64 model lives).

    Attributes (besides ``BaseMethodStrategy``'s): g (float64 [d] or None before the initial round),
    x0, lam (the last round's lambda), aggregator.
    """

    method = METHOD
    config_attrs = ("seed", "num_clients", "cohort_size", "full_cohort", "p", "gamma",
                    "batch_size", "alpha", "clip", "plus", "f", "byzantine",
                    "compressor_spec")  # fmt: skip
    model_dtype = torch.float64

    def __init__(self, *, num_clients: int, gamma: float, p: float | None = None,
                 cohort: int | None = None, full_cohort: int | None = None, batch_size: int = 1,
                 alpha: float = 1.0, clip: bool = True, plus: bool = False, aggregator=None,
                 aggregator_options: dict | None = None, bucketing: int | None = None,
                 compressor=None, byzantine=(), f: int | None = None, adversary=None,
                 seed: int = 0, **kwargs):  # fmt: skip
        n = v.integer("num_clients", num_clients, 1)
        c = v.integer("cohort", math.ceil(0.2 * n) if cohort is None else cohort, 1, n)
        p = c / n if p is None else p
        kwargs.pop("device", None)
        super().__init__(num_clients=n, cohort=c, p=p, gamma=gamma, seed=seed, **kwargs)
        self.full_cohort = v.integer("full_cohort", n if full_cohort is None else full_cohort,
                                     1, n)  # fmt: skip
        self.batch_size = v.integer("batch_size", batch_size, 1)
        self.alpha = v.positive("alpha", alpha)
        self.clip = v.boolean("clip", clip)
        self.plus = v.boolean("plus", plus)
        if isinstance(byzantine, (str, bytes)) or not hasattr(byzantine, "__iter__"):
            raise TypeError(f"byzantine must be a collection of client ids, got {byzantine!r}")
        self.byzantine = sorted({v.integer("byzantine", b, 0, n - 1) for b in byzantine})
        if len(self.byzantine) >= n:
            raise ValueError("byzantine: at least one client must be honest")
        self.f = len(self.byzantine) if f is None else v.integer("f", f, 0, n - 1)
        self.compressor_spec = _compressor_spec(compressor)
        self.compressor = compressor
        if adversary is not None and not callable(adversary):
            raise TypeError(f"adversary must be callable, got {type(adversary).__name__}")
        self.adversary = adversary
        self._cap_f = isinstance(aggregator, str)
        if aggregator is None:
            if aggregator_options is not None or bucketing is not None:
                raise ValueError("aggregator_options and bucketing apply to a rule name given "
                                 "as aggregator")  # fmt: skip
            aggregator = R.Aggregator("coordinate_median", pre="bucketing", seed=self.seed)
        elif self._cap_f:
            aggregator = self._rule_aggregator(aggregator, aggregator_options, bucketing)
        elif aggregator_options is not None or bucketing is not None:
            raise ValueError("aggregator_options and bucketing apply to a rule name given as "
                             "aggregator, not to an aggregator object")  # fmt: skip
        elif not callable(aggregator):
            raise TypeError(f"aggregator must be a rule name or callable, got "
                            f"{type(aggregator).__name__}")  # fmt: skip
        self.aggregator = aggregator
        self.device = torch.device("cpu")
        self.g: torch.Tensor | None = None
        self.x0: torch.Tensor | None = None
        self.lam = 0.0

    def _rule_aggregator(self, rule, options, bucketing) -> R.Aggregator:
        """The Aggregator of a rule name, as the simulator builds it (``rule_aggregator``)."""
        return rule_aggregator(rule, self.f, options=options, bucketing=bucketing, seed=self.seed,
                               cohort=min(self.cohort_size, self.full_cohort))  # fmt: skip

    def _aggregate(self, X: torch.Tensor) -> torch.Tensor:
        """ARAgg(X); a rule-name aggregator gets f capped to what the rule accepts for X."""
        return capped_aggregate(self.aggregator, X) if self._cap_f else self.aggregator(X)

    # ---- the model ----------------------------------------------------------------------------

    def set_initial_arrays(self, arrays: ArrayRecord) -> None:
        """Adopt ``arrays`` as x0 (float64; names and shapes kept). With a model already (a
        checkpoint or an earlier ``start``) they must have its layout and are otherwise ignored."""
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
            return
        x = P.flatten(arrays, [k for k, _ in layout], np.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("initial_arrays must be finite")
        self.layout, self.x, self.x0 = layout, x, x.clone()

    def _arrays(self, x: torch.Tensor) -> ArrayRecord:
        rec, off, a = ArrayRecord(), 0, x.numpy()
        for k, shape in self.layout:
            m = math.prod(shape)
            rec[k] = Array(np.ascontiguousarray(a[off : off + m].reshape(shape)))
            off += m
        return rec

    def _k(self) -> int:
        kind, k, ratio = self.compressor_spec[:3]
        if kind == "none":
            return self.dim
        return self.compressor.k_for(self.dim)

    # ---- a round --------------------------------------------------------------------------------

    def _send(self, grid, timeout, t, key, full, S, x_new, x_old, lam, config):
        kind, _, _, cseed, unbiased = self.compressor_spec
        user = ConfigRecord(dict(config or {}))
        msgs, down = [], 0
        a_new = self._arrays(x_new)
        a_old = None if full else self._arrays(x_old)
        names = [k for k, _ in self.layout]
        for cid in S:
            node = self.nodes.get(cid)
            if node is None:
                continue
            fk = {"protocol": P.PROTOCOL, "method": self.method, "seed": self.seed, "round": t,
                  "client_id": cid, "kind": FULL if full else DIFF, "key": key, "lam": lam,
                  "batch_size": self.batch_size, "clip": self.clip, "comp": kind,
                  "comp_k": self._k(), "comp_seed": cseed, "comp_unbiased": unbiased,
                  "comp_step": self.rounds,
                  "layout": names, "config": self.configrecord_key}  # fmt: skip
            content = RecordDict({X_NEW: a_new, self.configrecord_key: user,
                                  P.RECORD: ConfigRecord(fk)})  # fmt: skip
            down += self.dim
            if not full:
                content[X_OLD] = a_old
                down += self.dim
            msgs.append(Message(content, dst_node_id=int(node), message_type=ACTION_BYZ,
                                group_id=str(t)))  # fmt: skip
        replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
        return list(replies), down

    def _problem(self, msg, want: dict, full: bool) -> str | None:
        """Why a reply is rejected (None: fine); ``want``: the expected seed, round, client_id and
        kind."""
        k = self.dim if full else self._k()
        why = P.header_problem(msg, self.method, want) or P.values_problem(msg, k)
        if why is None and not full and self.compressor_spec[0] == "topk":
            why = P.indices_problem(msg, k, self.dim)
        return why

    def _dense(self, msg, cid: int, full: bool) -> torch.Tensor:
        """The reply as a dense float32 [d] row."""
        rec = msg.content.array_records[P.VALUES]
        vals = torch.from_numpy(np.array(rec["values"].numpy()))
        kind = self.compressor_spec[0]
        if full or kind == "none":
            return vals
        if kind == "topk":
            idx = torch.from_numpy(np.array(rec["indices"].numpy()))
        else:  # rand-k: rebuild the client's mask from (seed, id, step)
            z = torch.zeros(1, self.dim)
            _, idx = R.diff_compress_clip(z, z, self.compressor, None, clients=[cid],
                                          step=self.rounds)  # fmt: skip
            idx = idx[0]
        return torch.zeros(self.dim).scatter_(0, idx, vals)

    def _round(self, grid, timeout, config, *, initial: bool):
        """One round (the initial full round when ``initial``); returns its metrics dict."""
        n = self.num_clients
        if initial:
            t, full = 0, True
            S = sampling.uniform(n, self.full_cohort, seed=self.seed, step=1).tolist()
            x_new, key = self.x, 0
        else:
            t = self.rounds + 1
            full = self.coin(self.p, 0)
            S = self.cohort(n, self.full_cohort if full else self.cohort_size, 1).tolist()
            x_new = self.x - self.gamma * self.g
            key = self.key(2)
        lam = 0.0 if initial else self.alpha * float((x_new - self.x).norm())
        replies, down = self._send(grid, timeout, t, key, full, S, x_new, self.x, lam, config)
        base = {"seed": self.seed, "round": t, "kind": FULL if full else DIFF}
        node_cid = {self.nodes[c]: c for c in S if c in self.nodes}
        got, failures, rejected, up = {}, 0, 0, 0
        for msg in replies:
            cid = node_cid.get(msg.metadata.src_node_id)
            if cid is None or cid in got:
                log(WARNING, "%s: round %s: reply from node %s ignored (%s)", self.method, t,
                    msg.metadata.src_node_id,
                    "not asked" if cid is None else "repeated")  # fmt: skip
                continue
            if msg.has_error():
                log(INFO, "%s: round %s: client %s failed: %s", self.method, t, cid,
                    msg.error.reason)  # fmt: skip
                got[cid] = None
                failures += 1
                continue
            why = self._problem(msg, {**base, "client_id": cid}, full)
            if why is not None:
                log(WARNING, "%s: round %s: reply of client %s skipped: %s", self.method, t, cid,
                    why)  # fmt: skip
                got[cid] = None
                rejected += 1
                continue
            got[cid] = self._dense(msg, cid, full)
            rec = msg.content.array_records[P.VALUES]
            up += sum(int(rec[k].numpy().size) for k in rec.keys())
        failures += sum(1 for c in S if c not in got)
        byz = set(self.byzantine)
        hon_ids = [c for c in S if c not in byz and got.get(c) is not None]
        byz_ids = [c for c in S if c in byz and got.get(c) is not None]
        hon = torch.stack([got[c] for c in hon_ids]) if hon_ids else None
        own = torch.stack([got[c] for c in byz_ids]) if byz_ids else None
        nb_cohort = sum(1 for c in S if c in byz)
        metrics = {"round": t, "full": int(full), "cohort": len(S), "clients": len(hon_ids)
                   + len(byz_ids), "failures": failures, "rejected": rejected,
                   "byzantine_majority": int(2 * nb_cohort > len(S)), "lam": lam,
                   "floats_up": up, "floats_down": down}  # fmt: skip
        if self.adversary is not None and byz_ids:
            view = RoundView(round=self.rounds, full=full, cohort=list(S), byzantine=byz_ids,
                             honest=hon, own=own, x=self.x, x_new=x_new, x0=self.x0, g=self.g,
                             gamma=self.gamma, lam=lam)  # fmt: skip
            rows = self.adversary(view)
            if rows is not None:
                rows = torch.as_tensor(rows)
                if rows.dtype != torch.float32 or tuple(rows.shape) != (len(byz_ids), self.dim):
                    raise ValueError(f"adversary must return float32 [{len(byz_ids)}, "
                                     f"{self.dim}], got {rows.dtype} "
                                     f"{tuple(rows.shape)}")  # fmt: skip
                own = rows.contiguous()
        parts = [m for m in (hon, own) if m is not None]
        if not parts:
            log(WARNING, "%s: round %s: no usable reply; the model is unchanged", self.method, t)
            metrics["skipped"] = 1
            return metrics
        X = torch.cat(parts).contiguous()
        if full:
            g_new = self._aggregate(X).to(torch.float64)
        else:
            if self.clip:
                if lam > 0:
                    R.clip_rows_(X, lam)
                else:
                    X.zero_()
            agg = X.float().mean(0) if self.plus else self._aggregate(X)
            g_new = self.g + agg.to(torch.float64)
        metrics["skipped"] = 0
        self.x, self.g, self.lam = x_new, g_new, lam
        return metrics

    def _log(self, metrics: dict) -> None:
        c = max(metrics["cohort"], 1)
        metrics["floats_up_per_client"] = metrics["floats_up"] / max(metrics["clients"], 1)
        metrics["floats_down_per_client"] = metrics["floats_down"] / c
        for k, val in metrics.items():
            self.history.setdefault(k, []).append(val)

    def run_round(self, grid: Grid, *, timeout: float = 3600,
                  train_config: ConfigRecord | None = None):  # fmt: skip
        """One method round over ``grid`` (after ``connect``; the initial full round first if g is
        not known yet). Returns (the model after the round, the round's MetricRecord)."""
        if self.x is None:
            raise RuntimeError(f"{type(self).__name__} has no model: run it with strategy.start "
                               "or call set_initial_arrays / load_state_dict first")  # fmt: skip
        if self.g is None:  # the initial full round at x0
            m = self._round(grid, timeout, train_config, initial=True)
            self._log(m)
            if m["skipped"]:
                raise RuntimeError("the initial full round got no usable reply: g0 is unknown")
        metrics = self._round(grid, timeout, train_config, initial=False)
        self._log(metrics)
        self.rounds += 1
        return self.global_arrays, MetricRecord(metrics)

    def summary(self) -> None:
        log(INFO, "\t└──> %r", self)

    def __repr__(self) -> str:
        return (f"ByzVRMarinaPPStrategy(n={self.num_clients}, cohort={self.cohort_size}, "
                f"full_cohort={self.full_cohort}, p={self.p:.4g}, gamma={self.gamma:.4g}, "
                f"alpha={self.alpha:.4g}, clip={self.clip}, plus={self.plus}, "
                f"compressor={self.compressor_spec[0]}, rounds={self.rounds})")  # fmt: skip

    # ---- checkpoints --------------------------------------------------------------------------

    def config(self) -> dict:
        out = super().config()
        out["byzantine"] = list(self.byzantine)
        return out

    def state_dict(self) -> dict:
        """``BaseMethodStrategy.state_dict`` plus g, x0, lambda and the aggregator's state
        (bucketing counter, centered-clip warm start). Copies."""
        st = super().state_dict()
        agg = self.aggregator
        st.update({"g": None if self.g is None else self.g.clone(),
                   "x0": None if self.x0 is None else self.x0.clone(), "lam": self.lam,
                   "aggregator": copy.deepcopy(agg.state_dict())
                   if hasattr(agg, "state_dict") else None})  # fmt: skip
        return st

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` of a strategy built with the same arguments (checked
        before anything changes)."""
        if not isinstance(state, dict) or "g" not in state or "x0" not in state:
            raise TypeError("state must be a dict from ByzVRMarinaPPStrategy.state_dict()")
        for k in ("g", "x0"):
            t = state[k]
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float64
                                  or t.dim() != 1):  # fmt: skip
                raise ValueError(f"state's {k} must be a float64 [d] tensor")
        x = state.get("x")
        if x is not None and any(state[k] is not None and state[k].shape != x.shape
                                 for k in ("g", "x0")):  # fmt: skip
            raise ValueError("state's g and x0 must have x's shape")
        super().load_state_dict(state)
        self.g = None if state["g"] is None else state["g"].clone()
        self.x0 = None if state["x0"] is None else state["x0"].clone()
        self.lam = float(state["lam"])
        if state["aggregator"] is not None and hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(copy.deepcopy(state["aggregator"]))


# ---- the client --------------------------------------------------------------------------------


def _float(cfg, name) -> float:
    """A finite float field >= 0 of a server message (``method_client._float`` plus the sign)."""
    val = _finite(cfg, name)
    if val < 0:
        raise _Reject(P.ERR_PROTOCOL, f"field {name!r} must be a finite float >= 0, got {val!r}")
    return val


class ProblemSampleGradients:
    """Gradients of a fedkern problem's client: ``problem.grads(x, [i], samples)``, bit for bit
    what ``ByzVRMarinaPP`` computes for client i (its rows are independent).

    ``provider(x, client_id, samples) -> float64 [d]`` with x float64 [d] CPU and samples None
    (the full local data) or an int64 index tensor into the client's samples;
    ``provider.num_samples(client_id) -> int`` (m_i, for the minibatch draw).
    Args: problem (``fedkern.problems.LogisticRegression``-like: ``grads`` and ``sizes``).
    """

    def __init__(self, problem):
        if not callable(getattr(problem, "grads", None)) or not hasattr(problem, "sizes"):
            raise TypeError("problem must have grads(x, clients, samples) and sizes")
        self.problem = problem

    def num_samples(self, client_id: int) -> int:
        return int(self.problem.sizes[client_id])

    def __call__(self, x, client_id, samples, config=None) -> torch.Tensor:
        smp = None if samples is None else [samples]
        return self.problem.grads(x, [client_id], smp)[0]

    def __repr__(self) -> str:
        return f"ProblemSampleGradients(n={self.problem.n})"


class ModuleSampleGradients(_ModuleLoss):
    """Gradients of a PyTorch module's loss on this client's data, at the flat model x.

    ``provider(x, client_id, samples, config) -> [d]``: x (float64 [d]) is split by the server's
    layout (``config["fedkern"]["layout"]``: [(name, shape)], which must be the module's parameter
    names, e.g. from ``method_client.module_arrays``) and cast to the module's parameter dtype;
    f_i(x) = loss(module(inputs[samples]), targets[samples]) + (l2 / 2) ||x||^2 via
    ``torch.func.functional_call``. The module's parameters are not modified.

    Args: module, loss (mean reduction), inputs, targets (this client's data, first dimension =
    samples), l2 (>= 0).
    """

    def __init__(self, module: torch.nn.Module, loss, inputs, targets, *, l2: float = 0.0):
        super().__init__(module, loss, inputs, targets, l2=l2)
        self.dtype = next(module.parameters()).dtype

    def num_samples(self, client_id: int) -> int:
        return len(self.inputs)

    def __call__(self, x, client_id, samples, config=None) -> torch.Tensor:
        inp, tgt = self.inputs, self.targets
        if samples is not None:
            inp, tgt = inp[samples], tgt[samples]
        return self._grad(x.to(self.dtype), config["fedkern"]["layout"], inp, tgt).double()

    def __repr__(self) -> str:
        return f"ModuleSampleGradients({type(self.module).__name__}, samples={len(self.inputs)})"


class ByzVRMarinaClient(ClientIdentity):
    """The client side of Byz-VR-MARINA-PP (module docstring, step 3); keeps no state.

    Args:
        gradients: a provider ``gradients(x, client_id, samples, config) -> [d]`` with
            ``gradients.num_samples(client_id)`` (``ProblemSampleGradients``,
            ``ModuleSampleGradients``).
        client_id: None (node_config "partition-id"), an int, or ``client_id(context) -> int``.
        seed: None, or the method seed this client expects (others are refused).
        byzantine: client ids that run ``attack`` instead of the honest reply (one ClientApp
            serves every simulated node; a deployment gives its Byzantine nodes their own app).
        attack: "bit_flip" (reply -scale times the honest message; the only client-local attack,
            module docstring) or None.
        bit_flip_scale: the bit flip's scale (default 1).

    Use: ``ByzVRMarinaClient(ProblemSampleGradients(problem)).register(app)`` on a ``ClientApp``:
    adds
    ``query.fedkern_hello`` (the handshake of ``BaseMethodStrategy.connect``) and
    ``train.fedkern_byz``. One fedkern client helper per ClientApp (``MethodClient`` registers the
    same handshake).
    """

    methods = (METHOD,)

    def __init__(self, gradients, *, client_id=None, seed: int | None = None, byzantine=(),
                 attack: str | None = None, bit_flip_scale: float = 1.0):  # fmt: skip
        if not callable(gradients) or not callable(getattr(gradients, "num_samples", None)):
            raise TypeError("gradients must be callable with a num_samples(client_id) method")
        if client_id is not None and not callable(client_id):
            client_id = v.integer("client_id", client_id, 0)
        if attack is not None and attack not in LOCAL_ATTACKS:
            raise ValueError(f"attack must be None or one of {LOCAL_ATTACKS} (shift_back, alie and "
                             f"ipm are server-side: SimulatedAttack), got {attack!r}")  # fmt: skip
        self.byzantine = {v.integer("byzantine", b, 0) for b in byzantine}
        if self.byzantine and attack is None:
            raise ValueError("byzantine clients need an attack")
        self.gradients, self._client_id, self.attack = gradients, client_id, attack
        self.seed = None if seed is None else v.integer("seed", seed, 0, (1 << 63) - 1)
        self.bit_flip_scale = v.fp32_scalar("bit_flip_scale", bit_flip_scale)

    def register(self, app) -> None:
        """``@app.query("fedkern_hello")`` and ``@app.train("fedkern_byz")``."""
        app.query(P.ACTION_HELLO.split(".")[1])(self.hello)
        app.train(ACTION_BYZ.split(".")[1])(self.train)

    def _check(self, msg, context):
        cfg, _, cid = self._common(msg, context)
        kind = cfg.get("kind")
        if kind not in (FULL, DIFF):
            raise _Reject(P.ERR_PROTOCOL, f"field 'kind' must be 'full' or 'diff', got {kind!r}")
        layout = self._layout(cfg)
        recs = msg.content.array_records
        try:
            if X_NEW not in recs:
                raise ValueError(f"the message has no model ArrayRecord {X_NEW!r}")
            x_new = P.flatten(recs[X_NEW], layout, np.float64)
            x_old = None
            if kind == DIFF:
                if X_OLD not in recs:
                    raise ValueError(f"a compressed round needs the ArrayRecord {X_OLD!r}")
                x_old = P.flatten(recs[X_OLD], layout, np.float64)
                if x_old.shape != x_new.shape:
                    raise ValueError("x and x+ have different sizes")
        except ValueError as exc:
            raise _Reject(P.ERR_PROTOCOL, str(exc)) from exc
        if not (bool(torch.isfinite(x_new).all())
                and (x_old is None or bool(torch.isfinite(x_old).all()))):  # fmt: skip
            raise _Reject(P.ERR_PROTOCOL, "the models must be finite")
        _int(cfg, "round", 0)
        if kind == DIFF:
            _float(cfg, "lam")
            _int(cfg, "key", 0)
            _int(cfg, "batch_size", 1)
            _int(cfg, "comp_step", 0)
            if cfg.get("comp") not in ("none", "randk", "topk"):
                raise _Reject(P.ERR_PROTOCOL, f"unknown compressor {cfg.get('comp')!r}")
            if cfg["comp"] != "none":
                _int(cfg, "comp_k", 1, x_new.numel())
                _int(cfg, "comp_seed", 0)
        shapes = [tuple(recs[X_NEW][k].shape) for k in layout]
        return cfg, cid, kind, x_new, x_old, list(zip(layout, shapes, strict=True))

    def train(self, msg: Message, context: Context) -> Message:
        """One round: the honest message (or the bit flip of it), float32."""
        try:
            cfg, cid, kind, x_new, x_old, layout = self._check(msg, context)
        except _Reject as exc:
            return self._error(msg, exc)
        config = dict(msg.content.config_records.get(cfg.get("config", ""), ConfigRecord()))
        config["fedkern"] = {"client_id": cid, "round": cfg["round"], "seed": cfg["seed"],
                             "layout": layout}  # fmt: skip
        try:
            out = self._message(cfg, cid, kind, x_new, x_old, config)
        except Exception as exc:  # the provider's failure is this round's error reply
            return self._error(msg, _Reject(P.ERR_TRAIN, f"gradients failed: {exc!r}"))
        vals, idx = out
        if cid in self.byzantine and self.attack == "bit_flip":
            vals = attacks.bit_flip(vals.reshape(1, -1), self.bit_flip_scale)[0]
        arrays = {"values": Array(vals.contiguous().numpy())}
        if idx is not None:
            arrays["indices"] = Array(idx.contiguous().numpy())
        echo = {k: cfg[k] for k in ("protocol", "method", "seed", "round", "kind")}
        echo["client_id"] = cid
        content = RecordDict({P.RECORD: ConfigRecord(echo), P.VALUES: ArrayRecord(arrays)})
        return Message(content, reply_to=msg)

    def _grad(self, x, cid, samples, config) -> torch.Tensor:
        g = torch.as_tensor(self.gradients(x, cid, samples, config)).reshape(-1)
        if g.numel() != x.numel():
            raise ValueError(f"the gradient has {g.numel()} entries, the model {x.numel()}")
        return g.to(torch.float32)

    def _message(self, cfg, cid, kind, x_new, x_old, config):
        """(values float32, indices int64 or None): the honest message of this round."""
        if kind == FULL:
            return self._grad(x_new, cid, None, config), None
        m = int(self.gradients.num_samples(cid))
        b = min(int(cfg["batch_size"]), m)
        samples = sampling.uniform(m, b, seed=client_seed(int(cfg["seed"]), cid),
                                   step=int(cfg["key"]))  # fmt: skip
        g_new = self._grad(x_new, cid, samples, config).reshape(1, -1)
        g_old = self._grad(x_old, cid, samples, config).reshape(1, -1)
        lam = float(cfg["lam"])
        bound = lam if (cfg.get("clip") is True and lam > 0) else None
        comp = None
        if cfg["comp"] == "randk":
            comp = RandK(int(cfg["comp_k"]), seed=int(cfg["comp_seed"]),
                         unbiased=bool(cfg["comp_unbiased"]))  # fmt: skip
        elif cfg["comp"] == "topk":
            comp = TopK(int(cfg["comp_k"]))
        out = R.diff_compress_clip(g_new, g_old, comp, bound, clients=[cid],
                                   step=int(cfg["comp_step"]))  # fmt: skip
        if isinstance(out, tuple):
            values, indices = out
            return values[0], (indices[0] if cfg["comp"] == "topk" else None)
        return out[0], None

    def __repr__(self) -> str:
        return f"ByzVRMarinaClient({self.gradients!r}, attack={self.attack!r})"
