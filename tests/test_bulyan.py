"""fedkern.robust.bulyan against a float64 NumPy oracle written from the definition, and against
Flower's aggregate_bulyan (flwr.server.strategy.aggregate) when flwr is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import EPS, fresh_seed

import fedkern.robust as R
from fedkern.robust.rules import _iterated_krum


def oracle_bulyan(X: torch.Tensor, f: int) -> np.ndarray:
    """Bulyan from its definition, in float64 with distances recomputed from the differences at
    every step: iterated Krum (max(1, n' - f - 2) nearest of the n' rows left, first minimum
    wins), then per coordinate the mean of the beta values with the smallest |x - median| (the
    median as coordinate_median: for even theta the float32 mean of the two middle values; an
    exact distance tie keeps the lower value)."""
    x = X.double().numpy()
    n = x.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    left, chosen = list(range(n)), []
    with np.errstate(invalid="ignore", over="ignore"):
        for _ in range(theta):
            k = max(1, len(left) - f - 2)
            scores = []
            for i in left:
                dist = [float(((x[i] - x[j]) ** 2).sum()) for j in left if j != i]
                dist = sorted(dd if math.isfinite(dd) else math.inf for dd in dist)
                scores.append(sum(dist[:k]))
            best = left[int(np.argmin(scores))]
            chosen.append(best)
            left.remove(best)
    S = x[chosen]
    s = np.sort(S, axis=0)
    h = theta // 2
    if theta % 2:
        med = s[h]
    else:
        med = (s[h - 1].astype(np.float32) + s[h].astype(np.float32)) * np.float32(0.5)
        med = med.astype(np.float64)
    out = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        order = np.lexsort((S[:, c], np.abs(S[:, c] - med[c])))  # by distance, then by value
        out[c] = S[order[:beta], c].mean()
    return out


def close(got: torch.Tensor, want: np.ndarray, dtype) -> None:
    """One rounding of the float64 mean to dtype (plus float64 summation error)."""
    want = torch.from_numpy(np.asarray(want, dtype=np.float64))
    torch.testing.assert_close(got.double(), want, rtol=2 * EPS[dtype], atol=1e-12)


# ---- against the oracle --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,f,d", [(7, 1, 40), (8, 1, 33), (12, 2, 17), (16, 3, 25), (5, 0, 9)])
def test_matches_oracle(n, f, d, dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    X = (torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 3).to(dtype)
    X[:f] += 5 * torch.randn(f, d, generator=gen).to(dtype)  # f rows off the honest cloud
    got = R.bulyan(X, f)
    assert got.dtype == dtype and got.shape == (d,)
    close(got, oracle_bulyan(X, f), dtype)
    assert torch.equal(R.bulyan(list(X), f), got)  # a list of rows is the same stack
    assert torch.equal(R.Aggregator("bulyan", f)(X), got)


@pytest.mark.parametrize("n,f", [(11, 2), (12, 2)])
def test_matches_oracle_with_many_ties(n, f):
    # small integers: equal values and distance ties between a value below and one above the
    # median in most columns, so both the direct sums and the sorted path run
    gen = torch.Generator().manual_seed(fresh_seed())
    X = torch.randint(-3, 4, (n, 300), generator=gen).float()
    close(R.bulyan(X, f), oracle_bulyan(X, f), torch.float32)


def test_minimal_n_and_strided_input():
    gen = torch.Generator().manual_seed(fresh_seed())
    for f in (1, 2, 4):
        n = 4 * f + 3  # the smallest stack Bulyan accepts: beta = 3
        X = torch.randn(30, n, generator=gen).T  # non-contiguous [n, 30]
        close(R.bulyan(X, f), oracle_bulyan(X.contiguous(), f), torch.float32)


def test_f0_is_the_mean():
    gen = torch.Generator().manual_seed(fresh_seed())
    X = torch.randn(6, 50, generator=gen)
    close(R.bulyan(X, 0), X.double().mean(0).numpy(), torch.float32)


def test_distance_ties_keep_the_lower_value():
    # 5 honest rows (selected: the 2 far rows, far from each other too, have huge Krum scores),
    # theta = 5, beta = 3, median 0 in both columns; -2 and 2 are equally far, the lower one is
    # kept whatever its row.
    honest = torch.tensor([[-2.0, 3.0], [-1.0, 2.0], [0.0, 0.0], [2.0, -1.0], [3.0, -2.0]])
    X = torch.cat([honest, torch.tensor([[1e3, 0.0], [0.0, 1e3]])])
    assert sorted(_iterated_krum(R.pairwise_sqdist(X).fill_diagonal_(math.inf), 1, 5)) == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert torch.equal(R.bulyan(X, 1), torch.tensor([-1.0, -1.0]))
    # identical rows: every choice is the same vector
    same = torch.ones(7, 4) * 0.25
    assert torch.equal(R.bulyan(same, 1), same[0])


def test_krum_ties_go_to_the_lower_row():
    # 4 points at equal distances (a regular simplex): every score ties at every step
    D = torch.ones(4, 4, dtype=torch.float64).fill_diagonal_(math.inf)
    assert _iterated_krum(D, 0, 4).tolist() == [0, 1, 2, 3]
    # a clear order otherwise: points on a line at 0, 1, 3, 7, 15
    p = torch.tensor([0.0, 1.0, 3.0, 7.0, 15.0], dtype=torch.float64)
    D = ((p[:, None] - p[None, :]) ** 2).fill_diagonal_(math.inf)
    # f = 0, k = n' - 2 neighbours: step 1 scores 1 + 4 + 36 (row 1), 4 + 9 + 16 (row 2), ...
    want, left = [], list(range(5))
    for _ in range(5):
        k = min(max(1, len(left) - 2), len(left) - 1)
        sc = [sum(sorted(float(D[i, j]) for j in left if j != i)[:k]) for i in left]
        want.append(left.pop(int(np.argmin(sc))))
    assert _iterated_krum(D, 0, 5).tolist() == want and want[0] == 2


def test_nonfinite_rows_are_never_selected():
    gen = torch.Generator().manual_seed(fresh_seed())
    X = torch.randn(11, 20, generator=gen)
    X[3, 5], X[7] = math.nan, math.inf  # f = 2 bad rows
    got = R.bulyan(X, 2)
    assert torch.isfinite(got).all()
    close(got, oracle_bulyan(X, 2), torch.float32)


# ---- against Flower ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,f,d", [(7, 1, 30), (11, 2, 64), (13, 2, 16), (19, 4, 40)])
def test_matches_flower(n, f, d):
    A = pytest.importorskip("flwr.server.strategy.aggregate")
    gen = torch.Generator().manual_seed(fresh_seed())
    X = torch.randn(n, d, generator=gen) + torch.randn(d, generator=gen)
    X[:f] = 4 * torch.randn(f, d, generator=gen)
    # Flower gets the same values in float64 (its float32 distances would round near-ties), as
    # two layers; n odd keeps theta odd, where its median and fedkern's are the same number.
    x64 = X.double().numpy()
    results = [([row[: d // 2].copy(), row[d // 2 :].copy()], 1) for row in x64]
    want = A.aggregate_bulyan(results, f, A.aggregate_krum, to_keep=0)
    close(R.bulyan(X, f), np.concatenate(want), torch.float32)


# ---- robustness ----------------------------------------------------------------------------------


def test_far_byzantine_rows_stay_outside_while_the_mean_moves():
    gen = torch.Generator().manual_seed(fresh_seed())
    n, f, d = 15, 3, 64
    X = torch.randn(n, d, generator=gen)
    honest = X[f:]
    lo, hi = honest.min(0).values, honest.max(0).values
    X[:f] = 1e4 + 1e3 * torch.randn(f, d, generator=gen)  # far away, not identical
    got, mean = R.bulyan(X, f), X.mean(0)
    assert bool(((got >= lo) & (got <= hi)).all())  # inside the honest per-coordinate range
    assert not bool(((mean >= lo) & (mean <= hi)).any())  # the control: the mean leaves it


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_input():
    X = torch.randn(7, 4)
    with pytest.raises(ValueError, match=r"n >= 4\*f \+ 3"):
        R.bulyan(X, 2)
    with pytest.raises(ValueError, match="f"):
        R.bulyan(X, -1)
    with pytest.raises(TypeError, match="f"):
        R.bulyan(X, 1.5)
    with pytest.raises(TypeError, match="X"):
        R.bulyan(X.double(), 1)
    with pytest.raises(ValueError, match="X"):
        R.bulyan(torch.randn(7), 1)
    with pytest.raises(ValueError, match="bulyan"):
        R.Aggregator("bulyan", 2)(X)
    with pytest.raises(TypeError, match="m"):
        R.Aggregator("bulyan", 1, m=2)
