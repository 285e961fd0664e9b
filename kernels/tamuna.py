"""TAMUNA's fused server step (Triton): the holders' average and their control-variate update.

Inputs X float32 [c, p] (the cohort's models, read only), H float32 [c, p] or None (their control
variates, updated in place), perm int64 [c] (slot -> cohort row, a permutation), 1 <= s <= c, coef
(fp32).  Coordinate r is held by the slots (s*r + j) mod c, j = 0..s-1, i.e. the rows
h_j = perm[(s*r + j) mod c]:

  xbar[r]    = (((X[h_0, r] + X[h_1, r]) + ...) + X[h_{s-1}, r]) / s     (fp32, slot order)
  H[h_j, r] += coef * (xbar[r] - X[h_j, r])                                (H given)

Kernel.  _aggregate_kernel: one program per block of BLOCK coordinates; the first slot of every
coordinate is (s * r) mod c (int64), and a runtime loop over j < s steps it by one (wrapping at c),
gathers the rows perm[slot] and their entries of X.  A second loop over the same slots updates H
(re-reading the held X entries, which are in cache).  Only the s * p held entries of X are read and
only the held entries of H are touched; the pattern q (d x c) never exists.

Numerics: the sum starts from X[h_0, r] (not from +0.0: s = 1 keeps a -0.0), adds in slot order,
divides by s with div_rn (IEEE); the update is one subtraction, one multiply, one add, launched with
enable_fp_fusion=False (no FMA): the bits of fedkern.reference.tamuna and of the C++ core.
"""

import torch
import triton
import triton.language as tl

TUNING = {"block": 512, "warps": 4}
# Interpreter (CPU tensors; tests): small blocks so that test sizes run several programs.
INTERPRETED = {"block": 16, "warps": 1}


@triton.jit(do_not_specialize=["c", "p", "s"])
def _aggregate_kernel(x_ptr, h_ptr, perm_ptr, xbar_ptr, c, p, s, coef, HAS_H: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < p
    c64 = c.to(tl.int64)
    first = (cols * s) % c64  # slot of holder 0; s * r < c * p, no int64 overflow
    row = tl.load(perm_ptr + first)  # slots are always in [0, c): no mask needed
    acc = tl.load(x_ptr + row * p + cols, mask=cmask, other=0.0)
    slot = first
    j = s * 0 + 1
    while j < s:
        slot = slot + 1
        slot = tl.where(slot >= c64, slot - c64, slot)
        row = tl.load(perm_ptr + slot)
        acc = acc + tl.load(x_ptr + row * p + cols, mask=cmask, other=0.0)
        j += 1
    xbar = tl.math.div_rn(acc, tl.zeros_like(acc) + s.to(tl.float32))  # IEEE division
    tl.store(xbar_ptr + cols, xbar, mask=cmask)
    if HAS_H:
        slot = first
        j = s * 0
        while j < s:
            offs = tl.load(perm_ptr + slot) * p + cols
            xv = tl.load(x_ptr + offs, mask=cmask, other=0.0)
            hv = tl.load(h_ptr + offs, mask=cmask, other=0.0)
            tl.store(h_ptr + offs, hv + coef * (xbar - xv), mask=cmask)
            slot = slot + 1
            slot = tl.where(slot >= c64, slot - c64, slot)
            j += 1


def _shapes(device):
    return INTERPRETED if device.type == "cpu" else TUNING


def tamuna_aggregate_(X, H, perm, s, coef):
    """TAMUNA's server step (module docstring).  X float32 [c, p] (not modified), H float32 [c, p]
    or None (held entries updated in place), perm int64 [c] (a permutation of 0..c-1), 1 <= s <= c,
    coef a float (fp32): all validated (fedkern.ops.tamuna), contiguous, on one device (CUDA, or CPU
    under TRITON_INTERPRET=1).  Returns xbar, float32 [p] on X's device."""
    c, p = X.shape
    xbar = torch.empty(p, dtype=torch.float32, device=X.device)
    sh = _shapes(X.device)
    opts = {"enable_fp_fusion": False}
    if X.device.type != "cpu":
        opts["num_warps"] = sh["warps"]
    _aggregate_kernel[(triton.cdiv(p, sh["block"]),)](
        X, X if H is None else H, perm, xbar, c, p, int(s), float(coef), H is not None,
        sh["block"], **opts,
    )  # fmt: skip
    return xbar
