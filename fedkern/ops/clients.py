"""Batched per-client local training and the server updates: schemas, validation, dispatch.

Ops (namespace ``fedkern``):
  local_steps_(X, clients, A, y, offsets, kind, classes, K, gamma, l2, H, mode, b, keys, clip, mu,
               anchor, check) -> X          K local steps for every cohort row of X [c, p], in place
  client_grads(X, clients, A, y, offsets, kind, classes, l2, mode, b, keys, samples, check) -> G
                                            one gradient per cohort row of X [c, p] (G [c, p])
  scaffnew_sync_(X, H, coef) -> xbar        xbar = mean X; H += coef (xbar - X); X = xbar
  weighted_sum(X, w) -> [p]                 sum_r w[r] X[r] (float64 accumulation)
The math is in ``fedkern.reference.clients``; the public entry point is ``fedkern.clients``, which
builds every argument (this module only checks them, before any kernel runs).
``check=False`` (default True) skips the checks that read tensor values (offsets rising from 0 to
the rows of A, client ids in range, client_grads' sample indices in range), which are host
synchronizations on CUDA: for callers that built those tensors themselves (``ClientBatch``:
offsets from its Problem, cohorts checked on the host); invalid values are then undefined
behaviour (the kernels index A and X with them), as in the quartic family.
"""

from __future__ import annotations

import torch

from fedkern import validation as v
from fedkern.ops._dispatch import pick
from fedkern.ops._native import cpu_core, lazy
from fedkern.reference import clients as ref

Tensor = torch.Tensor
F32 = torch.float32


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpu_local_steps(X, clients, A, y, offsets, kind, classes, K, gamma, l2, H, mode, b, keys,
                     clip, mu, anchor):  # fmt: skip
    cpu_core().local_steps(
        _ptr(X), _ptr(clients), X.shape[0], X.shape[1], _ptr(A), _ptr(y), _ptr(offsets),
        offsets.shape[0] - 1, A.shape[1], kind, classes, K, gamma, l2, _ptr(H), mode, b,
        _ptr(keys), clip, mu, _ptr(anchor),
    )  # fmt: skip
    return X


def _cpu_client_grads(X, clients, A, y, offsets, kind, classes, l2, mode, b, keys, samples):
    G = torch.empty_like(X)
    s = 0 if samples is None else samples.shape[1]
    cpu_core().client_grads(
        _ptr(X), _ptr(clients), X.shape[0], X.shape[1], _ptr(A), _ptr(y), _ptr(offsets),
        A.shape[1], kind, classes, l2, mode, b, _ptr(keys), _ptr(samples), s, _ptr(G),
    )  # fmt: skip
    return G


def _cpu_sync(X, H, coef):
    xbar = torch.empty(X.shape[1], dtype=F32)
    cpu_core().scaffnew_sync(_ptr(X), _ptr(H), X.shape[0], X.shape[1], coef, _ptr(xbar))
    return xbar


def _cpu_weighted_sum(X, w):
    out = torch.empty(X.shape[1], dtype=F32)
    cpu_core().weighted_sum(_ptr(X), _ptr(w), X.shape[0], X.shape[1], _ptr(out))
    return out


IMPLS = {
    "local_steps_": {
        "reference": ref.local_steps_,
        "cpu": _cpu_local_steps,
        "triton": lazy("fedkern.kernels.clients", "local_steps_"),
    },
    "client_grads": {
        "reference": ref.client_grads,
        "cpu": _cpu_client_grads,
        "triton": lazy("fedkern.kernels.clients", "client_grads"),
    },
    "scaffnew_sync_": {
        "reference": ref.scaffnew_sync_,
        "cpu": _cpu_sync,
        "triton": lazy("fedkern.kernels.clients", "scaffnew_sync_"),
    },
    "weighted_sum": {
        "reference": ref.weighted_sum,
        "cpu": _cpu_weighted_sum,
        "triton": lazy("fedkern.kernels.clients", "weighted_sum"),
    },
}


# ---- validation ---------------------------------------------------------------------------------


def _f32_matrix(name: str, t, rows: int | None, cols: int, device) -> Tensor:
    v.tensor(name, t)
    if t.dtype != F32:
        raise TypeError(f"{name} must be a float32 tensor, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != cols or (rows is not None and t.shape[0] != rows):
        want = f"[{rows if rows is not None else 'c'}, {cols}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def _check_data(X, A, y, kind, classes) -> tuple[torch.device, int, int]:
    """A [N, d] float32, y [N] float32, the model kind and class count, X [c, p]: (device, p, c)."""
    v.tensor("A", A)
    if A.dtype != F32 or A.dim() != 2:
        raise TypeError(f"A must be a 2-D float32 tensor, got {A.dtype} {tuple(A.shape)}")
    dev, d = A.device, A.shape[1]
    if kind not in (0, 1, 2):
        raise ValueError(f"kind must be 0 (logistic), 1 (multinomial) or 2 (least_squares), "
                         f"got {kind}")  # fmt: skip
    classes = v.integer("classes", classes, 2 if kind == 1 else 1)
    p = classes * d if kind == 1 else d
    c = _f32_matrix("X", X, None, p, dev).shape[0]
    v.tensor("y", y)
    if y.dtype != F32 or y.device != dev or y.shape != (A.shape[0],):
        raise ValueError(f"y must be a float32 tensor of shape ({A.shape[0]},) on {dev}, got "
                         f"{y.dtype} {tuple(y.shape)} on {y.device}")  # fmt: skip
    return dev, p, c


def check_local_steps(X, clients, A, y, offsets, kind, classes, K, gamma, l2, H, mode, b, keys,
                      clip, mu, anchor, check=True) -> None:  # fmt: skip
    """Every argument of local_steps_; raises before anything is modified."""
    dev, p, c = _check_data(X, A, y, kind, classes)
    v.writable("X", X)
    v.cohort_layout(clients, offsets, c=c, rows=A.shape[0], rows_name="A", device=dev, check=check)
    v.integer("K", K, 0)
    v.fp32_scalar("gamma", gamma)
    v.fp32_scalar("l2", l2, nonneg=True)
    v.fp32_scalar("clip", clip, nonneg=True)
    v.fp32_scalar("mu", mu, nonneg=True)
    if H is not None:
        _f32_matrix("H", H, c, p, dev)
        v.disjoint("H", H, "X", X)
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (gd), 1 (sgd) or 2 (rr), got {mode}")
    v.integer("b", b, 1)
    if mode != 0 and K > 0:
        v.step_keys(keys, c=c, K=K, device=dev)
    if mu:
        _f32_matrix("anchor", anchor, c, p, dev)


@torch.library.custom_op("fedkern::local_steps_", mutates_args=("X",))
def local_steps_(
    X: Tensor, clients: Tensor, A: Tensor, y: Tensor, offsets: Tensor, kind: int, classes: int,
    K: int, gamma: float, l2: float, H: Tensor | None, mode: int, b: int, keys: Tensor | None,
    clip: float, mu: float, anchor: Tensor | None, check: bool = True,
) -> None:  # fmt: skip
    """K local steps for every cohort row of X, in place (see fedkern.reference.clients;
    ``check`` in the module docstring)."""
    args = (X, clients, A, y, offsets, kind, classes, K, gamma, l2, H, mode, b, keys, clip, mu,
            anchor)  # fmt: skip
    check_local_steps(*args, check=v.boolean("check", check))
    if X.shape[0] == 0 or K == 0:
        return
    contiguous = [a.contiguous() if isinstance(a, Tensor) else a for a in args[1:]]
    pick("local_steps_", IMPLS["local_steps_"], X.device)(X, *contiguous)


@local_steps_.register_fake
def _(X, clients, A, y, offsets, kind, classes, K, gamma, l2, H, mode, b, keys, clip, mu, anchor,
      check=True):  # fmt: skip
    return None


def check_client_grads(X, clients, A, y, offsets, kind, classes, l2, mode, b, keys,
                       samples, check=True) -> None:  # fmt: skip
    """Every argument of client_grads; raises before any kernel runs."""
    dev, p, c = _check_data(X, A, y, kind, classes)
    # the values of offsets and clients are read below, after every argument's type and shape
    v.cohort_layout(clients, offsets, c=c, rows=A.shape[0], rows_name="A", device=dev, check=False)
    v.fp32_scalar("l2", l2, nonneg=True)
    if mode not in (0, 1, 3):
        raise ValueError(f"mode must be 0 (gd), 1 (sgd) or 3 (samples), got {mode}")
    v.integer("b", b, 1)
    if mode == 1:
        v.tensor("keys", keys)
        if keys.dtype != torch.int64 or keys.shape != (c, 8) or keys.device != dev:
            raise ValueError(f"keys must be an int64 tensor [{c}, 8] on {dev}")
    if mode == 3:
        v.tensor("samples", samples)
        if (
            samples.dtype != torch.int64
            or samples.dim() != 2
            or samples.shape[0] != c
            or (samples.device != dev)
        ):
            raise ValueError(f"samples must be an int64 tensor [{c}, s] on {dev}")
    host = v.cohort_layout(clients, offsets, c=c, rows=A.shape[0], rows_name="A", device=dev,
                           check=check)  # fmt: skip
    if host is None:
        return
    o, cl = host
    if mode == 3 and samples.numel():
        sizes = (o[1:] - o[:-1])[cl]
        sm = samples.cpu()
        if bool((sm < -1).any()) or bool((sm >= sizes[:, None]).any()):
            raise ValueError("samples must hold local sample indices in [0, m_i) of each row's "
                             "client, or -1 (padding)")  # fmt: skip


@torch.library.custom_op("fedkern::client_grads", mutates_args=())
def client_grads(
    X: Tensor, clients: Tensor, A: Tensor, y: Tensor, offsets: Tensor, kind: int, classes: int,
    l2: float, mode: int, b: int, keys: Tensor | None, samples: Tensor | None, check: bool = True,
) -> Tensor:  # fmt: skip
    """One gradient per cohort row of X, G [c, p] float32 (see fedkern.reference.clients;
    ``check`` in the module docstring)."""
    args = (X, clients, A, y, offsets, kind, classes, l2, mode, b, keys, samples)
    check_client_grads(*args, check=v.boolean("check", check))
    if X.shape[0] == 0:
        return torch.empty_like(X)
    contiguous = [a.contiguous() if isinstance(a, Tensor) else a for a in args]
    return pick("client_grads", IMPLS["client_grads"], X.device)(*contiguous)


@client_grads.register_fake
def _(X, clients, A, y, offsets, kind, classes, l2, mode, b, keys, samples, check=True):
    return torch.empty_like(X)


def check_sync(X, H) -> None:
    v.tensor("X", X)
    if X.dtype != F32 or X.dim() != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must be a non-empty float32 [c, p] tensor, got {X.dtype} "
                         f"{tuple(X.shape)}")  # fmt: skip
    v.writable("X", X)
    if H is not None:
        _f32_matrix("H", H, X.shape[0], X.shape[1], X.device)
        v.writable("H", H)
        v.disjoint("H", H, "X", X)


@torch.library.custom_op("fedkern::scaffnew_sync_", mutates_args=("X", "H"))
def scaffnew_sync_(X: Tensor, H: Tensor, coef: float) -> Tensor:
    """xbar = mean of the rows of X; H += coef (xbar - X); X = xbar; returns xbar [p] float32."""
    check_sync(X, H)
    coef = v.fp32_scalar("coef", coef)
    return pick("scaffnew_sync_", IMPLS["scaffnew_sync_"], X.device)(X, H, coef)


@scaffnew_sync_.register_fake
def _(X, H, coef):
    return X.new_empty(X.shape[1])


@torch.library.custom_op("fedkern::weighted_sum", mutates_args=())
def weighted_sum(X: Tensor, w: Tensor) -> Tensor:
    """sum_r w[r] X[r], float64 accumulation in row order, rounded once: [p] float32."""
    v.tensor("X", X)
    if X.dtype != F32 or X.dim() != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must be a non-empty float32 [c, p] tensor, got {X.dtype} "
                         f"{tuple(X.shape)}")  # fmt: skip
    v.tensor("w", w)
    if w.dtype != torch.float64 or w.shape != (X.shape[0],) or w.device != X.device:
        raise ValueError(f"w must be a float64 tensor of shape ({X.shape[0]},) on {X.device}")
    return pick("weighted_sum", IMPLS["weighted_sum"], X.device)(X.contiguous(), w.contiguous())


@weighted_sum.register_fake
def _(X, w):
    return X.new_empty(X.shape[1])
