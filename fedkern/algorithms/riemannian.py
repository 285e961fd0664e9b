"""Riemannian loopless variance reduction on ``fedkern.manifolds.PCA``: R-SGD, R-LSVRG, R-PAGE and
the distributed, compressed R-MARINA (ALGORITHMS.md section 9; Demidovich, Malinovsky and
Richtarik 2024 lift L-SVRG, PAGE and MARINA to manifolds).

fedkern's rendering. The algorithm boxes of the paper could not be confirmed here, so these are
the Riemannian lifts of the Euclidean updates as written in ALGORITHMS.md, with these choices
(each a knob):

* every gradient estimate is a tangent vector at the current iterate: ambient gradients are
  projected (the Riemannian gradient of the embedded metric), differences of gradients at two
  points are taken after moving the older one to the newer point with a vector transport
  (``transport``: the sphere's closed-form parallel transport by default, or the projection onto
  the new tangent space; on Stiefel the projection);
* the step is x+ = Exp_x(-eta v) on the sphere (``retraction="exp"``, default; "retr": the
  metric projection (x - eta v)/||x - eta v||) and the QR retraction on Stiefel, computed with the
  transport of the method's vector in one fused op (``Manifold.step``), which renormalizes the
  iterate;
* R-MARINA compresses in ambient coordinates (rand-k of the flattened difference) and the server
  projects the mean of the messages onto the tangent space (linear, so still unbiased);
* the coins, minibatches and rand-k masks are keyed by (seed, round, slot) as in the Euclidean
  methods; step sizes default to the Euclidean theory with the PCA problem's smoothness constants.

The single-node methods (R-SGD, R-LSVRG, R-PAGE) treat f as the finite sum over all N samples
(the problem's nodes pooled); R-MARINA runs over the nodes. History per round: "angle" (the
largest principal angle to the top-k eigenvectors), "loss" f(x), "gap" f(x) - f*, "grad_norm"
(the Riemannian gradient norm, float64), "off_manifold", "floats_up" / "floats_down" (per node;
0 for the single-node methods), "grad_evals" (per-sample gradients, index 0: the initialization),
"diverged".
"""

from __future__ import annotations

import math

import torch

from fedkern import validation as v
from fedkern.algorithms.base import Method
from fedkern.algorithms.federated import OPT_BATCH
from fedkern.algorithms.messages import RowCompressor
from fedkern.manifolds import PCA, Sphere

__all__ = ["RLSVRG", "RMARINA", "RPAGE", "RSGD", "RiemannianMethod"]

SLOT_COIN, SLOT_MINIBATCH, SLOT_MASK, SLOT_BIG = 0, 3, 4, 5

OPT_ETA = {"flag": "--eta", "type": float, "help": "Riemannian step size (default: theory)"}
OPT_TRANSPORT = {
    "flag": "--transport",
    "choices": ("parallel", "projection"),
    "help": "vector transport (sphere; default parallel)",
}
OPT_RETRACTION = {
    "flag": "--retraction",
    "choices": ("exp", "retr"),
    "help": "sphere step: exponential map or metric projection (default exp)",
}


class RiemannianMethod(Method):
    """Base of the methods on a ``PCA`` problem (sphere or Stiefel).

    Args:
        problem: a ``fedkern.manifolds.PCA``.
        x0: the start point ([n] or [n, k], on the manifold to 1e-5; default a random point
            ``manifold.random(seed=seed)``).
        seed: keys coins (``key(0)``), minibatches (``key(3)``, ``key(5)``), masks (``key(4)``).
        transport: "parallel" (sphere only) or "projection"; default parallel on the sphere.
        retraction: "exp" or "retr" on the sphere (default exp); Stiefel uses the QR retraction.
    """

    name = "riemannian"
    problems = ("pca", "pca_stiefel")
    state_attrs = ("x",)
    config_attrs = ("eta", "transport", "retraction")
    cli_options = {"eta": OPT_ETA, "transport": OPT_TRANSPORT, "retraction": OPT_RETRACTION}

    def __init__(self, problem, *, x0=None, seed: int = 0, transport: str | None = None,
                 retraction: str | None = None, diverge_factor: float = 1e8):  # fmt: skip
        if not isinstance(problem, PCA):
            raise TypeError(f"problem must be a fedkern.manifolds.PCA, got "
                            f"{type(problem).__name__}")  # fmt: skip
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        self.problem, self.M = problem, problem.manifold
        sphere = isinstance(self.M, Sphere)
        self.transport = transport or ("parallel" if sphere else "projection")
        self.retraction = retraction or ("exp" if sphere else "qr")
        if self.transport not in (("parallel", "projection") if sphere else ("projection",)):
            raise ValueError(f"transport must be 'parallel' or 'projection' on the sphere, "
                             f"'projection' on Stiefel, got {self.transport!r}")  # fmt: skip
        if self.retraction not in (("exp", "retr") if sphere else ("qr",)):
            raise ValueError(f"retraction must be 'exp' or 'retr' on the sphere, 'qr' on "
                             f"Stiefel, got {self.retraction!r}")  # fmt: skip
        shape = self.M.shape
        if x0 is None:
            x = self.M.random(seed=self.seed, device=problem.device)
        else:
            v.tensor("x0", x0)
            x = x0.detach().to(problem.device, torch.float32).contiguous().clone()
            if tuple(x.shape) != shape:
                raise ValueError(f"x0 must have shape {shape}, got {tuple(x.shape)}")
            self.M.check(x, name="x0")
        self.x = x
        self.remember_start()
        self._evals = 0

    # ---- pieces ------------------------------------------------------------------------------

    def _step_(self, x: torch.Tensor, u: torch.Tensor, eta: float, w=None) -> torch.Tensor:
        """In place on x [..., shape] (and w): x <- R_x(-eta proj_x(u)), w transported."""
        if isinstance(self.M, Sphere):
            return self.M.step(x, u, eta, w, exp=self.retraction == "exp",
                               transport=self.transport)  # fmt: skip
        return self.M.step(x, u, eta, w)

    def _move(self, x, y, w):
        """w (tangent at x) transported to y."""
        return self.M.transport(x, y, w, self.transport)

    def _pooled(self, X, mode="gd", b=1, slot=SLOT_MINIBATCH, initial=False):
        """Riemannian gradients of the pooled finite sum at the rows of X [r, ...]: "gd" the full
        gradient, "sgd" a b-sample minibatch keyed by this round's ``key(slot)`` (the same samples
        for every row). Counts the evaluations."""
        if mode == "gd":
            self._evals += X.shape[0] * self.problem.N
            G = self.problem.egrads(X, pooled=True)
        else:
            self._evals += X.shape[0] * min(b, self.problem.N)
            step = self.initial_key(slot) if initial else self.key(slot)
            G = self.problem.egrads(X, pooled=True, mode="sgd", batch_size=b, step=step)
        return self.M.proj(X, G)

    def _record(self, up: int, down: int) -> None:
        P = self.problem
        finite = bool(torch.isfinite(self.x).all())
        f = P.loss(self.x) if finite else math.nan
        self.record(
            angle=P.angle(self.x) if finite else math.nan,
            loss=f,
            gap=f - P.f_star,
            grad_norm=float(P.grad(self.x).norm()) if finite else math.nan,
            off_manifold=float(self.M.off_manifold(self.x)) if finite else math.nan,
            floats_up=up,
            floats_down=down,
            grad_evals=self._evals,
        )
        self._evals = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rounds={self.rounds}, eta={self.eta:.4g})"


class RSGD(RiemannianMethod):
    """Riemannian SGD: x+ = R_x(-eta_t grad_B f(x)), a b-sample minibatch per step,
    eta_t = eta / (1 + decay t). The baseline of R-LSVRG and R-PAGE.

    Args:
        problem, x0, seed, retraction: see ``RiemannianMethod``.
        eta: default 1 / L_avg (the mean-square per-sample smoothness of the problem; fedkern's
            choice). batch_size: b (default 1). decay: >= 0 (default 0: a constant step).
    """

    name = "rsgd"
    config_attrs = ("eta", "transport", "retraction", "batch_size", "decay")
    cli_options = {**RiemannianMethod.cli_options, "batch_size": OPT_BATCH}

    def __init__(self, problem, *, eta: float | None = None, batch_size: int = 1,
                 decay: float = 0.0, **kw):  # fmt: skip
        super().__init__(problem, **kw)
        self.eta = v.positive("eta", 1 / problem.L_avg if eta is None else eta)
        self.batch_size = v.integer("batch_size", batch_size, 1)
        self.decay = v.fp32_scalar("decay", decay, nonneg=True)
        self._record(0, 0)

    def step(self) -> None:
        eta = self.eta / (1 + self.decay * self.rounds)
        g = self._pooled(self.x[None], "sgd", self.batch_size)[0]
        self._step_(self.x, g, eta)
        self.rounds += 1
        self._record(0, 0)


class RLSVRG(RiemannianMethod):
    """R-LSVRG: loopless SVRG on the manifold (fedkern's rendering).

    Round k (x, w, mu = grad f(w), Riemannian): a b-sample minibatch B (the same samples at x and
    w);  v = grad_B f(x) - T_{w -> x}(grad_B f(w) - mu);  a coin (prob. p): heads: w = x (before
    the step), mu = grad f(x) (N evaluations);  x+ = Exp_x(-eta v). Starts with w = x0.

    Args:
        problem, x0, seed, transport, retraction: see ``RiemannianMethod``.
        eta: default 1 / (6 L_avg) (Kovalev et al.'s 1/(6L) with the mean-square per-sample
            smoothness). p: default b / N. batch_size: b (default 1).
    """

    name = "rlsvrg"
    state_attrs = ("x", "w", "mu")
    config_attrs = ("eta", "transport", "retraction", "batch_size", "p")
    cli_options = {**RiemannianMethod.cli_options, "batch_size": OPT_BATCH,
                   "p": {"flag": "--p", "type": float}}  # fmt: skip

    def __init__(self, problem, *, eta: float | None = None, p: float | None = None,
                 batch_size: int = 1, **kw):  # fmt: skip
        super().__init__(problem, **kw)
        self.batch_size = v.integer("batch_size", batch_size, 1)
        self.eta = v.positive("eta", 1 / (6 * problem.L_avg) if eta is None else eta)
        self.p = v.probability("p", min(1.0, self.batch_size / problem.N) if p is None else p)
        self.w = self.x.clone()
        self.mu = self._pooled(self.w[None])[0]
        self._record(0, 0)

    def step(self) -> None:
        heads = self.coin(self.p, SLOT_COIN)
        G = self._pooled(torch.stack([self.x, self.w]), "sgd", self.batch_size)
        v_est = G[0] - self._move(self.w, self.x, G[1] - self.mu)
        if heads:  # w <- x before the step: the full gradient there
            self.w = self.x.clone()
            self.mu = self._pooled(self.w[None])[0]
        self._step_(self.x, v_est, self.eta)
        self.rounds += 1
        self._record(0, 0)


class RPAGE(RiemannianMethod):
    """R-PAGE (fedkern's rendering): x+ = Exp_x(-eta g); a coin (prob. p):
    heads: g+ = grad_b f(x+) (b samples; the full gradient when b is None);
    tails: g+ = T_{x -> x+}(g - grad_{b'} f(x)) + grad_{b'} f(x+) (the same b' samples at x and
    x+; the transport is fused into the step). Starts with g = grad_b f(x0).

    Args:
        problem, x0, seed, transport, retraction: see ``RiemannianMethod``.
        batch_size: b (None: full gradients). small_batch: b' (default 1).
        p: default b' / (b + b') (b = N when full).
        eta: default 1 / (L_avg (1 + sqrt((1 - p) / (p b')))) (PAGE's theory step with the
            mean-square per-sample smoothness).
    """

    name = "rpage"
    state_attrs = ("x", "g")
    config_attrs = ("eta", "transport", "retraction", "batch_size", "small_batch", "p")
    cli_options = {**RiemannianMethod.cli_options, "p": {"flag": "--p", "type": float},
                   "small_batch": {"flag": "--small-batch", "type": int}}  # fmt: skip

    def __init__(self, problem, *, eta: float | None = None, p: float | None = None,
                 batch_size: int | None = None, small_batch: int = 1, **kw):  # fmt: skip
        super().__init__(problem, **kw)
        self.batch_size = None if batch_size is None else v.integer("batch_size", batch_size, 1)
        self.small_batch = v.integer("small_batch", small_batch, 1)
        b = problem.N if self.batch_size is None else self.batch_size
        bp = self.small_batch
        self.p = v.probability("p", bp / (b + bp) if p is None else p)
        if eta is None:
            eta = 1 / (problem.L_avg * (1 + math.sqrt((1 - self.p) / (self.p * bp))))
        self.eta = v.positive("eta", eta)
        self.g = self._big(self.x, initial=True)
        self._record(0, 0)

    def _big(self, x, initial=False):
        if self.batch_size is None:
            return self._pooled(x[None])[0]
        return self._pooled(x[None], "sgd", self.batch_size, SLOT_BIG, initial)[0]

    def step(self) -> None:
        heads = self.coin(self.p, SLOT_COIN)
        if heads:
            self._step_(self.x, self.g, self.eta)
            self.g = self._big(self.x)
        else:
            bp = self.small_batch
            w = (self.g - self._pooled(self.x[None], "sgd", bp)[0]).contiguous()
            self._step_(self.x, self.g, self.eta, w)  # x+ and T_{x -> x+}(g - grad(x))
            self.g = w + self._pooled(self.x[None], "sgd", bp)[0]
        self.rounds += 1
        self._record(0, 0)


class RMARINA(RiemannianMethod):
    """R-MARINA over the problem's nodes (fedkern's rendering), with rand-k in ambient coordinates.

    The server holds x and g (tangent at x); node i its Riemannian gradient G_i at x (kept from the
    previous round). Round k: x+ = R_x(-eta g), broadcast; a shared coin (prob. p):
      heads: node i sends G_i+ = grad f_i(x+) (dense); g+ = sum_i w_i G_i+;
      tails: node i transports its G_i to x+ and sends Q_i(G_i+ - T_{x -> x+} G_i) (rand-k of the
             flattened ambient difference: k values, the mask from (seed, round, node));
             g+ = T_{x -> x+} g + proj_{x+}(sum_i w_i Q_i(...)).
    The weights w_i = m_i / N make g an estimate of grad f (f = sum_i w_i f_i). With p = 1 every
    round is dense: distributed Riemannian GD (the baseline).

    Args:
        problem, x0, seed, transport, retraction: see ``RiemannianMethod``.
        compressor: "randk" (default, unbiased) or "none". k / ratio: coordinates kept of the
            d = n k ambient floats (default ratio 0.1).
        p: default k / d. eta: default 1 / (L + L_+ sqrt((1 - p) omega / (p n_nodes))) (MARINA's
            step; L = 2 lambda_1(C), L_+ the quadratic mean of the nodes' constants).
    """

    name = "rmarina"
    problems = ("pca", "pca_stiefel")
    state_attrs = ("x", "g", "G")
    config_attrs = ("eta", "transport", "retraction", "p", "compressor_kind", "k")
    cli_options = {**RiemannianMethod.cli_options, "p": {"flag": "--p", "type": float},
                   "compressor": {"flag": "--compressor", "choices": ("randk", "topk", "none")},
                   "k": {"flag": "--k", "type": int}}  # fmt: skip

    def __init__(self, problem, *, eta: float | None = None, p: float | None = None,
                 compressor: str = "randk", k: int | None = None, ratio: float | None = None,
                 **kw):  # fmt: skip
        super().__init__(problem, **kw)
        if compressor == "topk":
            raise ValueError("R-MARINA needs an unbiased compressor: 'randk' or 'none'")
        self.d = math.prod(self.M.shape)
        self.comp = RowCompressor(compressor, d=self.d, k=k, ratio=ratio, seed=self.seed)
        self.compressor_kind, self.k = self.comp.kind, self.comp.k
        self.p = v.probability("p", self.comp.k / self.d if p is None else p)
        if eta is None:
            omega, n = self.comp.omega, problem.nodes
            eta = 1 / (problem.L + problem.L_plus * math.sqrt((1 - self.p) * omega / (self.p * n)))
        self.eta = v.positive("eta", eta)
        self._w = (problem.sizes.double() / problem.N).to(problem.device)
        self._ids = torch.arange(problem.nodes)
        self.G = self._node_grads(self.x)
        self.g = self._aggregate(self.G)
        self._record(self.d, 0)

    def _node_grads(self, x) -> torch.Tensor:
        """[nodes, ...]: every node's Riemannian gradient at x (its full local data)."""
        X = x.expand(self.problem.nodes, *x.shape).contiguous()
        self._evals += self.problem.N
        return self.M.proj(X, self.problem.egrads(X))

    def _aggregate(self, G) -> torch.Tensor:
        return self.comp.mean(G.reshape(G.shape[0], -1), self._w).reshape(self.M.shape)

    def client_messages(self, x_new: torch.Tensor, heads: bool):
        """Every node's message of this round (dense gradients on heads, else the rand-k
        (values, indices) of G_i+ - T G_i); updates the nodes' cached gradients."""
        G_new = self._node_grads(x_new)
        if heads:
            self.G = G_new
            return G_new.reshape(G_new.shape[0], -1)
        c = self.problem.nodes
        X = self.x.expand(c, *self.x.shape).contiguous()  # each node moves its G_i to x+
        T = self.G.clone()
        self._step_(X, self.g.expand_as(X).contiguous(), self.eta, T)
        msg = self.comp.diff(G_new.reshape(c, -1), T.reshape(c, -1), clients=self._ids,
                             step=self.key(SLOT_MASK))  # fmt: skip
        self.G = G_new
        return msg

    def step(self) -> None:
        heads = self.coin(self.p, SLOT_COIN)
        x_new = self.x.clone()
        g_moved = self.g.clone()
        self._step_(x_new, self.g, self.eta, g_moved)  # the server: x+ and T_{x -> x+} g
        msg = self.client_messages(x_new, heads)
        if heads:
            self.g = self.comp.mean(msg, self._w).reshape(self.M.shape)
        else:
            m = self.comp.mean(msg, self._w).reshape(self.M.shape)
            self.g = g_moved + self.M.proj(x_new, m)
        self.x = x_new
        self.rounds += 1
        self._record(self.d if heads else self.comp.floats, self.d)
