"""Benchmarks of the tamuna family: TAMUNA's server step against the way it reads in eager PyTorch.

  tamuna_aggregate_   one round's server step on the cohort's stack X [c, p] (float32) with its
                      control variates H [c, p]: fedkern::tamuna_aggregate_ (gathers the s holders
                      of every coordinate from the round's slot permutation, averages them, updates
                      their h; the pattern is never built), against the eager way: materialize the
                      bool pattern q [c, p] from perm, xbar = (X * q).sum(0) / s and
                      H += coef * q * (xbar - X).

Case fields: n = p (coordinates), m = c (cohort), k = s (holders per coordinate). Cases: a round
of TAMUNA with 1000 clients, a cohort of c = 100 and s = 4, at p = 1e4 (quick) and p = 1e5 (full;
1e6 on CUDA); only the cohort's rows enter the server step, so the population size does not change
the timing.
Custom sizes: p from the sizes, c = 10, s = 4. Both sides call with a fresh, valid perm built at
setup; the fedkern side keeps the op's default check_perm=True (the permutation check included).
"""

from __future__ import annotations

import torch

from fedkern.benchmarks.core import Case, Prepared, cases, min_bytes, register, restore

TAMUNA_CASE = (10**4, 4, 100)  # p coordinates, s holders, c cohort rows (1000 clients in all)
COEF = 0.246 / 0.01  # eta / gamma of the authors' Flower baseline


def eager_tamuna_aggregate_(X, H, perm, s, coef):
    """The eager way: the pattern q as a bool [c, p] mask, a masked sum, a masked update."""
    c, p = X.shape
    r = torch.arange(p, device=X.device)
    slots = (s * r[None, :] + torch.arange(s, device=X.device)[:, None]) % c
    q = torch.zeros(c, p, dtype=torch.bool, device=X.device)
    q[perm[slots], r.expand(s, -1)] = True
    xbar = (X * q).sum(0) / s
    H += coef * q * (xbar - X)
    return xbar


def _setup(case, device, gen):
    import fedkern.ops.tamuna  # noqa: F401  (registers the op)

    p, s, c = case.n, case.k, case.m
    X = torch.randn(c, p, generator=gen, device=device)
    H0 = torch.randn(c, p, generator=gen, device=device) * 0.1
    perm = torch.randperm(c, generator=gen, device=device)
    H_fk, H_eg = H0.clone(), H0.clone()
    op = torch.ops.fedkern.tamuna_aggregate_
    return Prepared(
        fedkern=lambda: op(X, H_fk, perm, s, COEF),
        eager=lambda: eager_tamuna_aggregate_(X, H_eg, perm, s, COEF),
        rearm_fedkern=restore(H_fk, H0),
        rearm_eager=restore(H_eg, H0),
        nbytes=min_bytes(case),
        tensors={"X": X, "H0": H0, "perm": perm, "H_fedkern": H_fk, "H_eager": H_eg},
    )


def _bytes(case):
    """The held entries: s p reads of X, s p reads and writes of H; perm; xbar written."""
    return 12 * case.k * case.n + 4 * case.n + 8 * case.m


def _footprint(case):  # X, H0, two H copies, the eager mask and float temporaries
    return case.m * case.n * (4 * 4 + 1 + 3 * 4)


register("tamuna_aggregate_", family="tamuna", setup=_setup, position=910, by_size=False,
         stacked=True, footprint=_footprint, nbytes=_bytes,
         eager="q = bool [c, p] from perm; xbar = (X * q).sum(0) / s; "
               "H += coef * q * (xbar - X)")  # fmt: skip


@cases("tamuna")
def _cases(suite, device, sizes):
    p, s, c = TAMUNA_CASE
    if suite == "custom":
        return [Case("tamuna_aggregate_", n, s, torch.float32, 10) for n in sizes]
    if suite == "quick":
        return [Case("tamuna_aggregate_", p, s, torch.float32, c)]
    big = 10**6 if torch.device(device).type == "cuda" else 10**5
    return [Case("tamuna_aggregate_", big, s, torch.float32, c)]
