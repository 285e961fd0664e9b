"""Benchmarks of the sparse family: sparse_add_batched_ (m = 16 messages of k entries into a dense
vector of n).

Eager baseline: dense.index_add_(0, indices.flatten(), values.flatten(), alpha=a), one call over
the m concatenated messages (faster than a Python loop of m calls). Both sides accumulate into
their own dense buffer (the cost does not depend on the values). Cases: quick n = 1e7, k = 1e5;
full adds bf16 and, on CUDA, n = 1e8 (k = 1e6).
"""

from __future__ import annotations

import torch

import fedkern
from fedkern.benchmarks.core import Case, Prepared, cases, k_of, min_bytes, nothing, randn, register

ALPHA = 1.0
M_MESSAGES = 16


def eager_sparse_add_batched_(dense, values, indices, *, alpha: float = 1.0):
    """m sparse messages into ``dense`` with one index_add_ over the concatenated messages."""
    return dense.index_add_(0, indices.reshape(-1), values.reshape(-1), alpha=alpha)


def sparse_indices(d: int, m: int, k: int, gen, device) -> torch.Tensor:
    """[m, k] int64, each row k distinct ascending indices in [0, d), uniformly spread."""
    rows = []
    for _ in range(m):
        cand = torch.unique(torch.randint(d, (k + k // 8 + 16,), generator=gen, device=device))
        while cand.numel() < k:  # only when k is close to d
            more = torch.randint(d, (k,), generator=gen, device=device)
            cand = torch.unique(torch.cat([cand, more]))
        keep = torch.randperm(cand.numel(), generator=gen, device=device)[:k]
        rows.append(cand[keep.sort().values])
    return torch.stack(rows)


def _setup_sparse(case, device, gen):
    dense0 = randn(case.n, case, device, gen)
    d_fk, d_eg = dense0, dense0.clone()
    values = randn(case.m * case.k, case, device, gen).view(case.m, case.k)
    indices = sparse_indices(case.n, case.m, case.k, gen, device)
    touched = int(torch.unique(indices).numel())
    return Prepared(
        fedkern=lambda: fedkern.sparse_add_batched_(d_fk, values, indices, alpha=ALPHA),
        eager=lambda: eager_sparse_add_batched_(d_eg, values, indices, alpha=ALPHA),
        rearm_fedkern=nothing,  # both sides accumulate, each into its own buffer
        rearm_eager=nothing,
        nbytes=min_bytes(case, touched),
        tensors={"dense_fedkern": d_fk, "dense_eager": d_eg, "values": values, "indices": indices},
    )


def _bytes(case, touched=None):
    """The m messages read, and the touched dense entries read and written."""
    es = case.dtype.itemsize
    return case.m * case.k * (es + 8) + 2 * (touched or 0) * es


def _footprint(case):
    es = case.dtype.itemsize
    return 2 * case.n * es + case.m * case.k * (es + 8) * 3


register("sparse_add_batched_", family="sparse", setup=_setup_sparse, position=200,
         stacked=True,
         eager="dense.index_add_(0, I.flatten(), V.flatten(), alpha=a) (one call)",
         nbytes=_bytes, footprint=_footprint)  # fmt: skip


@cases("sparse")
def _cases(suite, device, sizes):
    f32, b16 = torch.float32, torch.bfloat16
    if suite == "custom":
        return [Case("sparse_add_batched_", n, k_of(n), f32, M_MESSAGES) for n in sizes]
    if suite == "quick":
        return [Case("sparse_add_batched_", 10**7, 10**5, f32, M_MESSAGES)]
    big = torch.device(device).type == "cuda"
    out = [Case("sparse_add_batched_", 10**8, 10**6, f32, M_MESSAGES)] if big else []
    out.append(Case("sparse_add_batched_", 10**7, 10**5, b16, M_MESSAGES))
    if big:
        out.append(Case("sparse_add_batched_", 10**8, 10**6, b16, M_MESSAGES))
    return out
