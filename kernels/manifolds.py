"""Fused Riemannian steps (Triton): the sphere and Stiefel steps of fedkern/reference/manifolds.py.

sphere_step_ (in place on X, V [b, n]; U [b, n] read only), per row x, u, v:
    a = <x, u>;  g = u - a x
    retraction:  y = x - eta g
    exp:         gn = ||g||, t = eta gn;  y = cos(t) x - (sin(t) / gn) g   (y = x when t = 0)
    x+ = y / ||y||
    projection transport: v = v - (<v, y> / ||y||) x+
    parallel transport:   v = v - ((<v, y> / ||y||) / (1 + <x, y> / ||y||)) (x + x+)
stiefel_step_ (in place on X, V [b, n, p]; U read only), per matrix:
    S = sym(X^T U);  Y = X - eta (U - X S);  X+ = Q of Y by classical Gram-Schmidt run twice per
    column (diag(R) > 0);  V = V - X+ sym(X+^T V),  sym(A) = (A + A^T) / 2

Kernels.  _sphere_kernel: one program per row, the row walked in chunks of BLOCK columns three
times (exp: four): the sums <x, u> (and ||g||^2), then ||y||^2, <x, y>, <v, y> with y recomputed
per chunk, then the stores.  _stiefel_kernel: one program per matrix, held in registers as an
[NB, PB] tile (NB = next_pow2(n), PB = next_pow2(p); NB * PB <= MAX_TILE, else ValueError naming
n and p); column j of a tile is taken out by a masked row sum, and the Gram-Schmidt coefficients of
column j against all earlier columns come from one reduction over the tile (classical GS), twice.

Numerics: the input's dtype (fp32 or fp64) throughout (eta is passed as a one-element tensor of
that dtype, so fp64 runs keep an fp64 step), enable_fp_fusion=False (no FMA), IEEE
division and square root (div_rn / sqrt_rn for fp32); reductions are tl.sum (Triton's tree, fixed
for a shape), chunk sums added in chunk order: every run gives the same bits, not the C++ core's.
cos / sin are tl.cos / tl.sin (libdevice on NVIDIA).
"""

import torch
import triton
import triton.language as tl

#: Largest padded Stiefel tile next_pow2(n) * next_pow2(p) kept in registers by one program.
MAX_TILE = 16384

# GPU: column chunk of the sphere rows and warps (not yet timed on a GPU).  Interpreter (CPU
# tensors, tests): small chunks so that small rows span several chunks.
TUNING = {"block": 1024, "warps": 4}
INTERPRETED = {"block": 16, "warps": 1}


@triton.jit
def _div(a, b):
    """IEEE a / b with broadcasting (div_rn in fp32; fp64 division is IEEE)."""
    a, b = tl.broadcast(a, b)
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(a):
    if a.dtype == tl.float32:
        return tl.math.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit(do_not_specialize=["n"])
def _sphere_kernel(
    x_ptr, u_ptr, v_ptr, eta_ptr, n, USE_EXP: tl.constexpr, PARALLEL: tl.constexpr,
    HAS_V: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row r = program_id(0) of the fused sphere step (module docstring)."""
    base = tl.program_id(0).to(tl.int64) * n
    cols = tl.arange(0, BLOCK)
    dt = x_ptr.dtype.element_ty
    zero = tl.zeros([], dt)
    a = zero
    k = n * 0
    while k < n:
        m = k + cols < n
        x = tl.load(x_ptr + base + k + cols, mask=m, other=0.0)
        u = tl.load(u_ptr + base + k + cols, mask=m, other=0.0)
        a += tl.sum(x * u, 0)
        k += BLOCK
    e = tl.load(eta_ptr)
    cx = zero + 1.0
    cg = e
    if USE_EXP:
        gg = zero
        k = n * 0
        while k < n:
            m = k + cols < n
            x = tl.load(x_ptr + base + k + cols, mask=m, other=0.0)
            u = tl.load(u_ptr + base + k + cols, mask=m, other=0.0)
            g = u - a * x
            gg += tl.sum(g * g, 0)
            k += BLOCK
        gn = _sqrt(gg)
        t = e * gn
        cx = tl.where(t > 0, tl.cos(t), zero + 1.0)
        cg = tl.where(t > 0, _div(tl.sin(t), tl.where(gn > 0, gn, zero + 1.0)), zero)
    yy = zero
    xy = zero
    vy = zero
    k = n * 0
    while k < n:
        m = k + cols < n
        x = tl.load(x_ptr + base + k + cols, mask=m, other=0.0)
        u = tl.load(u_ptr + base + k + cols, mask=m, other=0.0)
        y = cx * x - cg * (u - a * x)
        yy += tl.sum(y * y, 0)
        xy += tl.sum(x * y, 0)
        if HAS_V:
            v = tl.load(v_ptr + base + k + cols, mask=m, other=0.0)
            vy += tl.sum(v * y, 0)
        k += BLOCK
    ny = _sqrt(yy)
    vx = _div(vy, ny)
    coef = vx
    if PARALLEL:
        coef = _div(vx, 1.0 + _div(xy, ny))
    k = n * 0
    while k < n:
        m = k + cols < n
        offs = base + k + cols
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        u = tl.load(u_ptr + offs, mask=m, other=0.0)
        xn = _div(cx * x - cg * (u - a * x), ny)
        if HAS_V:
            v = tl.load(v_ptr + offs, mask=m, other=0.0)
            if PARALLEL:
                v = v - coef * (x + xn)
            else:
                v = v - coef * xn
            tl.store(v_ptr + offs, v, mask=m)
        tl.store(x_ptr + offs, xn, mask=m)
        k += BLOCK


@triton.jit
def _col(T, cidx, j):
    """Column j of the tile T [NB, PB] as [NB]."""
    return tl.sum(tl.where(cidx[None, :] == j, T, 0.0), 1)


@triton.jit
def _sym_product(A, B, cidx, p, PB: tl.constexpr):
    """sym(A^T B) as a [PB, PB] tile (zero outside p x p)."""
    M = tl.zeros([PB, PB], A.dtype)
    j = p * 0
    while j < p:
        col = tl.sum(A * _col(B, cidx, j)[:, None], 0)  # (A^T b_j)[i]
        M = tl.where(cidx[None, :] == j, col[:, None], M)
        j += 1
    return (M + tl.trans(M)) * 0.5


@triton.jit
def _apply(Q, S, cidx, p):
    """Q S for Q [NB, PB] and S [PB, PB] (zero padded), summing i in tile order."""
    out = tl.zeros(Q.shape, Q.dtype)
    j = p * 0
    while j < p:
        sj = tl.sum(tl.where(cidx[None, :] == j, S, 0.0), 1)  # column j of S, [PB]
        out = tl.where(cidx[None, :] == j, tl.sum(Q * sj[None, :], 1)[:, None], out)
        j += 1
    return out


@triton.jit(do_not_specialize=["n", "p"])
def _stiefel_kernel(x_ptr, u_ptr, v_ptr, eta_ptr, n, p, HAS_V: tl.constexpr, NB: tl.constexpr,
                    PB: tl.constexpr):  # fmt: skip
    """Matrix i = program_id(0) of the fused Stiefel step (module docstring)."""
    base = tl.program_id(0).to(tl.int64) * n * p
    rows = tl.arange(0, NB)
    cidx = tl.arange(0, PB)
    mask = (rows < n)[:, None] & (cidx < p)[None, :]
    offs = base + rows[:, None] * p + cidx[None, :]
    X = tl.load(x_ptr + offs, mask=mask, other=0.0)
    U = tl.load(u_ptr + offs, mask=mask, other=0.0)
    e = tl.load(eta_ptr)
    Y = X - e * (U - _apply(X, _sym_product(X, U, cidx, p, PB), cidx, p))
    Q = tl.zeros([NB, PB], X.dtype)
    j = p * 0
    while j < p:
        y = _col(Y, cidx, j)
        for _ in tl.static_range(2):  # classical Gram-Schmidt, reorthogonalized once
            r = tl.sum(Q * y[:, None], 0)  # coefficients against columns < j (Q is 0 beyond)
            y = y - tl.sum(Q * r[None, :], 1)
        q = _div(y, _sqrt(tl.sum(y * y, 0)))
        Q = tl.where(cidx[None, :] == j, q[:, None], Q)
        j += 1
    if HAS_V:
        V = tl.load(v_ptr + offs, mask=mask, other=0.0)
        V = V - _apply(Q, _sym_product(Q, V, cidx, p, PB), cidx, p)
        tl.store(v_ptr + offs, V, mask=mask)
    tl.store(x_ptr + offs, Q, mask=mask)


# ---- launchers ---------------------------------------------------------------------------------


def _shapes(device):
    return INTERPRETED if device.type == "cpu" else TUNING


def _opts(device, warps):
    return {"enable_fp_fusion": False} | ({} if device.type == "cpu" else {"num_warps": warps})


def sphere_step_(X, U, V, eta, use_exp, transport):
    """In place on X [b, n] and V [b, n] (or None); U [b, n] read only (module docstring).

    float32 or float64, contiguous, one device (CUDA, or CPU under TRITON_INTERPRET=1); inputs
    validated by fedkern.ops. transport: 0 projection, 1 parallel. Returns None.
    """
    b, n = X.shape
    if b == 0 or n == 0:
        return
    sh = _shapes(X.device)
    block = min(sh["block"], triton.next_power_of_2(n))
    eta_t = torch.full((1,), float(eta), dtype=X.dtype, device=X.device)  # fp64 stays fp64
    _sphere_kernel[(b,)](
        X, U, X if V is None else V, eta_t, n, bool(use_exp), int(transport) == 1,
        V is not None, block, **_opts(X.device, sh["warps"]),
    )  # fmt: skip


def stiefel_step_(X, U, V, eta):
    """In place on X [b, n, p] and V (or None); U read only (module docstring). Raises
    ValueError when next_pow2(n) * next_pow2(p) exceeds MAX_TILE (the tile lives in registers)."""
    b, n, p = X.shape
    nb, pb = triton.next_power_of_2(n), triton.next_power_of_2(p)
    if nb * pb > MAX_TILE:
        raise ValueError(
            f"stiefel_step_ (Triton): n = {n}, p = {p} is too large: the padded tile "
            f"next_pow2(n) * next_pow2(p) = {nb * pb} exceeds {MAX_TILE} elements in registers"
        )
    if b == 0:
        return
    warps = min(8, max(1, nb * pb // 1024))
    eta_t = torch.full((1,), float(eta), dtype=X.dtype, device=X.device)
    _stiefel_kernel[(b,)](
        X, U, X if V is None else V, eta_t, n, p, V is not None, nb, pb,
        **_opts(X.device, warps),
    )  # fmt: skip
