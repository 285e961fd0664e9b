"""The client side of MARINA, DIANA and EF21 on Flower: ``GradientClient`` and gradient sources.

``GradientClient(gradients).register(app)`` adds two handlers to a ``flwr.clientapp.ClientApp``:
the handshake ``query.fedkern_hello`` (the same as ``MethodClient``'s, so
``BaseMethodStrategy.connect`` works; register one fedkern client helper per ClientApp) and the
round ``train.fedkern_grad`` (``compressed.ACTION_GRAD``; fields in
``fedkern.integrations.flower.compressed``).

State (the node's persistent ``context.state``, per method): ArrayRecord
"fedkern.<method>.arrays" and ConfigRecord "fedkern.<method>":

* DIANA: the shift "h" (float32 [p]); EF21: the feedback state "g" (float32 [p]); both with the
  pending message of the last round ("pv" values, "pi" indices) while the server has not confirmed
  it. The pending update (DIANA h += alpha m, EF21 g += m) is committed when the next train
  message reports ``agg_round`` equal to its round, and dropped otherwise, so the state only moves
  with messages the server aggregated. ``agg_round = -1`` (the server never aggregated this client)
  resets the state to zeros (the server counts it as zero); a node that lost its state while the
  server holds aggregated rounds of it refuses every round (error replies), never silently
  restarting from zeros.
* MARINA: the models the client received (at most two: the one of the round the server last
  aggregated from it, and the latest), so a gradient difference at (x+, x) needs only x+ on the
  wire; the server resends x (``PREV``) when it cannot be sure the client holds it.

Gradient sources: ``gradients(x, config) -> g`` with x a float32 [p] CPU tensor (a copy, the
model's arrays flattened in the server's key order) and ``config`` the user's train ConfigRecord as
a dict plus ``config["fedkern"]`` = {client_id, round, seed, method, layout: [(name, shape)],
batch_key (the minibatch key of the round), full (bool: the full local gradient is asked)}. It
returns g [p] (tensor or ndarray, any float dtype; used as float32). ``ConvexGradients`` uses
fedkern's batched kernel on the client's row (bit for bit the simulator's gradients),
``ModuleGradients`` a PyTorch module.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

from fedkern import validation as v
from fedkern.algorithms.messages import COMPRESSORS, RowCompressor
from fedkern.clients import ClientBatch
from fedkern.integrations.flower import protocol as P
from fedkern.integrations.flower.method_client import (
    MethodClient,
    _float,
    _int,
    _ModuleLoss,
    _Reject,
)
from fedkern.random import client_seed

__all__ = ["ConvexGradients", "GradientClient", "ModuleGradients"]

#: The methods whose client side ``GradientClient`` implements.
METHODS = ("marina", "diana", "ef21")
ACTION_GRAD = "train.fedkern_grad"
#: ArrayRecord of the model x a MARINA difference needs (array "values"), when resent.
PREV = "fedkern.prev"


def _f32(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
    return torch.as_tensor(np.asarray(a), dtype=torch.float32).reshape(-1)


class GradientClient(MethodClient):
    """The client side of MARINA, DIANA and EF21 (module docstring: the round, the state).

    Args:
        gradients: ``gradients(x, config) -> g [p]`` (module docstring), e.g. ``ConvexGradients``
            or ``ModuleGradients``.
        methods: the methods served (default all three); others are refused with an error reply.
        client_id, seed: as ``MethodClient``'s (default: node_config "partition-id"; no seed check).

    Use: ``GradientClient(gradients).register(app)``. Not combinable with a ``MethodClient`` on
    the same ClientApp (both answer the handshake).
    """

    served = METHODS

    def __init__(self, gradients, *, methods=None, client_id=None, seed: int | None = None):
        if not callable(gradients):
            raise TypeError(f"gradients must be callable, got {type(gradients).__name__}")
        super().__init__(gradients, methods=methods, client_id=client_id, seed=seed)
        self.gradients = gradients

    def __repr__(self) -> str:
        return f"GradientClient({self.gradients!r}, methods={self.methods})"

    def register(self, app) -> None:
        """Register ``@app.query("fedkern_hello")`` and ``@app.train("fedkern_grad")``."""
        app.query(P.ACTION_HELLO.split(".")[1])(self.hello)
        app.train(ACTION_GRAD.split(".")[1])(self.train)

    # ---- state ----------------------------------------------------------------------------------

    def _read(self, context: Context, method: str) -> tuple[dict, dict]:
        ckey, akey = self._keys(method)
        arrays = context.state.array_records.get(akey)
        conf = context.state.config_records.get(ckey)
        arr = {} if arrays is None else {k: np.array(arrays[k].numpy()) for k in arrays.keys()}
        return arr, ({} if conf is None else dict(conf))

    def _write(self, context: Context, method: str, arrays: dict, conf: dict) -> None:
        ckey, akey = self._keys(method)
        context.state[akey] = ArrayRecord({k: Array(np.ascontiguousarray(a))
                                           for k, a in arrays.items()})  # fmt: skip
        context.state[ckey] = ConfigRecord(dict(conf, protocol=P.PROTOCOL))

    def client_state(self, context: Context, method: str, agg_round: int | None = None):
        """The node's DIANA shift / EF21 feedback state (float32 [p] copy; size 0 before the
        first round), with the pending message applied when ``agg_round`` equals its round
        (None: as if confirmed). For inspection and tests; the state is not changed."""
        arr, conf = self._read(context, method)
        name = "h" if method == "diana" else "g"
        if name not in arr:
            return torch.zeros(0)
        s = torch.from_numpy(arr[name].astype(np.float32))
        if conf.get("pending", -1) >= 0 and agg_round in (None, conf["pending"]):
            s = self._commit(s, arr, conf)
        return s

    @staticmethod
    def _commit(s, arr, conf):
        if not float(conf["alpha"]):
            return s
        vals = torch.from_numpy(arr["pv"].astype(np.float32))
        S = s.clone().reshape(1, -1)
        if "pi" in arr:
            comp = RowCompressor("topk", d=S.shape[1], k=vals.numel(), unbiased=False)
            comp.add_(S, (vals.reshape(1, -1), torch.from_numpy(arr["pi"]).reshape(1, -1)),
                      float(conf["alpha"]))  # fmt: skip
        else:
            comp = RowCompressor("none", d=S.shape[1], unbiased=False)
            comp.add_(S, vals.reshape(1, -1), float(conf["alpha"]))
        return S[0]

    # ---- the round ------------------------------------------------------------------------------

    def train(self, msg: Message, context: Context) -> Message:
        """One round: check the message, commit or drop the pending update, compute and send
        this round's message (module docstring). A refused message gets an error reply and leaves
        the state as it was; a failing gradient source gets an error reply after the pending
        update was committed (confirmed) or dropped, and leaves no pending update of its own."""
        try:
            cfg, method, cid = self._common(msg, context)
            rnd = _int(cfg, "round", 0)
            agg = _int(cfg, "agg_round", -1, rnd - 1 if rnd else -1)
            batch_key = _int(cfg, "batch_key", 0)
            mask_key = _int(cfg, "mask_key", 0)
            full = cfg.get("full")
            kind = cfg.get("compressor")
            if not isinstance(full, bool):
                raise _Reject(P.ERR_PROTOCOL, "field 'full' must be a bool")
            if kind not in COMPRESSORS:
                raise _Reject(P.ERR_PROTOCOL, f"field 'compressor' must be one of {COMPRESSORS}")
            alpha = _float(cfg, "alpha")
            if not isinstance(cfg.get("feedback"), bool):
                raise _Reject(P.ERR_PROTOCOL, "field 'feedback' must be a bool")
            x, layout, shapes = self._model(msg, cfg)
            p = x.numel()
            k = p if kind == "none" else _int(cfg, "k", 1, p)
            unbiased = cfg.get("unbiased")
            if not isinstance(unbiased, bool) or (kind == "topk" and unbiased):
                raise _Reject(P.ERR_PROTOCOL, "field 'unbiased' must be a bool (False for topk)")
            comp = RowCompressor(kind, d=p, k=None if kind == "none" else k, seed=cfg["seed"],
                                 unbiased=unbiased)  # fmt: skip
            arr, conf = self._read(context, method)
            x_old = None
            if method == "marina" and not full:
                x_round = _int(cfg, "x_round", 0, rnd - 1)
                prev = msg.content.array_records.get(PREV)
                if prev is not None:
                    a = prev["values"].numpy() if "values" in prev else None
                    if a is None or a.dtype != np.float32 or a.shape != (p,):
                        raise _Reject(P.ERR_PROTOCOL, f"the resent model must be float32 ({p},)")
                    x_old = torch.from_numpy(np.array(a))
                elif f"m{x_round}" in arr:
                    x_old = torch.from_numpy(arr[f"m{x_round}"].astype(np.float32))
                else:
                    raise _Reject(P.ERR_STATE, f"no model of round {x_round} on this client")
                if x_old.numel() != p:
                    raise _Reject(P.ERR_STATE, "the stored model has another size")
            name = {"diana": "h", "ef21": "g"}.get(method)
            if name is not None and agg >= 0 and name not in arr:
                raise _Reject(P.ERR_STATE, f"the server aggregated round {agg} of this client, "
                              f"which holds no {method} state (lost)")  # fmt: skip
            if name is not None and name in arr and arr[name].size != p and agg >= 0:
                raise _Reject(P.ERR_STATE, f"the stored state has {arr[name].size} entries, the "
                              f"model {p}: the model changed under a running method")  # fmt: skip
        except _Reject as exc:
            return self._error(msg, exc)
        # commit or drop the pending update (DIANA / EF21); agg_round -1: fresh state
        state = None
        if name is not None:
            if agg < 0 or name not in arr:
                state = torch.zeros(p)
            else:
                state = torch.from_numpy(arr[name].astype(np.float32))
                pend = conf.get("pending", -1)
                if pend >= 0 and pend == agg:
                    state = self._commit(state, arr, conf)
                elif pend >= 0:
                    log(INFO, "fedkern client %s: dropped the pending %s update of round %s (the "
                        "server aggregated round %s)", cid, method, pend, agg)  # fmt: skip
            self._write(context, method, {name: state.numpy()}, {"pending": -1})
        user = msg.content.config_records.get(cfg.get("config", ""), ConfigRecord())
        config = dict(user)
        config["fedkern"] = {"client_id": cid, "round": rnd, "seed": cfg["seed"],
                             "method": method, "layout": list(zip(layout, shapes, strict=True)),
                             "batch_key": batch_key, "full": full}  # fmt: skip
        try:
            g = _f32(self.gradients(x.clone(), config))
            if g.numel() != p:
                raise ValueError(f"the gradients returned {g.numel()} values for a model of {p}")
            if x_old is not None:
                g_old = _f32(self.gradients(x_old.clone(), config))
                if g_old.numel() != p:
                    raise ValueError(f"the gradients returned {g_old.numel()} values for {p}")
        except Exception as exc:  # the gradient source's failure is this round's error reply
            return self._error(msg, _Reject(P.ERR_TRAIN, f"gradients failed: {exc!r}"))
        ids = torch.tensor([cid])
        if full:
            values, indices = g, None
        else:
            if method == "marina":
                ref = g_old
            elif method == "diana" or (method == "ef21" and cfg["feedback"]):
                ref = state
            else:
                ref = torch.zeros(p)
            out = comp.diff(g.reshape(1, -1), ref.reshape(1, -1), clients=ids, step=mask_key)
            if isinstance(out, tuple):
                values, indices = out[0][0].contiguous(), out[1][0].contiguous()
            else:
                values, indices = out[0].contiguous(), None
        # keep the state of this round
        if method == "marina":
            keep = {f"m{agg}": arr[f"m{agg}"]} if f"m{agg}" in arr else {}
            keep[f"m{rnd}"] = x.numpy()
            self._write(context, method, keep, {})
        elif name is not None and (method == "diana" or cfg["feedback"]):
            pending = {name: state.numpy(), "pv": values.numpy()}
            if indices is not None:
                pending["pi"] = indices.numpy()
            self._write(context, method, pending, {"pending": rnd, "alpha": alpha})
        rec = {"values": Array(values.numpy().astype(np.float32))}
        if indices is not None and kind == "topk":
            rec["indices"] = Array(indices.numpy().astype(np.int64))
        content = RecordDict({P.RECORD: self._echo(cfg, cid), P.VALUES: ArrayRecord(rec)})
        return Message(content, reply_to=msg)


# ---- gradient sources -------------------------------------------------------------------------


class ConvexGradients:
    """Gradients of a fedkern convex problem on the client's row: ``ClientBatch.grads``.

    ``gradients(x, config)``: the full local gradient of client ``config["fedkern"]["client_id"]``
    at x when mode is "gd" or the round asks for it (``full``), else the minibatch of
    ``batch_size`` samples keyed by ``batch_key`` -- the call the simulator's MARINA / DIANA / EF21
    make for all clients at once, so a Flower run equals the simulator bit for bit. Returns
    float32 [p] CPU.

    Args:
        batch: the ``fedkern.clients.ClientBatch`` holding the client's data.
        mode: "gd" or "sgd"; batch_size: b >= 1 (sgd).
    """

    def __init__(self, batch: ClientBatch, *, mode: str = "gd", batch_size: int = 1):
        if not isinstance(batch, ClientBatch):
            raise TypeError(f"batch must be a fedkern.clients.ClientBatch, got "
                            f"{type(batch).__name__}")  # fmt: skip
        if mode not in ("gd", "sgd"):
            raise ValueError(f"mode must be 'gd' or 'sgd', got {mode!r}")
        self.batch, self.mode = batch, mode
        self.batch_size = v.integer("batch_size", batch_size, 1)

    def __call__(self, x, config) -> torch.Tensor:
        fk = config["fedkern"]
        X = x.reshape(1, -1).to(self.batch.device, torch.float32).contiguous()
        ids = [int(fk["client_id"])]
        if self.mode == "gd" or fk["full"]:
            return self.batch.grads(X, clients=ids)[0].cpu()
        return self.batch.grads(X, clients=ids, mode="sgd", batch_size=self.batch_size,
                                step=int(fk["batch_key"]))[0].cpu()  # fmt: skip

    def __repr__(self) -> str:
        return f"ConvexGradients(n={self.batch.n}, p={self.batch.p}, mode={self.mode!r})"


class ModuleGradients(_ModuleLoss):
    """Gradients of a PyTorch module's loss: grad of loss(module(inputs), targets) + (l2/2)||x||^2.

    The flat x is split by ``config["fedkern"]["layout"]`` (the module's parameter names and
    shapes: build the initial arrays with ``method_client.module_arrays``), evaluated with
    ``torch.func.functional_call`` (the module's parameters are not modified). With batch_size and
    a round that does not ask for the full gradient: b samples without replacement keyed by (seed,
    client id, batch_key), the same samples at both points of a difference. Returns float32 [p].

    Args:
        module: the model; loss: ``loss(outputs, targets) -> scalar`` (mean reduction).
        inputs, targets: this client's data (first dimension = samples).
        batch_size: None (full batch) or an int >= 1. l2: float >= 0.
    """

    def __call__(self, x, config) -> torch.Tensor:
        fk = config["fedkern"]
        layout = fk["layout"]
        self._check_layout(layout)
        m = len(self.inputs)
        inp, tgt = self.inputs, self.targets
        if self.batch_size is not None and self.batch_size < m and not fk["full"]:
            base = client_seed(int(fk["seed"]), int(fk["client_id"]))
            gen = torch.Generator().manual_seed(client_seed(base, int(fk["batch_key"])))
            idx = torch.randperm(m, generator=gen)[: self.batch_size]
            inp, tgt = inp[idx], tgt[idx]
        return self._grad(x, layout, inp, tgt)

    def __repr__(self) -> str:
        return f"ModuleGradients({type(self.module).__name__}, samples={len(self.inputs)})"
