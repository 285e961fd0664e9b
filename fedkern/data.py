"""Real datasets that need no download, and how to split them over clients.

``load(name)`` returns a float64 feature matrix (standardized, with a constant bias column) and
integer labels; ``split`` assigns samples to clients (iid, label-sorted shards, or Dirichlet label
skew); ``flip_labels`` is the label-flipping attack. Datasets: scikit-learn's bundled
"breast_cancer" (569 x 30, 2 classes) and "digits" (1797 x 64, 10 classes); scikit-learn must be
installed (it is in requirements-test.txt).
"""

from __future__ import annotations

import numpy as np
import torch

from fedkern import validation as v
from fedkern.random import permutation

__all__ = ["BINARY_LABELS", "DATASETS", "SPLITS", "flip_labels", "load", "load_libsvm", "split"]

DATASETS = ("breast_cancer", "digits")
SPLITS = ("iid", "label_sorted", "dirichlet")


def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A bundled dataset as (A, y).

    Args:
        name: "breast_cancer" or "digits".

    Returns:
        A: [N, d + 1] float64 CPU tensor, every feature standardized to mean 0 and std 1 (constant
        features left at 0), then a last column of ones (the bias). y: [N] int64 labels in
        0..classes-1 (breast_cancer: 1 = benign).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - scikit-learn is a test requirement
        raise ImportError(
            f"dataset {name!r} needs scikit-learn (pip install scikit-learn)"
        ) from exc
    raw = datasets.load_breast_cancer() if name == "breast_cancer" else datasets.load_digits()
    x = np.asarray(raw.data, dtype=np.float64)
    std = x.std(0)
    x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    return torch.from_numpy(a), torch.from_numpy(np.asarray(raw.target, dtype=np.int64))


#: The label sets a binary LibSVM file may use (each maps to 0/1 in sorted order).
BINARY_LABELS = ({-1.0, 1.0}, {0.0, 1.0}, {1.0, 2.0})


def load_libsvm(path, n_features: int | None = None, *, standardize: bool = True, bias: bool = True,
                binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A LibSVM-format file (a9a, w8a, ... downloaded by the user) as dense (A, y).

    Each line is ``label index:value index:value ...`` with 1-based indices (``#`` starts a
    comment). Binary labels (-1/+1, 0/1 or 1/2) become 0/1; other label sets map to 0..C-1 in
    sorted order.

    Args:
        path: the file.
        n_features: the feature count (default: the largest index in the file).
        standardize: scale every feature to mean 0, std 1 (as ``load``); with False the raw
            values are kept.
        bias: append a constant column of ones.
        binary: the labels must form one of the binary sets -1/+1, 0/1 or 1/2 (for logistic
            regression); a label outside it is an error naming its line.

    Returns:
        A: [N, d (+1)] float64; y: [N] int64.

    Raises:
        ValueError naming ``path:line`` for a malformed line, a label or feature value that is
        not a finite number (NaN, inf), an index below 1, a duplicate index on one line, or (with
        ``binary``) a label outside the binary sets; ``path: no samples`` for an empty file.
        OSError when the file cannot be read.
    """
    labels, rows, seen = [], [], set()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a text file ({exc.reason})") from exc
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            head, *feats = line.split()
            labels.append(_libsvm_label(path, lineno, head))
            if binary:
                seen.add(labels[-1])
                if not any(seen <= allowed for allowed in BINARY_LABELS):
                    raise ValueError(
                        f"{path}:{lineno}: label {head} is outside the binary label sets "
                        f"-1/+1, 0/1 and 1/2 (labels so far: {sorted(seen)}); logistic "
                        f"regression needs two classes"
                    )
            rows.append(_libsvm_features(path, lineno, feats))
    if not rows:
        raise ValueError(f"{path}: no samples")
    top = max((i for r in rows for i, _ in r), default=-1) + 1
    d = top if n_features is None else v.integer("n_features", n_features, top)
    a = np.zeros((len(rows), d))
    for k, r in enumerate(rows):
        for i, x in r:
            a[k, i] = x
    if standardize:
        std = a.std(0)
        a = (a - a.mean(0)) / np.where(std > 0, std, 1.0)
    if bias:
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    values = sorted(set(labels))
    y = np.searchsorted(np.asarray(values), np.asarray(labels)).astype(np.int64)
    return torch.from_numpy(a), torch.from_numpy(y)


def _libsvm_label(path, lineno: int, head: str) -> float:
    try:
        label = float(head)
    except ValueError as exc:
        raise ValueError(f"{path}:{lineno}: not LibSVM format (label {head!r} is not a "
                         f"number)") from exc  # fmt: skip
    if not np.isfinite(label):
        raise ValueError(f"{path}:{lineno}: label {head!r} is not a finite number")
    return label


def _libsvm_features(path, lineno: int, feats) -> list[tuple[int, float]]:
    out, used = [], set()
    for item in feats:
        try:
            i, x = item.split(":")
            i, x = int(i), float(x)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not LibSVM format ({item!r} is not "
                             f"index:value; {exc})") from exc  # fmt: skip
        if i < 1:
            raise ValueError(f"{path}:{lineno}: feature indices are 1-based, got {i}")
        if not np.isfinite(x):
            raise ValueError(f"{path}:{lineno}: feature {i} is {x}; features must be finite")
        if i in used:
            raise ValueError(f"{path}:{lineno}: feature {i} appears twice on the line")
        used.add(i)
        out.append((i - 1, x))
    return out


def split(y: torch.Tensor, clients: int, how: str = "iid", *, seed: int = 0,
          alpha: float = 0.5) -> list[torch.Tensor]:  # fmt: skip
    """Assign the samples (labels y) to ``clients`` clients.

    Args:
        y: [N] int64 labels.
        clients: int in [1, N].
        how: "iid" (a seeded shuffle cut into near-equal parts), "label_sorted" (samples sorted by
            label, stably, cut into near-equal contiguous shards: the heterogeneous split of the
            papers) or "dirichlet" (per class, proportions drawn from Dirichlet(alpha); a client
            may end up with no sample).
        seed: int in [0, 2**63) for the shuffle / the Dirichlet draws.
        alpha: Dirichlet concentration (> 0); smaller is more skewed.

    Returns:
        A list of ``clients`` int64 index tensors (ascending), together a partition of range(N).
    """
    v.tensor("y", y)
    if y.dim() != 1 or y.dtype != torch.int64:
        raise ValueError(f"y must be a 1-D int64 label tensor, got {y.dtype} {tuple(y.shape)}")
    n_samples = y.shape[0]
    clients = v.integer("clients", clients, 1, max(1, n_samples))
    if how not in SPLITS:
        raise ValueError(f"unknown split {how!r}; available: {', '.join(SPLITS)}")
    if how == "iid":
        order = torch.tensor(permutation(n_samples, seed), dtype=torch.int64)
        parts = torch.tensor_split(order, clients)
    elif how == "label_sorted":
        parts = torch.tensor_split(torch.sort(y, stable=True).indices, clients)
    else:
        alpha = v.fp32_scalar("alpha", alpha)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        rng = np.random.Generator(np.random.Philox(seed))
        owner = np.empty(n_samples, dtype=np.int64)
        y_np = y.numpy()
        for c in np.unique(y_np):
            members = np.flatnonzero(y_np == c)
            members = members[rng.permutation(members.size)]
            share = rng.dirichlet(np.full(clients, alpha))
            cuts = np.round(np.cumsum(share)[:-1] * members.size).astype(np.int64)
            for i, part in enumerate(np.split(members, cuts)):
                owner[part] = i
        parts = [torch.from_numpy(np.flatnonzero(owner == i)) for i in range(clients)]
    return [torch.sort(p).values for p in parts]


def flip_labels(y: torch.Tensor, classes: int) -> torch.Tensor:
    """The label-flipping attack: y -> classes - 1 - y (a new tensor).

    Args:
        y: int64 labels in [0, classes).
        classes: int >= 2.
    """
    classes = v.integer("classes", classes, 2)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"y must hold labels in [0, {classes})")
    return classes - 1 - y
