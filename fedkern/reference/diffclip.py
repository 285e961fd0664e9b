"""Difference -> compression -> norm clipping, per client row, in plain PyTorch: the oracle all
backends match, the fallback.

G_new, G_old: [n, d] float32 or bfloat16, one client per row. Row i's message is the difference
rounded to the dtype, compressed exactly as ``topk_compress`` / ``randk_compress`` compress a
vector, then clipped by the rule of ``clip_rows_`` (``fedkern.reference.rowops``): the family is
defined by those three ops, and this file composes their references.
"""

from __future__ import annotations

import torch

from fedkern.reference.randk import randk_compress
from fedkern.reference.rowops import clip_rows_
from fedkern.reference.topk import topk_compress

Tensor = torch.Tensor


def _clip_message(values: Tensor, max_norm: Tensor) -> tuple[Tensor, Tensor]:
    """clip_rows_ on a copy of a [n, k] message; returns (clipped values, norms)."""
    out = values.clone()
    norms = clip_rows_(out, max_norm)
    return out, norms


def _row_diff(g_new: Tensor, g_old: Tensor) -> Tensor:
    return (g_new.float() - g_old.float()).to(g_new.dtype)


def diff_topk_clip(g_new: Tensor, g_old: Tensor, k: int, max_norm: Tensor):
    """Per row: top-k of round(g_new - g_old) (as topk_compress), then the message clipped.
    Returns (values [n, k], indices [n, k] int64, norms [n] float64)."""
    diff = _row_diff(g_new, g_old)
    vals, idxs = zip(*(topk_compress(row, k) for row in diff), strict=True)
    values, norms = _clip_message(torch.stack(vals), max_norm)
    return values, torch.stack(idxs), norms


def diff_randk_clip(g_new: Tensor, g_old: Tensor, k: int, keys, scale: float, max_norm: Tensor):
    """Per row i: rand-k of round(g_new - g_old) with round keys keys[i] (8 ints) and the fp32
    scale (as randk_compress), then the message clipped. Returns (values, indices, norms)."""
    diff = _row_diff(g_new, g_old)
    msgs = [randk_compress(row, k, kr, scale) for row, kr in zip(diff, keys, strict=True)]
    vals, idxs = zip(*msgs, strict=True)
    values, norms = _clip_message(torch.stack(vals), max_norm)
    return values, torch.stack(idxs), norms


def diff_clip(g_new: Tensor, g_old: Tensor, max_norm: Tensor):
    """Per row: round(g_new - g_old), clipped as clip_rows_. Returns (out [n, d], norms)."""
    return _clip_message(_row_diff(g_new, g_old), max_norm)
