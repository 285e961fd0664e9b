"""fedkern.sampling: cohorts, coins and counts from the counter-based streams.

The oracles below are written from the definitions in fedkern/random.py's docstrings and the
published Philox4x32-10 (Salmon et al., SC'11), in plain Python integers; fedkern's own Philox,
Feistel and uniforms are never used by them. They are checked against the Random123 known-answer
vectors, then the module's draws are compared with them bit for bit. The distribution tests use
the module on many (seed, step) with tolerances from the variance of the statistic (z-scores at
|z| <= 5, chi-square at a 1e-6 tail), so a correct implementation fails them with a probability of
about 1e-6 per assertion.
"""

from __future__ import annotations

import itertools
import math
import random as pyrandom
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import fresh_seed

from fedkern import random as frandom
from fedkern import sampling

# ---- the oracle: Philox4x32-10, the keyed Feistel permutation, the uniform floats ----------------

M32 = 0xFFFFFFFF
MAX_SEED = (1 << 63) - 1


def tag(name: str) -> int:
    """A stream tag: its four ASCII letters as a big-endian uint32 ("COHT" -> 0x434F4854)."""
    return int.from_bytes(name.encode("ascii"), "big")


COHT, RSHF, UNIF, CLNT = tag("COHT"), tag("RSHF"), tag("UNIF"), tag("CLNT")
COIN_STREAM, GEOMETRIC_STREAM, INDEPENDENT_STREAM = UNIF, UNIF + 1, UNIF + 2


def philox(ctr, key):
    """Philox4x32-10: two multiply-hi/lo per round, key bumped by the Weyl constants."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def counter(seed: int, step: int):
    return seed & M32, seed >> 32, step & M32, step >> 32


def round_keys(stream: int, seed: int, step: int):
    """The eight Feistel round keys: Philox of (seed, step) under (stream, 0) then (stream, 1)."""
    return philox(counter(seed, step), (stream, 0)) + philox(counter(seed, step), (stream, 1))


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def perm(i: int, n: int, keys) -> int:
    """Entry i of the keyed permutation of [0, n): balanced Feistel on 2h bits, cycle walking."""
    b = max(2, (n - 1).bit_length())
    b += b & 1
    h = b // 2
    mask = (1 << h) - 1
    x = i
    while True:
        left, right = x >> h, x & mask
        for k in keys:
            left, right = right, left ^ (lowbias32(right ^ k) & mask)
        x = (left << h) | right
        if x < n:
            return x


def oracle_uniform(n: int, c: int, seed: int, step: int) -> list[int]:
    keys = round_keys(COHT, seed, step)
    return sorted(perm(i, n, keys) for i in range(c))


def oracle_reshuffled(n: int, c: int, seed: int, epoch: int) -> list[list[int]]:
    keys = round_keys(RSHF, seed, epoch)
    p = [perm(i, n, keys) for i in range(n)]
    return [sorted(p[j : j + c]) for j in range(0, n, c)]


def oracle_floats(n: int, seed: int, step: int, stream: int) -> list[float]:
    """Entry i: the top 53 bits of the 64-bit Philox word (hi, lo) = (out1, out0) at counter
    (i_lo, i_hi, w0, w1) under the key (w2, w3), w = Philox((seed, step), (stream, 0))."""
    w = philox(counter(seed, step), (stream, 0))
    out = []
    for i in range(n):
        o = philox((i & M32, i >> 32, w[0], w[1]), (w[2], w[3]))
        out.append((((o[1] << 32) | o[0]) >> 11) * 2.0**-53)
    return out


def oracle_coin(p: float, seed: int, step: int) -> bool:
    return oracle_floats(1, seed, step, COIN_STREAM)[0] < p


def oracle_geometric(p: float, seed: int, step: int) -> int:
    if p == 1:
        return 1
    u = oracle_floats(1, seed, step, GEOMETRIC_STREAM)[0]
    return max(1, math.ceil(math.log1p(-u) / math.log1p(-p)))


def oracle_independent(probs, seed: int, step: int) -> list[int]:
    u = oracle_floats(len(probs), seed, step, INDEPENDENT_STREAM)
    return [m for m, (um, pm) in enumerate(zip(u, probs, strict=True)) if um < pm]


def oracle_client_seed(seed: int, client: int) -> int:
    w = philox((client & M32, client >> 32, seed & M32, seed >> 32), (CLNT, 0))
    return (w[0] | (w[1] << 32)) & MAX_SEED


# ---- statistics ----------------------------------------------------------------------------------

Z = 5.0  # two-sided normal tail ~5.7e-7


def chi2_bound(df: int) -> float:
    """An upper bound on the 1 - 1e-6 quantile of chi-square(df) (Wilson-Hilferty with z = 4.76;
    conservative for small df)."""
    z = 4.76
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts, expected) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(counts, expected, strict=True))


def phi_z(a, b) -> float:
    """sqrt(T) * (the phi coefficient of two bool sequences): ~N(0, 1) when independent."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    sa, sb = a.std(), b.std()
    assert sa > 0 and sb > 0
    return math.sqrt(a.size) * float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


def seeds() -> list[int]:
    """A fresh seed, one above 2**32 (both counter words in use) and the extremes."""
    s = fresh_seed("sampling seed")
    return [s, (s << 31) | 5, 0, MAX_SEED]


# ---- the oracle against the published Philox vectors ---------------------------------------------


def test_oracle_philox_matches_random123_known_answers():
    """The Random123 known-answer vectors of philox4x32-10 (kat_vectors), and fedkern's
    philox4x32 agrees with them too (the documented generator is the standard one)."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for ctr, key, want in kat:
        assert philox(ctr, key) == want
        assert frandom.philox4x32(ctr, key) == want
    assert (COHT, RSHF, UNIF) == (frandom.STREAM_COHORT, frandom.STREAM_RESHUFFLE,
                                  frandom.STREAM_UNIFORM)  # fmt: skip


def test_oracle_feistel_is_a_permutation():
    keys = round_keys(COHT, 7, 3)
    for n in (1, 2, 3, 4, 5, 16, 17, 63, 64, 65, 100):
        assert sorted(perm(i, n, keys) for i in range(n)) == list(range(n))


# ---- bit for bit against the oracle --------------------------------------------------------------


@pytest.mark.parametrize("n,c", [(1, 1), (2, 1), (3, 2), (4, 4), (5, 3), (17, 5), (1000, 7),
                                 (2**40 + 3, 4), (2**62, 3)])  # fmt: skip
def test_uniform_matches_the_oracle(n, c):
    for seed in seeds():
        for step in (0, 1, 16 * 7 + 1, 2**33 + 9, MAX_SEED):
            got = sampling.uniform(n, c, seed=seed, step=step)
            assert got.dtype == torch.int64 and got.device.type == "cpu" and got.shape == (c,)
            assert got.tolist() == oracle_uniform(n, c, seed, step), (seed, step)


@pytest.mark.parametrize("n,c", [(1, 1), (5, 5), (7, 3), (8, 2), (10, 4), (33, 32)])
def test_reshuffled_matches_the_oracle(n, c):
    for seed in seeds():
        for epoch in (0, 1, 2**32 + 1, MAX_SEED):
            got = sampling.reshuffled(n, c, seed=seed, epoch=epoch)
            assert all(t.dtype == torch.int64 for t in got)
            assert [t.tolist() for t in got] == oracle_reshuffled(n, c, seed, epoch)


def test_uniform_floats_coin_geometric_independent_match_the_oracle():
    for seed in seeds():
        for step in (0, 3, 2**32 + 17, MAX_SEED):
            want = oracle_floats(9, seed, step, INDEPENDENT_STREAM)
            got = sampling.uniform_floats(9, seed=seed, step=step)
            assert got.dtype == torch.float64 and got.shape == (9,)
            assert got.tolist() == want  # exact: 53-bit integers times 2**-53
            assert sampling.uniform_floats(4, seed=seed, step=step).tolist() == want[:4]
            for p in (0.0, 0.3, 0.5, 0.97, 1.0):
                assert sampling.coin(p, seed=seed, step=step) == oracle_coin(p, seed, step)
            for p in (1e-3, 0.2, 0.5, 0.9, 1.0):
                got_k = sampling.geometric(p, seed=seed, step=step)
                assert got_k == oracle_geometric(p, seed, step)
            probs = [0.05, 0.5, 1.0, 0.3, 0.99, 0.7, 0.01, 0.6, 0.45]
            got = sampling.independent(probs, seed=seed, step=step)
            assert got.dtype == torch.int64
            assert got.tolist() == oracle_independent(probs, seed, step)
    assert sampling.uniform_floats(0, seed=1, step=2).shape == (0,)


# ---- uniform: the law of the cohort --------------------------------------------------------------


def test_uniform_cohorts_are_valid_subsets():
    s = fresh_seed("uniform seed")
    for n, c in [(1, 1), (2, 2), (3, 1), (9, 4), (64, 63), (65, 64), (1000, 50), (10**9, 20)]:
        for step in range(6):
            S = sampling.uniform(n, c, seed=s, step=step).tolist()
            assert len(S) == c and len(set(S)) == c
            assert S == sorted(S) and 0 <= S[0] and S[-1] < n
    # consecutive steps of a large population draw different cohorts (collisions ~1e-24)
    draws = {tuple(sampling.uniform(10**6, 5, seed=s, step=t).tolist()) for t in range(100)}
    assert len(draws) == 100
    assert sampling.uniform(6, 6, seed=s, step=3).tolist() == list(range(6))


T_SHARED = 1000


@pytest.fixture(scope="module")
def shared():
    """T_SHARED steps of one fresh seed: each function's draw at (seed, t), shared by the law
    tests and the stream-independence test (each call costs about a millisecond)."""
    s = fresh_seed("shared draws seed")
    d = {"cohort": [], "coin": [], "geom": [], "floats": [], "shuf": []}
    for t in range(T_SHARED):
        d["cohort"].append(sampling.uniform(10, 3, seed=s, step=t).tolist())
        d["coin"].append(sampling.coin(0.3, seed=s, step=t))
        d["geom"].append(sampling.geometric(0.25, seed=s, step=t))
        d["floats"].append(sampling.uniform_floats(2, seed=s, step=t).tolist())
        d["shuf"].append(sampling.reshuffled(10, 5, seed=s, epoch=t)[0].tolist())
    d["seed"] = s
    return d


def test_uniform_inclusion_frequency_is_c_over_n(shared):
    """Client m's inclusion count over T steps has mean T q (q = c / n); the counts are negatively
    correlated (fixed total), covariance T q (1 - q) n / (n - 1) (I - 11^T / n), so
    sum (N_m - T q)^2 / (T q (1 - q) n / (n - 1)) is chi-square(n - 1)."""
    n, c, T = 10, 3, T_SHARED
    q = c / n
    counts = [0] * n
    for S in shared["cohort"]:
        assert len(S) == c and S == sorted(set(S))
        for m in S:
            counts[m] += 1
    scale = T * q * (1 - q) * n / (n - 1)
    assert sum((k - T * q) ** 2 for k in counts) / scale < chi2_bound(n - 1), counts
    # the negative control: a cohort that favours client 0 (swap it in for client 9) fails
    biased = [0] * n
    for S in shared["cohort"]:
        for m in S if 0 in S else [0 if x == 9 else x for x in S]:
            biased[m] += 1
    assert sum((k - T * q) ** 2 for k in biased) / scale > chi2_bound(n - 1)


def test_uniform_subsets_are_equally_likely():
    """Every c-subset has probability 1 / C(n, c): chi-square over all subsets (tiny n is where a
    weakly keyed permutation shows: see fedkern.random's docstring), over consecutive steps and
    over consecutive seeds (both are counter words)."""
    for n, c, T, over in [(5, 2, 1000, "step"), (4, 1, 400, "seed"), (4, 2, 600, "seed")]:
        s = fresh_seed("uniform seed")
        subsets = list(itertools.combinations(range(n), c))
        counts = dict.fromkeys(subsets, 0)
        for t in range(T):
            key = {"seed": s, "step": t} if over == "step" else {"seed": s + t, "step": 5}
            counts[tuple(sampling.uniform(n, c, **key).tolist())] += 1
        e = T / len(subsets)
        assert chi2(counts.values(), [e] * len(subsets)) < chi2_bound(len(subsets) - 1), counts


# ---- independent participation -------------------------------------------------------------------


def test_independent_frequencies_expected_size_and_independence():
    s, T = fresh_seed("independent seed"), 1000
    probs = [0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0]
    counts, sizes, a, b = [0] * len(probs), [], [], []
    for step in range(T):
        S = sampling.independent(probs, seed=s, step=step).tolist()
        assert S == sorted(set(S)) and all(0 <= m < len(probs) for m in S)
        sizes.append(len(S))
        a.append(3 in S)
        b.append(4 in S)
        for m in S:
            counts[m] += 1
    for k, p in zip(counts, probs, strict=True):
        if p == 1.0:
            assert k == T
        else:
            assert abs(k - T * p) <= Z * math.sqrt(T * p * (1 - p)), (p, k)
    mean, var = sum(probs), sum(p * (1 - p) for p in probs)
    assert abs(sum(sizes) / T - mean) <= Z * math.sqrt(var / T)
    assert abs(phi_z(a, b)) < Z  # two clients' joins are uncorrelated
    # a float32 tensor of the same values gives the draw of its float64 values
    q = torch.tensor(probs, dtype=torch.float32)
    for step in range(5):
        want = sampling.independent(q.double().tolist(), seed=s, step=step)
        assert torch.equal(sampling.independent(q, seed=s, step=step), want)


def test_independent_empty_cohorts_occur_and_are_valid():
    s, T = fresh_seed("independent seed"), 300
    probs = [0.01] * 10
    empty = 0
    for step in range(T):
        S = sampling.independent(probs, seed=s, step=step)
        assert S.dtype == torch.int64 and S.dim() == 1
        empty += S.numel() == 0
    q = 0.99**10  # P(empty) ~ 0.904
    assert abs(empty - T * q) <= Z * math.sqrt(T * q * (1 - q))
    assert empty < T  # and not always empty


def test_uniform_floats_are_uniform():
    """One long draw: 20 equal bins (chi-square), the mean 1/2 and the range [0, 1)."""
    u = sampling.uniform_floats(20000, seed=fresh_seed("floats seed"), step=3)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1).tolist()
    assert chi2(counts, [1000] * 20) < chi2_bound(19), counts
    assert abs(float(u.mean()) - 0.5) <= Z * math.sqrt(1 / 12 / 20000)


# ---- coin and geometric --------------------------------------------------------------------------


def test_coin_frequency(shared):
    s, T, p = shared["seed"], T_SHARED, 0.3
    heads = sum(shared["coin"])
    assert abs(heads - T * p) <= Z * math.sqrt(T * p * (1 - p)), heads
    assert not any(sampling.coin(0.0, seed=s, step=t) for t in range(50))
    assert all(sampling.coin(1.0, seed=s, step=t) for t in range(50))
    assert all(type(x) is bool for x in shared["coin"])


def test_geometric_law(shared):
    """Mean 1/p (variance (1 - p) / p^2), P(K = 1) = p, and chi-square over the bins
    K = 1..8 and K > 8 of P(K = k) = (1 - p)^(k - 1) p."""
    s, T, p = shared["seed"], T_SHARED, 0.25
    K = shared["geom"]
    assert all(type(k) is int and k >= 1 for k in K)
    mean = sum(K) / T
    assert abs(mean - 1 / p) <= Z * math.sqrt((1 - p) / p**2 / T), mean
    ones = K.count(1)
    assert abs(ones - T * p) <= Z * math.sqrt(T * p * (1 - p))
    bins = [K.count(k) for k in range(1, 9)] + [sum(k > 8 for k in K)]
    probs = [(1 - p) ** (k - 1) * p for k in range(1, 9)] + [(1 - p) ** 8]
    assert chi2(bins, [T * q for q in probs]) < chi2_bound(len(bins) - 1), bins
    assert all(sampling.geometric(1.0, seed=s, step=t) == 1 for t in range(50))
    # a tiny p gives large but exact integer counts (mean 1e6)
    big = [sampling.geometric(1e-6, seed=s, step=t) for t in range(100)]
    assert all(type(k) is int and k >= 1 for k in big) and max(big) > 10**5


# ---- importance ----------------------------------------------------------------------------------


def brute_force_capped(w, c):
    """The capped proportional allocation by exhaustive search over the capped set C, in exact
    rationals: p = 1 on C, p = lam w on the rest with lam = (c - |C|) / sum_rest w, consistent
    iff lam w <= 1 off C and lam w >= 1 on C. Every consistent C must give the same p."""
    n = len(w)
    wq = [Fraction(x) for x in w]
    cq = Fraction(c)
    found = None
    for k in range(n + 1):
        for C in itertools.combinations(range(n), k):
            rest = [m for m in range(n) if m not in C]
            if not rest:
                if cq != n:
                    continue
                p = [Fraction(1)] * n
            else:
                lam = (cq - k) / sum(wq[m] for m in rest)
                if lam <= 0 or any(lam * wq[m] > 1 for m in rest):
                    continue
                if any(lam * wq[m] < 1 for m in C):
                    continue
                p = [Fraction(1) if m in C else lam * wq[m] for m in range(n)]
            if found is None:
                found = p
            else:
                assert p == found  # uniqueness of the allocation
    assert found is not None
    return [float(x) for x in found]


def test_importance_matches_the_brute_force_water_filling():
    g = torch.Generator().manual_seed(fresh_seed("importance inputs"))
    for trial in range(60):
        n = 1 + trial % 7
        L = torch.exp(2.5 * torch.randn(n, generator=g, dtype=torch.float64))
        c = float(torch.rand((), generator=g, dtype=torch.float64)) * n or n
        if trial % 5 == 0:
            c = float(max(1, n - 1))  # integer c, many capped
        alpha = [1.0, 0.5, 2.0][trial % 3]
        w = [float(x) ** alpha for x in L]
        want = torch.tensor(brute_force_capped(w, c), dtype=torch.float64)
        got = sampling.importance(L, c, alpha)
        assert got.dtype == torch.float64 and got.shape == (n,)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        assert abs(float(got.sum()) - c) <= 1e-12 * n
        assert bool((got > 0).all()) and bool((got <= 1).all())
        free = got < 1
        if int(free.sum()) >= 2:  # proportional to L**alpha among the uncapped
            ratio = got[free] / torch.tensor(w, dtype=torch.float64)[free]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=0)
        capped = ~free
        if bool(capped.any()) and bool(free.any()):  # the capped have the largest weights
            wt = torch.tensor(w, dtype=torch.float64)
            assert float(wt[capped].min()) >= float(wt[free].max())


def test_importance_multi_pass_capping_and_its_negative_control():
    """Two clients exceed 1 in turn: the second only after the first is capped. A one-shot clamp
    of c L / sum L (the negative control) loses mass; the water-filling keeps sum = c."""
    L, c = [100.0, 50.0, 1.0, 1.0, 1.0, 1.0], 3.0
    p = sampling.importance(L, c)
    assert p.tolist() == [1.0, 1.0, 0.25, 0.25, 0.25, 0.25]
    naive = torch.clamp(c * torch.tensor(L) / sum(L), max=1.0)
    assert abs(float(naive.sum()) - c) > 0.1  # the naive clamp fails the same sum check
    assert abs(float(p.sum()) - c) <= 1e-12


def test_importance_special_exponents_and_sizes():
    g = torch.Generator().manual_seed(fresh_seed("importance inputs"))
    L = torch.exp(3 * torch.randn(9, generator=g, dtype=torch.float64))
    L0 = L.clone()
    for c in (0.5, 1, 4.5, 9):
        assert sampling.importance(L, c, alpha=0).tolist() == [c / 9] * 9  # exactly c / n
    assert sampling.importance(L, 9).tolist() == [1.0] * 9
    assert sampling.importance(L, 9, alpha=500.0).tolist() == [1.0] * 9
    assert sampling.importance([3.0], 1).tolist() == [1.0]
    assert sampling.importance([3.0], 0.25).tolist() == [0.25]
    assert torch.equal(L, L0)  # the input is not modified
    # float32 tensors and sequences are accepted; the result is float64 on the CPU
    got = sampling.importance(L.float(), 2.0)
    want = sampling.importance(L.float().double().tolist(), 2.0)
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("alpha", [50.0, 500.0, -50.0, -500.0, 1e6])
def test_importance_large_exponents_stay_finite_positive_and_sum_to_c(alpha):
    """L**alpha overflows and underflows float64 here; the probabilities must not: finite, in
    (0, 1] (a valid input of ``independent``), summing to c, the heaviest (lightest for alpha < 0)
    clients capped."""
    L = [1.0, 2.0, 3.0, 1e3, 1e-3, 7.5, 7.5]
    for c in (1.0, 2.5, 6.0):
        p = sampling.importance(L, c, alpha)
        assert bool(torch.isfinite(p).all()), p
        assert bool((p > 0).all()) and bool((p <= 1).all()), p
        assert abs(float(p.sum()) - c) <= 1e-12 * len(L), (c, p)
        order = sorted(range(len(L)), key=lambda m: L[m], reverse=alpha > 0)
        assert float(p[order[0]]) == max(p.tolist())
        sampling.independent(p, seed=1, step=2)  # accepted
    # alpha = 50 on close weights is still proportional among the uncapped
    L = [1.0, 1.01, 1.02, 1.03]
    p = sampling.importance(L, 1.0, 50.0)
    w = torch.tensor(L, dtype=torch.float64) ** 50
    torch.testing.assert_close(p, w / w.sum(), rtol=1e-12, atol=0)


def test_independent_of_importance_has_expected_size_c():
    s, T = fresh_seed("importance seed"), 600
    L, c = [0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0], 3.0
    p = sampling.importance(L, c)
    sizes = [sampling.independent(p, seed=s, step=t).numel() for t in range(T)]
    var = float((p * (1 - p)).sum())
    assert abs(sum(sizes) / T - c) <= Z * math.sqrt(var / T)


# ---- reshuffled ----------------------------------------------------------------------------------


def test_reshuffled_covers_every_client_once_per_epoch():
    s = fresh_seed("reshuffled seed")
    for n, c in [(1, 1), (2, 1), (5, 5), (7, 3), (10, 5), (11, 4), (100, 7), (64, 10)]:
        for epoch in range(8):
            parts = sampling.reshuffled(n, c, seed=s, epoch=epoch)
            assert len(parts) == -(-n // c)
            flat = [m for t in parts for m in t.tolist()]
            assert sorted(flat) == list(range(n))
            assert all(t.tolist() == sorted(t.tolist()) for t in parts)
            assert all(t.numel() == c for t in parts[:-1])
            assert parts[-1].numel() == (n % c or c)
        if n >= 64:  # a fresh permutation each epoch (collisions have probability < 1e-60)
            epochs = {tuple(m for t in sampling.reshuffled(n, c, seed=s, epoch=e)
                            for m in t.tolist()) for e in range(30)}  # fmt: skip
            assert len(epochs) == 30


def test_reshuffled_epoch_orders_are_equally_likely():
    """n = 4, c = 2: the 6 ordered pairs of cohorts are equally likely; n = 5, c = 2: client 0's
    cohort index (0, 1, 2) has probabilities 2/5, 2/5, 1/5."""
    s, T = fresh_seed("reshuffled seed"), 900
    counts: dict = {}
    for e in range(T):
        key = tuple(tuple(t.tolist()) for t in sampling.reshuffled(4, 2, seed=s, epoch=e))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6
    assert chi2(counts.values(), [T / 6] * 6) < chi2_bound(5), counts
    where = [0, 0, 0]
    for e in range(500):
        parts = sampling.reshuffled(5, 2, seed=s, epoch=e)
        where[next(j for j, t in enumerate(parts) if 0 in t.tolist())] += 1
    assert chi2(where, [500 * 0.4, 500 * 0.4, 500 * 0.2]) < chi2_bound(2), where


# ---- purity: keyed, reproducible, no global RNG, independent streams -----------------------------


def _all_draws(seed, step):
    return (sampling.uniform(10, 4, seed=seed, step=step).tolist(),
            sampling.independent([0.3] * 6, seed=seed, step=step).tolist(),
            sampling.importance([1.0, 2.0, 5.0], 1.5).tolist(),
            [t.tolist() for t in sampling.reshuffled(7, 3, seed=seed, epoch=step)],
            sampling.coin(0.5, seed=seed, step=step),
            sampling.geometric(0.2, seed=seed, step=step),
            sampling.uniform_floats(3, seed=seed, step=step).tolist())  # fmt: skip


def test_draws_are_pure_and_leave_the_global_generators_alone():
    s = fresh_seed("purity seed")
    torch.manual_seed(0)
    first = _all_draws(s, 5)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    py_state = pyrandom.getstate()
    again = _all_draws(s, 5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert pyrandom.getstate() == py_state
    np_after = np.random.get_state()
    assert np_after[0] == np_state[0] and np.array_equal(np_after[1], np_state[1])
    assert np_after[2:] == np_state[2:]
    assert again == first
    torch.manual_seed(12345)  # reseeding the global generator does not change a draw
    np.random.seed(7)
    pyrandom.seed(9)
    assert _all_draws(s, 5) == first
    # the negative control: a different (seed, step) changes the draws
    assert _all_draws(s, 6) != first and _all_draws(s + 1, 5) != first


def test_numpy_integers_are_accepted_as_sizes_and_keys():
    s = fresh_seed("numpy keys seed")
    i64 = np.int64
    assert torch.equal(sampling.uniform(i64(9), i64(4), seed=i64(s), step=i64(7)),
                       sampling.uniform(9, 4, seed=s, step=7))  # fmt: skip
    assert sampling.coin(0.5, seed=i64(s), step=np.uint32(7)) == sampling.coin(0.5, seed=s, step=7)
    got = sampling.reshuffled(np.int32(7), np.int32(3), seed=i64(s), epoch=i64(2))
    assert [t.tolist() for t in got] == oracle_reshuffled(7, 3, s, 2)


def test_streams_are_independent(shared):
    """At the same (seed, step): the cohort, the coin, the geometric count, the participation
    floats and the reshuffle are uncorrelated over many steps; and so are adjacent steps and two
    entries of one float draw. The statistic flags a stream read twice (the negative control)."""
    s = shared["seed"]
    cohort = [0 in S for S in shared["cohort"]]
    coin, geom = shared["coin"], [k == 1 for k in shared["geom"]]
    part0 = [u[0] < 0.5 for u in shared["floats"]]
    part1 = [u[1] < 0.5 for u in shared["floats"]]
    shuf = [0 in S for S in shared["shuf"]]
    named = {"cohort": cohort, "coin": coin, "geom": geom, "part0": part0, "part1": part1,
             "shuf": shuf}  # fmt: skip
    for (na, a), (nb, b) in itertools.combinations(named.items(), 2):
        assert abs(phi_z(a, b)) < Z, (na, nb)
    for na, a in named.items():
        assert abs(phi_z(a[1:], a[:-1])) < Z, na  # adjacent steps
    assert abs(phi_z(coin, coin)) > Z  # negative control
    # the cohort stream is not the shuffle stream of fedkern.random.permutation
    same = sum(sampling.uniform(50, 5, seed=s, step=t).tolist()
               == sorted(frandom.permutation(50, s, t)[:5]) for t in range(30))  # fmt: skip
    assert same == 0


def test_coin_stream_is_not_shared_with_the_default_uniform_stream():
    """Found here: the quartic data used to be the coin's draw (the default stream of
    fedkern.random.uniforms at step 0), so that with one seed the data's first float was the first
    coin's uniform. At the coin's own uniform as p, a coin is tails at p and heads just above it;
    the data's first float as p must not sit on that edge."""
    from fedkern.problems import Quartic

    s = fresh_seed("collision seed")
    u0 = float(Quartic.uniform_points(1, 1, low=0.0, high=1.0, seed=s)[0, 0])
    assert sampling.coin(u0, seed=s, step=0) or not sampling.coin(u0 + 1e-9, seed=s, step=0)
    # the negative control: the coin's own uniform (the default stream) sits on the edge
    c0 = float(frandom.uniforms(1, seed=s, step=0)[0])
    assert not sampling.coin(c0, seed=s, step=0) and sampling.coin(c0 + 1e-9, seed=s, step=0)


def test_quartic_data_has_its_own_stream():
    """Quartic.uniform_points at (seed, step 0) is the documented draw of stream "QDAT", bit for
    bit (the oracle), and shares no float with the coin stream's words of that seed."""
    from fedkern.problems import Quartic

    assert frandom.STREAM_QUARTIC == tag("QDAT")
    for s in seeds():
        data = Quartic.uniform_points(40, 3, low=0.0, high=1.0, seed=s).flatten().tolist()
        assert data == oracle_floats(120, s, 0, tag("QDAT"))
        coins = oracle_floats(120, s, 0, COIN_STREAM)
        assert coins == frandom.uniforms(120, seed=s, step=0).tolist()  # the default stream
        assert not set(data) & set(coins)
        # what the data was before it had its own stream: the control the check above fails
        assert set(oracle_floats(120, s, 0, UNIF)) & set(coins)


# ---- bad input -----------------------------------------------------------------------------------

U, IND, IMP, R, C, G, F = (sampling.uniform, sampling.independent, sampling.importance,
                         sampling.reshuffled, sampling.coin, sampling.geometric,
                         sampling.uniform_floats)  # fmt: skip
OK = {"seed": 1, "step": 2}
BAD_SEEDS = [(-1, ValueError), (2**63, ValueError), (2**64 + 1, ValueError), (1.0, TypeError),
             (1.5, TypeError), ("3", TypeError), (None, TypeError), (True, TypeError)]  # fmt: skip

BAD = [
    # uniform
    (U, (0, 1), OK, ValueError, "n"), (U, (-3, 1), OK, ValueError, "n"),
    (U, (2.0, 1), OK, TypeError, "n"), (U, ("5", 1), OK, TypeError, "n"),
    (U, (True, 1), OK, TypeError, "n"), (U, (2**62 + 1, 1), OK, ValueError, "n"),
    (U, (5, 0), OK, ValueError, "c"), (U, (5, 6), OK, ValueError, "c"),
    (U, (5, -1), OK, ValueError, "c"), (U, (5, 2.0), OK, TypeError, "c"),
    (U, (5, None), OK, TypeError, "c"),
    # independent
    (IND, ([],), OK, ValueError, "probs"),
    (IND, ([0.5, 0.0],), OK, ValueError, "probs"),
    (IND, ([1.5],), OK, ValueError, "probs"),
    (IND, ([-0.1, 0.5],), OK, ValueError, "probs"),
    (IND, ([0.5, math.nan],), OK, ValueError, "probs"),
    (IND, ([math.inf],), OK, ValueError, "probs"),
    (IND, ([[0.5, 0.5]],), OK, ValueError, "probs"),
    (IND, (0.5,), OK, ValueError, "probs"),
    (IND, (torch.full((2, 2), 0.5),), OK, ValueError, "probs"),
    (IND, (torch.tensor(0.5),), OK, ValueError, "probs"),
    (IND, (torch.empty(0),), OK, ValueError, "probs"),
    (IND, ("abc",), OK, TypeError, "probs"),
    (IND, (None,), OK, TypeError, "probs"),
    (IND, ([0.5, "x"],), OK, TypeError, "probs"),
    # importance
    (IMP, ([], 1), {}, ValueError, "L"), (IMP, ([1.0, 0.0], 1), {}, ValueError, "L"),
    (IMP, ([1.0, -2.0], 1), {}, ValueError, "L"), (IMP, ([1.0, math.nan], 1), {}, ValueError, "L"),
    (IMP, ([1.0, math.inf], 1), {}, ValueError, "L"),
    (IMP, ([[1.0, 2.0]], 1), {}, ValueError, "L"), (IMP, (3.0, 1), {}, ValueError, "L"),
    (IMP, (torch.ones(2, 2), 1), {}, ValueError, "L"), (IMP, ("ab", 1), {}, TypeError, "L"),
    (IMP, (None, 1), {}, TypeError, "L"),
    (IMP, ([1.0, 2.0], 0), {}, ValueError, "c"), (IMP, ([1.0, 2.0], -1), {}, ValueError, "c"),
    (IMP, ([1.0, 2.0], 2.5), {}, ValueError, "c"),
    (IMP, ([1.0, 2.0], math.nan), {}, ValueError, "c"),
    (IMP, ([1.0, 2.0], math.inf), {}, ValueError, "c"),
    (IMP, ([1.0, 2.0], True), {}, TypeError, "c"),
    (IMP, ([1.0, 2.0], "1"), {}, TypeError, "c"), (IMP, ([1.0, 2.0], None), {}, TypeError, "c"),
    (IMP, ([1.0, 2.0], 1, math.nan), {}, ValueError, "alpha"),
    (IMP, ([1.0, 2.0], 1, math.inf), {}, ValueError, "alpha"),
    (IMP, ([1.0, 2.0], 1, -math.inf), {}, ValueError, "alpha"),
    (IMP, ([1.0, 2.0], 1, "2"), {}, TypeError, "alpha"),
    (IMP, ([1.0, 2.0], 1, None), {}, TypeError, "alpha"),
    # reshuffled
    (R, (0, 1), {"seed": 1, "epoch": 0}, ValueError, "n"),
    (R, (4, 0), {"seed": 1, "epoch": 0}, ValueError, "c"),
    (R, (4, 5), {"seed": 1, "epoch": 0}, ValueError, "c"),
    (R, (4, 1.0), {"seed": 1, "epoch": 0}, TypeError, "c"),
    # coin, geometric, uniform_floats
    (C, (-0.1,), OK, ValueError, "p"), (C, (1.1,), OK, ValueError, "p"),
    (C, (math.nan,), OK, ValueError, "p"), (C, (math.inf,), OK, ValueError, "p"),
    (C, ("0.5",), OK, TypeError, "p"), (C, (True,), OK, TypeError, "p"),
    (G, (0.0,), OK, ValueError, "p"), (G, (-0.5,), OK, ValueError, "p"),
    (G, (1.5,), OK, ValueError, "p"), (G, (math.nan,), OK, ValueError, "p"),
    (G, (None,), OK, TypeError, "p"), (G, (1e-310,), OK, ValueError, "p"),
    (F, (-1,), OK, ValueError, "n"), (F, (1.5,), OK, TypeError, "n"),
    (F, ("3",), OK, TypeError, "n"), (F, (None,), OK, TypeError, "n"),
]  # fmt: skip

# every keyed function, with valid other arguments (c = n and p = 1 included: the fast paths)
KEYED = [(U, (5, 2), ("seed", "step")), (U, (5, 5), ("seed", "step")),
         (U, (1, 1), ("seed", "step")), (IND, ([0.5, 1.0],), ("seed", "step")),
         (R, (5, 2), ("seed", "epoch")), (R, (1, 1), ("seed", "epoch")),
         (C, (0.5,), ("seed", "step")), (C, (0.0,), ("seed", "step")),
         (G, (0.5,), ("seed", "step")), (G, (1.0,), ("seed", "step")),
         (F, (3,), ("seed", "step")), (F, (0,), ("seed", "step"))]  # fmt: skip


def _id(case):
    return f"{case[0].__name__}-{case[-1]}-{case[1]!r}"[:60]


@pytest.mark.parametrize("case", BAD, ids=[_id(c) for c in BAD])
def test_bad_input_names_the_argument(case):
    fn, args, kw, exc, name = case
    with pytest.raises(exc, match=rf"^{name}\b"):
        fn(*args, **kw)


@pytest.mark.parametrize("case", KEYED, ids=[f"{f.__name__}{a!r}" for f, a, _ in KEYED])
def test_bad_keys_name_the_argument(case):
    fn, args, names = case
    for name in names:
        kw = dict.fromkeys(names, 3)
        fn(*args, **kw)  # valid
        for bad, exc in BAD_SEEDS:
            kw[name] = bad
            with pytest.raises(exc, match=rf"^{name}\b"):
                fn(*args, **kw)
    with pytest.raises(TypeError):
        fn(*args)  # the keys are keyword-only and required


# ---- the users draw from fedkern.sampling at the documented keys ---------------------------------


def test_method_cohort_coin_geometric_are_sampling_at_key():
    from fedkern.algorithms.base import Method

    class Probe(Method):
        def step(self):
            self.rounds += 1

    s = fresh_seed("method seed")
    m = Probe(seed=s)
    for r in range(4):
        for slot in (0, 1, 7, 15):
            key = (r + 1) * 16 + slot
            assert m.key(slot) == key
            assert m.cohort(20, 6, slot).tolist() == oracle_uniform(20, 6, s, key)
            assert m.coin(0.5, slot) == oracle_coin(0.5, s, key)
            assert m.geometric(0.3, slot) == oracle_geometric(0.3, s, key)
        m.step()
    assert [m.initial_key(k) for k in (0, 1, 15)] == [0, 1, 15]


@pytest.fixture(scope="module")
def cancer():
    from fedkern import data

    return data.load("breast_cancer")


def test_scaffnew_partial_participation_uses_the_sampling_cohort(cancer, monkeypatch):
    """Round r of Scaffnew with cohort c trains exactly the clients oracle_uniform(n, c) at key
    (r + 1) * 16 + 1 (slot 1) for geometric(p) at key (r + 1) * 16 local steps; only their control
    variates change. The cohort comes through fedkern.sampling.uniform (a spy on the module
    attribute sees every call). Negative control: the neighbouring key does not match."""
    from fedkern import data
    from fedkern.algorithms import Scaffnew
    from fedkern.clients import ClientBatch
    from fedkern.problems import Problem

    A, y = cancer
    B = ClientBatch(Problem(A, y, data.split(y, 8, "iid", seed=0), "logistic", 0.05), seed=1)
    s, n, c, p = fresh_seed("scaffnew seed"), 8, 3, 0.4
    calls = []
    real = sampling.uniform

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append((args, kw, out.tolist()))
        return out

    monkeypatch.setattr(sampling, "uniform", spy)
    m = Scaffnew(B, p=p, cohort=c, seed=s)
    used = []
    real_local = B.local_steps_

    def local_spy(X, **kw):
        used.append(kw["clients"].cpu().tolist())
        return real_local(X, **kw)

    monkeypatch.setattr(B, "local_steps_", local_spy)
    mismatches = 0
    for r in range(6):
        H0 = m.H.clone()
        ncalls = len(calls)
        m.step()
        want = oracle_uniform(n, c, s, (r + 1) * 16 + 1)
        assert used[-1] == want
        assert calls[ncalls:] == [((n, c), {"seed": s, "step": (r + 1) * 16 + 1}, want)]
        assert m.history["local_steps"][-1] == oracle_geometric(p, s, (r + 1) * 16)
        changed = sorted(set(torch.nonzero((m.H != H0).any(1)).flatten().tolist()))
        assert set(changed) <= set(want) and changed  # only the cohort's h_i move
        mismatches += oracle_uniform(n, c, s, (r + 1) * 16 + 2) != want
    assert mismatches >= 1  # negative control: the slot matters


def test_byz_vr_marina_pp_draws_its_coins_cohorts_and_minibatches_from_sampling(monkeypatch):
    """Byz-VR-MARINA-PP: the initial full round uses uniform(n, full_cohort) at key 1; round r's
    coin is coin(p) at (r + 1) * 16, its cohort uniform(n, C or C_hat) at (r + 1) * 16 + 1 and, in
    compressed rounds, client i's minibatch uniform(m_i, b) under client_seed(seed, i) at
    (r + 1) * 16 + 2."""
    from fedkern import data
    from fedkern.algorithms import ByzVRMarinaPP
    from fedkern.problems import LogisticRegression

    A, y = data.load("breast_cancer")
    problem = LogisticRegression(A, y, data.split(y, 10, "iid", seed=0), l2=0.1)
    s, n, C, Chat, p, b = fresh_seed("marina seed"), 10, 3, 6, 0.4, 4
    cohorts = []
    real_split = ByzVRMarinaPP._split

    def split_spy(self, S):
        cohorts.append(list(S))
        return real_split(self, S)

    monkeypatch.setattr(ByzVRMarinaPP, "_split", split_spy)
    m = ByzVRMarinaPP(problem, byzantine=[8, 9], cohort=C, full_cohort=Chat, p=p, batch_size=b,
                      seed=s)  # fmt: skip
    assert cohorts == [oracle_uniform(n, Chat, s, 1)]
    batches = []
    real_grads = problem.grads

    def grads_spy(x, clients, samples=None):
        if samples is not None:
            batches.append((list(clients), [t.tolist() for t in samples]))
        return real_grads(x, clients, samples)

    monkeypatch.setattr(problem, "grads", grads_spy)
    sizes = problem.sizes.tolist()
    saw = {True: 0, False: 0}
    for r in range(8):
        cohorts.clear()
        batches.clear()
        m.step()
        full = m.history["full"][-1]
        assert full == oracle_coin(m.p, s, (r + 1) * 16)  # m.p: p rounded to float32
        saw[full] += 1
        assert cohorts[0] == oracle_uniform(n, Chat if full else C, s, (r + 1) * 16 + 1)
        for clients, samples in batches:
            for i, got in zip(clients, samples, strict=True):
                want = oracle_uniform(sizes[i], min(b, sizes[i]), oracle_client_seed(s, i),
                                      (r + 1) * 16 + 2)  # fmt: skip
                assert got == want
        assert bool(batches) == (not full)
    assert saw[False] > 0
