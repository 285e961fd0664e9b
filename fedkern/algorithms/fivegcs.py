"""5GCS and 5GCS-CC with client sampling and importance sampling, on a ``ClientBatch``.

fedkern's rendering of ALGORITHMS.md section 3 (Grudzien, Malinovsky and Richtarik, 2212.14370;
5GCS-CC and importance sampling: 2306.03240). No public implementation exists and the algorithm
boxes could not be read, so the updates below are fedkern's reconstruction: a primal-dual method
whose clients solve a proximal (FedProx-type) local problem and keep a dual variable u_m that
converges to grad psi_m(x*); the server keeps x and v = mean_m u_m. It converges to the exact
optimum under client sampling (no neighbourhood), which FedAvg does not.

Convention (fedkern's choice: the spec's "sum convention" does not match min (1/M) sum f_m, so the
mean is used throughout):

  min_x f(x) = (1/M) sum_m f_m(x),   f_m = loss_m + (mu/2)||x||^2,   mu = problem.mu (= l2),
  psi_m = f_m - (mu/2)||x||^2 = loss_m (convex, L_m - mu smooth),   v = (1/M) sum_m u_m.

One round (x, v, U = [u_1 .. u_M]):

  1. y_hat = (x - gamma v) / (1 + gamma mu) (broadcast: d floats down); draw the cohort S.
  2. Every m in S runs K local steps (GD, or AGD: Nesterov's method for the tau-strongly convex
     local problem) warm-started at y_hat on
        psi_m(y) + (tau/2) ||y - a_m||^2,   a_m = y_hat + u_m / tau      -> y_m,
     and computes u_m+ = grad psi_m(y_m), Delta_m = u_m+ - u_m.
  3. The client sends Delta_m (d floats up) and sets u_m = u_m+. 5GCS-CC: it sends Q(Delta_m),
     Rand-k with the unbiased scaling d/k (k floats; the mask is regenerated from (compressor
     seed, round, client), so no indices travel; omega = d/k - 1), and moves its dual by the
     applied change D_m = Q(Delta_m) / (1 + omega) (the unscaled Rand-k of Delta_m).
  4. Server: v += (1/M) sum_{m in S} D_m;  x = y_hat - gamma (1/M) sum_{m in S} D_m / p_m
     (D_m = Delta_m without compression), with p_m the probability that m is in S (C/M for
     uniform sampling), so sum_{m in S} D_m / (M p_m) is an unbiased estimate of the mean change
     of all M clients. An empty cohort (possible with independent sampling) gives x = y_hat.

At the solution, y_hat = x* (x* = -v*/mu), y_m = x* solves every local problem and Delta_m = 0:
the optimum is a fixed point for any K, sampling and compressor.

Sampling:
  "uniform": C distinct clients uniformly without replacement (``Method.cohort``), p_m = C/M;
  "importance": independent participation (``fedkern.sampling.independent``) with
      p = ``fedkern.sampling.importance(L, C, alpha)``: p_m proportional to L_m**alpha, capped at
      1, sum p_m = C (the expected cohort), L_m the smoothness constant of f_m
      (``client_smoothness``);
  a tensor of M probabilities in (0, 1]: independent participation with those p_m.

Step sizes (fedkern's choice, every one a keyword). With q = C / M (the expected fraction of
clients per round; C = sum p_m) and L_eff = max_m L_m C / (M p_m) (= max_m L_m for uniform
sampling, = the mean of the L_m for importance sampling with alpha = 1 when no p_m is capped):

  gamma = GAMMA_SCALE * sqrt(q / (mu L_eff)) (GAMMA_SCALE = 1),   tau = q / gamma,

so gamma tau = q (given one of gamma, tau, the other follows from gamma tau = q); the local step
is 1 / (max_m L_m - mu + tau), the local problem's smoothness constant, and with the local
condition number kappa_loc = (max_m L_m - mu + tau) / tau the local steps are
K = max(1, ceil(log kappa_loc)) for "gd" and K = max(1, ceil(sqrt(kappa_loc) log kappa_loc)) for
"agd". GD from the warm start contracts the distance to the local solution at every step, and a
few steps are enough; Nesterov's bound, ||y_K - y*||^2 <= (kappa_loc + 1) (1 - 1/sqrt(kappa_loc))^K
||y_0 - y*||^2, only guarantees no expansion after about sqrt(kappa_loc) log kappa_loc steps, and
with ceil(sqrt kappa_loc) steps the outer method diverged in the measurements (l2 = 0.001, C = 2).
AGD is Nesterov's method with the momentum min((t - 1) / (t + 2), (sqrt(kappa) - 1) /
(sqrt(kappa) + 1)) at its step t >= 1 (kappa = 1 / (local_lr tau)); the constant strongly convex
momentum alone overshot with few steps. 5GCS-CC keeps the same gamma and tau: dividing q by
1 + omega (a smaller gamma tau) cost more uplink floats to reach 1e-6 of the initial gap in every
measured case.

Measured on breast_cancer (20 label-sorted clients, logistic, l2 = 0.1 / 0.01 / 0.001, C = 2,
5, 10, 20, uniform and importance sampling, GD and AGD, Rand-4; 100 clients and iid splits at
l2 = 0.1, 0.01), these defaults reach 1e-6 of the initial gap in every case but one: full
participation at l2 = 0.001 (kappa = 7600) with "gd", where K = 5 local steps are too few
(K = 16 converges, as do "agd" and GAMMA_SCALE = 0.5). A gamma 2 to 4 times larger is faster in
many of these cases but diverges in others. These are not the papers' constants.

History (``FederatedMethod``'s metrics, per round; index 0 = the start point): "floats_up" (floats
one participating client sent: d, or k with Rand-k), "floats_down" (d: y_hat), "local_steps" (K)
and "cohort" (the round's cohort size |S|; 0 at index 0). Uplink floats of a round: floats_up *
cohort. Randomness: cohorts ``key(1)`` (the federated methods' slot), Rand-k masks ``key(4)``,
masks keyed per client by ``fedkern.clients.minibatch_keys(compressor.seed, S, key(4))``. State:
x, v, U [M, d] (and the local-step counter); ``state_dict`` resumes bit for bit on the CPU.
"""

from __future__ import annotations

import math

import torch

from fedkern import sampling as smp
from fedkern import validation as v
from fedkern.algorithms.federated import (
    OPT_COHORT,
    OPT_GAMMA,
    SLOT_COHORT,
    FederatedMethod,
    _require_batch,
)
from fedkern.algorithms.messages import RowCompressor
from fedkern.algorithms.vr import SLOT_MASK
from fedkern.compress import RandK

__all__ = ["FiveGCS", "client_smoothness"]

#: The constant of the default server step gamma = GAMMA_SCALE * sqrt(q / (mu L_eff)).
GAMMA_SCALE = 1.0
SAMPLINGS = ("uniform", "importance")
SOLVERS = ("gd", "agd")

_FACTOR = {"logistic": 0.25, "multinomial": 0.5, "least_squares": 1.0}


def client_smoothness(problem) -> torch.Tensor:
    """The smoothness constant of every client's f_m: float64 [M] on the CPU.

    L_m = c lambda_max(A_m^T A_m) / m_m + l2 (c = 1/4 logistic, 1/2 multinomial, 1 least
    squares; an empty client has l2 alone), the per-client value whose maximum is
    ``Problem.L``.
    """
    kind = getattr(problem, "kind", None)
    if kind not in _FACTOR:
        raise TypeError(f"problem must be a fedkern.problems.Problem of kind logistic, multinomial "
                        f"or least_squares, got {type(problem).__name__} ({kind})")  # fmt: skip
    off = problem.offsets.tolist()
    out = torch.full((problem.n,), float(problem.l2), dtype=torch.float64)
    for m in range(problem.n):
        a = problem.A[off[m] : off[m + 1]]
        if a.shape[0]:
            lam = float(torch.linalg.eigvalsh(a.T @ a)[-1])
            out[m] += _FACTOR[kind] * lam / a.shape[0]
    return out


def _probabilities(sampling, M: int) -> torch.Tensor:
    """A user's probability tensor, validated: float64 [M] CPU in (0, 1]."""
    if sampling.dim() != 1 or sampling.numel() != M:
        raise ValueError(f"sampling must hold one probability per client ({M}), got shape "
                         f"{tuple(sampling.shape)}")  # fmt: skip
    if not sampling.is_floating_point():
        raise TypeError(f"sampling must be a float tensor of probabilities, got {sampling.dtype}")
    q = sampling.detach().to("cpu", torch.float64)
    bad = ~((q > 0) & (q <= 1))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"sampling must hold probabilities in (0, 1], got sampling[{i}] = "
                         f"{float(q[i])}")  # fmt: skip
    return q.contiguous()


def cohort_probabilities(sampling, M: int, cohort, L, alpha: float):
    """The client sampling of 5GCS / 5GCS-CC from the user's options: ``sampling`` "uniform",
    "importance" (needs L, the clients' smoothness float64 [M]; ``fedkern.sampling.importance``
    with exponent ``alpha``) or a tensor of M probabilities in (0, 1] (then ``cohort`` must be
    None); ``cohort``: the cohort size C (None: M).

    Returns (name, probabilities float64 [M] CPU, expected cohort C as a float, the cohort size as
    an int or None for a probability tensor). Raises TypeError / ValueError naming the argument."""
    if isinstance(sampling, torch.Tensor):
        if cohort is not None:
            raise ValueError("cohort must be None when sampling is a probability tensor "
                             "(the expected cohort is sum(sampling))")  # fmt: skip
        probs = _probabilities(sampling, M)
        return "probabilities", probs, float(probs.sum()), None
    if not isinstance(sampling, str):
        raise TypeError(f"sampling must be 'uniform', 'importance' or a tensor of "
                        f"probabilities, got {type(sampling).__name__}")  # fmt: skip
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be 'uniform', 'importance' or a tensor of "
                         f"probabilities, got {sampling!r}")  # fmt: skip
    size = v.integer("cohort", M if cohort is None else cohort, 1, M)
    C = float(size)
    if sampling == "uniform":
        return sampling, torch.full((M,), C / M, dtype=torch.float64), C, size
    if L is None:
        raise ValueError("sampling 'importance' needs smoothness (the clients' L_m), or pass the "
                         "probabilities as sampling=")  # fmt: skip
    return sampling, smp.importance(L, C, alpha), C, size


class FiveGCS(FederatedMethod):
    """5GCS (and 5GCS-CC with a Rand-k compressor) with uniform or importance client sampling.

    fedkern's rendering of ALGORITHMS.md section 3: the updates, the conventions and the default
    constants are in the module docstring (``fedkern.algorithms.fivegcs``).

    Args:
        batch: a ``fedkern.clients.ClientBatch`` (logistic, multinomial or least squares; mu =
            l2 > 0).
        cohort: C, clients per round for "uniform" and the expected cohort for "importance": an
            int in [1, M] (default M). With a probability tensor the expected cohort is
            sum(sampling) and cohort must be None.
        sampling: "uniform", "importance" or a tensor of M participation probabilities in (0, 1]
            (independent participation).
        alpha: importance exponent, p_m proportional to L_m**alpha (finite; 0 is uniform in
            expectation). Used by "importance" only.
        compressor: None (5GCS) or a ``fedkern.compress.RandK`` with ``unbiased=True``
            (5GCS-CC); its k (or ratio, of d) and seed key the per-client masks.
        local_steps: K >= 1 (default: see the module docstring).
        local_solver: "gd" (K steps of ``ClientBatch.local_steps_`` with the FedProx term) or
            "agd" (Nesterov: K one-step calls with the extrapolation between them, batched over
            the cohort).
        gamma, tau: the server step and the local proximal weight (finite, > 0; defaults in the
            module docstring).
        local_lr: the local step size (default 1 / (max_m L_m - mu + tau)).
        k: shorthand for ``compressor=RandK(k, seed=seed)`` (an int in [1, d]; not with
            compressor).
        seed: keys cohorts and masks (``Method.key``).
        x0, mode, batch_size, diverge_factor: as in ``FederatedMethod``. mode "sgd" / "rr" make
            the local steps stochastic (u_m+ is still the full local gradient): the method then
            stalls at a neighbourhood (measured: 1e-4 of the initial gap with b = 4).

    Attributes:
        x [d], v [d], U [M, d] float32 on the batch's device; probs (float64 [M], p_m), L_clients
        (float64 [M], L_m), gamma, tau, K, local_lr, omega, q (see the module docstring).

    Errors (ValueError / TypeError naming the argument, before any state exists): cohort out of
    [1, M], a probability tensor of the wrong length or outside (0, 1], alpha not finite, an
    unknown sampling or local_solver, gamma / tau / local_lr <= 0 or not finite, local_steps < 1,
    a compressor that is not an unbiased RandK.
    """

    name = "fivegcs"
    state_attrs = ("x", "total_local_steps", "v", "U")
    config_attrs = ("gamma", "tau", "K", "local_lr", "local_solver", "sampling", "probs",
                    "alpha", "cohort_size", "compressor_k", "compressor_seed", "mode",
                    "batch_size")  # fmt: skip
    cli_options = {
        **FederatedMethod.cli_options,
        "gamma": {**OPT_GAMMA, "help": "server step (default sqrt(C/(M mu L)), see the docs)"},
        "cohort": OPT_COHORT,
        "local_steps": {"flag": "--local-steps", "type": int,
                        "help": "local steps K (default 10; fivegcs: ceil(log kappa_loc))"},
        "sampling": {"flag": "--sampling", "choices": SAMPLINGS,
                     "help": "fivegcs client sampling (default uniform)"},
        "importance_alpha": {"flag": "--importance-alpha", "type": float, "keyword": "alpha",
                             "help": "fivegcs importance exponent: p_m ~ L_m^alpha (default 1)"},
        "local_solver": {"flag": "--local-solver", "choices": SOLVERS,
                         "help": "fivegcs local solver (default gd)"},
        "k": {"flag": "--k", "type": int,
              "help": "fivegcs: 5GCS-CC with unbiased Rand-k of k coordinates (default: 5GCS)"},
        "tau": {"flag": "--tau", "type": float,
                "help": "fivegcs local proximal weight (default C / (M gamma))"},
    }  # fmt: skip

    def __init__(self, batch, *, cohort: int | None = None, sampling="uniform",
                 alpha: float = 1.0, compressor: RandK | None = None,
                 local_steps: int | None = None, local_solver: str = "gd",
                 gamma: float | None = None, tau: float | None = None,
                 local_lr: float | None = None, k: int | None = None, **kw):  # fmt: skip
        P = _require_batch(batch).problem
        M, d = batch.n, batch.p
        if k is not None:
            if compressor is not None:
                raise ValueError("give compressor or k (its shorthand), not both")
            compressor = RandK(v.integer("k", k, 1, d), seed=kw.get("seed", 0))
        L = client_smoothness(P)
        self.alpha = v.finite("alpha", alpha)
        self.sampling, self.probs, C, size = cohort_probabilities(sampling, M, cohort, L,
                                                                  self.alpha)  # fmt: skip
        self.cohort_size = C if size is None else size
        if local_solver not in SOLVERS:
            raise ValueError(f"local_solver must be 'gd' or 'agd', got {local_solver!r}")
        self.local_solver = local_solver
        if compressor is not None:
            if not isinstance(compressor, RandK):
                raise TypeError(f"compressor must be None or a fedkern.compress.RandK, got "
                                f"{type(compressor).__name__}")  # fmt: skip
            if not compressor.unbiased:
                raise ValueError("compressor must be an unbiased RandK (unbiased=True): 5GCS-CC "
                                 "needs E Q(x) = x")  # fmt: skip
            self.comp = RowCompressor("randk", d=d, k=compressor.k_for(d),
                                      seed=compressor.seed)  # fmt: skip
            self.compressor_k, self.compressor_seed = self.comp.k, compressor.seed
            self.omega = self.comp.omega
        else:
            self.comp, self.compressor_k, self.compressor_seed, self.omega = None, None, None, 0.0
        self.mu = float(P.mu)
        self.L_clients = L
        L_psi = float(L.max()) - self.mu  # the local smoothness of psi_m, every client
        self.q = C / M
        if gamma is not None:
            gamma = v.positive("gamma", gamma)
        if tau is not None:
            tau = v.positive("tau", tau)
        if gamma is None and tau is None:
            L_eff = float((L * (C / M) / self.probs).max())
            gamma = GAMMA_SCALE * math.sqrt(self.q / (self.mu * L_eff))
        self.gamma = v.positive("gamma", gamma if gamma is not None else self.q / tau)
        self.tau = v.positive("tau", tau if tau is not None else self.q / self.gamma)
        smooth = L_psi + self.tau
        self.local_lr = v.positive("local_lr", 1.0 / smooth if local_lr is None else local_lr)
        if local_steps is None:
            kappa_loc = smooth / self.tau
            grow = 1.0 if local_solver == "gd" else math.sqrt(kappa_loc)  # see the docs
            local_steps = max(1, math.ceil(grow * math.log(kappa_loc)))
        self.K = v.integer("local_steps", local_steps, 1)
        # Nesterov's momentum for the tau-strongly convex local problem at step local_lr
        kappa = max(1.0, 1.0 / (self.local_lr * self.tau))
        self.momentum = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
        self._probs_dev = self.probs.to(batch.device)
        self._cohort_n = 0
        super().__init__(batch, **kw)  # validates x0, mode, batch_size, seed; records round 0
        self.v = torch.zeros(d, device=batch.device)
        self.U = batch.zeros()

    # ---- one round -------------------------------------------------------------------------

    def draw(self) -> torch.Tensor:
        """This round's cohort S: ascending int64 client ids on the batch's device (possibly
        empty with independent sampling). A pure function of (seed, round)."""
        if self.sampling == "uniform":
            return self._cohort(self.cohort_size)
        ids = smp.independent(self.probs, seed=self.seed, step=self.key(SLOT_COHORT))
        return ids.to(self.batch.device)

    def local_solve_(self, Y: torch.Tensor, S: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """K local steps on psi_m(y) + (tau/2)||y - anchor_m||^2 for every row of Y, in place.

        Y, anchor: float32 [|S|, d] on the batch's device (row r = client S[r]); returns Y.
        "gd": one ``local_steps_`` call (l2 = 0: psi_m, FedProx weight tau). "agd": K calls of
        one step each at the extrapolated points, the Nesterov extrapolation done on the stack.
        """
        common = dict(gamma=self.local_lr, clients=S, mode=self.mode, batch_size=self.batch_size,
                      mu=self.tau, anchor=anchor, l2=0.0)  # fmt: skip
        if self.local_solver == "gd":
            self.batch.local_steps_(Y, steps=self.K, round=self.rounds, **common)
        else:
            prev, Z = Y.clone(), Y.clone()
            for t in range(self.K):
                # one step from Z; global step index r K + t, as the K-step call would use
                self.batch.local_steps_(Z, steps=1, round=self.rounds * self.K + t, **common)
                nxt = Z
                Z = nxt + min(self.momentum, t / (t + 3)) * (nxt - prev)
                prev = nxt
            Y.copy_(prev)
        self.total_local_steps += self.K
        return Y

    def client_updates(self, y_hat: torch.Tensor, S: torch.Tensor):
        """The cohort's side of a round from the broadcast y_hat [d]: (D, U_new), float32
        [|S|, d] each: the applied dual changes (Delta_m, or Q(Delta_m) / (1 + omega) with
        Rand-k) and the clients' new duals (u_m+ = grad psi_m(y_m), or u_m + D_m). Does not
        modify U, v or x (only the local-step counter)."""
        U_S = self.U[S]
        # a copy: expand(1, -1).contiguous() would alias y_hat, and the local steps write in place
        Y = y_hat.repeat(S.numel(), 1)
        self.local_solve_(Y, S, y_hat + U_S / self.tau)
        G = self.batch.grads(Y, clients=S) - self.mu * Y  # grad psi_m = grad f_m - mu y
        if self.comp is None:
            return G - U_S, G
        msg = self.comp.diff(G, U_S, clients=S, step=self.key(SLOT_MASK))
        D = self.comp.dense(msg) * (1.0 / (1.0 + self.omega))
        return D, U_S + D

    def step(self) -> None:
        M = self.batch.n
        y_hat = (self.x - self.gamma * self.v) / (1.0 + self.gamma * self.mu)
        S = self.draw()
        if S.numel():
            D, self.U[S] = self.client_updates(y_hat, S)
            w_v = torch.full((S.numel(),), 1.0 / M, dtype=torch.float64)
            self.v = self.v + self.batch.weighted_sum(D, w_v)  # v = mean_m u_m, exactly in sum
            w_x = 1.0 / (M * self._probs_dev[S])  # the unbiased estimate of the mean change
            self.x = y_hat - self.gamma * self.batch.weighted_sum(D, w_x)
        else:
            self.x = y_hat.clone()
        self.rounds += 1
        self._cohort_n = int(S.numel())
        up = self.batch.p if self.comp is None else self.comp.k
        self._record(up, self.batch.p, self.K)

    def record(self, **metrics) -> None:
        """``Method.record`` with the round's cohort size added ("cohort")."""
        super().record(**metrics, cohort=self._cohort_n)

    def __repr__(self) -> str:
        cc = "" if self.comp is None else f", randk k={self.comp.k}"
        return (f"FiveGCS(rounds={self.rounds}, sampling={self.sampling!r}, "
                f"gamma={self.gamma:.4g}, tau={self.tau:.4g}, K={self.K}{cc})")  # fmt: skip
