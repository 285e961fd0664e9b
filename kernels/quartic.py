"""Batched local steps on the quartic f_i(x) = (1/m_i) sum_j ||x - x_j||^4 (Triton).

Data (packed, one client after another): points float32 [N, d], offsets int64 [n + 1]; client i
owns rows offsets[i] .. offsets[i+1] - 1 (m_i of them, possibly 0).

local_steps_ (in place on X [c, d]), cohort row r, client i = clients[r], x = X[r]; K times:
    batches: gd: all m_i points in order; sgd: perm(0 .. min(b, m_i) - 1); rr: perm(0 .. m_i - 1)
             cut into batches of b (the last may be shorter); perm(j) = the keyed Feistel
             permutation of [0, m_i) with cycle walking (kernels/randk.py), keys[r, t, 0:8]
    per batch B:  D_j = x - x_j;  s_j = ||D_j||^2;  g = (4/|B|) sum_{j in B} s_j D_j (0 if B empty)
                  u = g - H[r] (if H);  clip > 0: nrm = sqrt(sum double(u_k)^2);
                  nrm > clip: u = float(clip / nrm) u;  x = x - gamma u

Kernel.  _local_kernel: one program per cohort row, x in registers as a [DB] vector (DB =
next_pow2(d) <= MAX_TILE = 8192; beyond it local_steps_ raises ValueError).  The batch is read in
chunks of BLOCK_M points ([BLOCK_M, DB] tiles, gathered through perm for sgd/rr); x changes once per
batch.

Numerics: fp32, launched with enable_fp_fusion=False (no FMA); 4 / |B| is an IEEE division; the
clip norm and clip / nrm are fp64.  Summation orders are fixed for a given d and block size: s_j is
a tl.sum over the DB lanes (Triton's reduction tree), the gradient sum takes the batch in chunks of
BLOCK_M points in batch order, each chunk reduced by tl.sum over its rows, the chunk sums added in
order.  (The C++ core sums s_j in 8 lanes: the backends agree to rounding, not bit for bit.)
"""

import torch
import triton
import triton.language as tl

from ._common import half_width, load_round_keys, sample_index

#: Largest padded dimension next_pow2(d) kept in registers.
MAX_TILE = 8192
# GPU launch shapes (not timed on a GPU yet): BLOCK_M * DB near `chunk_elems` elements.
TUNING = {"chunk_elems": 4096, "block_m_max": 64}
# Interpreter (CPU tensors; tests): small chunks, so small cases run several chunks per batch.
INTERPRETED = {"chunk_elems": 64, "block_m_max": 4}


@triton.jit(do_not_specialize=["d", "K", "b", "has_h"])
def _local_kernel(
    x_ptr, clients_ptr, p_ptr, off_ptr, h_ptr, keys_ptr, clip_ptr, d, K, b, gamma, has_h,
    MODE: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    client = tl.load(clients_ptr + r)
    lo = tl.load(off_ptr + client)
    m = tl.load(off_ptr + client + 1) - lo
    cols = tl.arange(0, DB)
    cmask = cols < d
    x = tl.load(x_ptr + r * d + cols, mask=cmask, other=0.0)
    clipv = tl.load(clip_ptr)
    h = half_width(m)  # of the Feistel permutation of the client's m points
    if MODE == 0:
        bsz = m
    elif MODE == 1:
        bsz = tl.minimum(b, m)
    else:
        bsz = b.to(tl.int64) + m * 0
    if MODE == 2:
        nb = tl.maximum((m + b - 1) // b, 1)
    else:
        nb = m * 0 + 1
    zero = tl.full([], 0, tl.uint32)
    k0, k1, k2, k3, k4, k5, k6, k7 = zero, zero, zero, zero, zero, zero, zero, zero
    t = K * 0
    while t < K:
        if MODE != 0:
            k0, k1, k2, k3, k4, k5, k6, k7 = load_round_keys(keys_ptr + (r * K + t) * 8)
        bi = m * 0
        while bi < nb:
            start = bi * bsz
            end = tl.minimum(start + bsz, m)
            gsum = tl.zeros([DB], tl.float32)
            j = start
            while j < end:
                pos = j + tl.arange(0, BLOCK_M).to(tl.int64)
                valid = pos < end
                rows = lo + sample_index(pos, valid, h, k0, k1, k2, k3, k4, k5, k6, k7, m, MODE)
                tmask = valid[:, None] & cmask[None, :]
                pts = tl.load(p_ptr + rows[:, None] * d + cols[None, :], mask=tmask, other=0.0)
                D = tl.where(tmask, x[None, :] - pts, 0.0)
                s = tl.sum(D * D, 1)
                gsum += tl.sum(s[:, None] * D, 0)
                j += BLOCK_M
            cnt = tl.maximum(end - start, 1).to(tl.float32)
            c4 = tl.where(end > start, tl.math.div_rn(tl.full([], 4.0, tl.float32), cnt), 0.0)
            u = c4 * gsum
            if has_h != 0:
                u = u - tl.load(h_ptr + r * d + cols, mask=cmask, other=0.0)
            if clipv > 0.0:
                u64 = u.to(tl.float64)
                nrm = tl.sqrt(tl.sum(u64 * u64, 0))
                big = nrm > clipv
                scale = (clipv / tl.where(big, nrm, 1.0)).to(tl.float32)
                u = tl.where(big, scale * u, u)
            x = x - gamma * u
            bi += 1
        t += 1
    tl.store(x_ptr + r * d + cols, x, mask=cmask)


def local_steps_(X, clients, points, offsets, K, gamma, H, mode, b, keys, clip):
    """K local steps on the quartic for every cohort row, in place on X (module docstring).

    X float32 [c, d], clients int64 [c], points float32 [N, d], offsets int64 [n + 1]; H float32
    [c, d] or None; keys int64 [c, K, 8] (sgd/rr only, else None); mode 0 gd / 1 sgd / 2 rr;
    K >= 0, b >= 1; gamma float (fp32), clip float (fp64; 0 = off). All contiguous on one device:
    CUDA, or CPU under TRITON_INTERPRET=1. Inputs are assumed validated (fedkern.ops); raises
    ValueError when next_pow2(d) exceeds MAX_TILE. Returns X.
    """
    c, d = X.shape
    db = triton.next_power_of_2(max(d, 1))
    if db > MAX_TILE:
        raise ValueError(f"quartic local_steps_ (Triton): d = {d} is too large: next_pow2(d) = "
                         f"{db} exceeds {MAX_TILE} elements kept in registers")  # fmt: skip
    if c == 0 or K == 0:
        return X
    dev = X.device
    sh = INTERPRETED if dev.type == "cpu" else TUNING
    block_m = max(1, min(sh["block_m_max"], sh["chunk_elems"] // db))
    opts = {"enable_fp_fusion": False}
    if dev.type != "cpu":
        opts["num_warps"] = min(8, max(2, block_m * db // 512))
    clip_t = torch.full((1,), float(clip), dtype=torch.float64, device=dev)
    _local_kernel[(c,)](
        X, clients, points, offsets, X if H is None else H, X if keys is None else keys, clip_t,
        d, int(K), int(b), float(gamma), 0 if H is None else 1, int(mode), db, block_m, **opts,
    )  # fmt: skip
    return X
