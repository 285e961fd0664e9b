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

  tamuna_round_vs_loop   one TAMUNA round of n = 1000 clients (all in the cohort, s = 4, K = 10
                         local GD steps) on logistic regression (d = 100 features + bias, m = 50
                         samples each): ClientBatch.local_steps_ with the control variates, then
                         tamuna_aggregate_; against a Python loop over the clients (K manual
                         gradient steps each) and the eager masked aggregation.
  fivegcs_round_vs_loop  one 5GCS round on the same clients (all sampled, K = 10 local GD steps on
                         the proximal local problem): FiveGCS.client_updates and the two weighted
                         sums; against a Python loop over the clients.
Case fields of the rounds: n = clients, k = K, m = samples per client (quick suite only). The
rounds use fixed draws (cohort, pattern, K), so every timed call does the same work; the methods'
per-round float64 metrics are not part of either side.
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


ROUND_CASE = (1000, 10, 50)  # n clients (all in the cohort), K local steps, m samples per client
ROUND_DIM = 100  # features (plus a bias column)


def _logistic_clients(case, device, gen):
    from fedkern.clients import ClientBatch
    from fedkern.problems import Problem

    n, m, d = case.n, case.m, ROUND_DIM + 1
    A = torch.randn(n * m, d, generator=gen, dtype=torch.float64)
    A[:, -1] = 1.0
    y = (torch.rand(n * m, generator=gen) < 0.5).double()
    parts = [torch.arange(i * m, (i + 1) * m) for i in range(n)]
    return ClientBatch(Problem(A, y, parts, "logistic", 1e-3), device=device)


def _loop_grad(a, t, x, l2):
    """The logistic gradient of one client, written the eager way: A^T (sigmoid(A x) - y) / m."""
    return a.T @ (torch.sigmoid(a @ x) - t) / a.shape[0] + l2 * x


def _setup_round(case, device, gen):
    import fedkern.ops.tamuna  # noqa: F401  (registers the op)
    from fedkern.algorithms import FiveGCS

    n, K, m = case.n, case.k, case.m
    batch = _logistic_clients(case, device, gen)
    d, l2, gamma = batch.p, batch.problem.l2, 0.1
    Af, yf = batch.A.view(n, m, d), batch.y.view(n, m)
    x = 0.1 * torch.randn(d, generator=gen).to(device)
    S = torch.arange(n, device=device)
    if case.op == "tamuna_round_vs_loop":
        s = 4
        perm = torch.randperm(n, generator=gen).to(device)
        H0 = 0.01 * torch.randn(n, d, generator=gen).to(device)
        H0 -= H0.mean(0)
        H_fk, H_eg = H0.clone(), H0.clone()
        op = torch.ops.fedkern.tamuna_aggregate_

        def fk():
            X = x.repeat(n, 1)
            batch.local_steps_(X, gamma=gamma, steps=K, clients=S, H=H_fk)
            return op(X, H_fk, perm, s, COEF, check_perm=False)

        def eg():
            xs = []
            for i in range(n):
                xi = x.clone()
                for _ in range(K):
                    xi = xi - gamma * (_loop_grad(Af[i], yf[i], xi, l2) - H_eg[i])
                xs.append(xi)
            return eager_tamuna_aggregate_(torch.stack(xs), H_eg, perm, s, COEF)

        return Prepared(fedkern=fk, eager=eg, rearm_fedkern=restore(H_fk, H0),
                        rearm_eager=restore(H_eg, H0), nbytes=min_bytes(case),
                        tensors={"H_fedkern": H_fk, "H_eager": H_eg})  # fmt: skip
    method = FiveGCS(batch, local_steps=K, seed=0)
    U0 = 0.01 * torch.randn(n, d, generator=gen).to(device)
    method.U = U0.clone()
    tau, lr, mu = method.tau, method.local_lr, method.mu
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    U_eg = U0.clone()

    def fk():
        y_hat = (x - method.gamma * x) / (1.0 + method.gamma * mu)
        D, method.U[S] = method.client_updates(y_hat, S)
        return batch.weighted_sum(D, w), y_hat - method.gamma * batch.weighted_sum(D, w)

    def eg():
        y_hat = (x - method.gamma * x) / (1.0 + method.gamma * mu)
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for i in range(n):
            anchor = y_hat + U_eg[i] / tau
            yi = y_hat.clone()
            for _ in range(K):
                g = _loop_grad(Af[i], yf[i], yi, 0.0) + tau * (yi - anchor)
                yi = yi - lr * g
            u_new = _loop_grad(Af[i], yf[i], yi, 0.0)
            total += (u_new - U_eg[i]).double()
            U_eg[i] = u_new
        mean = (total / n).float()
        return mean, y_hat - method.gamma * mean

    def rearm_fk():
        method.U.copy_(U0)

    return Prepared(fedkern=fk, eager=eg, rearm_fedkern=rearm_fk, rearm_eager=restore(U_eg, U0),
                    nbytes=min_bytes(case), tensors={"U_eager": U_eg})  # fmt: skip


def _round_footprint(case):  # packed data (float64 copy included) and the [n, d] stacks
    return case.n * case.m * (ROUND_DIM + 2) * 16 + 6 * case.n * (ROUND_DIM + 1) * 4


for _op, _pos, _eager in (
    ("tamuna_round_vs_loop", 920,
     "for each client: K x (x -= gamma (grad - h)); eager masked aggregation"),
    ("fivegcs_round_vs_loop", 930,
     "for each client: K x proximal GD step, u = grad psi, delta; mean of the deltas"),
):  # fmt: skip
    register(_op, family="tamuna_rounds", setup=_setup_round, eager=_eager, position=_pos,
             by_size=False, stacked=True, impl_op="local_steps_", ops_module="fedkern.ops.clients",
             footprint=_round_footprint,
             nbytes=lambda c: c.n * c.m * (ROUND_DIM + 2) * 4)  # fmt: skip


@cases("tamuna_rounds")
def _round_cases(suite, device, sizes):
    ops = ("tamuna_round_vs_loop", "fivegcs_round_vs_loop")
    if suite == "custom":
        return [Case(op, 20, 2, torch.float32, 10) for op in ops]
    if suite == "quick":
        return [Case(op, *ROUND_CASE[:2], torch.float32, ROUND_CASE[2]) for op in ops]
    return []
