"""The wire protocol of fedkern's federated methods on Flower (``methods`` and ``method_client``).

Shared by the server strategies (``methods.BaseMethodStrategy`` and its subclasses) and the client
helper (``method_client.MethodClient``). Version ``PROTOCOL`` = 1. Message types (Flower's
"<category>.<action>" routing, so an app keeps its own default train / evaluate functions):

  ACTION_HELLO "query.fedkern_hello"  server -> every node, once per ``strategy.start``;
      content: ConfigRecord RECORD {protocol, method, seed};
      reply:   ConfigRecord RECORD {protocol, methods (list of str), client_id}.
  ACTION_TRAIN "train.fedkern"        server -> each cohort client, once per round;
      content: the model ArrayRecord (the strategy's ``arrayrecord_key``), the user's train
               ConfigRecord (``configrecord_key``) and ConfigRecord RECORD {protocol, method, seed,
               round, key, K, gamma, coef, n, c, s, row, slot, client_id, agg_round, sync, layout,
               shift};
      reply:   ConfigRecord RECORD {protocol, method, seed, round, client_id, row} and ArrayRecord
               VALUES {"values": float32 [k]}: the trained model's values at the k coordinates the
               client holds this round (all p for Scaffnew; ``held_mask``), minus shift * h there
               (shift = gamma / p for ProxSkip's L1 prox, else 0).
  ACTION_SYNC  "train.fedkern_sync"   server -> the aggregated cohort clients, same round (only
      when the round's sync mode is SYNC_EXCHANGE);
      content: ConfigRecord RECORD {protocol, method, seed, round, client_id, row} and ArrayRecord
               VALUES {"values": float32 [k]}: the new server model at the client's held
               coordinates;
      reply:   ConfigRecord RECORD {protocol, method, seed, round, client_id, row}.

Randomness crosses the wire as numbers: the seed, the round and its key (``Method.key``'s stream
position), K, and the client's pattern slot with (s, c); the client rebuilds its held set from
(slot, s, c, p) with ``held_mask``. Masks are never sent.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fedkern.reference.tamuna import held_by_slot

__all__ = [
    "ACTION_HELLO",
    "ACTION_SYNC",
    "ACTION_TRAIN",
    "CATCHUP",
    "PROTOCOL",
    "RECORD",
    "SYNC_EXCHANGE",
    "SYNC_NEXT",
    "VALUES",
    "flatten",
    "held_count",
    "held_index",
    "held_mask",
]

PROTOCOL = 1
ACTION_HELLO = "query.fedkern_hello"
ACTION_TRAIN = "train.fedkern"
ACTION_SYNC = "train.fedkern_sync"
#: The ConfigRecord of fedkern's protocol fields in every message and reply.
RECORD = "fedkern"
#: The ArrayRecord of the held values (array "values").
VALUES = "fedkern.values"
#: The ArrayRecord of a resent server model (array "values"; see ``methods``: catch-up).
CATCHUP = "fedkern.catchup"
#: Sync modes. SYNC_EXCHANGE: the client's control-variate update uses the new server model's
#: held coordinates, sent back in a second message of the same round. SYNC_NEXT: the update is
#: applied when the client next receives the model (exact when that is the next round, i.e. full
#: participation; otherwise the authors' deferred update, with that later round's model).
SYNC_EXCHANGE, SYNC_NEXT = "exchange", "next"

#: Error codes of the client's error replies.
ERR_PROTOCOL, ERR_METHOD, ERR_SEED, ERR_STATE, ERR_TRAIN, ERR_CLIENT = 71, 72, 73, 74, 75, 76


def held_mask(p: int, c: int, s: int, slot: int) -> torch.Tensor:
    """bool [p] CPU: the coordinates that pattern slot ``slot`` holds in a cohort of c with s
    holders per coordinate (TAMUNA's pattern: coordinate r goes to slots (s*r + j) mod c, j < s;
    every coordinate when s = c)."""
    if s == c:
        return torch.ones(p, dtype=torch.bool)
    return held_by_slot(p, c, s, slot)


def _period(c: int, s: int, slot: int) -> tuple[int, torch.Tensor]:
    """(T, base): the pattern repeats every T = c / gcd(s, c) coordinates (s T = 0 mod c), and
    slot ``slot`` holds the coordinates r = base + T m (base: int64 ascending, in [0, T))."""
    T = c // math.gcd(s, c)
    r = torch.arange(T, dtype=torch.int64)
    return T, r[torch.remainder(slot - s * r, c) < s]


def held_index(p: int, c: int, s: int, slot: int) -> torch.Tensor:
    """int64 [k] CPU, ascending: the coordinates ``held_mask(p, c, s, slot)`` marks, built from
    the pattern's period in O(k) (no p-sized mask)."""
    if s == c:
        return torch.arange(p, dtype=torch.int64)
    T, base = _period(c, s, slot)
    idx = (base[None, :] + T * torch.arange(-(-p // T), dtype=torch.int64)[:, None]).reshape(-1)
    return idx[idx < p] if idx.numel() and int(idx[-1]) >= p else idx


def held_count(p: int, c: int, s: int, slot: int) -> int:
    """k, the number of coordinates slot ``slot`` holds (= held_mask(...).sum()), in O(c)."""
    if s == c:
        return p
    T, base = _period(c, s, slot)
    q, rem = divmod(p, T)
    return base.numel() * q + int((base < rem).sum())


def held_positions(p: int, c: int, s: int, j: int, perm_slots=None) -> tuple[Tensor, Tensor]:
    """(slot, pos), int64 [p] each: coordinate r's holder j (j < s) is pattern slot
    (s r + j) mod c, and r is entry ``pos`` of that slot's ``held_index`` list -- where the
    holder's compact reply carries r's value. Built in O(p + c T) from the period."""
    T = c // math.gcd(s, c)
    r = torch.arange(p, dtype=torch.int64)
    slot = torch.remainder(s * r + j, c)
    # rank[q, t]: the rank of t among slot q's period offsets (its base); count[q] = |base|
    t = torch.arange(T, dtype=torch.int64)
    held = torch.remainder(torch.arange(c, dtype=torch.int64)[:, None] - s * t[None, :], c) < s
    rank = torch.cumsum(held.to(torch.int64), 1) - 1
    count = held.sum(1)
    pos = torch.div(r, T, rounding_mode="floor") * count[slot] + rank[slot, r % T]
    return slot, pos


def flatten(record, keys, dtype=np.float32) -> torch.Tensor:
    """The arrays of an ArrayRecord named by ``keys``, flattened in that order: [p] CPU of
    ``dtype`` (float32 by default; a copy). Raises ValueError when a key is missing or an array is
    not floating point."""
    parts = []
    for k in keys:
        if k not in record:
            raise ValueError(f"the model record has no array {k!r}")
        a = record[k].numpy()
        if a.dtype.kind != "f":
            raise ValueError(f"array {k!r} must be floating point, got {a.dtype}")
        parts.append(torch.from_numpy(np.ascontiguousarray(a, dtype=dtype).reshape(-1)))
    return torch.cat(parts) if parts else torch.from_numpy(np.zeros(0, dtype))


def header_problem(msg, method: str, want: dict) -> str | None:
    """Why the fedkern ConfigRecord of a reply is rejected (None: fine): it is missing, states
    another protocol version than PROTOCOL or another method than ``method``, or differs from
    ``want`` (field -> expected value) in any of its fields."""
    cfg = msg.content.config_records.get(RECORD)
    if cfg is None:
        return f"no {RECORD!r} ConfigRecord"
    if cfg.get("protocol") != PROTOCOL:
        return f"protocol version {cfg.get('protocol')!r}, expected {PROTOCOL}"
    if cfg.get("method") != method:
        return f"it reports method {cfg.get('method')!r}, not {method!r}"
    for k, w in want.items():
        if cfg.get(k) != w:
            return f"its {k} is {cfg.get(k)!r}, expected {w!r}"
    return None


def values_problem(msg, width: int) -> str | None:
    """Why the VALUES ArrayRecord of a reply is rejected (None: fine): it is missing, has no
    'values' array, or its values are not finite float32 of shape (width,)."""
    rec = msg.content.array_records.get(VALUES)
    if rec is None or "values" not in rec:
        return f"no {VALUES!r} ArrayRecord with 'values'"
    a = rec["values"].numpy()
    if a.dtype != np.float32 or a.shape != (width,):
        return f"values are {a.dtype} {a.shape}, expected float32 ({width},)"
    if not np.isfinite(a).all():
        return "values are not finite"
    return None


def indices_problem(msg, k: int, dim: int) -> str | None:
    """Why the top-k 'indices' of a reply's VALUES ArrayRecord are rejected (None: fine): they
    must be int64 of shape (k,), strictly ascending in [0, dim)."""
    rec = msg.content.array_records[VALUES]
    idx = rec["indices"].numpy() if "indices" in rec else None
    if idx is None or idx.dtype != np.int64 or idx.shape != (k,):
        got = None if idx is None else f"{idx.dtype} {idx.shape}"
        return f"indices are {got}, expected int64 ({k},)"
    if k and (idx[0] < 0 or idx[-1] >= dim or (np.diff(idx) <= 0).any()):
        return f"indices must be strictly ascending in [0, {dim})"
    return None
