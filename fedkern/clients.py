"""Many clients in one launch: ``ClientBatch`` (convex models, fused kernels) and ``ModuleClients``
(any ``torch.nn.Module`` through torch.func).

A cohort's parameters are stacked as X [c, p] (one row per client; control variates H of the same
shape). ``local_steps_`` runs K local steps of full-batch GD, minibatch SGD or one
random-reshuffling epoch per step for every row at once, with the update
x_i <- x_i - gamma * (g_i - h_i) (optional per-client clipping of g_i - h_i, optional FedProx term)
fused into the gradient kernel; ``grads`` gives every cohort client's (minibatch) gradient at its
row in one call. Each client's randomness (minibatches, reshuffles) is keyed by
``fedkern.random.client_seed(seed, client id)`` and the local step's global index, so results do not
depend on the order of the cohort or on which other clients are in it.
"""

from __future__ import annotations

import functools
import math

import torch

from fedkern import validation as v
from fedkern.ops import clients as ops
from fedkern.ops import quartic as quartic_ops
from fedkern.problems import Problem, Quartic
from fedkern.random import client_seed, client_seeds, randk_keys, randk_keys_tensor
from fedkern.reference.clients import GRAD_MODE_TAG, KIND_TAG, MODE_TAG

__all__ = ["ClientBatch", "ModuleBatch", "ModuleClients"]

Tensor = torch.Tensor


def _cohort(clients, n: int, device) -> Tensor:
    return _cohorts(clients, n, device)[0]


def _cohorts(clients, n: int, device) -> tuple[Tensor, Tensor]:
    """The cohort's ids (default 0..n-1) on ``device`` and on the host, checked on the host: the
    keys drawn from the ids use the host copy, so a round never reads ids back from the device
    (a host synchronization on CUDA). Ids given as a device tensor are read once, here."""
    if clients is None:
        return torch.arange(n, device=device), torch.arange(n)
    c = torch.as_tensor(clients, dtype=torch.int64).reshape(-1).cpu()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n):
        raise ValueError(f"clients must be ids in [0, {n})")
    if torch.unique(c).numel() != c.numel():
        raise ValueError("clients must not repeat an id")
    return c.to(device), c


@functools.lru_cache(maxsize=4096)
def _client_seed(seed: int, client: int) -> int:
    return client_seed(seed, client)


def minibatch_keys(seed: int, clients, step: int) -> Tensor:
    """``randk_keys(client_seed(seed, i), step)`` for every id i of ``clients``: int64 [c, 8] CPU.

    The round keys of the clients' minibatch permutations (and of rand-k masks keyed per client).
    A few distinct ids go through the scalar Python functions (far cheaper than the vectorized
    Philox on tiny tensors), many through ``randk_keys_tensor``; both give the same values.
    """
    ids = torch.as_tensor(clients, dtype=torch.int64).reshape(-1).cpu()
    uniq, inv = torch.unique(ids, return_inverse=True)
    if uniq.numel() <= 32:
        keys = torch.tensor([randk_keys(_client_seed(seed, int(i)), step) for i in uniq.tolist()],
                            dtype=torch.int64).reshape(-1, 8)  # fmt: skip
    else:
        keys = randk_keys_tensor(client_seeds(seed, uniq), step)
    return keys[inv]


def _samples_tensor(samples, c: int) -> Tensor:
    """int64 [c, s] (-1 padded) from a [c, s] tensor or a list of c index sequences."""
    if isinstance(samples, torch.Tensor):
        if samples.dtype != torch.int64 or samples.dim() != 2 or samples.shape[0] != c:
            raise ValueError(f"samples must be an int64 tensor [{c}, s] or a list of {c} index "
                             f"lists")  # fmt: skip
        return samples
    rows = [torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in samples]
    if len(rows) != c:
        raise ValueError(f"samples must give one index list per cohort client ({c}), got "
                         f"{len(rows)}")  # fmt: skip
    s = max((r.numel() for r in rows), default=0)
    out = torch.full((c, s), -1, dtype=torch.int64)
    for r, t in enumerate(rows):
        if t.numel() and int(t.min()) < 0:
            raise ValueError("samples must hold local sample indices >= 0")
        out[r, : t.numel()] = t
    return out


class ClientBatch:
    """n clients of a convex ``fedkern.problems.Problem``, packed for batched local training.

    Args:
        problem: the problem (data split over clients, loss kind, l2). Its float64 data stays the
            oracle for metrics; a float32 copy of A and y lives on ``device`` for the kernels.
            A ``fedkern.problems.Quartic`` is accepted too (kind "quartic": A holds its points;
            ``local_steps_`` runs the "quartic" op family, without FedProx's mu). A ``Problem``
            with ``nonconvex_reg`` > 0 is refused: the kernels do not implement that term.
        seed: int in [0, 2**63), keys every client's random stream.
        device: where the packed data and the stacked parameters live ("cpu" or a CUDA device).

    Attributes:
        n, d, p: clients, features, parameters per client; kind, classes, seed; A [N, d], y [N]
        (float32 on device), offsets [n + 1] int64 on device.
    """

    def __init__(self, problem: Problem, *, seed: int = 0, device="cpu"):
        if not isinstance(problem, (Problem, Quartic)):
            raise TypeError(f"problem must be a fedkern.problems.Problem or Quartic, got "
                            f"{type(problem).__name__}")  # fmt: skip
        if getattr(problem, "nonconvex_reg", 0.0):
            raise ValueError("ClientBatch's kernels do not implement nonconvex_reg; evaluate "
                             "such a problem in float64 (algorithms.BiasedSGD)")  # fmt: skip
        self.problem = problem
        self.device = torch.device(device)
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self.kind, self.classes = problem.kind, problem.classes
        self.n, self.d, self.p = problem.n, problem.d, problem.p
        self.A = problem.A.to(self.device, torch.float32).contiguous()
        self.y = problem.y.to(self.device, torch.float32).contiguous()
        self.offsets = problem.offsets.to(self.device)
        # every client's stream seed, on the host once: a full-cohort step reads no tensor
        self._seeds = client_seeds(self.seed, torch.arange(self.n))

    def zeros(self, rows: int | None = None) -> Tensor:
        """A float32 [rows (default n), p] stack of zeros on the batch's device."""
        return torch.zeros(self.n if rows is None else rows, self.p, device=self.device)

    def local_steps_(self, X: Tensor, *, gamma: float, steps: int, clients=None, H=None,
                     mode: str = "gd", batch_size: int = 1, clip: float | None = None,
                     mu: float = 0.0, anchor: Tensor | None = None, round: int = 0,
                     l2: float | None = None) -> Tensor:  # fmt: skip
        """K local steps for every cohort client, in place on X; returns X.

        Args:
            X: float32 [c, p] on the batch's device, row r = client clients[r]'s parameters.
                Modified in place.
            gamma: the local step size (a finite float).
            steps: K >= 0 (gd/sgd: K gradient steps; rr: K epochs of ceil(m_i / b) steps).
            clients: the cohort's client ids (c distinct ints), default 0..n-1 (then c = n).
            H: float32 [c, p] control variates (the update uses g_i - h_i), or None.
            mode: "gd" (full local batch), "sgd" (b samples without replacement per step) or "rr"
                (a fresh reshuffle per epoch, consecutive batches of b).
            batch_size: b >= 1 for sgd / rr.
            clip: None, or a float > 0: g_i - h_i is scaled to norm <= clip before each update.
            mu: FedProx's proximal weight (>= 0); with mu > 0, anchor is required.
            anchor: the FedProx centre, [p] (shared) or [c, p].
            round: the communication round (>= 0); local step t of round r draws its randomness
                from global step r * K + t, so rounds never reuse a permutation.
            l2: the L2 weight of the local objective, a finite float >= 0 (default None: the
                problem's l2). 0.0 trains the unregularized loss (5GCS's psi_m).

        Errors (before anything is modified): shapes, dtypes, devices, gamma not finite or <= 0,
        clip <= 0, l2 < 0 or not finite, unknown mode, clients out of range or repeated.
        """
        c, c_host = _cohorts(clients, self.n, self.device)
        if mode not in MODE_TAG:
            raise ValueError(f"mode must be one of {', '.join(MODE_TAG)}, got {mode!r}")
        K = v.integer("steps", steps, 0)
        v.tensor("X", X)
        if X.dim() != 2 or X.shape[0] != c.numel():
            raise ValueError(f"X must have one row per cohort client ({c.numel()}), got "
                             f"{tuple(X.shape)}")  # fmt: skip
        if clip is not None:
            clip = v.fp32_scalar("clip", clip)
            if clip <= 0:
                raise ValueError(f"clip must be > 0 (or None), got {clip}")
        mu = v.fp32_scalar("mu", mu, nonneg=True)
        if mu and anchor is None:
            raise ValueError("mu > 0 (FedProx) needs anchor, the proximal centre")
        if anchor is not None and anchor.dim() == 1:
            anchor = anchor.to(self.device, torch.float32).expand(c.numel(), -1).contiguous()
        if not v.fp32_scalar("gamma", gamma) > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        r = v.integer("round", round, 0)
        l2 = self.problem.l2 if l2 is None else v.fp32_scalar("l2", l2, nonneg=True)
        keys = None
        if mode != "gd" and K > 0:
            # full cohort: the cached host seeds (no read of the device ids, no synchronization)
            seeds = self._seeds if clients is None else client_seeds(self.seed, c_host)
            keys = randk_keys_tensor(seeds[:, None], r * K + torch.arange(K)[None, :])
            keys = keys.to(self.device)
        if self.kind == "quartic":
            if mu:
                raise ValueError("mu (FedProx) is not supported on the quartic problem")
            quartic_ops.local_steps_(X, c, self.A, self.offsets, K, float(gamma), H, MODE_TAG[mode],
                                     v.integer("batch_size", batch_size, 1), keys,
                                     clip or 0.0, False)  # fmt: skip
            return X
        # offsets come from the Problem and the cohort was checked on the host by _cohort: the
        # op's value checks (device reads, a host synchronization on CUDA) are skipped
        ops.local_steps_(X, c, self.A, self.y, self.offsets, KIND_TAG[self.kind], self.classes,
                         K, float(gamma), float(l2), H, MODE_TAG[mode],
                         v.integer("batch_size", batch_size, 1), keys, clip or 0.0, mu,
                         anchor, False)  # fmt: skip
        return X

    def grads(self, X: Tensor, *, clients=None, mode: str = "gd", batch_size: int = 1,
              step: int = 0, samples=None) -> Tensor:  # fmt: skip
        """Every cohort client's gradient at its row of X, in one call: G [c, p] float32.

        G[r] = (1/|B_r|) sum_{j in B_r} grad loss(X[r]; a_j, y_j) + l2 X[r] over client
        clients[r]'s batch B_r (the gradient of f_i on that batch; ``fedkern.problems``).

        Args:
            X: float32 [c, p] (row r at client clients[r]) or [p] (one point for every client),
                on the batch's device. Not modified.
            clients: the cohort's client ids (c distinct ints), default 0..n-1.
            mode: "gd": every local sample; "sgd": min(b, m_i) samples without replacement, the
                batch that ``local_steps_`` with mode "sgd" uses at global step ``step`` (keyed by
                ``client_seed(seed, i)`` and ``step``), so two calls with the same step share
                their samples (gradient differences at two points) and a client's batch does not
                depend on the rest of the cohort.
            batch_size: b >= 1 (sgd).
            step: int >= 0, the minibatch key (sgd).
            samples: instead of mode: the batches themselves, a list of c index tensors (local
                indices in [0, m_i); repeats count twice) or an int64 [c, s] tensor (-1 = padding).

        Returns:
            float32 [c, p] on the batch's device. One local step of ``local_steps_`` (no H, clip
            or FedProx term) from X equals X - gamma * G bit for bit on every backend.

        Errors (TypeError / ValueError naming the argument): shapes, dtypes, devices, unknown
        mode, clients out of range or repeated, sample indices out of range.
        """
        c, c_host = _cohorts(clients, self.n, self.device)
        v.tensor("X", X)
        if X.dim() == 1 and X.shape[0] == self.p:
            X = X.expand(c.numel(), -1)
        if X.dim() != 2 or X.shape[0] != c.numel():
            raise ValueError(f"X must be [{self.p}] or have one row per cohort client "
                             f"({c.numel()}), got {tuple(X.shape)}")  # fmt: skip
        keys = smp = None
        if samples is not None:
            tag = GRAD_MODE_TAG["samples"]
            smp = _samples_tensor(samples, c.numel()).to(self.device)
        else:
            if mode not in ("gd", "sgd"):
                raise ValueError(f"mode must be 'gd' or 'sgd', got {mode!r}")
            tag = GRAD_MODE_TAG[mode]
            if mode == "sgd":
                t = v.integer("step", step, 0)
                keys = minibatch_keys(self.seed, c_host, t).to(self.device)
        b = v.integer("batch_size", batch_size, 1)
        # value checks only for caller-given samples (offsets and cohort: as in local_steps_)
        return ops.client_grads(X.contiguous(), c, self.A, self.y, self.offsets,
                                KIND_TAG[self.kind], self.classes, self.problem.l2, tag, b, keys,
                                smp, smp is not None)  # fmt: skip

    # ---- server side ---------------------------------------------------------------------------

    def mean(self, X: Tensor) -> Tensor:
        """The cohort mean of X [c, p]: float32 [p] (float64 accumulation)."""
        w = torch.full((X.shape[0],), 1.0 / max(X.shape[0], 1), dtype=torch.float64,
                       device=X.device)  # fmt: skip
        return ops.weighted_sum(X, w)

    def weighted_sum(self, X: Tensor, w) -> Tensor:
        """sum_r w[r] X[r] for per-client weights w (c floats): float32 [p]."""
        w = torch.as_tensor(w, dtype=torch.float64).to(X.device)
        return ops.weighted_sum(X, w)

    def scaffnew_sync_(self, X: Tensor, H: Tensor, *, p: float, gamma: float) -> Tensor:
        """Scaffnew's communication: xbar = mean X; H += (p / gamma)(xbar - X); X = xbar.

        In place on X and H (float32 [c, p]); returns xbar [p]. sum_i h_i stays 0 (up to float32
        rounding) when it was 0.
        """
        if not (0 < p <= 1) or not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"need p in (0, 1] and gamma > 0, got p = {p}, gamma = {gamma}")
        return ops.scaffnew_sync_(X, H, float(p) / float(gamma))

    def __repr__(self) -> str:
        return f"ClientBatch({self.problem!r}, seed={self.seed}, device={str(self.device)!r})"


class ModuleClients:
    """Batched local training for any ``torch.nn.Module`` through torch.func.

    The stacked parameters X [c, P] (P = the module's parameter count, flattened in
    ``named_parameters`` order) are trained with ``torch.func.functional_call`` and ``vmap`` over
    the cohort; each step computes every client's full-batch gradient at once (clients padded to the
    largest local dataset, padding weighted 0), then applies the same update as ``ClientBatch``
    (g_i - h_i, optional clipping through ``fedkern.robust.clip_rows_``, x -= gamma * u).

    Args:
        module: the model (its parameters give the shapes; buffers are shared, not batched).
        loss: ``loss(outputs, targets) -> per-sample losses [m]`` (reduction="none").
        inputs: [N, ...] samples packed by client; targets: [N, ...].
        parts: a list of n index tensors (each client's rows).
        l2: L2 regularization added to every client's objective.
    """

    def __init__(self, module: torch.nn.Module, loss, inputs: Tensor, targets: Tensor, parts,
                 *, l2: float = 0.0):  # fmt: skip
        self.module, self.loss = module, loss
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]
        self.P = sum(self.sizes)
        self.n = len(parts)
        self.l2 = v.fp32_scalar("l2", l2, nonneg=True)
        m = max(len(p) for p in parts)
        idx = torch.zeros(self.n, m, dtype=torch.int64)
        w = torch.zeros(self.n, m)
        for i, part in enumerate(parts):
            part = torch.as_tensor(part, dtype=torch.int64)
            idx[i, : len(part)] = part
            w[i, : len(part)] = 1.0 / max(len(part), 1)
        self.inputs, self.targets, self.weights = inputs[idx], targets[idx], w
        self.buffers = dict(module.named_buffers())

    def flat(self) -> Tensor:
        """The module's current parameters as one float32 vector [P]."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.module.parameters()])

    def _unflatten(self, x: Tensor) -> dict:
        return {n: t.view(s) for n, t, s in zip(self.names, x.split(self.sizes), self.shapes,
                                                 strict=True)}  # fmt: skip

    def grads(self, X: Tensor, clients=None) -> Tensor:
        """[c, P]: every cohort client's full-batch gradient (+ l2 x) at its row of X."""
        from torch.func import functional_call, grad, vmap

        c = _cohort(clients, self.n, X.device).cpu()

        def objective(x, inp, tgt, w):
            out = functional_call(self.module, (self._unflatten(x), self.buffers), (inp,))
            return (self.loss(out, tgt) * w).sum() + 0.5 * self.l2 * (x * x).sum()

        return vmap(grad(objective))(X, self.inputs[c], self.targets[c], self.weights[c])

    def local_steps_(self, X: Tensor, *, gamma: float, steps: int, clients=None, H=None,
                     clip: float | None = None) -> Tensor:  # fmt: skip
        """K full-batch GD steps for every cohort row of X [c, P] (in place); returns X."""
        from fedkern.robust import clip_rows_

        for _ in range(v.integer("steps", steps, 0)):
            u = self.grads(X, clients)
            if H is not None:
                u -= H
            if clip is not None:
                clip_rows_(u, clip)
            X.sub_(u, alpha=float(gamma))
        return X


class _ModuleObjective:
    """The metrics view of a ``ModuleBatch``: f(x) = mean over clients of f_i(x) (ModuleClients'
    weighting), evaluated in float64 on a float64 copy of the module. No optimum is known."""

    has_optimum = False

    def __init__(self, mb: ModuleBatch):
        self.mb = mb
        self.n = mb.n
        mc = mb.clients
        self.sizes = (mc.weights > 0).sum(1).to(torch.int64)

    def _objective64(self, x: Tensor) -> Tensor:
        from torch.func import functional_call

        mc = self.mb.clients
        mod = self.mb.module64
        params = {n: t.view(s) for n, t, s in zip(mc.names, x.split(mc.sizes), mc.shapes,
                                                   strict=True)}  # fmt: skip
        inp = mc.inputs.to(torch.float64) if mc.inputs.is_floating_point() else mc.inputs
        n, M = mc.weights.shape
        out = functional_call(mod, (params, {}), (inp.reshape(n * M, *inp.shape[2:]),))
        per = mc.loss(out, mc.targets.reshape(n * M)).reshape(n, M)
        return (per * mc.weights.to(torch.float64)).sum() / n + 0.5 * mc.l2 * (x * x).sum()

    def loss(self, x: Tensor) -> float:
        """f(x) in float64: a float."""
        with torch.no_grad():
            return float(self._objective64(x.detach().cpu().to(torch.float64)))

    def grad(self, x: Tensor) -> Tensor:
        """[P] float64 on the CPU: grad f(x)."""
        x = x.detach().cpu().to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._objective64(x), x)
        return g


class ModuleBatch:
    """``ClientBatch``'s interface over ``ModuleClients``, so that the federated methods of
    ``fedkern.algorithms.generalized`` train a neural network: n, p, device, ``problem`` (float64
    metrics: loss and gradient norm; no optimum), ``local_steps_`` (gd, or sgd / rr minibatches
    with the same keyed per-client permutations as ClientBatch), ``mean``, ``weighted_sum`` and
    ``full_grad`` (on the device).

    Args:
        clients: a ``ModuleClients`` (module, loss, data packed per client).
        seed: int in [0, 2**63): keys the clients' minibatch permutations.
        test: optional (inputs, targets) for ``accuracy``.

    The stacked parameters X [c, P] are float32 on the clients' data device.
    """

    kind = "module"

    def __init__(self, clients: ModuleClients, *, seed: int = 0, test=None):
        import copy

        if not isinstance(clients, ModuleClients):
            raise TypeError(f"clients must be a fedkern.clients.ModuleClients, got "
                            f"{type(clients).__name__}")  # fmt: skip
        self.clients = clients
        self.seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self.n, self.p = clients.n, clients.P
        self.device = clients.inputs.device
        self.module64 = copy.deepcopy(clients.module).to(torch.float64)
        self.problem = _ModuleObjective(self)
        self.test = test

    def zeros(self, rows: int | None = None) -> Tensor:
        return torch.zeros(self.n if rows is None else rows, self.p, device=self.device)

    def _grads(self, X: Tensor, inputs, targets, weights) -> Tensor:
        from torch.func import functional_call, grad, vmap

        mc = self.clients

        def objective(x, inp, tgt, w):
            out = functional_call(mc.module, (mc._unflatten(x), mc.buffers), (inp,))
            return (mc.loss(out, tgt) * w).sum() + 0.5 * mc.l2 * (x * x).sum()

        return vmap(grad(objective))(X, inputs, targets, weights)

    def local_steps_(self, X: Tensor, *, gamma: float, steps: int, clients=None, H=None,
                     mode: str = "gd", batch_size: int = 1, clip: float | None = None,
                     mu: float = 0.0, anchor=None, round: int = 0) -> Tensor:  # fmt: skip
        """K local steps for every cohort row of X [c, P] (in place), as ClientBatch.local_steps_
        (gd: full local batch; sgd: b samples without replacement; rr: one reshuffled epoch of
        batches of b per step). FedProx (mu) is not supported here. Returns X."""
        from fedkern.robust import clip_rows_

        if mu:
            raise ValueError("mu (FedProx) is not supported by ModuleBatch")
        if mode not in MODE_TAG:
            raise ValueError(f"mode must be one of {', '.join(MODE_TAG)}, got {mode!r}")
        K = v.integer("steps", steps, 0)
        b = v.integer("batch_size", batch_size, 1)
        gamma = v.positive("gamma", gamma)
        r = v.integer("round", round, 0)
        c = _cohort(clients, self.n, "cpu")
        if X.shape != (c.numel(), self.p):
            raise ValueError(f"X must be [{c.numel()}, {self.p}], got {tuple(X.shape)}")
        mc = self.clients
        inputs, targets = mc.inputs[c], mc.targets[c]
        sizes = (mc.weights[c] > 0).sum(1).tolist()
        M = inputs.shape[1]
        seeds = client_seeds(self.seed, c)
        for t in range(K):
            if mode == "gd":
                plans = [(torch.arange(M)[None].expand(c.numel(), -1), mc.weights[c])]
            else:
                keys = randk_keys_tensor(seeds, torch.full_like(seeds, r * K + t))
                plans = self._plans(sizes, keys, b, mode)
            for idx, w in plans:
                rows = torch.arange(c.numel())[:, None]
                u = self._grads(X, inputs[rows, idx], targets[rows, idx], w.to(X.device))
                if H is not None:
                    u = u - H
                if clip is not None:
                    clip_rows_(u, float(clip))
                live = (w.sum(1) > 0).to(X.dtype).to(X.device)[:, None]  # empty batch: no step
                X.sub_(live * u, alpha=gamma)
        return X

    @staticmethod
    def _plans(sizes, keys, b: int, mode: str):
        """The batches of one step: [(idx [c, b], weights [c, b])], position j of client r's
        batch k being perm_r(k b + j) (ClientBatch's keyed permutation), weight 1/|B| or 0."""
        from fedkern.reference.clients import permutation

        perms = [permutation(m, keys[r]) for r, m in enumerate(sizes)]
        nb = 1 if mode == "sgd" else max((m + b - 1) // b for m in sizes)
        out = []
        for k in range(nb):
            idx = torch.zeros(len(sizes), b, dtype=torch.int64)
            w = torch.zeros(len(sizes), b)
            for r, (m, perm) in enumerate(zip(sizes, perms, strict=True)):
                part = perm[k * b : min((k + 1) * b, m)]
                idx[r, : part.numel()] = part
                if part.numel():
                    w[r, : part.numel()] = 1.0 / part.numel()
            out.append((idx, w))
        return out

    def mean(self, X: Tensor) -> Tensor:
        """The cohort mean of X [c, P]: float32 [P] (float64 accumulation)."""
        w = torch.full((X.shape[0],), 1.0 / max(X.shape[0], 1), dtype=torch.float64,
                       device=X.device)  # fmt: skip
        return ops.weighted_sum(X, w)

    def weighted_sum(self, X: Tensor, w) -> Tensor:
        """sum_r w[r] X[r]: float32 [P]."""
        return ops.weighted_sum(X, torch.as_tensor(w, dtype=torch.float64).to(X.device))

    def full_grad(self, x: Tensor) -> Tensor:
        """grad f(x) at a shared x [P] on the device (float32): the mean over clients."""
        G = self.clients.grads(x.expand(self.n, -1).contiguous())
        return G.mean(0)

    def accuracy(self, x: Tensor, inputs: Tensor | None = None,
                 targets: Tensor | None = None) -> float:  # fmt: skip
        """Classification accuracy of the model x [P] on (inputs, targets) (default: ``test``)."""
        from torch.func import functional_call

        if inputs is None:
            if self.test is None:
                raise ValueError("no test set: pass inputs and targets, or test= at construction")
            inputs, targets = self.test
        mc = self.clients
        with torch.no_grad():
            out = functional_call(mc.module, (mc._unflatten(x.to(self.device)), mc.buffers),
                                  (inputs,))  # fmt: skip
        return float((out.argmax(1) == targets).double().mean())

    def __repr__(self) -> str:
        return f"ModuleBatch(n={self.n}, P={self.p}, seed={self.seed})"
