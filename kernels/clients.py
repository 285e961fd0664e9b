"""Batched per-client local training (Triton): local steps, Scaffnew consensus, weighted row sums.

Data (packed, one client after another): A float32 [N, d], y float32 [N], offsets int64 [n + 1];
client i owns rows offsets[i] .. offsets[i+1] - 1 (m_i of them, possibly 0).  Model kinds:
0 logistic (p = d, y in {0, 1}), 1 multinomial (p = C*d, W [C, d] row-major, y = class as float),
2 least squares (p = d).  Per-sample gradients at x:

    logistic:       s = 2y - 1; z = a.x;  grad = coef * a,  coef = -s / (1 + exp(s z))
    multinomial:    z_c = a.w_c; P = softmax(z) (max subtracted); grad_c = (P_c - [c == y]) * a
    least_squares:  z = a.x;  grad = (z - y) * a

local_steps_ (in place on X [c, p]), cohort row r, client i = clients[r], x = X[r]; K times:
    batches: gd: all m_i samples in order; sgd: perm(0 .. min(b, m_i) - 1); rr: perm(0 .. m_i - 1)
             cut into batches of b (the last may be shorter); perm(j) = the keyed Feistel
             permutation of [0, m_i) with cycle walking (kernels/randk.py), keys[r, t, 0:8]
    per batch B:  g = (1/|B|) sum_{j in B} grad(x; a_j, y_j)  (0 when |B| = 0: empty clients step)
                  g += l2 x;  mu != 0: g += mu (x - anchor[r]);  u = g - H[r] (if H)
                  clip > 0: nrm = sqrt(sum double(u_k)^2); nrm > clip: u = float(clip / nrm) u
                  x = x - gamma u
client_grads (G [c, p] out, X read only), cohort row r, client i, x = X[r], one batch B:
    gd: all m_i samples; sgd: perm(0 .. min(b, m_i) - 1) keyed by keys[r, 0:8] (local_steps_'s sgd
    batch); samples (mode 3): the entries samples[r, q] >= 0 (local indices; -1 is padding)
    G[r] = (1/|B|) sum_{j in B} grad(x; a_j, y_j) + l2 x      (|B| = 0: l2 x)
scaffnew_sync_:  xbar_k = (sum over rows in row order of X[r, k]) / c   (fp32 sum, IEEE division)
                 H[r, k] += coef (xbar_k - X[r, k]);  X[r, k] = xbar_k;  returns xbar float32 [p]
weighted_sum:    out[k] = float(sum over rows in row order of w[r] * double(X[r, k]))

Kernels.  _local_kernel: one program per cohort row; x lives in registers as a [CB, DB] tile
(CB = next_pow2(C), 1 for the binary kinds; DB = next_pow2(d)), so the padded size CB * DB is
limited to MAX_TILE = 8192 elements (p = d <= 8192 for logistic / least squares; e.g. C = 10,
d <= 512 for multinomial); beyond it local_steps_ raises ValueError naming p.  The batch is read in
chunks of BLOCK_M samples ([BLOCK_M, DB] tiles of A, gathered through perm for sgd/rr); z for the
whole batch uses the x of the batch start, x changes once per batch.  H and anchor are re-read
from global memory per batch (L1/L2 hits) to keep registers for x and the gradient sum.
_grads_kernel: _local_kernel's batch loop for one batch, storing g instead of stepping.
_scaffnew_kernel and _wsum_kernel: programs over column blocks, each walking the rows in order
(UNROLL rows per iteration, added one after the other), so both are single kernels; scaffnew reads
X twice (mean, then update).

Numerics: fp32 throughout, every launch with enable_fp_fusion=False (no FMA); the clip norm and
clip / nrm are fp64 (IEEE sqrt and division), the clip threshold is passed as an fp64 tensor.
Divisions 1/|B|, 1/(1 + exp) and the softmax normalisation use div_rn (IEEE); exp is tl.exp (on
NVIDIA ex2.approx, a few ulp).  Summation orders, fixed for a given shape and block size, so every
run gives the same bits: z = a.x is a tl.sum over the DB lanes of the products (Triton's reduction
tree); the batch gradient sum takes the batch in chunks of BLOCK_M samples in batch order, each
chunk reduced by tl.sum over its BLOCK_M rows, and adds the chunk sums in order; the clip norm is a
tl.sum over the [CB, DB] tile of fp64 squares.  The row sums of scaffnew_sync_ and weighted_sum
are strictly sequential in row order (bit-identical to any other backend that follows the spec).
"""

import torch
import triton
import triton.language as tl

from ._common import half_width, load_round_keys, sample_index

#: Largest padded parameter tile next_pow2(C) * next_pow2(d) kept in registers by local_steps_.
MAX_TILE = 8192

# GPU launch shapes (not yet timed on a GPU; ptxas for sm_90 reports no spills for the binary kinds
# up to MAX_TILE).  block_m: samples per chunk, chosen so that the largest temporary
# ([BLOCK_M, CB, DB] for multinomial) stays near `chunk_elems` elements; warps: ~16 of those
# elements per thread.
TUNING = {"chunk_elems": 2048, "block_m_max": 32, "cols": 256, "cols_small": 64, "unroll": 4}
# Interpreter (CPU tensors; tests): small blocks so that small test sizes run every loop more than
# once (several chunks per batch, several column programs, ragged unrolled row groups).
INTERPRETED = {"chunk_elems": 256, "block_m_max": 4, "cols": 16, "cols_small": 16, "unroll": 4}

_LOGISTIC, _MULTINOMIAL, _LEAST_SQUARES = 0, 1, 2
_GD, _SGD, _RR = 0, 1, 2


@triton.jit
def _div(a, b):
    """IEEE fp32 a / b with broadcasting."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit(do_not_specialize=["C", "d", "p", "K", "b", "has_h", "nkeys"])
def _local_kernel(
    x_ptr, clients_ptr, a_ptr, y_ptr, off_ptr, h_ptr, keys_ptr, anchor_ptr, clip_ptr,
    C, d, p, K, b, gamma, l2, mu, has_h, nkeys,
    KIND: tl.constexpr, MODE: tl.constexpr, CB: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """K local steps of cohort row r = program_id(0), x in registers (module docstring)."""
    r = tl.program_id(0).to(tl.int64)
    client = tl.load(clients_ptr + r)
    lo = tl.load(off_ptr + client)
    m = tl.load(off_ptr + client + 1) - lo
    crow = tl.arange(0, CB)
    cols = tl.arange(0, DB)
    cmask = cols < d
    pmask = (crow < C)[:, None] & cmask[None, :]
    xoffs = r * p + crow[:, None] * d + cols[None, :]
    x = tl.load(x_ptr + xoffs, mask=pmask, other=0.0)  # padding stays 0 through every step
    clipv = tl.load(clip_ptr)
    h = half_width(m)  # of the Feistel permutation of the client's m samples
    if MODE == 0:
        bsz = m
    else:
        bsz = b
    if MODE == 2:
        nb = tl.maximum((m + b - 1) // b, 1)
    else:
        nb = m * 0 + 1
    zero = tl.full([], 0, tl.uint32)  # gd: the keys are unused
    k0, k1, k2, k3, k4, k5, k6, k7 = zero, zero, zero, zero, zero, zero, zero, zero
    t = K * 0
    while t < K:
        if MODE != 0:
            k0, k1, k2, k3, k4, k5, k6, k7 = load_round_keys(keys_ptr + (r * nkeys + t) * 8)
        bi = m * 0
        while bi < nb:
            start = bi * bsz
            end = tl.minimum(start + bsz, m)
            gsum = tl.zeros([CB, DB], tl.float32)
            j = start
            while j < end:
                pos = j + tl.arange(0, BLOCK_M).to(tl.int64)
                valid = pos < end
                idx = sample_index(pos, valid, h, k0, k1, k2, k3, k4, k5, k6, k7, m, MODE)
                rows = lo + idx
                a = tl.load(a_ptr + rows[:, None] * d + cols[None, :],
                            mask=valid[:, None] & cmask[None, :], other=0.0)  # fmt: skip
                yv = tl.load(y_ptr + rows, mask=valid, other=0.0)
                if KIND == 1:  # _MULTINOMIAL
                    z = tl.sum(a[:, None, :] * x[None, :, :], 2)  # [BLOCK_M, CB]
                    z = tl.where((crow < C)[None, :], z, float("-inf"))
                    e = tl.exp(z - tl.max(z, 1)[:, None])
                    prob = _div(e, tl.sum(e, 1)[:, None])
                    hit = crow[None, :] == yv.to(tl.int32)[:, None]
                    coef = tl.where(valid[:, None], prob - hit.to(tl.float32), 0.0)
                    gsum += tl.sum(coef[:, :, None] * a[:, None, :], 0)
                else:
                    z = tl.sum(a * x, 1)  # x is [1, DB]
                    if KIND == 0:  # _LOGISTIC
                        s = 2.0 * yv - 1.0
                        coef = _div(-s, 1.0 + tl.exp(s * z))
                    else:
                        coef = z - yv
                    coef = tl.where(valid, coef, 0.0)
                    gsum += tl.sum(coef[:, None] * a, 0)[None, :]
                j += BLOCK_M
            cnt = tl.maximum(end - start, 1).to(tl.float32)  # |B| = 0: gsum is 0
            g = tl.math.div_rn(tl.full([], 1.0, tl.float32), cnt) * gsum
            g = g + l2 * x
            if mu != 0.0:
                g = g + mu * (x - tl.load(anchor_ptr + xoffs, mask=pmask, other=0.0))
            u = g
            if has_h != 0:
                u = g - tl.load(h_ptr + xoffs, mask=pmask, other=0.0)
            if clipv > 0.0:
                u64 = u.to(tl.float64)
                nrm = tl.sqrt(tl.sum(tl.sum(u64 * u64, 1), 0))
                big = nrm > clipv
                scale = (clipv / tl.where(big, nrm, 1.0)).to(tl.float32)
                u = tl.where(big, scale * u, u)
            x = x - gamma * u
            bi += 1
        t += 1
    tl.store(x_ptr + xoffs, x, mask=pmask)


@triton.jit(do_not_specialize=["C", "d", "p", "b", "s"])
def _grads_kernel(
    x_ptr, g_ptr, clients_ptr, a_ptr, y_ptr, off_ptr, keys_ptr, smp_ptr, C, d, p, b, s, l2,
    KIND: tl.constexpr, MODE: tl.constexpr, CB: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One gradient of cohort row r = program_id(0) into G[r] (module docstring)."""
    r = tl.program_id(0).to(tl.int64)
    client = tl.load(clients_ptr + r)
    lo = tl.load(off_ptr + client)
    m = tl.load(off_ptr + client + 1) - lo
    crow = tl.arange(0, CB)
    cols = tl.arange(0, DB)
    cmask = cols < d
    pmask = (crow < C)[:, None] & cmask[None, :]
    xoffs = r * p + crow[:, None] * d + cols[None, :]
    x = tl.load(x_ptr + xoffs, mask=pmask, other=0.0)
    h = half_width(m)
    zero = tl.full([], 0, tl.uint32)
    k0, k1, k2, k3, k4, k5, k6, k7 = zero, zero, zero, zero, zero, zero, zero, zero
    if MODE == 1:
        k0, k1, k2, k3, k4, k5, k6, k7 = load_round_keys(keys_ptr + r * 8)
    if MODE == 0:
        end = m
    elif MODE == 1:
        end = tl.minimum(m, b)
    else:
        end = m * 0 + s
    gsum = tl.zeros([CB, DB], tl.float32)
    count = m * 0
    j = m * 0
    while j < end:
        pos = j + tl.arange(0, BLOCK_M).to(tl.int64)
        valid = pos < end
        if MODE == 3:
            idx = tl.load(smp_ptr + r * s + pos, mask=valid, other=-1)
            valid = valid & (idx >= 0)
            idx = tl.where(valid, idx, 0)
        else:
            idx = sample_index(pos, valid, h, k0, k1, k2, k3, k4, k5, k6, k7, m, MODE)
        count += tl.sum(valid.to(tl.int64), 0)
        rows = lo + idx
        a = tl.load(a_ptr + rows[:, None] * d + cols[None, :],
                    mask=valid[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        yv = tl.load(y_ptr + rows, mask=valid, other=0.0)
        if KIND == 1:  # _MULTINOMIAL
            z = tl.sum(a[:, None, :] * x[None, :, :], 2)
            z = tl.where((crow < C)[None, :], z, float("-inf"))
            e = tl.exp(z - tl.max(z, 1)[:, None])
            prob = _div(e, tl.sum(e, 1)[:, None])
            hit = crow[None, :] == yv.to(tl.int32)[:, None]
            coef = tl.where(valid[:, None], prob - hit.to(tl.float32), 0.0)
            gsum += tl.sum(coef[:, :, None] * a[:, None, :], 0)
        else:
            z = tl.sum(a * x, 1)
            if KIND == 0:  # _LOGISTIC
                sg = 2.0 * yv - 1.0
                coef = _div(-sg, 1.0 + tl.exp(sg * z))
            else:
                coef = z - yv
            coef = tl.where(valid, coef, 0.0)
            gsum += tl.sum(coef[:, None] * a, 0)[None, :]
        j += BLOCK_M
    cnt = tl.maximum(count, 1).to(tl.float32)  # |B| = 0: gsum is 0
    g = tl.math.div_rn(tl.full([], 1.0, tl.float32), cnt) * gsum + l2 * x
    tl.store(g_ptr + xoffs, g, mask=pmask)


@triton.jit(do_not_specialize=["c", "p"])
def _scaffnew_kernel(
    x_ptr, h_ptr, xbar_ptr, c, p, coef, BLOCK: tl.constexpr, UNROLL: tl.constexpr
):  # fmt: skip
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < p
    acc = tl.zeros([BLOCK], tl.float32)
    r = c.to(tl.int64) * 0
    while r < c:
        for u in tl.static_range(UNROLL):  # independent loads, added in row order
            row = r + u
            v = tl.load(x_ptr + row * p + cols, mask=cmask & (row < c), other=0.0)
            acc = tl.where(row < c, acc + v, acc)
        r += UNROLL
    xbar = _div(acc, c.to(tl.float32))
    tl.store(xbar_ptr + cols, xbar, mask=cmask)
    r = c.to(tl.int64) * 0
    while r < c:
        for u in tl.static_range(UNROLL):
            offs = (r + u) * p + cols
            m = cmask & (r + u < c)
            xv = tl.load(x_ptr + offs, mask=m, other=0.0)
            hv = tl.load(h_ptr + offs, mask=m, other=0.0)
            tl.store(h_ptr + offs, hv + coef * (xbar - xv), mask=m)
            tl.store(x_ptr + offs, xbar, mask=m)
        r += UNROLL


@triton.jit(do_not_specialize=["c", "p"])
def _wsum_kernel(x_ptr, w_ptr, out_ptr, c, p, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < p
    acc = tl.zeros([BLOCK], tl.float64)
    r = c.to(tl.int64) * 0
    while r < c:
        for u in tl.static_range(UNROLL):
            row = r + u
            w = tl.load(w_ptr + row, mask=row < c, other=0.0)
            v = tl.load(x_ptr + row * p + cols, mask=cmask & (row < c), other=0.0)
            acc = tl.where(row < c, acc + w * v.to(tl.float64), acc)
        r += UNROLL
    tl.store(out_ptr + cols, acc.to(tl.float32), mask=cmask)


# ---- launchers ---------------------------------------------------------------------------------


def _shapes(device):
    return INTERPRETED if device.type == "cpu" else TUNING


def _opts(device, warps=4):
    return {"enable_fp_fusion": False} | ({} if device.type == "cpu" else {"num_warps": warps})


def local_steps_(X, clients, A, y, offsets, kind, C, K, gamma, l2, H, mode, b, keys, clip, mu,
                 anchor):  # fmt: skip
    """K local steps of every cohort client, in place on X (module docstring); returns X.

    X float32 [c, p] (p = C*d for kind 1, else d), clients int64 [c], A float32 [N, d], y float32
    [N], offsets int64 [n + 1]; H / anchor float32 [c, p] or None (anchor required if mu != 0);
    keys int64 [c, K, 8] (uint32 round keys; sgd/rr only, else None); kind 0/1/2, mode 0 gd /
    1 sgd / 2 rr, C classes (1 for kinds 0 and 2), K >= 0, b >= 1; gamma, l2, mu floats (fp32),
    clip float (fp64; 0 = off).  All contiguous on one device: CUDA, or CPU under
    TRITON_INTERPRET=1.  Inputs are assumed validated (fedkern.ops); raises ValueError when the
    padded tile next_pow2(C) * next_pow2(d) exceeds MAX_TILE (x must fit in registers).
    """
    c, p = X.shape
    d = A.shape[1]
    kind, mode, C, K, b = int(kind), int(mode), int(C), int(K), int(b)
    cb = triton.next_power_of_2(C) if kind == _MULTINOMIAL else 1
    db = triton.next_power_of_2(max(d, 1))
    if cb * db > MAX_TILE:
        raise ValueError(
            f"local_steps_ (Triton): p = {p} (C = {C}, d = {d}) is too large: the padded tile "
            f"next_pow2(C) * next_pow2(d) = {cb * db} exceeds {MAX_TILE} elements kept in registers"
        )
    if c == 0 or K == 0 or p == 0:
        return X
    dev = X.device
    sh = _shapes(dev)
    block_m = max(1, min(sh["block_m_max"], sh["chunk_elems"] // (cb * db)))
    warps = min(8, max(2, block_m * cb * db // 512))  # ~16 chunk elements per thread
    clip_t = torch.full((1,), float(clip), dtype=torch.float64, device=dev)
    _local_kernel[(c,)](
        X, clients, A, y, offsets, X if H is None else H, X if keys is None else keys,
        X if anchor is None else anchor, clip_t, C, d, p, K, b, float(gamma), float(l2),
        float(mu), 0 if H is None else 1, K, kind, mode, cb, db, block_m, **_opts(dev, warps),
    )  # fmt: skip
    return X


def client_grads(X, clients, A, y, offsets, kind, C, l2, mode, b, keys, samples):
    """One gradient per cohort row (module docstring): returns G float32 [c, p].

    X float32 [c, p] (not modified), clients int64 [c], A / y / offsets as local_steps_; kind
    0/1/2; mode 0 gd, 1 sgd (keys int64 [c, 8]), 3 samples (samples int64 [c, s], -1 padding);
    b >= 1; l2 float.  Same device, contiguous, validated (fedkern.ops); the MAX_TILE limit of
    local_steps_ applies (ValueError naming p).
    """
    c, p = X.shape
    d = A.shape[1]
    kind, mode, C, b = int(kind), int(mode), int(C), int(b)
    cb = triton.next_power_of_2(C) if kind == _MULTINOMIAL else 1
    db = triton.next_power_of_2(max(d, 1))
    if cb * db > MAX_TILE:
        raise ValueError(
            f"client_grads (Triton): p = {p} (C = {C}, d = {d}) is too large: the padded tile "
            f"next_pow2(C) * next_pow2(d) = {cb * db} exceeds {MAX_TILE} elements kept in registers"
        )
    G = torch.empty_like(X)
    if c == 0 or p == 0:
        return G
    dev = X.device
    sh = _shapes(dev)
    block_m = max(1, min(sh["block_m_max"], sh["chunk_elems"] // (cb * db)))
    warps = min(8, max(2, block_m * cb * db // 512))
    s = 0 if samples is None else samples.shape[1]
    _grads_kernel[(c,)](
        X, G, clients, A, y, offsets, X if keys is None else keys,
        X if samples is None else samples, C, d, p, b, s, float(l2), kind, mode, cb, db, block_m,
        **_opts(dev, warps),
    )  # fmt: skip
    return G


def _cols_block(p, device):
    sh = _shapes(device)
    big = sh["cols"]
    return big if triton.cdiv(p, big) >= 264 else sh["cols_small"]  # 264: 2 programs per SM


def scaffnew_sync_(X, H, coef):
    """Scaffnew consensus, in place on X and H (both float32 [c, p], contiguous, same device):
    xbar = row mean of X (fp32 sum in row order, IEEE division by c); H += coef (xbar - X);
    X[r] = xbar.  coef = p_prob / gamma (fp32).  Returns xbar, float32 [p]."""
    c, p = X.shape
    xbar = torch.empty(p, dtype=torch.float32, device=X.device)
    if p == 0:
        return xbar
    if c == 0:
        return xbar.fill_(float("nan"))
    block = _cols_block(p, X.device)
    _scaffnew_kernel[(triton.cdiv(p, block),)](
        X, H, xbar, c, p, float(coef), block, _shapes(X.device)["unroll"], **_opts(X.device)
    )
    return xbar


def weighted_sum(X, w):
    """out[k] = float(sum over rows r in row order of w[r] * double(X[r, k])) (fp64 accumulation,
    one rounding).  X float32 [c, p], w float64 [c], contiguous, same device; X and w not
    modified.  Returns float32 [p]."""
    c, p = X.shape
    out = torch.empty(p, dtype=torch.float32, device=X.device)
    if p == 0:
        return out
    block = _cols_block(p, X.device)
    _wsum_kernel[(triton.cdiv(p, block),)](
        X, w, out, c, p, block, _shapes(X.device)["unroll"], **_opts(X.device)
    )
    return out
