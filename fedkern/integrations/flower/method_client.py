"""The client side of fedkern's federated methods on Flower: ``MethodClient`` and the trainers.

``MethodClient(trainer).register(app)`` adds three handlers to a ``flwr.clientapp.ClientApp``
(``protocol``: the messages and their fields): the handshake (``query.fedkern_hello``), the local
training of a round (``train.fedkern``) and the control-variate exchange (``train.fedkern_sync``).
The app keeps its own default train / evaluate functions, if any.

The client's state lives in the node's persistent ``context.state``, per method (so one node can
serve Scaffnew, ProxSkip and TAMUNA runs side by side): ArrayRecord "fedkern.<method>.arrays" with
the control variate "h" (float32 [p], zeros before the first round) and, while an update is pending,
"xhat" (the trained model's held values of the round it was sent in); ConfigRecord
"fedkern.<method>" with the pending round, slot, c, s and coef.

A round on the client (``train.fedkern``):

1. checks the message (protocol version, a method it serves, the seed it expects if one was given,
   its own client id, sane numbers); a bad message gets an error reply and changes nothing;
2. completes its previous update if it is pending and the server says it was aggregated
   (``agg_round`` equals its round): h[held] += coef (x+[held] - xhat) with x+ the catch-up
   values the server resent for that round if any, else the model x just received -- exact when
   that model is the server model of the pending round (the next round under full
   participation), otherwise the authors' deferred update; a pending update the server did not
   aggregate (a failed, rejected or lost reply, or a round lost to a server restart) is dropped,
   so a client's h only moves with rounds the server used. This step is committed;
3. runs the trainer from x with h: x_i = trainer(x, h, K, gamma, config);
4. replies with x_i's values at its held coordinates (``protocol.held_mask`` of (slot, s, c, p);
   minus ``shift`` h_i there when the server's ``shift`` field is not 0: ProxSkip's L1 prox) and
   keeps x_i's held values as the pending update. If the trainer raises, the reply is an error and
   this round leaves no trace in the state.

``train.fedkern_sync`` (same round, sync mode "exchange"): the new server model's values at the held
coordinates; h[held] += coef (xbar[held] - xhat); the pending update is cleared.

Trainers: ``trainer(x, h, K, gamma, config) -> x_new`` with x, h float32 [p] CPU tensors (copies
the trainer may modify; the model's arrays flattened in the server's key order), K local steps of
size gamma, and ``config`` the round's train ConfigRecord as a dict plus ``config["fedkern"]``
(client_id, round, seed, key, method, layout: [(name, shape)]). It returns x_new [p] (a tensor or
ndarray, any float dtype; sent as float32). ``ConvexTrainer`` runs fedkern's batched kernel on the
client's row (so a Flower run equals ``fedkern.algorithms`` bit for bit), ``ModuleTrainer`` a
PyTorch module.
"""

from __future__ import annotations

import math
import numbers
from logging import INFO, WARNING

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

from fedkern import validation as v
from fedkern.clients import ClientBatch
from fedkern.integrations.flower import protocol as P
from fedkern.random import client_seed

__all__ = ["ClientIdentity", "ConvexTrainer", "MethodClient", "ModuleTrainer", "module_arrays"]

#: The methods whose client side ``MethodClient`` implements.
METHODS = ("scaffnew", "proxskip", "tamuna")


class _Reject(Exception):
    """A message the client refuses: (error code, reason)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


def _int(cfg, name: str, lo: int, hi: int | None = None) -> int:
    val = cfg.get(name)
    if isinstance(val, bool) or not isinstance(val, numbers.Integral):
        raise _Reject(P.ERR_PROTOCOL, f"field {name!r} must be an int, got {val!r}")
    if val < lo or (hi is not None and val > hi):
        raise _Reject(P.ERR_PROTOCOL, f"field {name!r} = {val} is out of range")
    return int(val)


def _float(cfg, name: str, positive: bool = False) -> float:
    val = cfg.get(name)
    if isinstance(val, bool) or not isinstance(val, numbers.Real) or not math.isfinite(val):
        raise _Reject(P.ERR_PROTOCOL, f"field {name!r} must be a finite float, got {val!r}")
    if positive and val <= 0:
        raise _Reject(P.ERR_PROTOCOL, f"field {name!r} must be > 0, got {val}")
    return float(val)


class ClientIdentity:
    """What every fedkern Flower client shares: its client id, the handshake reply, error replies
    and the checks of a message's fedkern record (protocol version, method, seed, client id).

    A subclass sets ``methods`` (the method names it serves), ``seed`` (None or the seed it
    expects) and ``_client_id`` (None: ``context.node_config["partition-id"]``; an int; or a
    callable ``client_id(context) -> int``).
    """

    methods: tuple[str, ...] = ()
    seed: int | None = None
    _client_id = None

    def client_id(self, context: Context) -> int:
        """This node's global client id (from ``_client_id``: see the class docstring)."""
        cid = self._client_id
        if cid is None:
            if "partition-id" not in context.node_config:
                raise _Reject(P.ERR_CLIENT, "no client id: node_config has no 'partition-id' "
                              f"(pass client_id= to {type(self).__name__})")  # fmt: skip
            cid = context.node_config["partition-id"]
        elif callable(cid):
            cid = cid(context)
        if isinstance(cid, bool) or not isinstance(cid, numbers.Integral) or cid < 0:
            raise _Reject(P.ERR_CLIENT, f"client id must be an int >= 0, got {cid!r}")
        return int(cid)

    def _error(self, msg: Message, exc: _Reject) -> Message:
        log(WARNING, "fedkern client: refused %s: %s", msg.metadata.message_type, exc)
        return Message(Error(code=exc.code, reason=str(exc)), reply_to=msg)

    def _common(self, msg: Message, context: Context):
        """The message's fedkern record, checked: (cfg, method, client id)."""
        cfg = msg.content.config_records.get(P.RECORD)
        if cfg is None:
            raise _Reject(P.ERR_PROTOCOL, f"the message has no {P.RECORD!r} ConfigRecord")
        if cfg.get("protocol") != P.PROTOCOL:
            raise _Reject(P.ERR_PROTOCOL, f"protocol version {cfg.get('protocol')!r}; this "
                          f"client speaks {P.PROTOCOL}")  # fmt: skip
        method = cfg.get("method")
        if method not in self.methods:
            raise _Reject(P.ERR_METHOD, f"method {method!r} is not served by this client "
                          f"({', '.join(self.methods)})")  # fmt: skip
        seed = _int(cfg, "seed", 0)
        if self.seed is not None and seed != self.seed:
            raise _Reject(P.ERR_SEED, f"seed {seed} differs from this client's {self.seed}")
        cid = self.client_id(context)
        if _int(cfg, "client_id", 0) != cid:
            raise _Reject(P.ERR_CLIENT, f"message for client {cfg.get('client_id')}, this is "
                          f"client {cid}")  # fmt: skip
        return cfg, method, cid

    @staticmethod
    def _layout(cfg) -> list:
        """The record's field 'layout' (the model's array names, in order), checked."""
        layout = cfg.get("layout")
        if not isinstance(layout, list) or not all(isinstance(k, str) for k in layout):
            raise _Reject(P.ERR_PROTOCOL, "field 'layout' must be a list of array names")
        return layout

    def _model(self, msg: Message, cfg) -> tuple[torch.Tensor, list, list]:
        """The model the message carries (the ArrayRecord named by field 'arrays'), flattened in
        layout order to float32 [p] (``protocol.flatten``), the layout (array names) and the
        arrays' shapes in that order."""
        layout = self._layout(cfg)
        records = msg.content.array_records
        akey = cfg.get("arrays")
        if akey not in records:
            raise _Reject(P.ERR_PROTOCOL, f"the message has no model ArrayRecord {akey!r}")
        try:
            flat = P.flatten(records[akey], layout)
        except ValueError as exc:
            raise _Reject(P.ERR_PROTOCOL, str(exc)) from exc
        return flat, layout, [tuple(records[akey][n].shape) for n in layout]

    def hello(self, msg: Message, context: Context) -> Message:
        """The handshake: reply with the protocol version, the methods served and the client id
        (the server checks them; module ``protocol``)."""
        try:
            cid = self.client_id(context)
        except _Reject as exc:
            return self._error(msg, exc)
        reply = {"protocol": P.PROTOCOL, "methods": list(self.methods), "client_id": cid}
        if self.seed is not None:
            reply["seed"] = self.seed
        return Message(RecordDict({P.RECORD: ConfigRecord(reply)}), reply_to=msg)


class MethodClient(ClientIdentity):
    """The client side of Scaffnew, ProxSkip and TAMUNA (module docstring: the round, the state).

    Args:
        trainer: ``trainer(x, h, K, gamma, config) -> x_new`` (module docstring), e.g. a
            ``ConvexTrainer`` or a ``ModuleTrainer``.
        methods: the methods this client serves (default all of ``METHODS``); a message for
            another method is refused with an error reply.
        client_id: the client's global id in [0, n) (what the server's cohort draws name): None
            (default) reads ``context.node_config["partition-id"]``; an int; or a callable
            ``client_id(context) -> int``.
        seed: None, or the method seed this client expects: a message with another seed is
            refused (error reply), and the handshake reports the mismatch to the server.

    Use: ``MethodClient(trainer).register(app)`` on a ``flwr.clientapp.ClientApp``.
    """

    #: The methods a client of this class can serve (a subclass for other methods sets its own).
    served: tuple[str, ...] = METHODS

    def __init__(self, trainer, *, methods=None, client_id=None, seed: int | None = None):
        if not callable(trainer):
            raise TypeError(f"trainer must be callable, got {type(trainer).__name__}")
        methods = self.served if methods is None else methods
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        bad = [m for m in methods if m not in self.served]
        if bad or not methods:
            raise ValueError(f"methods must be a non-empty subset of {self.served}, got "
                             f"{methods}")  # fmt: skip
        if client_id is not None and not callable(client_id):
            client_id = v.integer("client_id", client_id, 0)
        self.trainer = trainer
        self.methods = methods
        self._client_id = client_id
        self.seed = None if seed is None else v.integer("seed", seed, 0, (1 << 63) - 1)

    def __repr__(self) -> str:
        return f"MethodClient({self.trainer!r}, methods={self.methods})"

    # ---- registration and identity ---------------------------------------------------------

    def register(self, app) -> None:
        """Register the handlers on a ``ClientApp``: ``@app.query("fedkern_hello")``,
        ``@app.train("fedkern")`` and ``@app.train("fedkern_sync")``."""
        app.query(P.ACTION_HELLO.split(".")[1])(self.hello)
        app.train(P.ACTION_TRAIN.split(".")[1])(self.train)
        app.train(P.ACTION_SYNC.split(".")[1])(self.sync)

    # ---- state in context.state -------------------------------------------------------------

    @staticmethod
    def _keys(method: str) -> tuple[str, str]:
        return f"fedkern.{method}", f"fedkern.{method}.arrays"

    def _load(self, context: Context, method: str, p: int):
        """(h [p] float32, pending dict or None) of ``method`` (h zeros if none yet)."""
        ckey, akey = self._keys(method)
        arrays = context.state.array_records.get(akey)
        conf = context.state.config_records.get(ckey)
        if arrays is None:
            return torch.zeros(p), None
        h = torch.from_numpy(np.array(arrays["h"].numpy(), dtype=np.float32).reshape(-1))
        if h.numel() != p:
            raise _Reject(P.ERR_STATE, f"the stored control variate has {h.numel()} entries, the "
                          f"model {p}: the model changed under a running method")  # fmt: skip
        pending = None
        if conf is not None and conf.get("pending"):
            pending = {k: conf[k] for k in ("round", "slot", "c", "s", "coef")}
            pending["xhat"] = torch.from_numpy(np.array(arrays["xhat"].numpy(), np.float32))
        return h, pending

    def _store(self, context: Context, method: str, h: torch.Tensor, pending=None) -> None:
        ckey, akey = self._keys(method)
        arrays = {"h": Array(h.numpy().astype(np.float32, copy=True))}
        conf = {"protocol": P.PROTOCOL, "pending": pending is not None}
        if pending is not None:
            arrays["xhat"] = Array(pending["xhat"].numpy().astype(np.float32, copy=True))
            conf.update({k: pending[k] for k in ("round", "slot", "c", "s", "coef")})
        context.state[akey] = ArrayRecord(arrays)
        context.state[ckey] = ConfigRecord(conf)

    def control_variate(self, context: Context, method: str, x=None,
                        agg_round: int | None = None) -> torch.Tensor:  # fmt: skip
        """This node's control variate h of ``method`` (float32 [p] CPU; zeros of size 0 before
        the first round). With x (the current server model, [p]), a pending update is applied
        to the copy returned, as the node would apply it on receiving x with ``agg_round`` (the
        strategy's ``last_agg`` of this client; None: as if aggregated). For inspection and
        tests; the state is not changed."""
        ckey, akey = self._keys(method)
        arrays = context.state.array_records.get(akey)
        if arrays is None:
            return torch.zeros(0)
        h, pending = self._load(context, method, int(arrays["h"].numpy().size))
        if x is not None and pending is not None and agg_round in (None, pending["round"]):
            x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
            held = P.held_mask(h.numel(), pending["c"], pending["s"], pending["slot"])
            h[held] = h[held] + pending["coef"] * (x[held] - pending["xhat"])
        return h

    # ---- handlers ---------------------------------------------------------------------------

    @staticmethod
    def _echo(cfg, cid: int) -> ConfigRecord:
        return ConfigRecord({"protocol": P.PROTOCOL, "method": cfg["method"], "seed": cfg["seed"],
                             "round": cfg["round"], "client_id": cid,
                             "row": cfg["row"]})  # fmt: skip

    def train(self, msg: Message, context: Context) -> Message:
        """One round's local training (module docstring, steps 1-4)."""
        try:
            cfg, method, cid = self._common(msg, context)
            rnd = _int(cfg, "round", 0)
            K = _int(cfg, "K", 0)
            gamma = _float(cfg, "gamma", positive=True)
            coef = _float(cfg, "coef")
            c = _int(cfg, "c", 1)
            s = _int(cfg, "s", 1, c)
            slot = _int(cfg, "slot", 0, c - 1)
            _int(cfg, "row", 0, c - 1)
            agg_round = _int(cfg, "agg_round", -1)
            shift = _float(cfg, "shift") if "shift" in cfg else 0.0
            x, layout, shapes = self._model(msg, cfg)
            p = x.numel()
            h, pending = self._load(context, method, p)
        except _Reject as exc:
            return self._error(msg, exc)
        if pending is not None:
            if pending["round"] == agg_round and pending["round"] < rnd:
                held = P.held_mask(p, pending["c"], pending["s"], pending["slot"])
                xplus = x[held]
                catch = msg.content.array_records.get(P.CATCHUP)
                if catch is not None and cfg.get("catchup_round") == pending["round"]:
                    vals = catch["values"].numpy() if "values" in catch else None
                    if vals is None or vals.dtype != np.float32 or vals.shape != xplus.shape:
                        why = f"catch-up values must be float32 {tuple(xplus.shape)}"
                        return self._error(msg, _Reject(P.ERR_PROTOCOL, why))
                    xplus = torch.from_numpy(np.array(vals))
                h[held] = h[held] + pending["coef"] * (xplus - pending["xhat"])
            else:
                log(INFO, "fedkern client %s: dropped the pending %s update of round %s (the "
                    "server aggregated round %s)", cid, method, pending["round"],
                    agg_round)  # fmt: skip
            self._store(context, method, h)
        user = msg.content.config_records.get(cfg.get("config", ""), ConfigRecord())
        config = dict(user)
        config["fedkern"] = {"client_id": cid, "round": rnd, "seed": cfg["seed"],
                             "key": cfg.get("key"), "method": method,
                             "layout": list(zip(layout, shapes, strict=True))}  # fmt: skip
        try:
            out = self.trainer(x.clone(), h.clone(), K, gamma, config)
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu()
            out = torch.as_tensor(np.asarray(out), dtype=torch.float32).reshape(-1)
            if out.numel() != p:
                raise ValueError(f"the trainer returned {out.numel()} values for a model of {p}")
        except Exception as exc:  # the trainer's failure is this round's error reply
            return self._error(msg, _Reject(P.ERR_TRAIN, f"trainer failed: {exc!r}"))
        held = P.held_mask(p, c, s, slot)
        values = out[held].contiguous()
        self._store(context, method, h, {"round": rnd, "slot": slot, "c": c, "s": s,
                                          "coef": coef, "xhat": values})  # fmt: skip
        if shift:  # ProxSkip's L1 prox: the server needs x_i - (gamma / p) h_i
            values = (values - shift * h[held]).contiguous()
        vals = ArrayRecord({"values": Array(values.numpy())})
        content = RecordDict({P.RECORD: self._echo(cfg, cid), P.VALUES: vals})
        return Message(content, reply_to=msg)

    def sync(self, msg: Message, context: Context) -> Message:
        """The control-variate exchange of the round: h[held] += coef (xbar[held] - xhat)."""
        try:
            cfg, method, cid = self._common(msg, context)
            rnd = _int(cfg, "round", 0)
            _int(cfg, "row", 0)
            ckey, akey = self._keys(method)
            arrays = context.state.array_records.get(akey)
            if arrays is None:
                raise _Reject(P.ERR_STATE, f"no {method} state on this client")
            h, pending = self._load(context, method, int(arrays["h"].numpy().size))
            if pending is None or pending["round"] != rnd:
                got = None if pending is None else pending["round"]
                raise _Reject(P.ERR_STATE, f"no pending update of round {rnd} (pending: {got})")
            rec = msg.content.array_records.get(P.VALUES)
            vals = None if rec is None or "values" not in rec else rec["values"].numpy()
            held = P.held_mask(h.numel(), pending["c"], pending["s"], pending["slot"])
            k = int(held.sum())
            if vals is None or vals.dtype != np.float32 or vals.shape != (k,):
                got = None if vals is None else f"{vals.dtype} {vals.shape}"
                raise _Reject(P.ERR_PROTOCOL, f"sync values must be float32 ({k},), got {got}")
        except _Reject as exc:
            return self._error(msg, exc)
        xbar = torch.from_numpy(np.array(vals))
        h[held] = h[held] + pending["coef"] * (xbar - pending["xhat"])
        self._store(context, method, h)
        return Message(RecordDict({P.RECORD: self._echo(cfg, cid)}), reply_to=msg)


# ---- trainers --------------------------------------------------------------------------------


class _ConvexLocal:
    """What the client-side workers on a ``ClientBatch`` share (``ConvexTrainer`` here, 5GCS's
    ``ConvexSolver``): the batch, the local gradient's mode ("gd", "sgd" or "rr") and batch size,
    validated."""

    def __init__(self, batch: ClientBatch, *, mode: str = "gd", batch_size: int = 1):
        if not isinstance(batch, ClientBatch):
            raise TypeError(f"batch must be a fedkern.clients.ClientBatch, got "
                            f"{type(batch).__name__}")  # fmt: skip
        if mode not in ("gd", "sgd", "rr"):
            raise ValueError(f"mode must be 'gd', 'sgd' or 'rr', got {mode!r}")
        self.batch, self.mode = batch, mode
        self.batch_size = v.integer("batch_size", batch_size, 1)


class ConvexTrainer(_ConvexLocal):
    """A trainer for fedkern's convex problems: ``ClientBatch.local_steps_`` on the client's row.

    x_i <- x_i - gamma (g_i(x_i) - h_i), K times, on client ``config["fedkern"]["client_id"]``'s
    data with the round ``config["fedkern"]["round"]`` keying its minibatches: the same call, on a
    one-row cohort, that ``fedkern.algorithms.Scaffnew`` / ``TAMUNA`` make for the whole cohort,
    so a Flower run equals the simulator bit for bit (rows are independent in the kernel).

    Args:
        batch: the ``fedkern.clients.ClientBatch`` holding the client's data (in a simulation the
            whole problem; the client's global id picks its rows and its random stream).
        mode, batch_size: the local gradient ("gd", "sgd", "rr"; ``ClientBatch.local_steps_``),
            as given to the simulator's method.
    """

    def __call__(self, x, h, K, gamma, config) -> torch.Tensor:
        fk = config["fedkern"]
        dev = self.batch.device
        X = x.reshape(1, -1).to(dev, torch.float32).clone()
        H = h.reshape(1, -1).to(dev, torch.float32).contiguous()
        self.batch.local_steps_(X, gamma=gamma, steps=K, clients=[fk["client_id"]], H=H,
                                mode=self.mode, batch_size=self.batch_size,
                                round=fk["round"])  # fmt: skip
        return X[0].cpu()

    def __repr__(self) -> str:
        return f"ConvexTrainer(n={self.batch.n}, p={self.batch.p}, mode={self.mode!r})"


class _ModuleLoss:
    """What ``ModuleTrainer`` and ``gradient_client.ModuleGradients`` share: a module, its loss and
    data, and grad f_i at a flat x, f_i(x) = loss(module(inputs), targets) + (l2/2) ||x||^2 with
    the module's parameters taken from x by the server's layout (``torch.func.functional_call``;
    the module's own parameters are not modified, its buffers are used as they are)."""

    def __init__(self, module: torch.nn.Module, loss, inputs: torch.Tensor, targets: torch.Tensor,
                 *, batch_size: int | None = None, l2: float = 0.0):  # fmt: skip
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(loss):
            raise TypeError("loss must be callable")
        if len(inputs) != len(targets) or len(inputs) < 1:
            raise ValueError("inputs and targets must hold the same number (>= 1) of samples")
        self.module, self.loss = module, loss
        self.inputs, self.targets = inputs, targets
        self.batch_size = None if batch_size is None else v.integer("batch_size", batch_size, 1)
        self.l2 = v.fp32_scalar("l2", l2, nonneg=True)
        self.names = {n: tuple(t.shape) for n, t in module.named_parameters()}

    def _check_layout(self, layout) -> None:
        if {n for n, _ in layout} != set(self.names):
            raise ValueError(f"the model's arrays {[n for n, _ in layout]} are not the module's "
                             f"parameters {list(self.names)}")  # fmt: skip

    def _params(self, x: torch.Tensor, layout) -> dict:
        self._check_layout(layout)
        out, off = {}, 0
        for name, shape in layout:
            if tuple(shape) != self.names[name]:
                raise ValueError(f"array {name!r} has shape {tuple(shape)}, the module's "
                                 f"parameter {self.names[name]}")  # fmt: skip
            k = math.prod(shape)
            out[name] = x[off : off + k].view(shape)
            off += k
        return out

    def _grad(self, x: torch.Tensor, layout, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """grad f_i(x) on the samples (inp, tgt): float32 [p], detached; x is not modified."""
        from torch.func import functional_call

        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = functional_call(self.module, self._params(leaf, layout), (inp,))
            f = self.loss(out, tgt) + 0.5 * self.l2 * (leaf * leaf).sum()
            (g,) = torch.autograd.grad(f, leaf)
        return g.detach()


class ModuleTrainer(_ModuleLoss):
    """A trainer for a PyTorch module: K steps of x <- x - gamma (grad f_i(x) - h) on its data.

    The flat model x is split by ``config["fedkern"]["layout"]`` (the server's array names and
    shapes, which must be the module's parameter names: build the initial arrays with
    ``module_arrays(module)``); f_i(x) = mean loss over the batch + (l2/2) ||x||^2, evaluated with
    ``torch.func.functional_call`` (buffers are the module's own).

    Args:
        module: the model (its parameters are not modified; the trainer works on x).
        loss: ``loss(outputs, targets) -> scalar`` (mean reduction), e.g.
            ``torch.nn.functional.cross_entropy``.
        inputs, targets: this client's data (tensors, first dimension = samples).
        batch_size: None (full batch) or an int: each step a minibatch of that many samples drawn
            without replacement, keyed by (seed, client id, round * K + step) so runs repeat.
        l2: the L2 weight (a float >= 0).
    """

    def __call__(self, x, h, K, gamma, config) -> torch.Tensor:
        fk = config["fedkern"]
        layout = fk["layout"]
        m = len(self.inputs)
        base = client_seed(int(fk["seed"]), int(fk["client_id"]))
        x = x.detach().clone()
        for t in range(K):
            if self.batch_size is None or self.batch_size >= m:
                inp, tgt = self.inputs, self.targets
            else:
                gen = torch.Generator().manual_seed(client_seed(base, fk["round"] * K + t))
                idx = torch.randperm(m, generator=gen)[: self.batch_size]
                inp, tgt = self.inputs[idx], self.targets[idx]
            x = x - gamma * (self._grad(x, layout, inp, tgt) - h)
        return x

    def __repr__(self) -> str:
        return f"ModuleTrainer({type(self.module).__name__}, samples={len(self.inputs)})"


def module_arrays(module: torch.nn.Module) -> ArrayRecord:
    """The module's parameters as an ArrayRecord (float32 copies, ``named_parameters`` order):
    the ``initial_arrays`` of a method strategy whose clients use ``ModuleTrainer``."""
    return ArrayRecord({n: Array(t.detach().cpu().float().numpy().copy())
                        for n, t in module.named_parameters()})  # fmt: skip
