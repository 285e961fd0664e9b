"""Benchmark cases: each fedkern op against the way a competent user writes it in eager PyTorch.

A :class:`Case` names an op, a size and a dtype. ``case.setup(device)`` builds the inputs (fresh,
from a fixed seed, so every run and both sides see the same data) and returns a :class:`Prepared`
with the fedkern call, the eager baseline, the re-arming of mutated buffers and the bytes the op
must move. :func:`run_case` times both sides interleaved, repetition by repetition, and reports
medians. The same cases drive ``fedkern bench`` (fedkern.cli) and the pytest-benchmark suites in
bench/.

Eager baselines (``eager_*`` below; 1-D inputs, the indices unsorted as torch returns them):

  topk_compress        i = x.abs().topk(k, sorted=False).indices; v = x[i]
  randk_compress       i = torch.randperm(n)[:k]; v = x[i] * (n/k)
  ef14_topk_           e.add_(g, alpha=lr); i = e.abs().topk(k, sorted=False).indices
                       v = e[i]; e[i] = 0
  ef21_topk_           d = g - s; i = d.abs().topk(k, sorted=False).indices; v = d[i]; s[i] += v
  ef14_randk_          e.add_(g, alpha=lr); i = torch.randperm(n)[:k]; v = e[i]; e[i] = 0
  ef21_randk_          i = torch.randperm(n)[:k]; v = g[i] - s[i]; s[i] += v
  sparse_add_batched_  dense.index_add_(0, indices.flatten(), values.flatten(), alpha=a): one call
                       over the m concatenated messages (faster than a Python loop of m calls)
  microadam_step_      MicroAdam.step() on n parameters in 4 tensors (40/30/20/10%), default
                       options, weight decay 0.01: against the same optimizer on the reference
                       backend (plain PyTorch, the eager way to write MicroAdam)
  coordinate_median    torch.median(X, dim=0).values on a stack X of m client vectors [m, n] (for
                       even m torch returns the lower middle value; fedkern the mean of both)
  trimmed_mean         X.sort(dim=0).values[f:m-f].mean(0), f = k = m // 4
  krum                 D = torch.cdist(X, X) ** 2 (diagonal inf); scores = the n-f-2 smallest per
                       row summed; X[scores.argmin()], f = k = m // 4
  nnm                  D = torch.cdist(X, X) ** 2; the n-f nearest per row; W @ X with W the
                       [m, m] averaging matrix of the neighbours (one sgemm), f = k = m // 4
  geometric_median     a Python Weiszfeld loop: r = (X - z).norm(dim=1); w = 1 / r.clamp_min(nu);
                       z = (w[:, None] * X).sum(0) / w.sum(), k = 8 iterations, nu = 0.1
  centered_clip        a Python loop: u = X - v; s = (tau / u.norm(dim=1)).clamp(max=1);
                       v = v + (s[:, None] * u).mean(0), k = 3 iterations, tau = 1
  clip_rows_           norms = X.norm(dim=1); X.mul_((c / norms).clamp(max=1)[:, None])
  diff_compress_clip   D = G_new - G_old; i = D.abs().topk(k, dim=1).indices; v = D.gather(1, i);
                       v.mul_((c / v.norm(dim=1)).clamp(max=1)[:, None]), k = n // 100 per row
  local_steps_vs_loop  one round of K = k local GD steps for n logistic-regression clients (d = 100
                       features + bias, m = 50 samples each) by ClientBatch.local_steps_,
                       against a Python loop over clients with torch.optim.SGD
  local_steps_vs_vmap  the same round against K steps of torch.func.vmap(grad(loss)) (eager)
  module_steps_vs_loop the same round for an MLP 20-32-10 (cross-entropy, m = 50 samples) by
                       ModuleClients (torch.func + the fused clipping/update), against the loop
  microadam_vs_adamw   the same fedkern step against torch.optim.AdamW (foreach=True on CPU,
                       fused=True on CUDA) on the same parameters; the records also carry the
                       optimizer state in bytes per parameter of both sides

Fairness: the mutated buffer (EF error / state) is restored from a pristine copy before every
repetition of either side, untimed; sparse_add_batched_ accumulates into its own dense buffer on
both sides (the cost does not depend on the values). Rand-k calls advance ``step`` every call, as
training does. Timing: warm-up, then fedkern and eager alternate; per repetition, CUDA events
around the call on a synchronized device (CPU: perf_counter). ``ratio = eager / fedkern`` (> 1:
fedkern is faster); ``GB/s = bytes / fedkern time`` with ``bytes`` the traffic the op cannot avoid
(see :func:`min_bytes`).

Peak memory: on CUDA the growth of ``torch.cuda.max_memory_allocated`` over one call (outputs
included); on Linux CPUs the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after ``malloc_trim``) over one call; elsewhere None.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

import fedkern

SEED = 1234
LR = 0.5
ALPHA = 1.0
M_MESSAGES = 16

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

FAMILY = {
    "topk_compress": "topk",
    "ef14_topk_": "topk",
    "ef21_topk_": "topk",
    "randk_compress": "randk",
    "ef14_randk_": "randk",
    "ef21_randk_": "randk",
    "sparse_add_batched_": "sparse",
    "microadam_step_": "microadam",
    "microadam_vs_adamw": "microadam",
    "coordinate_median": "robust",
    "trimmed_mean": "robust",
    "krum": "gram",
    "nnm": "rowops",
    "geometric_median": "rowops",
    "centered_clip": "rowops",
    "clip_rows_": "rowops",
    "diff_compress_clip": "diffclip",
    "local_steps_vs_loop": "clients",
    "local_steps_vs_vmap": "clients",
    "module_steps_vs_loop": "clients",
}
#: Cases over a stack of m client vectors of n coordinates (m is shown next to n).
STACKED = ("local_steps_vs_loop", "local_steps_vs_vmap", "module_steps_vs_loop",
           "sparse_add_batched_", "coordinate_median", "trimmed_mean", "krum", "nnm",
           "geometric_median", "centered_clip", "clip_rows_", "diff_compress_clip")  # fmt: skip
#: Benchmark cases that time an op under another name (a second baseline, or the kernel op that
#: does the heavy work of a composed function).
IMPL_OP = {
    "microadam_vs_adamw": "microadam_step_",
    "krum": "gram",
    "nnm": "gather_mean",
    "diff_compress_clip": "diff_topk_clip",
    "local_steps_vs_loop": "local_steps_",
    "local_steps_vs_vmap": "local_steps_",
    "module_steps_vs_loop": "local_steps_",
}
#: Ops whose fedkern kernel must read the whole input (compared with one read at copy bandwidth).
FULL_PASS = ("topk_compress", "ef14_topk_", "ef21_topk_", "ef14_randk_")

EAGER = {
    "topk_compress": "x.abs().topk(k, sorted=False) + x[i]",
    "randk_compress": "x[randperm(n)[:k]] * (n/k)",
    "ef14_topk_": "e.add_(g, alpha=lr); topk(e.abs()); v = e[i]; e[i] = 0",
    "ef21_topk_": "d = g - s; topk(d.abs()); v = d[i]; s[i] += v",
    "ef14_randk_": "e.add_(g, alpha=lr); i = randperm(n)[:k]; v = e[i]; e[i] = 0",
    "ef21_randk_": "i = randperm(n)[:k]; v = g[i] - s[i]; s[i] += v",
    "sparse_add_batched_": "dense.index_add_(0, I.flatten(), V.flatten(), alpha=a) (one call)",
    "microadam_step_": "MicroAdam.step() on the reference backend (plain PyTorch)",
    "microadam_vs_adamw": "torch.optim.AdamW.step() (foreach=True on CPU, fused=True on CUDA)",
    "coordinate_median": "torch.median(X, dim=0).values",
    "trimmed_mean": "X.sort(dim=0).values[f:m-f].mean(0)",
    "krum": "torch.cdist(X, X)**2 -> scores -> X[argmin]",
    "nnm": "torch.cdist(X, X)**2 -> neighbours -> W @ X",
    "geometric_median": "Python Weiszfeld loop, 8 iterations",
    "centered_clip": "Python centered-clipping loop, 3 iterations",
    "clip_rows_": "X.mul_((c / X.norm(dim=1)).clamp(max=1)[:, None])",
    "diff_compress_clip": "D = G_new - G_old; D.abs().topk(k, dim=1); gather; clip",
    "local_steps_vs_loop": "for each client: torch.optim.SGD, K x (loss, backward, step)",
    "local_steps_vs_vmap": "K x torch.func.vmap(torch.func.grad(loss)) over the stacked clients",
    "module_steps_vs_loop": "MLP: for each client: torch.optim.SGD, K x (loss, backward, step)",
}


# --------------------------------------------------------------------------- eager baselines


def _perm(n: int, k: int, device) -> torch.Tensor:
    return torch.randperm(n, device=device)[:k]


def eager_topk(x: torch.Tensor, k: int):
    """(values, indices) of the k largest |x|, the way eager PyTorch does it."""
    i = x.abs().topk(k, sorted=False).indices
    return x[i], i


def eager_randk(x: torch.Tensor, k: int, *, unbiased: bool = True, indices=None):
    """Rand-k through randperm; ``indices`` replaces the draw (tests compare like with like)."""
    n = x.numel()
    i = _perm(n, k, x.device) if indices is None else indices
    v = x[i]
    return (v * (n / k) if unbiased else v), i


def eager_ef14_topk_(g, e, k: int, *, lr: float = 1.0):
    """Classic error feedback with top-k in eager PyTorch; mutates ``e``."""
    e.add_(g, alpha=lr)
    i = e.abs().topk(k, sorted=False).indices
    v = e[i]
    e[i] = 0
    return v, i


def eager_ef21_topk_(g, s, k: int):
    """EF21 with top-k in eager PyTorch; mutates ``s``."""
    d = g - s
    i = d.abs().topk(k, sorted=False).indices
    v = d[i]
    s[i] += v
    return v, i


def eager_ef14_randk_(g, e, k: int, *, lr: float = 1.0, unbiased: bool = False, indices=None):
    """Classic error feedback with rand-k (randperm) in eager PyTorch; mutates ``e``."""
    n = e.numel()
    e.add_(g, alpha=lr)
    i = _perm(n, k, e.device) if indices is None else indices
    if unbiased:
        v = e[i] * (n / k)
        e[i] -= v
    else:
        v = e[i]
        e[i] = 0
    return v, i


def eager_ef21_randk_(g, s, k: int, *, unbiased: bool = False, indices=None):
    """EF21 with rand-k (randperm) in eager PyTorch; mutates ``s``."""
    n = s.numel()
    i = _perm(n, k, s.device) if indices is None else indices
    v = g[i] - s[i]
    if unbiased:
        v = v * (n / k)
    s[i] += v
    return v, i


def eager_sparse_add_batched_(dense, values, indices, *, alpha: float = 1.0):
    """m sparse messages into ``dense`` with one index_add_ over the concatenated messages."""
    return dense.index_add_(0, indices.reshape(-1), values.reshape(-1), alpha=alpha)


# --------------------------------------------------------------------------- cases


@dataclass
class Prepared:
    """Ready-to-time callables over one case's inputs (see the module docstring)."""

    fedkern: Callable[[], object]
    eager: Callable[[], object]
    rearm_fedkern: Callable[[], None]
    rearm_eager: Callable[[], None]
    nbytes: int
    tensors: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # merged into the result record


def _nothing() -> None:
    return None


def _restore(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
    def rearm() -> None:
        dst.copy_(src)

    return rearm


@dataclass(frozen=True)
class Case:
    """One benchmark: ``op`` on ``n`` elements (the dense size for sparse ops), keep ``k``.

    For ``sparse_add_batched_``, ``m`` messages of ``k`` entries each go into a dense [n] vector.
    """

    op: str
    n: int
    k: int
    dtype: torch.dtype = torch.float32
    m: int = 1

    @property
    def family(self) -> str:
        return FAMILY[self.op]

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def id(self) -> str:
        """Unique, filterable name, e.g. ``topk_compress-n1e7-k1e5-fp32``."""
        m = f"-m{self.m}" if self.op in STACKED else ""
        return f"{self.op}-n{fmt_n(self.n)}{m}-k{fmt_n(self.k)}-{self.dtype_name}"

    @property
    def eager_desc(self) -> str:
        return EAGER[self.op]

    def full_pass(self) -> bool:
        return self.op in FULL_PASS

    def footprint(self) -> int:
        """Rough bytes both sides need at once (inputs, copies, eager temporaries)."""
        es = self.dtype.itemsize
        if self.op == "sparse_add_batched_":
            return 2 * self.n * es + self.m * self.k * (es + 8) * 3
        if self.family == "robust":  # X, the sorted copy and its int64 indices, fp32 temps
            return self.m * self.n * (2 * es + 8 + 8)
        if self.family == "clients":  # the packed data (float64 oracle copy included)
            return self.n * self.m * (CLIENT_DIM + 2) * 16
        if self.family in ("gram", "rowops", "diffclip"):  # X (two for differences), temporaries
            return self.m * self.n * (4 * es + 8)
        if self.family == "microadam":  # params + grads twice, AdamW moments, reference temps
            return 4 * self.n * es + 8 * self.n + 40 * self.n
        return 6 * self.n * es + 2 * self.n * 8  # buffers + abs/diff temps + randperm's int64s

    def setup(self, device) -> Prepared:
        """Fresh inputs from a fixed seed on ``device`` and the two calls over them."""
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(SEED)
        return _SETUP[self.op](self, device, gen)


def fmt_n(n: int) -> str:
    """1000000 -> '1e6', 20000 -> '2e4', 12345 -> '12345'."""
    if n >= 1000:
        e = int(math.floor(math.log10(n)))
        mant, rem = divmod(n, 10**e)
        if rem == 0:
            return f"{mant}e{e}"
    return str(n)


def _randn(n, case: Case, device, gen, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        x.mul_(scale)
    return x.to(case.dtype)


def min_bytes(case: Case, touched: int | None = None) -> int:
    """Bytes the op must move at least: reads of its inputs, writes of its outputs.

    ``touched`` (sparse_add_batched_ only) is the number of distinct dense entries the messages hit.
    """
    n, k, es = case.n, case.k, case.dtype.itemsize
    out = k * (es + 8)  # values + int64 indices written
    return {
        "topk_compress": n * es + out,
        "randk_compress": k * es + out,  # gathers k entries
        "ef14_topk_": 3 * n * es + out,  # read g, read + write e
        "ef21_topk_": 2 * n * es + k * es + out,  # read g, s; write s at k entries
        "ef14_randk_": 3 * n * es + out,
        "ef21_randk_": 3 * k * es + out,  # g[I], s[I] read, s[I] written
        "sparse_add_batched_": case.m * k * (es + 8) + 2 * (touched or 0) * es,
        "coordinate_median": case.m * n * es + n * es,  # read the stack, write one vector
        "trimmed_mean": case.m * n * es + n * es,
        "krum": case.m * n * es,  # one read for the Gram matrix (the winner's copy is small)
        "nnm": 2 * case.m * n * es,  # read the stack, write the mixed stack
        "geometric_median": 2 * k * case.m * n * es,  # two reads per iteration
        "centered_clip": 2 * k * case.m * n * es,
        "clip_rows_": 3 * case.m * n * es,  # read for the norms, read + write to scale
        "diff_compress_clip": 2 * case.m * n * es + case.m * k * (es + 8),
        # the data once per local step (it stays in cache between steps on a CPU)
        "local_steps_vs_loop": n * case.m * (CLIENT_DIM + 2) * 4,
        "local_steps_vs_vmap": n * case.m * (CLIENT_DIM + 2) * 4,
        "module_steps_vs_loop": n * case.m * (MLP[0] + 1) * 4,
        "microadam_step_": microadam_bytes_moved(n, es),
        "microadam_vs_adamw": microadam_bytes_moved(n, es),
    }[case.op]


def microadam_bytes_moved(n: int, es: int, *, m: int = 10, k: int = 41, block: int = 4096,
                          bucket: int = 256, decay: bool = True) -> int:  # fmt: skip
    """Bytes one MicroAdam step must move for n parameters of ``es`` bytes: read the gradient,
    read and write the 4-bit error feedback and its bucket statistics, write one window row,
    read the whole window, and read + write the parameters (only the window's entries when
    there is no weight decay)."""
    stats = 2 * 2 * 4 * n // bucket
    window_row = n * k // block * 4
    params = 2 * n * es if decay else 2 * m * window_row // 4 * es
    return n * es + n + stats + window_row + m * window_row + params


def _setup_topk(case, device, gen):
    x = _randn(case.n, case, device, gen)
    return Prepared(
        fedkern=lambda: fedkern.topk_compress(x, case.k),
        eager=lambda: eager_topk(x, case.k),
        rearm_fedkern=_nothing,
        rearm_eager=_nothing,
        nbytes=min_bytes(case),
        tensors={"x": x},
    )


def _setup_randk(case, device, gen):
    x = _randn(case.n, case, device, gen)
    step = itertools.count()
    return Prepared(
        fedkern=lambda: fedkern.randk_compress(x, case.k, seed=SEED, step=next(step)),
        eager=lambda: eager_randk(x, case.k, unbiased=True),
        rearm_fedkern=_nothing,
        rearm_eager=_nothing,
        nbytes=min_bytes(case),
        tensors={"x": x},
    )


def _setup_feedback(case, device, gen):
    g = _randn(case.n, case, device, gen)
    buf0 = _randn(case.n, case, device, gen, 0.1 if case.op.startswith("ef14") else 1.0)
    b_fk, b_eg = buf0.clone(), buf0.clone()
    k, step = case.k, itertools.count()
    fk, eg = {
        "ef14_topk_": (
            lambda: fedkern.ef14_topk_(g, b_fk, k, lr=LR),
            lambda: eager_ef14_topk_(g, b_eg, k, lr=LR),
        ),
        "ef21_topk_": (
            lambda: fedkern.ef21_topk_(g, b_fk, k),
            lambda: eager_ef21_topk_(g, b_eg, k),
        ),
        "ef14_randk_": (
            lambda: fedkern.ef14_randk_(g, b_fk, k, seed=SEED, step=next(step), lr=LR),
            lambda: eager_ef14_randk_(g, b_eg, k, lr=LR),
        ),
        "ef21_randk_": (
            lambda: fedkern.ef21_randk_(g, b_fk, k, seed=SEED, step=next(step)),
            lambda: eager_ef21_randk_(g, b_eg, k),
        ),
    }[case.op]
    return Prepared(
        fedkern=fk,
        eager=eg,
        rearm_fedkern=_restore(b_fk, buf0),
        rearm_eager=_restore(b_eg, buf0),
        nbytes=min_bytes(case),
        tensors={"grad": g, "buf0": buf0, "buf_fedkern": b_fk, "buf_eager": b_eg},
    )


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
    dense0 = _randn(case.n, case, device, gen)
    d_fk, d_eg = dense0, dense0.clone()
    values = _randn(case.m * case.k, case, device, gen).view(case.m, case.k)
    indices = sparse_indices(case.n, case.m, case.k, gen, device)
    touched = int(torch.unique(indices).numel())
    return Prepared(
        fedkern=lambda: fedkern.sparse_add_batched_(d_fk, values, indices, alpha=ALPHA),
        eager=lambda: eager_sparse_add_batched_(d_eg, values, indices, alpha=ALPHA),
        rearm_fedkern=_nothing,  # both sides accumulate, each into its own buffer
        rearm_eager=_nothing,
        nbytes=min_bytes(case, touched),
        tensors={"dense_fedkern": d_fk, "dense_eager": d_eg, "values": values, "indices": indices},
    )


def _setup_robust(case, device, gen):
    x = _randn(case.m * case.n, case, device, gen).view(case.m, case.n)
    m, f = case.m, case.k
    if case.op == "coordinate_median":
        fk = lambda: fedkern.robust.coordinate_median(x)  # noqa: E731
        eg = lambda: torch.median(x, dim=0).values  # noqa: E731
    else:
        fk = lambda: fedkern.robust.trimmed_mean(x, f)  # noqa: E731
        eg = lambda: x.sort(dim=0).values[f : m - f].mean(0)  # noqa: E731
    return Prepared(
        fedkern=fk, eager=eg, rearm_fedkern=_nothing, rearm_eager=_nothing,
        nbytes=min_bytes(case), tensors={"x": x},
    )  # fmt: skip


def _setup_rows(case, device, gen):
    """Krum, NNM, Weiszfeld, centered clipping, row clipping and difference-compress-clip."""
    from fedkern import robust as R

    m, d, k = case.m, case.n, case.k
    x = _randn(m * d, case, device, gen).view(m, d)
    tensors = {"x": x}
    rearm_fk = rearm_eg = _nothing

    def sqdist():
        D = torch.cdist(x.float(), x.float()) ** 2
        return D.fill_diagonal_(math.inf)

    if case.op == "krum":
        fk = lambda: R.krum(x, k)  # noqa: E731

        def eg():
            scores = sqdist().topk(m - k - 2, dim=1, largest=False).values.sum(1)
            return x[scores.argmin()]

    elif case.op == "nnm":
        fk = lambda: R.nnm(x, k)  # noqa: E731

        def eg():
            D = sqdist().fill_diagonal_(-1.0)
            near = D.topk(m - k, dim=1, largest=False).indices
            W = torch.zeros(m, m, device=device).scatter_(1, near, 1.0 / (m - k))
            return (W @ x.float()).to(x.dtype)

    elif case.op == "geometric_median":
        fk = lambda: R.geometric_median(x, iters=k, nu=0.1)  # noqa: E731

        def eg():
            xf, z = x.float(), torch.zeros(d, device=device)
            for _ in range(k):
                w = 1 / (xf - z).norm(dim=1).clamp_min(0.1)
                z = (w[:, None] * xf).sum(0) / w.sum()
            return z.to(x.dtype)

    elif case.op == "centered_clip":
        fk = lambda: R.centered_clip(x, tau=1.0, iters=k)  # noqa: E731

        def eg():
            xf, v = x.float(), torch.zeros(d, device=device)
            for _ in range(k):
                u = xf - v
                v = v + ((1.0 / u.norm(dim=1)).clamp(max=1)[:, None] * u).mean(0)
            return v.to(x.dtype)

    elif case.op == "clip_rows_":
        pristine = x.clone()
        y = x.clone()
        bound = math.sqrt(d) / 2  # about half the rows' norm: every row is scaled
        tensors.update(y=y, pristine=pristine)
        rearm_fk, rearm_eg = _restore(x, pristine), _restore(y, pristine)
        fk = lambda: R.clip_rows_(x, bound)  # noqa: E731

        def eg():
            y.mul_((bound / y.float().norm(dim=1)).clamp(max=1)[:, None].to(y.dtype))

    else:  # diff_compress_clip with top-k
        from fedkern.compress import TopK

        old = _randn(m * d, case, device, gen).view(m, d)
        tensors["old"] = old
        bound = 1.0
        fk = lambda: R.diff_compress_clip(x, old, TopK(k), bound)  # noqa: E731

        def eg():
            D = x - old
            i = D.abs().topk(k, dim=1, sorted=False).indices
            v = D.gather(1, i)
            v.mul_((bound / v.float().norm(dim=1)).clamp(max=1)[:, None].to(v.dtype))
            return v, i

    return Prepared(
        fedkern=fk, eager=eg, rearm_fedkern=rearm_fk, rearm_eager=rearm_eg,
        nbytes=min_bytes(case), tensors=tensors,
    )  # fmt: skip


CLIENT_OPS_NAMES = ("local_steps_vs_loop", "local_steps_vs_vmap", "module_steps_vs_loop")
CLIENT_DIM = 100  # logistic-regression features per sample (plus a bias column)
MLP = (20, 32, 10)  # the generic-path model: in, hidden, classes


def _setup_clients(case, device, gen):
    """One round of K local GD steps for n clients of m samples each (see EAGER)."""
    from fedkern.clients import ClientBatch, ModuleClients
    from fedkern.problems import Problem

    n, K, m = case.n, case.k, case.m
    gamma = 0.1
    parts = [torch.arange(i * m, (i + 1) * m) for i in range(n)]
    if case.op == "module_steps_vs_loop":
        torch.manual_seed(SEED)
        model = torch.nn.Sequential(torch.nn.Linear(MLP[0], MLP[1]), torch.nn.Tanh(),
                                    torch.nn.Linear(MLP[1], MLP[2])).to(device)  # fmt: skip
        inputs = torch.randn(n * m, MLP[0], generator=gen, device=device)
        targets = torch.randint(0, MLP[2], (n * m,), generator=gen, device=device)

        def loss(out, tgt):
            return torch.nn.functional.cross_entropy(out, tgt, reduction="none")

        mc = ModuleClients(model, loss, inputs, targets, parts)
        X0 = mc.flat().expand(n, -1).contiguous()
        X = X0.clone()
        fk = lambda: mc.local_steps_(X, gamma=gamma, steps=K)  # noqa: E731
        local = [torch.nn.Sequential(torch.nn.Linear(MLP[0], MLP[1]), torch.nn.Tanh(),
                                     torch.nn.Linear(MLP[1], MLP[2])).to(device)
                 for _ in range(2)]  # fmt: skip

        def eg():
            for i in range(n):
                net = local[i % 2]
                net.load_state_dict(model.state_dict())
                opt = torch.optim.SGD(net.parameters(), lr=gamma)
                xi, ti = inputs[i * m : (i + 1) * m], targets[i * m : (i + 1) * m]
                for _ in range(K):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(xi), ti).backward()
                    opt.step()

        return Prepared(fedkern=fk, eager=eg, rearm_fedkern=_restore(X, X0), rearm_eager=_nothing,
                        nbytes=min_bytes(case), tensors={"X": X})  # fmt: skip
    d = CLIENT_DIM + 1
    A = torch.randn(n * m, d, generator=gen, dtype=torch.float64)
    A[:, -1] = 1.0
    y = (torch.rand(n * m, generator=gen) < 0.5).double()
    problem = Problem(A.cpu(), y.cpu(), parts, "logistic", 1e-3)
    batch = ClientBatch(problem, device=device)
    X0 = torch.zeros(n, d, device=device)
    X = X0.clone()
    fk = lambda: batch.local_steps_(X, gamma=gamma, steps=K)  # noqa: E731
    Af, yf = batch.A.view(n, m, d), batch.y.view(n, m)
    l2 = problem.l2
    if case.op == "local_steps_vs_vmap":
        from torch.func import grad, vmap

        def objective(x, a, t):
            z = a @ x
            return torch.nn.functional.binary_cross_entropy_with_logits(z, t) + 0.5 * l2 * (x @ x)

        step = vmap(grad(objective))
        Y = X0.clone()

        def eg():
            for _ in range(K):
                Y.sub_(step(Y, Af, yf), alpha=gamma)

        rearm_eg = _restore(Y, X0)
    else:
        W = [torch.nn.Linear(d, 1, bias=False).to(device) for _ in range(2)]

        def eg():
            for i in range(n):
                lin = W[i % 2]
                with torch.no_grad():
                    lin.weight.zero_()
                opt = torch.optim.SGD(lin.parameters(), lr=gamma, weight_decay=l2)
                for _ in range(K):
                    opt.zero_grad()
                    z = lin(Af[i])[:, 0]
                    torch.nn.functional.binary_cross_entropy_with_logits(z, yf[i]).backward()
                    opt.step()

        rearm_eg = _nothing
    return Prepared(fedkern=fk, eager=eg, rearm_fedkern=_restore(X, X0), rearm_eager=rearm_eg,
                    nbytes=min_bytes(case), tensors={"X": X, "A": Af})  # fmt: skip


MICROADAM_SPLIT = (0.4, 0.3, 0.2, 0.1)


def _setup_microadam(case, device, gen):
    from fedkern.optim import MicroAdam

    sizes = [int(case.n * f) for f in MICROADAM_SPLIT]
    sizes[0] += case.n - sum(sizes)
    init = [_randn(s, case, device, gen) for s in sizes]
    grads = [_randn(s, case, device, gen, 1e-2) for s in sizes]

    def params():
        out = [torch.nn.Parameter(x.clone()) for x in init]
        for p, g in zip(out, grads, strict=True):
            p.grad = g
        return out

    opts = {"lr": 1e-3, "weight_decay": 0.01}
    fk = MicroAdam(params(), **opts)
    if case.op == "microadam_step_":
        eg = MicroAdam(params(), **opts)

        def eager() -> None:
            with fedkern.backend("reference"):
                eg.step()

    else:
        flag = {"fused": True} if device.type == "cuda" else {"foreach": True}
        eg = torch.optim.AdamW(params(), **opts, **flag)
        eager = eg.step
    fk.step()  # allocate the state outside the timed calls
    eager()

    def state_bytes(opt) -> int:
        return sum(t.numel() * t.element_size() for st in opt.state.values()
                   for t in st.values() if isinstance(t, torch.Tensor))  # fmt: skip

    return Prepared(
        fedkern=fk.step,
        eager=eager,
        rearm_fedkern=_nothing,  # a step costs the same whatever the parameter values
        rearm_eager=_nothing,
        nbytes=min_bytes(case),
        tensors={"grads": grads, "fedkern_optimizer": fk, "eager_optimizer": eg},
        extra={
            "state_bytes_per_param": state_bytes(fk) / case.n,
            "eager_state_bytes_per_param": state_bytes(eg) / case.n,
        },  # fmt: skip
    )


_SETUP = {
    "topk_compress": _setup_topk,
    "randk_compress": _setup_randk,
    "ef14_topk_": _setup_feedback,
    "ef21_topk_": _setup_feedback,
    "ef14_randk_": _setup_feedback,
    "ef21_randk_": _setup_feedback,
    "sparse_add_batched_": _setup_sparse,
    "microadam_step_": _setup_microadam,
    "microadam_vs_adamw": _setup_microadam,
    "coordinate_median": _setup_robust,
    "trimmed_mean": _setup_robust,
    **dict.fromkeys(
        ("krum", "nnm", "geometric_median", "centered_clip", "clip_rows_", "diff_compress_clip"),
        _setup_rows,
    ),  # fmt: skip
    **dict.fromkeys(CLIENT_OPS_NAMES, _setup_clients),
}

OPS = tuple(_SETUP)


def _k_of(n: int) -> int:
    return max(1, n // 100)


MICROADAM_OPS = ("microadam_step_", "microadam_vs_adamw")
CLIENT_OPS = CLIENT_OPS_NAMES
CLIENTS_CASE = (1000, 10, 50)  # n clients, K local steps, m samples per client
ROBUST_OPS = ("coordinate_median", "trimmed_mean")
ROW_OPS = ("krum", "nnm", "geometric_median", "centered_clip", "clip_rows_", "diff_compress_clip")
#: k of the row cases: f for Krum / NNM, iterations for Weiszfeld / centered clipping, 1% of the
#: row for difference-compress-clip.
ROW_K = {
    "krum": lambda d, m: m // 4,
    "nnm": lambda d, m: m // 4,
    "geometric_median": lambda d, m: 8,
    "centered_clip": lambda d, m: 3,
    "clip_rows_": lambda d, m: 0,
    "diff_compress_clip": lambda d, m: max(1, d // 100),
}
MICROADAM_K = 41  # keep_count(0.01, 4096): the default density and block size


def suite(*, full: bool = False, device: str = "cpu", sizes: Iterable[int] | None = None):
    """The benchmark cases, in the order they run.

    Quick: n = 1e6 and 1e7 fp32, k = 1% (plus bf16 at 1e7 for topk_compress),
    sparse_add_batched_ of 16 messages of 1e5 entries into 1e7, and a MicroAdam step on 1e7 fp32
    parameters against both baselines. ``full`` adds bf16 everywhere and, on CUDA, n = 1e8 and 1e9
    (fp32 first; MicroAdam up to 1e8). ``sizes`` replaces the sizes of the quick suite (k = 1%,
    sparse: 16 messages into n), for smoke tests.
    """
    f32, b16 = torch.float32, torch.bfloat16
    special = (*STACKED, *MICROADAM_OPS)
    dense_ops = [op for op in OPS if op not in special]
    n_c, k_c, m_c = CLIENTS_CASE
    clients = [Case(op, n_c, k_c, f32, m_c) for op in CLIENT_OPS]

    def micro(n, dtype):
        return [Case(op, n, MICROADAM_K, dtype) for op in MICROADAM_OPS]

    def robust(d, m, dtype, rows_m=None):
        cases = [Case(op, d, m // 4 if op == "trimmed_mean" else 0, dtype, m) for op in ROBUST_OPS]
        rm = m if rows_m is None else rows_m
        return cases + [Case(op, d, ROW_K[op](d, rm), dtype, rm) for op in ROW_OPS]

    if sizes is not None:
        sizes = [int(s) for s in sizes]
        cases = [Case(op, n, _k_of(n), f32) for n in sizes for op in dense_ops]
        cases += [Case("sparse_add_batched_", n, _k_of(n), f32, M_MESSAGES) for n in sizes]
        cases += [c for n in sizes for c in micro(n, f32)]
        cases += [Case(op, 20, 2, f32, 10) for op in CLIENT_OPS]
        return cases + [c for n in sizes for c in robust(n, 16, f32)]
    cases = [Case(op, n, _k_of(n), f32) for n in (10**6, 10**7) for op in dense_ops]
    cases.insert(cases.index(Case("topk_compress", 10**7, 10**5)) + 1,
                 Case("topk_compress", 10**7, 10**5, b16))  # fmt: skip
    cases.append(Case("sparse_add_batched_", 10**7, 10**5, f32, M_MESSAGES))
    cases += micro(10**7, f32)
    cases += robust(10**6, 64, f32, rows_m=16)  # the row aggregators' eager loops are slow
    cases += clients
    if not full:
        return cases
    cases += [c for m in (16, 64, 256) for d in (10**5, 10**6) for c in robust(d, m, f32)]
    big = (10**8, 10**9) if torch.device(device).type == "cuda" else ()
    for n in big:
        cases += [Case(op, n, _k_of(n), f32) for op in dense_ops]
    if big:
        cases.append(Case("sparse_add_batched_", 10**8, 10**6, f32, M_MESSAGES))
        cases += micro(10**8, f32)
    for n in (10**6, 10**7, *big):
        cases += [Case(op, n, _k_of(n), b16) for op in dense_ops]
    cases.append(Case("sparse_add_batched_", 10**7, 10**5, b16, M_MESSAGES))
    cases += micro(10**7, b16)
    if big:
        cases.append(Case("sparse_add_batched_", 10**8, 10**6, b16, M_MESSAGES))
        cases += micro(10**8, b16)
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# --------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device) -> float:
    """Seconds one call of ``fn`` takes (CUDA: events on a synchronized device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_libc = None


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Bytes of memory one call of ``fn`` adds at its peak (outputs included); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    try:
        _malloc_trim()  # hand freed heap pages back, so reusing them shows as growth again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _proc_status("VmRSS")
        out = fn()
        peak = _proc_status("VmHWM") - base
        del out
        return max(int(peak), 0)
    except (OSError, KeyError, ValueError):
        return None


_copy_cache: dict[tuple, float] = {}


def copy_bandwidth(n: int, dtype: torch.dtype, device, reps: int = 5) -> float:
    """Bytes/s of ``y.copy_(x)`` for n elements (read + write counted), median of ``reps``."""
    device = torch.device(device)
    key = (n, dtype, str(device))
    if key not in _copy_cache:
        x = torch.ones(n, dtype=dtype, device=device)
        y = torch.empty_like(x)
        y.copy_(x)
        t = statistics.median(time_call(lambda: y.copy_(x), device) for _ in range(reps))
        _copy_cache[key] = 2 * n * dtype.itemsize / t
        del x, y
        _release(device)
    return _copy_cache[key]


def _release(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def resolve_backend(op: str, device, choice: str = "auto") -> str | None:
    """The backend a fedkern op runs with on ``device`` under ``choice``; None if it has none.

    A forced backend the op has no kernel for gives None.
    """
    fam = FAMILY[op]
    try:
        impls = importlib.import_module(f"fedkern.ops.{fam}").IMPLS[IMPL_OP.get(op, op)]
        from fedkern.ops._dispatch import pick
    except (ImportError, AttributeError, KeyError):
        return choice
    if choice != "auto":
        return choice if choice in impls else None
    with fedkern.backend("auto"):
        fn = pick(IMPL_OP.get(op, op), impls, torch.device(device))
    return next((name for name, f in impls.items() if f is fn), "auto")


@dataclass
class Budget:
    """Repetitions per case: at least ``min_reps``, then until ``seconds`` of timed calls."""

    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 30
    seconds: float = 2.0


def run_case(case: Case, device, backend: str = "auto", budget: Budget | None = None) -> dict:
    """Time ``case`` on ``device`` with fedkern forced to ``backend``; one result record.

    Returns a dict with the case fields, ``backend`` (used), ``fedkern_ms`` / ``eager_ms``
    (medians), their minima, ``ratio``, ``bytes``, ``gbps``, ``eager_gbps``, peak memory
    (``fedkern_peak_bytes`` / ``eager_peak_bytes``, None when unknown), ``copy_gbps`` and
    ``x_read`` (fedkern time over one read of the input at copy bandwidth) for ops that read
    their whole input, and ``status`` ("ok" or "skipped" with ``note``).
    """
    device = torch.device(device)
    budget = budget or Budget()
    rec = {
        "id": case.id,
        "case": case.op,
        "n": case.n,
        "k": case.k,
        "m": case.m,
        "dtype": case.dtype_name,
        "eager": case.eager_desc,
        "backend": resolve_backend(case.op, device, backend),
    }
    if rec["backend"] is None:
        return {**rec, "status": "skipped", "note": f"no {backend!r} kernel for {case.op}"}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if case.footprint() > 0.9 * free:
            gb = case.footprint() / 1e9
            note = f"needs ~{gb:.0f} GB, {free / 1e9:.0f} GB free"
            return {**rec, "status": "skipped", "note": note}
    copy_bw = copy_bandwidth(case.n, case.dtype, device) if case.full_pass() else None
    with fedkern.backend(backend):
        p = case.setup(device)
        for _ in range(max(1, budget.warmup)):
            p.rearm_fedkern()
            t = time_call(p.fedkern, device)
            p.rearm_eager()
            time_call(p.eager, device)
        if t < 0.05:  # short calls: one more round for caches, clocks and JIT
            p.rearm_fedkern()
            time_call(p.fedkern, device)
            p.rearm_eager()
            time_call(p.eager, device)
        t_fk, t_eg = [], []
        while len(t_fk) < budget.max_reps and (
            len(t_fk) < budget.min_reps or sum(t_fk) + sum(t_eg) < budget.seconds
        ):
            p.rearm_fedkern()
            t_fk.append(time_call(p.fedkern, device))
            p.rearm_eager()
            t_eg.append(time_call(p.eager, device))
        p.rearm_fedkern()
        mem_fk = peak_memory(p.fedkern, device)
        p.rearm_eager()
        mem_eg = peak_memory(p.eager, device)
        nbytes, extra = p.nbytes, p.extra
    del p
    _release(device)
    fk, eg = statistics.median(t_fk), statistics.median(t_eg)
    rec.update(
        status="ok",
        fedkern_ms=fk * 1e3,
        eager_ms=eg * 1e3,
        fedkern_min_ms=min(t_fk) * 1e3,
        eager_min_ms=min(t_eg) * 1e3,
        reps=len(t_fk),
        ratio=eg / fk,
        bytes=nbytes,
        gbps=nbytes / fk / 1e9,
        eager_gbps=nbytes / eg / 1e9,
        fedkern_peak_bytes=mem_fk,
        eager_peak_bytes=mem_eg,
        copy_gbps=copy_bw / 1e9 if copy_bw else None,
        x_read=fk / (case.n * case.dtype.itemsize / copy_bw) if copy_bw else None,
        **extra,
    )
    return rec


def run_suite(
    cases: Iterable[Case],
    device,
    backend: str = "auto",
    budget: Budget | None = None,
    *,
    deadline: float | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """run_case over ``cases``; past ``deadline`` (time.monotonic()) the rest are skipped.

    An exception in one case becomes a record with status "error" and the message; the others run.
    """
    cases = list(cases)
    out = []
    for i, case in enumerate(cases):
        if deadline is not None and time.monotonic() > deadline:
            rec = {"id": case.id, "case": case.op, "n": case.n, "k": case.k, "m": case.m,
                   "dtype": case.dtype_name, "eager": case.eager_desc, "backend": None,
                   "status": "skipped", "note": "time budget spent"}  # fmt: skip
        else:
            try:
                rec = run_case(case, device, backend, budget)
            except Exception as exc:  # report and go on: one broken case must not hide the rest
                rec = {"id": case.id, "case": case.op, "n": case.n, "k": case.k, "m": case.m,
                       "dtype": case.dtype_name, "eager": case.eager_desc,
                       "backend": backend, "status": "error",
                       "note": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}  # fmt: skip
                with contextlib.suppress(Exception):
                    _release(device)
        out.append(rec)
        if progress is not None:
            progress(i, len(cases), rec)
    return out
