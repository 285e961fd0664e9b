"""Client mod: send the compressed model update (with error feedback) instead of the parameters.

``make_compress_mod(compressor, error_feedback=True)`` returns a Flower client mod (a callable
``(Message, Context, call_next) -> Message`` for ``ClientApp(mods=[...])``). It works with both
client APIs:

* Message API (``@app.train()`` functions, the ``flwr new`` templates): the TRAIN message carries
  the global model in an ``ArrayRecord`` (key ``arrayrecord_key``, default "arrays", or the only
  ArrayRecord of the message); the reply's ArrayRecord under the same key (or its only one) is the
  trained model. The mod replaces it by the encoded compressed update (``codec``), tensors in the
  order of the global record's keys.
* legacy ``NumPyClient`` / ``Client`` apps (``fit`` returns ``FitRes``): the reply's
  ``FitRes.parameters`` are replaced by the encoded update.

The update of tensor t is ``returned_t - received_t`` (float32). With error feedback (EF14:
``a = e + u; c = C(a); e = a - c``) the residual ``e`` lives in the client's persistent
``context.state``, so it survives from one round to the next as Flower keeps the node's context.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
except ImportError as exc:  # pragma: no cover - flwr is optional
    raise ImportError("fedkern.integrations.flower needs Flower: pip install flwr==1.42.0") from exc

from fedkern.compress import Compressor, RandK
from fedkern.integrations.flower.codec import MAX_SEED, compress_update
from fedkern.random import client_seed

__all__ = ["CompressMod", "make_compress_mod"]

LEGACY_KEY = "fitins.parameters"


def message_arrays(content, key: str, what: str):
    """The ArrayRecord of a message's content: under ``key``, else its only ArrayRecord.

    Raises ValueError naming ``what`` (the message) when there is none or several without ``key``.
    """
    records = content.array_records
    if key in records:
        return key, records[key]
    if len(records) == 1:
        (only,) = records.keys()
        return only, records[only]
    raise ValueError(f"{what} has {len(records)} ArrayRecords and none named {key!r}")


class CompressMod:
    """Flower client mod that compresses the update a client's ``fit`` returns.

    Build it with ``make_compress_mod`` (which documents the behaviour).

    State in ``context.state`` (``state_key`` defaults to "fedkern.compress"): a ConfigRecord
    ``state_key`` with ``step`` (the compressed replies sent so far) and, with error feedback, an
    ArrayRecord ``state_key + ".ef"`` with the T float32 residuals (shaped like the tensors).
    """

    def __init__(self, compressor: Compressor, *, error_feedback: bool = True,
                 state_key: str = "fedkern.compress", arrayrecord_key: str = "arrays"):  # fmt: skip
        if not isinstance(compressor, Compressor):
            raise TypeError(
                "compressor must be a fedkern.compress.Compressor (TopK, RandK, ...), got "
                f"{type(compressor).__name__}"
            )
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be a bool, got {type(error_feedback).__name__}")
        if error_feedback and isinstance(compressor, RandK) and compressor.unbiased:
            raise ValueError(
                "error_feedback needs a contractive compressor: use RandK(..., unbiased=False) "
                "(the unbiased d/k scaling makes the EF14 residual grow)"
            )
        if not isinstance(state_key, str) or not state_key:
            raise TypeError("state_key must be a non-empty str")
        if not isinstance(arrayrecord_key, str) or not arrayrecord_key:
            raise TypeError("arrayrecord_key must be a non-empty str")
        self.compressor = compressor
        self.error_feedback = error_feedback
        self.state_key = state_key
        self.arrayrecord_key = arrayrecord_key

    def __call__(self, msg: Message, ctxt: Context, call_next) -> Message:
        """Run the inner app; on a successful TRAIN reply, compress its update."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if LEGACY_KEY in msg.content.array_records:
            return self._legacy(msg, ctxt, call_next)
        key, sent_rec = message_arrays(msg.content, self.arrayrecord_key, "the TRAIN message")
        keys = list(sent_rec.keys())
        # copy the global arrays before the inner app may consume or change the content
        sent = [np.array(sent_rec[k].numpy()) for k in keys]
        out = call_next(msg, ctxt)
        if out.has_error():
            return out
        key, new_rec = message_arrays(out.content, key, "the TRAIN reply")
        missing = [k for k in keys if k not in new_rec]
        if missing:
            raise ValueError(f"the TRAIN reply lacks the arrays {missing} of the global model")
        new = [new_rec[k].numpy() for k in keys]
        out.content[key] = ArrayRecord(self._encode(new, sent, ctxt))
        return out

    def _legacy(self, msg: Message, ctxt: Context, call_next) -> Message:
        # read the global parameters before the inner app consumes the content
        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        sent = parameters_to_ndarrays(fit_ins.parameters)
        out = call_next(msg, ctxt)
        if out.has_error():
            return out
        fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
        new = parameters_to_ndarrays(fit_res.parameters)
        fit_res.parameters = ndarrays_to_parameters(self._encode(new, sent, ctxt))
        out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
        return out

    def _encode(self, new, sent, ctxt: Context) -> list[np.ndarray]:
        """The encoded compressed update new - sent; advances the state in ``ctxt.state``."""
        if len(new) != len(sent):
            raise ValueError(f"fit returned {len(new)} arrays for {len(sent)} global parameters")
        update = []
        for t, (a, b) in enumerate(zip(new, sent, strict=True)):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"fit returned tensor {t} of shape {np.shape(a)}, the global "
                                 f"parameter has shape {np.shape(b)}")  # fmt: skip
            update.append(np.asarray(a, np.float32) - np.asarray(b, np.float32))
        conf = ctxt.state.config_records.get(self.state_key)
        step = int(conf["step"]) if conf is not None else 0
        residual = None
        if self.error_feedback:
            rec = ctxt.state.array_records.get(self.state_key + ".ef")
            if rec is None:
                residual = [torch.zeros(u.size, dtype=torch.float32) for u in update]
            else:
                saved = rec.to_numpy_ndarrays()
                if [a.shape for a in saved] != [u.shape for u in update]:
                    raise ValueError("the error-feedback residual in context.state does not match "
                                     "the model's tensor shapes")  # fmt: skip
                residual = [torch.from_numpy(np.array(a, np.float32).reshape(-1)) for a in saved]
        seed = 0
        if isinstance(self.compressor, RandK):
            seed = client_seed(self.compressor.seed, int(ctxt.node_id) & MAX_SEED)
        encoded = compress_update(update, self.compressor, residual=residual, seed=seed, step=step)
        if residual is not None:
            ctxt.state[self.state_key + ".ef"] = ArrayRecord(
                [e.numpy().reshape(u.shape) for e, u in zip(residual, update, strict=True)]
            )
        ctxt.state[self.state_key] = ConfigRecord({"step": step + 1})
        return encoded

    def __repr__(self) -> str:
        return f"CompressMod({self.compressor!r}, error_feedback={self.error_feedback})"


def make_compress_mod(compressor: Compressor, *, error_feedback: bool = True,
                      arrayrecord_key: str = "arrays") -> CompressMod:  # fmt: skip
    """A Flower client mod that sends the compressed update instead of the parameters.

    After the inner ``ClientApp`` (a Message-API ``@app.train()`` function or a legacy
    ``NumPyClient``'s ``fit``) replies to a TRAIN message, the mod computes the update
    u_t = returned_t - received_t (float32) of every tensor t and replaces the reply's model by
    the encoded compressed update (module docstring). Other messages, and replies that carry an
    error, pass through untouched.

    Args:
        compressor: ``fedkern.compress.TopK`` (fused ``ef14_topk_``), ``RandK`` (fused
            ``ef14_randk_``; only values and (seed, step) are sent) or any ``Compressor``. k is
            per tensor: ``compressor.k_for(numel_t)``. The compressor object is shared by every
            node the ClientApp serves and is never mutated (RandK's step lives in context.state).
        error_feedback: keep the EF14 residual in ``context.state`` (float32, one per tensor):
            ``a = e + u; c = C(a); e = a - c``. Needs a contractive compressor (RandK with
            ``unbiased=False``). Without it each round's update is compressed on its own.
        arrayrecord_key: the Message API's key of the model's ArrayRecord (the strategy's
            ``arrayrecord_key``; a message with a single ArrayRecord works with any key).

    Returns:
        A ``CompressMod`` for ``flwr.client.ClientApp(client_fn, mods=[mod])``.

    Raises:
        TypeError: compressor is not a fedkern Compressor; error_feedback is not a bool.
        ValueError: error_feedback with an unbiased RandK.
    """
    return CompressMod(compressor, error_feedback=error_feedback, arrayrecord_key=arrayrecord_key)
