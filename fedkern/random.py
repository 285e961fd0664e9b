"""Counter-based randomness shared by every backend.

fedkern never stores random masks: every random choice is a pure function of a key, so the same
(seed, step) produces the same mask on the reference, C++, Triton and CUDA backends, bit for bit,
and a mask can be communicated as its seed.

The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11): a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) map to four uint32 words
through ten rounds of multiply-high/low and xor, with the key bumped by the Weyl constants between
rounds.

Rand-k draws its index set from a keyed pseudo-random permutation of [0, n) (a balanced Feistel
network on 2h bits with cycle walking); its eight round keys are the Philox words of the
counter (seed_lo, seed_hi, step_lo, step_hi) under the keys (STREAM_RANDK, 0) and (STREAM_RANDK, 1),
computed here once per call and passed to the kernels as plain integers. (seed, step) go into the
counter, the input Philox is designed to diffuse, rather than into the key: with the key carrying
the seed, the subsets drawn for consecutive seeds on tiny n failed a chi-square uniformity test.
"""

from __future__ import annotations

__all__ = [
    "philox4x32",
    "randk_keys",
    "client_seed",
    "feistel_params",
    "feistel",
    "permutation",
    "permutation_tensor",
    "uniforms",
    "STREAM_RANDK",
    "STREAM_CLIENT",
    "STREAM_SHUFFLE",
    "STREAM_COHORT",
    "STREAM_RESHUFFLE",
    "STREAM_UNIFORM",
    "STREAM_GAUSSIAN",
    "STREAM_MANIFOLD",
    "STREAM_BERNOULLI",
    "STREAM_SKETCH",
    "STREAM_PARTITION",
    "STREAM_PATTERN",
    "STREAM_QUARTIC",
    "draw_key",
    "draw_keys_tensor",
    "gaussian",
    "bernoulli",
]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_MAX_SEED = (1 << 63) - 1

#: Stream tag (key word k0) of the rand-k round keys; other random features use other tags.
STREAM_RANDK = 0x52414E4B  # "RANK"
#: Stream tag of per-client seeds (``client_seed``).
STREAM_CLIENT = 0x434C4E54  # "CLNT"
#: Stream tag of shuffles (``permutation``: bucketing).
STREAM_SHUFFLE = 0x53484646  # "SHFF"
#: Stream tags of ``fedkern.sampling``: uniform cohorts, meta-epoch reshuffles, and the uniform
#: floats behind coins, geometric counts and independent participation.
STREAM_COHORT = 0x434F4854  # "COHT"
STREAM_RESHUFFLE = 0x52534846  # "RSHF"
STREAM_UNIFORM = 0x554E4946  # "UNIF"
#: Stream tag of TAMUNA's per-round slot permutation (``fedkern.sampling.slot_permutation``).
STREAM_PATTERN = 0x50415454  # "PATT"
#: Stream tags of the Gaussian draws (``gaussian``: the frozen RAC-LoRA factors; and the
#: directions of ``fedkern.estimators.ZerothOrder``) and ``bernoulli`` (the Bernoulli sketches), and
#: of the Feistel round keys of the Rand-K and partition sketches (fedkern.sketch).
STREAM_GAUSSIAN = 0x47415553  # "GAUS"
STREAM_BERNOULLI = 0x4245524E  # "BERN"
STREAM_SKETCH = 0x534B5443  # "SKTC"
STREAM_PARTITION = 0x50415254  # "PART"
#: Stream tag of random points and tangent vectors of ``fedkern.manifolds``.
STREAM_MANIFOLD = 0x4D414E49  # "MANI"
#: Stream tag of the quartic problem's data (``fedkern.problems.Quartic.uniform_points``): its own
#: tag, so that the data drawn from a seed is independent of the coins drawn from the same seed.
STREAM_QUARTIC = 0x51444154  # "QDAT"


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = 10):
    """Philox4x32 bijection of one 128-bit counter under a 64-bit key.

    Args:
        counter: four integers in [0, 2**32).
        key: two integers in [0, 2**32).
        rounds: number of rounds (10 is the standard, crush-resistant choice).

    Returns:
        A tuple of four integers in [0, 2**32).
    """
    c0, c1, c2, c3 = (int(c) & _MASK32 for c in counter)
    k0, k1 = (int(k) & _MASK32 for k in key)
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            ((p1 >> 32) ^ c1 ^ k0) & _MASK32,
            p1 & _MASK32,
            ((p0 >> 32) ^ c3 ^ k1) & _MASK32,
            p0 & _MASK32,
        )
    return c0, c1, c2, c3


def _check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {type(value).__name__}")
    if not 0 <= value <= _MAX_SEED:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value}")
    return value


def _round_keys(stream: int, seed: int, step: int) -> tuple[int, ...]:
    counter = (seed & _MASK32, seed >> 32, step & _MASK32, step >> 32)
    words = philox4x32(counter, (stream, 0)) + philox4x32(counter, (stream, 1))
    return tuple(int(w) for w in words)


def randk_keys(seed: int, step: int) -> tuple[int, ...]:
    """The eight uint32 Feistel round keys of rand-k for (seed, step).

    Args:
        seed: int in [0, 2**63).
        step: int in [0, 2**63).

    Returns:
        A tuple of eight integers in [0, 2**32).

    Raises:
        TypeError / ValueError naming ``seed`` or ``step`` when they are not such integers.
    """
    return _round_keys(STREAM_RANDK, _check_seed("seed", seed), _check_seed("step", step))


def client_seed(seed: int, client: int) -> int:
    """The seed of client ``client``'s own stream, derived from a run's ``seed``.

    Per-client randomness (a client's rand-k masks, its minibatches) is keyed by this value, so it
    depends on (seed, client id) only, never on the order in which clients are batched.

    Args:
        seed: int in [0, 2**63).
        client: int in [0, 2**63).

    Returns:
        An int in [0, 2**63): the low 63 bits of Philox4x32 at counter (client, seed) under the
        key (STREAM_CLIENT, 0).
    """
    seed = _check_seed("seed", seed)
    client = _check_seed("client", client)
    counter = (client & _MASK32, client >> 32, seed & _MASK32, seed >> 32)
    w = philox4x32(counter, (STREAM_CLIENT, 0))
    return (int(w[0]) | (int(w[1]) << 32)) & _MAX_SEED


def feistel_params(n: int) -> tuple[int, int]:
    """Half width h and the uint32 half mask of the Feistel network that permutes [0, n).

    The network acts on b = 2h bits with b the bit length of n - 1, at least 2 and rounded up to
    even, so 2**b >= n and cycle walking needs fewer than four evaluations on average.
    """
    b = max(2, (n - 1).bit_length())
    b += b & 1
    h = b // 2
    return h, (1 << h) - 1


def permutation(n: int, seed: int, step: int = 0) -> list[int]:
    """A keyed uniform-looking permutation of range(n): entry i is perm(i).

    The same 8-round Feistel network with cycle walking as rand-k (``fedkern.reference.randk``),
    keyed by the shuffle stream (STREAM_SHUFFLE) at (seed, step), so it is reproducible on any
    machine and independent of the rand-k masks drawn from the same seed.

    Args:
        n: int >= 1.
        seed, step: ints in [0, 2**63).

    Returns:
        A list of the n ints 0..n-1 in permuted order.
    """
    return permutation_tensor(n, seed, step).tolist()


def permutation_tensor(n: int, seed: int, step: int = 0, *, stream: int = STREAM_SHUFFLE,
                       count: int | None = None):  # fmt: skip
    """``permutation`` as an int64 tensor, vectorized; ``count`` keeps only its first entries.

    Args:
        n: int >= 1, the size of the permuted range.
        seed, step: ints in [0, 2**63).
        stream: the Philox stream tag of the round keys (STREAM_SHUFFLE for ``permutation``;
            ``fedkern.sampling`` uses its own tags, so its draws are independent of these).
        count: how many leading entries perm(0..count-1) to compute (default n). The first
            ``count`` entries of a uniform permutation are a uniform ``count``-subset in random
            order: that is how a cohort is drawn in O(count).

    Returns:
        int64 CPU tensor [count] of distinct values in [0, n).
    """
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    count = n if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= n:
        raise ValueError(f"count must be an int in [0, {n}], got {count!r}")
    keys = _round_keys(stream, _check_seed("seed", seed), _check_seed("step", step))
    h, mask = feistel_params(n)
    x = feistel(torch.arange(count, dtype=torch.int64), keys, h, mask)
    walk = torch.nonzero(x >= n).flatten()
    while walk.numel():  # cycle walking, on the lanes still outside [0, n) only
        x[walk] = feistel(x[walk], keys, h, mask)
        walk = walk[x[walk] >= n]
    return x


def feistel(x, keys, h: int, mask: int):
    """One pass of the 8-round Feistel network on an int64 tensor of values in [0, 2**(2h)).

    Round function F(R, K) = mix32(R ^ K) & mask with mix32 the "lowbias32" hash; the network of
    rand-k, ``permutation`` and the clients' minibatches (cycle walking is the caller's).
    """
    left, right = x >> h, x & mask
    for key in keys:
        f = right ^ key
        f = f ^ (f >> 16)
        f = _mul32_tensor(f, 0x7FEB352D)
        f = f ^ (f >> 15)
        f = _mul32_tensor(f, 0x846CA68B)
        f = f ^ (f >> 16)
        left, right = right, left ^ (f & mask)
    return (left << h) | right


def _mul32_tensor(x, c: int):
    """uint32 product x * c mod 2**32 in int64 without overflow (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def uniforms(n: int, *, seed: int, step: int, stream: int = STREAM_UNIFORM):
    """n independent uniform floats in [0, 1) for (seed, step): float64 CPU tensor [n].

    Entry i is the top 53 bits of the 64-bit Philox output at counter (i, k) under a key k,
    with k = Philox((seed, step), (stream, 0)) derived once per call, times 2**-53. Entry i does
    not depend on n, so a longer draw extends a shorter one.

    Args:
        n: int >= 0.
        seed, step: ints in [0, 2**63).
        stream: the stream tag (distinct features use distinct tags). The default,
            STREAM_UNIFORM, is also the base of ``fedkern.sampling``'s streams (its coins use it
            as it is): a draw that must be independent of a method's coins passes its own tag,
            as ``Quartic.uniform_points`` does (STREAM_QUARTIC).
    """
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    seed, step = _check_seed("seed", seed), _check_seed("step", step)
    w = philox4x32((seed & _MASK32, seed >> 32, step & _MASK32, step >> 32), (stream, 0))
    i = torch.arange(n, dtype=torch.int64)
    zero = torch.zeros_like(i)
    out = philox4x32_tensor(i & _MASK32, i >> 32, zero + w[0], zero + w[1], w[2], w[3])
    bits = (out[1] << 21) | (out[0] >> 11)  # the top 53 of the 64 bits (out[1] high), exact
    return bits.to(torch.float64) * 2.0**-53


# ---- vectorized forms (torch int64 tensors holding uint32 / uint63 values) ----------------------


def _mulhilo(a, m: int):
    """(hi, lo) 32-bit words of a * m for a tensor a of uint32 values and a uint32 constant m,
    in int64 arithmetic without overflow (m split in 16-bit halves)."""
    lo = a * (m & 0xFFFF)
    mid = a * (m >> 16)
    hi = (mid + (lo >> 16)) >> 16
    return hi, (((mid & 0xFFFF) << 16) + lo) & _MASK32


def philox4x32_tensor(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """``philox4x32`` on int64 tensors of counter words (broadcast together); same outputs.

    Args:
        c0..c3: int64 tensors of values in [0, 2**32).
        k0, k1: the key words, ints in [0, 2**32).

    Returns:
        Four int64 tensors of values in [0, 2**32).
    """
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def client_seeds(seed: int, clients):
    """``client_seed(seed, c)`` for every c of an int64 tensor ``clients`` (any shape)."""
    import torch

    seed = _check_seed("seed", seed)
    c = torch.as_tensor(clients, dtype=torch.int64)
    if c.numel() and int(c.min()) < 0:
        raise ValueError("clients must be ids >= 0")
    zero = torch.zeros_like(c)
    w = philox4x32_tensor(c & _MASK32, c >> 32, zero + (seed & _MASK32), zero + (seed >> 32),
                          STREAM_CLIENT, 0)  # fmt: skip
    return (w[0] | (w[1] << 32)) & _MAX_SEED


def randk_keys_tensor(seeds, steps, *, stream: int = STREAM_RANDK):
    """``randk_keys(seed, step)`` for tensors of seeds and steps (broadcast): [..., 8] int64.

    The Feistel round keys of every (client, step) in one call: what the batched local-training
    kernels use for their minibatch and reshuffling permutations (``stream`` another tag: the
    round keys of that stream, e.g. the sketches' STREAM_SKETCH).
    """
    import torch

    s = torch.as_tensor(seeds, dtype=torch.int64)
    t = torch.as_tensor(steps, dtype=torch.int64)
    s, t = torch.broadcast_tensors(s, t)
    words = []
    for k1 in (0, 1):
        words += philox4x32_tensor(s & _MASK32, s >> 32, t & _MASK32, t >> 32, stream, k1)
    return torch.stack(words, -1)


def feistel_keys(seed: int, step: int, *, stream: int) -> tuple[int, ...]:
    """The eight Feistel round keys of (seed, step) in stream ``stream`` (``randk_keys`` is the
    STREAM_RANDK case): what the Rand-K and partition sketches permute with."""
    return _round_keys(stream, _check_seed("seed", seed), _check_seed("step", step))


# ---- Gaussian and Bernoulli draws ---------------------------------------------------------------


def draw_key(seed: int, step: int, *, stream: int) -> tuple[int, int, int, int]:
    """The four key words (w0, w1, w2, w3) of a draw: Philox4x32 of the counter (seed_lo, seed_hi,
    step_lo, step_hi) under the key (stream, 0). Entry i of the draw is lane i & 3 of
    Philox4x32((g_lo, g_hi, w2, w3), (w0, w1)) with g = i >> 2 (``fedkern.reference.random``)."""
    seed, step = _check_seed("seed", seed), _check_seed("step", step)
    w = philox4x32((seed & _MASK32, seed >> 32, step & _MASK32, step >> 32), (stream, 0))
    return tuple(int(x) for x in w)


def draw_keys_tensor(seeds, steps, *, stream: int):
    """``draw_key`` for tensors of seeds and steps (broadcast together): int64 [..., 4]."""
    import torch

    s = torch.as_tensor(seeds, dtype=torch.int64)
    t = torch.as_tensor(steps, dtype=torch.int64)
    s, t = torch.broadcast_tensors(s, t)
    w = philox4x32_tensor(s & _MASK32, s >> 32, t & _MASK32, t >> 32, stream, 0)
    return torch.stack(w, -1)


def gaussian(shape, *, seed: int, step: int = 0, dtype=None, device=None, std: float = 1.0):
    """Standard normal draws, a pure function of (seed, step): the same bits on every backend.

    Box-Muller on the words of Philox4x32-10 with fedkern's own fp32 log / sin / cos (fixed
    sequences of exactly rounded operations; ``fedkern.reference.random`` gives the exact
    definition), so the reference, the C++ core and Triton return identical tensors and a
    receiver regenerates the draw from its seed. The values are fp32 numbers with |z| <= 5.77
    (the 24-bit uniform of the radius truncates the tail at probability ~8e-9).

    Args:
        shape: the output shape (ints >= 0).
        seed, step: ints in [0, 2**63).
        dtype: torch.float32 (default), torch.bfloat16 (the fp32 value rounded once) or
            torch.float64 (the fp32 value, exactly).
        device: where the tensor is made (default CPU); CUDA runs the Triton kernel.
        std: a finite fp32 number; the result is round(std * z) in fp32 (default 1: z itself).

    Returns:
        A new tensor of ``shape``; entry i (row-major) does not depend on the shape, so a longer
        draw extends a shorter one.
    """
    from fedkern.ops import random as ops

    return ops.gaussian(shape, seed=seed, step=step, dtype=dtype, device=device, std=std)


def bernoulli(shape, p, *, seed: int, step: int = 0, device=None):
    """Independent keep flags with probability p, a pure function of (seed, step).

    Entry i is kept iff its 24-bit Philox word is below T = ceil(p * 2^24), so the keep
    probability is exactly T / 2^24 (p rounded up to a multiple of 2^-24, the same on every
    backend); ``fedkern.sketch.Bernoulli`` scales kept entries by 2^24 / T, exactly unbiased.

    Args:
        shape: the output shape.
        p: a probability in (0, 1] (rounded to fp32), or a float32 tensor of ``shape`` (one per
            entry, each in (0, 1]).
        seed, step: ints in [0, 2**63).
        device: default p's device (a tensor p) or CPU.

    Returns:
        A new bool tensor of ``shape``.
    """
    from fedkern.ops import random as ops

    return ops.bernoulli(shape, p, seed=seed, step=step, device=device)
