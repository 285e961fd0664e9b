"""MAST: training through random sketches (Demidovich, Malinovsky, Shulgin, Richtarik 2023).

The objective is f_D(x) = E_S f(v + S (x - v)) for random diagonal sketches S with E[S] = I
(``fedkern.sketch``: Bernoulli, RandK, Partition) and a pre-trained point v (0 when training from
scratch): the model is trained so that its sketched (sparsified) versions perform well. Methods,
on a float64 ``fedkern.problems.Problem`` (its gradients are the oracle; the model x, the sketched
model w and the updates are float32 through the fused sketch ops):

- ``DSGD``: double-sketched SGD: draw S, w = v + S (x - v), x <- x - gamma S^T g with g the
  exact gradient grad f(w) (mode "exact", version I) or a minibatch one (mode "sgd", version II);
- ``DistributedDSGD``: node i receives only the support of its sketch of the model
  (v + S_i (x - v); K floats for Rand-K), returns S_i^T grad f_i (K floats), the server steps
  x <- x - gamma mean_i S_i^T grad f_i(v + S_i (x - v));
- ``LSVRDSG``: loopless variance reduction over a finite set of N sketches: the minibatch
  estimator g = mean_{j in J} [S_j^T grad f(w_j(x)) - S_j^T grad f(w_j(w))] + G(w), with
  w <- x (and G(w) recomputed) with probability p; with b = N it converges linearly to the exact
  minimizer of f_D.

Randomness: sketch t of a run is keyed by (seed, step t, node); a finite sketch set {S_0, ...,
S_{N-1}} is nodes 0..N-1 of step 0 (``sketches=N``), drawn by index. The index and minibatch draws
use ``Method.key`` slots 3 and 4, the L-SVRG coin slot 0, so every run resumes exactly.

History per iteration (index 0: the start): "loss" f(x), "gap" f(x) - f* (the ERM optimum),
"grad_norm" ||grad f(x)||, "dist" ||x - x*||, and with a finite sketch set "gap_D" f_D(x) - f_D*
and "dist_D" ||x - x_D*|| (x_D* by Newton's method on the exact finite average, float64);
``DistributedDSGD`` adds "floats_up" / "floats_down" (per node), ``LSVRDSG`` "grad_evals".
"""

from __future__ import annotations

import math

import torch

from fedkern import sketch as sk
from fedkern import validation as val
from fedkern.algorithms.base import Method
from fedkern.problems import Problem
from fedkern.random import client_seed, permutation_tensor

__all__ = ["DSGD", "LSVRDSG", "DistributedDSGD", "finite_objective", "finite_optimum"]

F64 = torch.float64
SLOT_COIN, SLOT_INDEX, SLOT_BATCH = 0, 3, 4

OPT_SKETCH = {"flag": "--sketch", "choices": ("randk", "bernoulli", "partition"),
              "help": "MAST sketch (default randk)"}  # fmt: skip
OPT_Q = {"flag": "--q", "type": float,
         "help": "MAST density: K/d for randk, p for bernoulli (default 0.25)"}  # fmt: skip
OPT_MAST_GAMMA = {"flag": "--gamma", "type": float, "help": "step size (default 1/L)"}
OPT_SKETCHES = {"flag": "--sketches", "type": int,
                "help": "MAST: a finite set of N sketches (LSVRDSG default 10)"}  # fmt: skip


def make_sketch(kind: str = "randk", q: float = 0.25, nodes: int = 1) -> sk.Sketch:
    """The sketch of ``fedkern run``'s --sketch / --q: RandK(ratio=q), Bernoulli(q) or
    Partition(nodes)."""
    if kind == "randk":
        return sk.RandK(ratio=q)
    if kind == "bernoulli":
        return sk.Bernoulli(q)
    if kind == "partition":
        return sk.Partition(nodes)
    raise ValueError(f"sketch must be 'randk', 'bernoulli' or 'partition', got {kind!r}")


def _problem(problem) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a fedkern.problems.Problem, got {type(problem).__name__}")
    return problem


def finite_objective(problem: Problem, diags: torch.Tensor, x: torch.Tensor, v=None) -> float:
    """f_D(x) = mean_j f(v + S_j (x - v)) for the sketch diagonals ``diags`` [N, p], in float64."""
    x = x.to(F64).cpu()
    v0 = torch.zeros_like(x) if v is None else v.to(F64).cpu()
    return sum(problem.loss(v0 + s * (x - v0)) for s in diags.to(F64)) / diags.shape[0]


def finite_optimum(problem: Problem, diags: torch.Tensor, v=None, *, tol: float = 1e-12):
    """(x_D*, f_D*) of the finite average f_D(x) = mean_j f(v + S_j (x - v)) by Newton's method.

    f_D is convex and (l2-)strongly convex on the coordinates some S_j keeps; coordinates that no
    sketch keeps do not change f_D and stay at v. Gradient (1/N) sum_j S_j grad f(w_j), Hessian
    (1/N) sum_j S_j H(w_j) S_j, float64, with a backtracking line search.
    """
    D = diags.to(F64).cpu()
    p = problem.p
    v0 = torch.zeros(p, dtype=F64) if v is None else v.to(F64).cpu()
    kept = (D != 0).any(0)
    x = v0.clone()

    def fg(x):
        f, g = 0.0, torch.zeros(p, dtype=F64)
        for s in D:
            w = v0 + s * (x - v0)
            f += problem.loss(w)
            g += s * problem.grad(w)
        return f / D.shape[0], g / D.shape[0]

    f, g = fg(x)
    for _ in range(100):
        if float(g[kept].norm()) <= tol:
            break
        H = torch.zeros(p, p, dtype=F64)
        for s in D:
            H += s[:, None] * problem.hessian(v0 + s * (x - v0)) * s[None, :]
        H /= D.shape[0]
        idx = torch.nonzero(kept).flatten()
        step = torch.zeros(p, dtype=F64)
        step[idx] = torch.linalg.solve(H[idx][:, idx], g[idx])
        t = 1.0
        while t > 1e-10:
            f_new, g_new = fg(x - t * step)
            if f_new <= f + 1e-14 * abs(f):
                break
            t *= 0.5
        x, f, g = x - t * step, f_new, g_new
    return x, f


class _MASTMethod(Method):
    """Shared setup: the problem, the sketch, x (float32), v, metrics."""

    problems = ("mast_logistic",)
    state_attrs = ("x",)
    config_attrs = ("gamma", "sketch", "sketches")
    cli_options = {"sketch": OPT_SKETCH, "q": OPT_Q, "gamma": OPT_MAST_GAMMA}

    def __init__(self, problem, sketch=None, *, gamma=None, v=None, x0=None, sketches=None,
                 q: float | None = None, seed: int = 0, diverge_factor: float = 1e8,
                 nodes: int = 1):  # fmt: skip
        self.problem = _problem(problem)
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        if sketch is None or isinstance(sketch, str):
            sketch = make_sketch(sketch or "randk", 0.25 if q is None else q, nodes)
        if not isinstance(sketch, sk.Sketch):
            raise TypeError(f"sketch must be a fedkern.sketch.Sketch or its name, got "
                            f"{type(sketch).__name__}")  # fmt: skip
        p = self.problem.p
        sketch.check(p)
        self.sketch = sketch
        self.sketches = None if sketches is None else val.integer("sketches", sketches, 1)
        self.gamma = val.positive("gamma", self.default_gamma() if gamma is None else gamma)
        self.v = None if v is None else self._vector("v", v)
        self.x = torch.zeros(p) if x0 is None else self._vector("x0", x0).clone()
        if self.v is not None and x0 is None:
            self.x = self.v.clone()
        self.remember_start()
        xs, fs = self.problem.optimum()
        self._opt = (xs, fs)
        self._opt_D = None
        if self.sketches is not None:
            self.diags = self.finite_diagonals()
            self._opt_D = finite_optimum(self.problem, self.diags, self.v)
        self._record()

    def default_gamma(self) -> float:
        """1 / (L_f L_S^max): the theory step of double-sketched SGD."""
        return 1.0 / (self.problem.L * self.sketch.L_S_max(self.problem.p))

    def _vector(self, name, t) -> torch.Tensor:
        val.tensor(name, t)
        if t.shape != (self.problem.p,):
            raise ValueError(f"{name} must have shape ({self.problem.p},), got {tuple(t.shape)}")
        return t.detach().to(torch.float32).cpu().contiguous()

    def finite_diagonals(self) -> torch.Tensor:
        """[N, p] float32: the diagonals of the finite sketch set (nodes 0..N-1 of step 0)."""
        ids = torch.arange(self.sketches)
        return sk.apply(self.sketch, torch.ones(self.problem.p), seed=self.seed, step=0, node=ids)

    def sketch_index(self) -> tuple[int, int]:
        """(step, node) of this iteration's sketch: (t, 0) fresh, or (0, j) from the finite set."""
        if self.sketches is None:
            return self.rounds, 0
        j = int(permutation_tensor(self.sketches, self.seed, self.key(SLOT_INDEX), count=1)[0])
        return 0, j

    def grad_at(self, w: torch.Tensor, mode: str = "exact", batch_size: int = 1) -> torch.Tensor:
        """grad f at the float32 point w: exact (float64 oracle) or a per-client minibatch mean."""
        if mode == "exact":
            return self.problem.grad(w.double()).float()
        P = self.problem
        samples = []
        for i in range(P.n):
            m = int(P.sizes[i])
            b = min(batch_size, m)
            samples.append(permutation_tensor(m, client_seed(self.seed, i),
                                              self.key(SLOT_BATCH), count=b))  # fmt: skip
        return P.grads(w.double(), samples=samples).mean(0).float()

    def _record(self, **extra) -> None:
        x = self.x.double()
        finite = bool(torch.isfinite(x).all())
        f = self.problem.loss(x) if finite else math.nan
        xs, fs = self._opt
        out = {"loss": f, "gap": f - fs, "dist": float((x - xs).norm()),
               "grad_norm": float(self.problem.grad(x).norm()) if finite else math.nan}  # fmt: skip
        if self._opt_D is not None:
            xd, fd = self._opt_D
            fD = finite_objective(self.problem, self.diags, x, self.v) if finite else math.nan
            out["gap_D"] = fD - fd
            out["dist_D"] = float((x - xd).norm())
        self.record(**out, **extra)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.sketch!r}, rounds={self.rounds}, gamma={self.gamma:.4g})"


class DSGD(_MASTMethod):
    """Double-sketched SGD on f_D(x) = E f(v + S (x - v)) (ALGORITHMS.md section 7).

    Per iteration: draw S (fresh from (seed, t), or index j of the finite set), w = v + S (x - v)
    (``fedkern.sketch.apply``), g = grad f(w) (exact, or a minibatch of ``batch_size`` per client
    in mode "sgd"), x <- x - gamma S^T g (``fedkern.sketch.grad_step_``: only the kept coordinates
    are read and written).

    Args:
        problem: a ``fedkern.problems.Problem`` (f = the mean of its clients' losses).
        sketch: a ``fedkern.sketch.Sketch`` or its name ("randk", "bernoulli", "partition"; with
            ``q``). Default RandK(ratio=0.25).
        gamma: step size (default the theory 1 / (L L_S^max); the tests and experiments use more).
        v: the pre-trained point [p] (default 0); x0: the start (default v).
        mode: "exact" (version I) or "sgd" (version II); batch_size: per-client minibatch.
        sketches: None (a fresh sketch every iteration) or N: S drawn uniformly from the finite set
            of N sketches (the objective is then the exact average over them: "gap_D", "dist_D").
        seed: keys the sketches and every draw.
    """

    name = "dsgd"
    config_attrs = ("gamma", "sketch", "sketches", "mode", "batch_size")
    cli_options = {**_MASTMethod.cli_options, "sketches": OPT_SKETCHES}

    def __init__(self, problem, sketch=None, *, mode: str = "exact", batch_size: int = 8, **kw):
        if mode not in ("exact", "sgd"):
            raise ValueError(f"mode must be 'exact' or 'sgd', got {mode!r}")
        self.mode, self.batch_size = mode, val.integer("batch_size", batch_size, 1)
        super().__init__(problem, sketch, **kw)

    def step(self) -> None:
        step, node = self.sketch_index()
        w = sk.apply(self.sketch, self.x, self.v, seed=self.seed, step=step, node=node)
        g = self.grad_at(w, self.mode, self.batch_size)
        sk.grad_step_(self.sketch, self.x, g, self.gamma, seed=self.seed, step=step, node=node)
        self.rounds += 1
        self._record()


class DistributedDSGD(_MASTMethod):
    """Distributed double-sketched SGD: node i trains its own sketch of the model.

    Round t: every node i gets w_i = v + S_i (x - v) (its sketch at (seed, t, i); it needs only
    the support values when it holds v: ``floats_down``), computes grad f_i(w_i) (the float64
    oracle ``Problem.grads``) and returns S_i^T grad f_i(w_i) on the support (``floats_up``); the
    server steps x <- x - (gamma / n) sum_i S_i^T g_i (one fused ``grad_step_`` over the node
    batch, the nodes added in order). With ``Partition(n)`` the supports are disjoint
    (independent subnetwork training).

    Args:
        problem: a Problem whose n clients are the nodes. sketch: as in ``DSGD``
            ("partition" builds Partition(n)). gamma: default 1 / (L L_S^max). v, x0, seed: as in
            ``DSGD``.
    """

    name = "ddsgd"

    def __init__(self, problem, sketch=None, **kw):
        kw.setdefault("nodes", _problem(problem).n)
        if kw.get("sketches") is not None:
            raise ValueError("DistributedDSGD draws fresh sketches (sketches must be None)")
        super().__init__(problem, sketch, **kw)

    def _record(self, **extra) -> None:
        if not extra:
            extra = {"floats_up": 0, "floats_down": 0}
        super()._record(**extra)

    def step(self) -> None:
        n = self.problem.n
        nodes = torch.arange(n)
        W = sk.apply(self.sketch, self.x, self.v, seed=self.seed, step=self.rounds, node=nodes)
        G = self.problem.grads(W.double()).float()
        sk.grad_step_(self.sketch, self.x, G, self.gamma / n, seed=self.seed, step=self.rounds,
                      node=nodes)  # fmt: skip
        ones = torch.ones(self.problem.p)
        support = sk.apply(self.sketch, ones, seed=self.seed, step=self.rounds, node=nodes)
        floats = int((support != 0).sum()) // n  # per node (the mean; Bernoulli's varies)
        self.rounds += 1
        self._record(floats_up=floats, floats_down=floats)


class LSVRDSG(_MASTMethod):
    """Loopless variance-reduced double-sketched gradient over a finite sketch set.

    f_D(x) = (1/N) sum_j f_j(x), f_j(x) = f(v + S_j (x - v)), grad f_j(x) = S_j^T grad f(v +
    S_j (x - v)); the sketches are nodes 0..N-1 of step 0. Per iteration: a minibatch J of b
    distinct indices (uniform), g = (1/b) sum_{j in J} [grad f_j(x) - grad f_j(w)] + G(w),
    x <- x - gamma g; then with probability p: w <- x, G(w) = (1/N) sum_j grad f_j(w). With b = N,
    g = grad f_D(x) exactly and the method converges linearly to x_D* (where DSGD on the same set
    stalls at a neighbourhood).

    Args:
        problem, sketch, v, x0, seed: as in ``DSGD``.
        sketches: N (default 10). batch: b in [1, N] (default N). p: the reference-point
            probability (default b / N). gamma: default 1 / (L L_D) (f_D is L L_D smooth).
    """

    name = "lsvrdsg"
    state_attrs = ("x", "w", "Gw", "grad_evals")
    config_attrs = ("gamma", "sketch", "sketches", "batch", "p")
    cli_options = {**_MASTMethod.cli_options, "sketches": OPT_SKETCHES}

    def __init__(self, problem, sketch=None, *, sketches: int = 10, batch: int | None = None,
                 p: float | None = None, **kw):  # fmt: skip
        N = val.integer("sketches", sketches, 1)
        self.batch = val.integer("batch", N if batch is None else batch, 1, N)
        self.p = val.probability("p", self.batch / N if p is None else p)
        self.grad_evals = 0
        super().__init__(problem, sketch, sketches=N, **kw)
        self.w = self.x.clone()
        self.Gw = self.full_grad(self.w)
        self.grad_evals = N
        self.history["grad_evals"] = [N]

    def default_gamma(self) -> float:
        return 1.0 / (self.problem.L * self.sketch.L_D(self.problem.p))

    def _component_grads(self, y: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        """[|J|, p] float32: row r = grad f(v + S_{J_r} (y - v)) (not yet multiplied by S)."""
        W = sk.apply(self.sketch, y, self.v, seed=self.seed, step=0, node=J)
        return torch.stack([self.problem.grad(w.double()) for w in W]).float()

    def _sketched_mean(self, G: torch.Tensor, J: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """base + (1/|J|) sum_r S_{J_r}^T G_r (float32, the rows added in order)."""
        out = base.clone()
        sk.grad_step_(self.sketch, out, G, -1.0 / J.numel(), seed=self.seed, step=0, node=J)
        return out

    def full_grad(self, y: torch.Tensor) -> torch.Tensor:
        """grad f_D(y) = (1/N) sum_j S_j^T grad f(v + S_j (y - v)): float32 [p]."""
        J = torch.arange(self.sketches)
        return self._sketched_mean(self._component_grads(y, J), J, torch.zeros_like(y))

    def step(self) -> None:
        N, b = self.sketches, self.batch
        if b == N:
            J = torch.arange(N)
        else:
            J = permutation_tensor(N, self.seed, self.key(SLOT_INDEX), count=b).sort().values
        D = self._component_grads(self.x, J) - self._component_grads(self.w, J)
        g = self._sketched_mean(D, J, self.Gw)
        self.x = self.x - self.gamma * g
        evals = 2 * b
        if self.coin(self.p, SLOT_COIN):
            self.w = self.x.clone()
            self.Gw = self.full_grad(self.w)
            evals += N
        self.grad_evals += evals
        self.rounds += 1
        self._record(grad_evals=evals)
