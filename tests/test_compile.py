"""The ops are drop-in PyTorch ops: torch.compile traces them whole (fake impls, mutation)."""

from __future__ import annotations

import torch

import fedkern


def _step(g, e, dense):
    values, indices = fedkern.ef14_topk_(g, e, 5, lr=0.5)
    fedkern.sparse_add_(dense, values * 2, indices)
    rv, ri = fedkern.randk_compress(g, 3, seed=4, step=1)
    return values.sum() + rv.sum() + ri.sum()


def test_fullgraph_compile_matches_eager():
    g = torch.randn(100)
    e1 = torch.randn(100)
    e2 = e1.clone()
    d1, d2 = torch.zeros(100), torch.zeros(100)
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    out = compiled(g, e1, d1)
    ref = _step(g, e2, d2)
    assert torch.equal(out, ref)
    assert torch.equal(e1, e2) and torch.equal(d1, d2)
