"""Local and random-reshuffling methods for (L0, L1)-smooth problems (Demidovich et al., 2412.02781)
and the baselines of the official code: Clip-LocalGDJ, clipped GD, CLERR / NASTYA, Clipped RR-CLI,
local clipped SGD, clipped FedAvg, Local GD.

Assumption: ||grad^2 f(x)|| <= L0 + L1 ||grad f(x)|| (the quartic, neural networks), under which a
fixed step is unsafe far from the solution. The methods keep the clients' local steps plain and
clip the server's "jump": from the round's start point x,

  g = s * (x - sum_m a_m y_m)   (the pseudo-gradient of the clients' end points y_m)
  x <- x - theta * g,  theta = 1 / (c0 + c1 ||g||)   (or ||grad f(x)|| with norm="full")

in one fused pass on the device (``fedkern.ops.clipjump.clip_jump``: the pseudo-gradient, its norm
and the step; no host synchronization). c1 = 0 is the unclipped jump with theta = 1/c0; hard
clipping at level lam with rate eta is c0 = 1/(2 eta), c1 = c0/lam (up to a factor 2).

Defaults from the problem's constants (fedkern's choice, documented per class): on a
``fedkern.problems.Quartic`` (constants L0, L1), c0 = L0 and c1 = L1 (the (L0, L1)-GD step
1/(L0 + L1 ||g||)), and the local step gamma = 1 / (2 s (L0 + L1 G0)) for s local steps per round,
G0 = the largest sample-gradient norm at x0, so that every local step of the first round is within
the region where the (L0, L1) bound keeps it stable. On an L-smooth ``Problem``: c0 = L, c1 = 0,
gamma = 1 / (2 s L). On ``ModuleClients`` (a neural network) gamma, c0 and c1 must be given.

Metrics (history, one entry per round; float64): "loss", "gap" (NaN without a known optimum),
"grad_norm", "dist", "theta" (the jump's step) and "jump_norm" (||g|| or the full norm used),
"floats_up", "floats_down", "local_steps", "diverged"; on a ``ModuleBatch`` built with a test set
also "test_accuracy" and "test_error" (1 - accuracy) of the server model x. ``record_every=k``
records the metrics (a host read of the model) only on rounds divisible by k (NaN otherwise) and
checks divergence only then, so the other rounds run without any host synchronization.
"""

from __future__ import annotations

import math

import torch

from fedkern import sampling
from fedkern import validation as v
from fedkern.algorithms.base import Method
from fedkern.algorithms.federated import (
    OPT_BATCH,
    OPT_COHORT,
    OPT_GAMMA,
    OPT_LOCAL_STEPS,
    OPT_MODE,
    OPT_SERVER_LR,
    SLOT_PATTERN,
    FedAvg,
    FederatedMethod,
)
from fedkern.ops.clipjump import clip_jump

__all__ = [
    "CLERR",
    "NASTYA",
    "ClipLocalGDJ",
    "ClippedFedAvg",
    "ClippedGD",
    "ClippedRRCLI",
    "LocalClippedSGD",
    "LocalGD",
]

F64 = torch.float64
PROBLEMS = ("quartic", "convex", "mlp_digits")

OPT_C0 = {"flag": "--c0", "type": float, "help": "jump step 1/(c0 + c1||g||): c0 (default L0)"}
OPT_C1 = {"flag": "--c1", "type": float, "help": "jump step 1/(c0 + c1||g||): c1 (default L1)"}
OPT_NORM = {"flag": "--norm", "default": "aggregate", "choices": ("aggregate", "full"),
            "help": "clipping norm: of the aggregated estimate or the full gradient"}  # fmt: skip
OPT_ETA = {"flag": "--eta", "type": float, "help": "Clipped RR-CLI's server step within an epoch"}
OPT_CLIP = {"flag": "--clip", "type": float, "help": "clipping level of clipped FedAvg"}
OPT_RECORD = {"flag": "--record-every", "type": int,
              "help": "record metrics every k rounds (default 1)"}  # fmt: skip


def _check_batch(batch):
    from fedkern.clients import ClientBatch, ModuleBatch

    if not isinstance(batch, (ClientBatch, ModuleBatch)):
        raise TypeError(f"batch must be a fedkern.clients.ClientBatch or ModuleBatch, got "
                        f"{type(batch).__name__}")  # fmt: skip
    return batch


def _steps_per_epoch(batch, b: int) -> torch.Tensor:
    """[n] int64: the rr steps ceil(m_i / b) of one local epoch of each client (at least 1)."""
    sizes = batch.problem.sizes
    return torch.clamp((sizes + b - 1) // b, min=1)


def theory_defaults(batch, x0: torch.Tensor, steps: int) -> dict:
    """The default (c0, c1, gamma) of the module docstring for ``steps`` local steps per round."""
    P = batch.problem
    if hasattr(P, "L0"):
        G0 = P.max_sample_grad_norm(x0)
        return {"c0": P.L0, "c1": P.L1, "gamma": 1.0 / (2 * steps * (P.L0 + P.L1 * G0))}
    L = getattr(P, "L", None)
    if L is None:
        return {}
    return {"c0": L, "c1": 0.0, "gamma": 1.0 / (2 * steps * L)}


class _Jump(FederatedMethod):
    """Base of the methods here: a ClientBatch / ModuleBatch, the server point x, the fused jump.

    Common args: batch, x0 ([p], default the problem's ``start`` attribute if it has one, else
    zeros; the quartic of ``fedkern run`` sets it to x0 * ones), seed, mode / batch_size (the
    local gradient),
    norm ("aggregate" | "full"), record_every (k >= 1), diverge_factor (see ``Method``).
    """

    problems = PROBLEMS
    state_attrs = ("x", "total_local_steps")
    cli_options = {"record_every": OPT_RECORD}

    def __init__(self, batch, *, x0=None, seed: int = 0, mode: str = "gd", batch_size: int = 8,
                 norm: str = "aggregate", record_every: int = 1,
                 diverge_factor: float = 1e8):  # fmt: skip
        # FederatedMethod.__init__, widened to ModuleBatch (same interface)
        batch = _check_batch(batch)
        if x0 is None:
            x0 = getattr(batch.problem, "start", None)
        Method.__init__(self, seed=seed, diverge_factor=diverge_factor)
        self.batch, self.problem = batch, batch.problem
        if mode not in ("gd", "sgd", "rr"):
            raise ValueError(f"mode must be 'gd', 'sgd' or 'rr', got {mode!r}")
        if norm not in ("aggregate", "full"):
            raise ValueError(f"norm must be 'aggregate' or 'full', got {norm!r}")
        self.mode, self.norm = mode, norm
        self.batch_size = v.integer("batch_size", batch_size, 1)
        self.record_every = v.integer("record_every", record_every, 1)
        p = batch.p
        if x0 is None:
            self.x = torch.zeros(p, device=batch.device)
        else:
            v.tensor("x0", x0)
            if not bool(torch.isfinite(x0).all()):
                raise ValueError("x0 must be finite")
            self.x = x0.detach().to(batch.device, torch.float32).clone()
        if self.x.shape != (p,):
            raise ValueError(f"x0 must have shape ({p},), got {tuple(self.x.shape)}")
        self.remember_start()
        self.total_local_steps = 0
        self._stats: torch.Tensor | None = None
        self._w_all = torch.full((batch.n,), 1.0 / batch.n, dtype=F64, device=batch.device)
        self._full = _FullGrad(batch) if norm == "full" else None
        self._optimum = self.optimum()
        self._record(0, 0, 0)

    # ---- hyperparameters ------------------------------------------------------------------------

    def _defaults(self, gamma, c0, c1, steps: int, x0) -> None:
        """Sets gamma, c0, c1 from the arguments or ``theory_defaults``; validates them."""
        x0 = getattr(self.batch.problem, "start", None) if x0 is None else x0
        start = torch.zeros(self.batch_p()) if x0 is None else x0
        need = [n for n, val in (("gamma", gamma), ("c0", c0), ("c1", c1)) if val is None]
        theory = theory_defaults(self.batch, start, steps) if need else {}
        if need and not theory:
            where = type(self.batch.problem).__name__
            raise ValueError(f"{', '.join(need)} must be given for {where} (no theory constants)")
        self.gamma = v.positive("gamma", theory["gamma"] if gamma is None else gamma)
        self.c0 = v.finite("c0", theory["c0"] if c0 is None else c0)
        if not self.c0 > 0:
            raise ValueError(f"c0 must be > 0, got {self.c0}")
        self.c1 = v.finite("c1", theory["c1"] if c1 is None else c1)
        if self.c1 < 0:
            raise ValueError(f"c1 must be >= 0, got {self.c1}")

    def batch_p(self) -> int:
        return self.batch.p

    # ---- the fused jump -----------------------------------------------------------------------

    def _jump(self, Y, x, w, s: float, c0: float, c1: float, G=None):
        """x - theta * g for g = s (x - sum w_r Y_r), on the device; keeps the stats tensor."""
        x_new, self._stats = clip_jump(Y, x, w, float(s), float(c0), float(c1), G)
        return x_new

    def _full_norm(self, x):
        """||grad f(x)|| as a float64 [1] device tensor (norm="full"), else None."""
        return None if self._full is None else self._full.norm(x)

    # ---- recording ----------------------------------------------------------------------------

    def _due(self) -> bool:
        return self.rounds % self.record_every == 0

    def _record(self, up: int, down: int, local: int) -> None:
        if not self._due():
            nan = math.nan
            self.record(loss=nan, gap=nan, grad_norm=nan, dist=nan, theta=nan, jump_norm=nan,
                        floats_up=up, floats_down=down, local_steps=local)  # fmt: skip
            self._record_test(nan)
            return
        super()._record(up, down, local)
        if self._stats is None:
            theta = jn = math.nan
        else:
            st = self._stats.cpu()
            theta = float(st[1])
            jn = float(st[0]) if self._full is None else float(self._full.last.cpu()[0])
        for k, val in (("theta", theta), ("jump_norm", jn)):
            self.history.setdefault(k, []).append(val)
        if getattr(self.batch, "test", None) is not None:
            finite = bool(torch.isfinite(self.x).all())
            self._record_test(self.batch.accuracy(self.x) if finite else math.nan)

    def _record_test(self, acc: float) -> None:
        """Appends test_accuracy / test_error (a ModuleBatch with a test set only)."""
        if getattr(self.batch, "test", None) is None:
            return
        self.history.setdefault("test_accuracy", []).append(acc)
        self.history.setdefault("test_error", []).append(1.0 - acc)

    def diverged(self) -> bool:
        return self._due() and super().diverged()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rounds={self.rounds}, gamma={self.gamma:.4g}, "
                f"c0={self.c0:.4g}, c1={self.c1:.4g})")  # fmt: skip


class _FullGrad:
    """||grad f(x)|| on the batch's device without a host read (the "full" clipping norm)."""

    def __init__(self, batch):
        self.batch = batch
        P = batch.problem
        kind = getattr(batch, "kind", "module")
        self.kind = kind
        if kind == "module":
            return
        sizes = P.sizes.to(F64)
        w = torch.repeat_interleave(1.0 / (sizes.clamp_min(1) * P.n), P.sizes)
        self.w = w.to(batch.device, torch.float32)
        self.last = None

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch
        if self.kind == "module":
            g = b.full_grad(x)
        elif self.kind == "quartic":
            D = x - b.A
            g = 4 * ((self.w * (D * D).sum(1)) @ D)
        elif self.kind == "logistic":
            s = 2 * b.y - 1
            g = (self.w * (-s * torch.sigmoid(-s * (b.A @ x)))) @ b.A + b.problem.l2 * x
        elif self.kind == "least_squares":
            g = (self.w * (b.A @ x - b.y)) @ b.A + b.problem.l2 * x
        else:
            C = b.classes
            Pm = torch.softmax(b.A @ x.view(C, -1).T, 1)
            Pm = Pm - torch.nn.functional.one_hot(b.y.long(), C).to(Pm.dtype)
            g = ((Pm * self.w[:, None]).T @ b.A).reshape(-1) + b.problem.l2 * x
        self.last = g.double().norm().reshape(1)
        return self.last


class ClipLocalGDJ(_Jump):
    """Clip-LocalGDJ: tau plain local steps on every client, then the clipped jump.

    Round: broadcast x; each client m runs tau local steps of step gamma from x to y_m (full local
    gradients, or mode "sgd" / "rr" minibatches); g = mean_m (x - y_m) / (gamma tau); x <- x -
    theta g with theta = 1 / (c0 + c1 ||g||) (norm "full": ||grad f(x)||, one extra exchange). tau
    = 1 is clipped GD; c1 = 0 with c0 = 1/(gamma tau) is Local GD bit for bit.

    Args:
        batch: ClientBatch (a Problem or a Quartic) or ModuleBatch. gamma: local step (default:
            the module docstring's theory value). local_steps: tau (default 10). c0 > 0, c1 >= 0
            (default L0, L1 of a Quartic; L, 0 of a Problem). norm, mode, batch_size, x0, seed,
            record_every, diverge_factor: see ``_Jump``.
    Sends p floats up and down per round.
    """

    name = "clip_localgdj"
    config_attrs = ("gamma", "mode", "batch_size", "K", "c0", "c1", "norm")
    cli_options = {**_Jump.cli_options, "gamma": OPT_GAMMA, "local_steps": OPT_LOCAL_STEPS,
                   "c0": OPT_C0, "c1": OPT_C1, "norm": OPT_NORM, "mode": OPT_MODE,
                   "batch_size": OPT_BATCH}  # fmt: skip

    def __init__(self, batch, *, gamma: float | None = None, local_steps: int = 10,
                 c0: float | None = None, c1: float | None = None, x0=None, **kw):  # fmt: skip
        _check_batch(batch)
        self.batch = batch
        self.K = v.integer("local_steps", local_steps, 1)
        self._defaults(gamma, c0, c1, self.K, x0)
        super().__init__(batch, x0=x0, **kw)

    def step(self) -> None:
        n = self.batch.n
        Y = self.x.repeat(n, 1)
        G = self._full_norm(self.x)
        self._local(Y, self.K)
        self.x = self._jump(Y, self.x, self._w_all, 1.0 / (self.gamma * self.K), self.c0, self.c1,
                            G)  # fmt: skip
        self.rounds += 1
        p = self.batch.p
        self._record(p, p, self.K)


class ClippedGD(ClipLocalGDJ):
    """Clipped GD (the official code's baseline): x <- x - grad f(x) / (c0 + c1 ||grad f(x)||).

    Clip-LocalGDJ with one local GD step (g is then the full gradient; gamma does not matter).
    """

    name = "clipped_gd"
    cli_options = {k: val for k, val in ClipLocalGDJ.cli_options.items()
                   if k not in ("local_steps", "mode", "batch_size")}  # fmt: skip

    def __init__(self, batch, **kw):
        for bad in ("local_steps", "mode"):
            if bad in kw:
                raise TypeError(f"ClippedGD takes no {bad!r} (one full-gradient step per round)")
        super().__init__(batch, local_steps=1, mode="gd", **kw)


class LocalGD(FedAvg):
    """Local GD / FedAvg with the local step defaulted by the theory of this module (the baseline
    the clipped methods beat on the quartic): tau local steps of gamma from x, x <- mean_m y_m
    (server_lr 1). Any FedAvg argument is accepted."""

    name = "local_gd"
    problems = ("quartic", "convex")  # FedAvg takes a ClientBatch only (no ModuleBatch)

    def __init__(self, batch, *, gamma: float | None = None, local_steps: int = 10, x0=None,
                 **kw):  # fmt: skip
        x0 = getattr(batch.problem, "start", None) if x0 is None else x0
        if gamma is None:
            start = torch.zeros(batch.p) if x0 is None else x0
            gamma = theory_defaults(batch, start, local_steps).get("gamma")
        super().__init__(batch, gamma=gamma, local_steps=local_steps, x0=x0, **kw)


class CLERR(_Jump):
    """CLERR: every client runs one random-reshuffling epoch, then the clipped jump.

    Round: each client m reshuffles its samples (a fresh keyed permutation per round) and runs
    s_m = ceil(m_m / b) steps of step gamma over consecutive batches of b from x, ending at y_m;
    g_m = (x - y_m) / (gamma s_m) is its epoch's mean batch gradient; g = mean_m g_m; x <- x -
    theta g, theta = 1 / (c0 + c1 ||g||) (norm "full": ||grad f(x)|| at the epoch start, as in the
    theory and the official single-node code). The inner iterates are discarded. c1 = 0 is NASTYA.

    Args:
        batch, gamma (default theory for s = max_m s_m steps), c0, c1 (defaults as
        ClipLocalGDJ), norm, batch_size b (default 8), x0, seed, record_every, diverge_factor.
    """

    name = "clerr"
    config_attrs = ("gamma", "batch_size", "c0", "c1", "norm")
    cli_options = {**_Jump.cli_options, "gamma": OPT_GAMMA, "c0": OPT_C0, "c1": OPT_C1,
                   "norm": OPT_NORM, "batch_size": OPT_BATCH}  # fmt: skip

    def __init__(self, batch, *, gamma: float | None = None, c0: float | None = None,
                 c1: float | None = None, batch_size: int = 8, x0=None, **kw):  # fmt: skip
        _check_batch(batch)
        self.batch = batch
        b = v.integer("batch_size", batch_size, 1)
        steps = _steps_per_epoch(batch, b)
        self._defaults(gamma, c0, c1, int(steps.max()), x0)
        super().__init__(batch, x0=x0, mode="rr", batch_size=b, **kw)
        # g = sum_m w_m (x - y_m), w_m = 1 / (n gamma s_m) = S a_m, a_m summing to 1
        w = 1.0 / (batch.n * self.gamma * steps.to(F64))
        self._S = float(w.sum())
        self._a = (w / self._S).to(batch.device)
        self._epoch_steps = int(steps.max())

    def step(self) -> None:
        n = self.batch.n
        Y = self.x.repeat(n, 1)
        G = self._full_norm(self.x)
        self._local(Y, 1)
        self.x = self._jump(Y, self.x, self._a, self._S, self.c0, self.c1, G)
        self.rounds += 1
        p = self.batch.p
        self._record(p, p, self._epoch_steps)


class NASTYA(CLERR):
    """NASTYA (Malinovsky et al. 2022): CLERR without clipping, the server step eta fixed:
    x <- x - eta g (c0 = 1/eta, c1 = 0). eta defaults to 1/c0 of CLERR's theory."""

    name = "nastya"
    cli_options = {k: val for k, val in CLERR.cli_options.items() if k not in ("c0", "c1", "norm")}
    cli_options["eta"] = OPT_ETA

    def __init__(self, batch, *, eta: float | None = None, **kw):
        for bad in ("c0", "c1", "norm"):
            if bad in kw:
                raise TypeError(f"NASTYA takes no {bad!r} (its server step is eta)")
        c0 = None if eta is None else 1.0 / v.positive("eta", eta)
        super().__init__(batch, c0=c0, c1=0.0, **kw)


class ClippedRRCLI(_Jump):
    """Clipped RR-CLI: random reshuffling of the clients into cohorts within a meta-epoch, local RR
    epochs, and a clipped jump per meta-epoch.

    One round (a meta-epoch): the clients are permuted (``fedkern.sampling.reshuffled``, keyed by
    the round) into R = ceil(M / C) cohorts of C (when C does not divide M the last cohort holds
    the remainder, the sampling module's documented rule); z = x; for each cohort in turn, its
    clients run one local RR epoch from z (as CLERR: g_m = (z - y_m) / (gamma s_m)) and the server
    moves z <- z - eta mean_m g_m; finally g = (x - z) / (eta R) and x <- x - theta g, theta = 1 /
    (c0 + c1 ||g||) (norm "full": ||grad f(x)||). Three step sizes: gamma, eta, theta.

    Args:
        batch, gamma (default theory for one epoch), eta (default gamma * max_m s_m: the server
        moves like one local epoch, within the region gamma is safe in), cohort C (default 2,
        the official experiments'), c0, c1 (defaults as ClipLocalGDJ), norm, batch_size b
        (default 8), x0, seed, record_every, diverge_factor.
    Per meta-epoch each client sends p floats once and the server R p floats in all.
    """

    name = "clipped_rr_cli"
    config_attrs = ("gamma", "eta", "batch_size", "cohort_size", "c0", "c1", "norm")
    cli_options = {**_Jump.cli_options, "gamma": OPT_GAMMA, "eta": OPT_ETA, "cohort": OPT_COHORT,
                   "c0": OPT_C0, "c1": OPT_C1, "norm": OPT_NORM,
                   "batch_size": OPT_BATCH}  # fmt: skip

    def __init__(self, batch, *, gamma: float | None = None, eta: float | None = None,
                 cohort: int = 2, c0: float | None = None, c1: float | None = None,
                 batch_size: int = 8, x0=None, **kw):  # fmt: skip
        _check_batch(batch)
        self.batch = batch
        b = v.integer("batch_size", batch_size, 1)
        self.cohort_size = v.integer("cohort", cohort, 1, batch.n)
        steps = _steps_per_epoch(batch, b)
        self._defaults(gamma, c0, c1, int(steps.max()), x0)
        # default: one epoch of local steps, gamma * s (a safe server step where gamma is)
        self.eta = v.positive("eta", self.gamma * int(steps.max()) if eta is None else eta)
        super().__init__(batch, x0=x0, mode="rr", batch_size=b, **kw)
        self._steps = steps
        self._R = math.ceil(batch.n / self.cohort_size)
        self._one = torch.ones(1, dtype=F64, device=batch.device)

    def step(self) -> None:
        G = self._full_norm(self.x)
        cohorts = sampling.reshuffled(self.batch.n, self.cohort_size, seed=self.seed,
                                      epoch=self.key(SLOT_PATTERN))  # fmt: skip
        z = self.x
        for S in cohorts:
            w = 1.0 / (S.numel() * self.gamma * self._steps[S].to(F64))
            total = float(w.sum())
            Y = z.repeat(S.numel(), 1)
            self._local(Y, 1, clients=S)
            # z - eta * sum_m w_m (z - y_m): the jump with theta = eta (c0 = 1/eta, c1 = 0)
            z = clip_jump(Y, z, (w / total).to(self.batch.device), total, 1.0 / self.eta, 0.0,
                          None)[0]  # fmt: skip
        self.x = self._jump(z[None], self.x, self._one, 1.0 / (self.eta * self._R), self.c0,
                            self.c1, G)  # fmt: skip
        self.rounds += 1
        p = self.batch.p
        self._record(p, self._R * p, int(self._steps.max()))


class LocalClippedSGD(_Jump):
    """Local clipped SGD (the official code's baseline): every local step clipped, then averaging.

    Round: each client runs tau local steps y <- y - eta clip_lam(g) from x (the clients kernel's
    hard clipping, with eta = 1/(2 c0) and lam = c0 / c1: the map of ALGORITHMS.md between the
    smoothed step 1/(c0 + c1 ||g||) and hard clipping, equal up to a factor 2; c1 = 0: no
    clipping); x <- mean_m y_m.

    Args:
        batch, local_steps tau (default 10), c0, c1 (defaults as ClipLocalGDJ), mode (default
        "sgd"), batch_size, cohort (clients per round, uniform; default all), x0, seed,
        record_every, diverge_factor.
    """

    name = "local_clipped_sgd"
    config_attrs = ("mode", "batch_size", "K", "c0", "c1", "cohort_size")
    cli_options = {**_Jump.cli_options, "local_steps": OPT_LOCAL_STEPS, "c0": OPT_C0,
                   "c1": OPT_C1, "cohort": OPT_COHORT, "mode": OPT_MODE,
                   "batch_size": OPT_BATCH}  # fmt: skip

    def __init__(self, batch, *, local_steps: int = 10, c0: float | None = None,
                 c1: float | None = None, cohort: int | None = None, mode: str = "sgd", x0=None,
                 **kw):  # fmt: skip
        _check_batch(batch)
        self.batch = batch
        self.K = v.integer("local_steps", local_steps, 1)
        self._defaults(1.0, c0, c1, self.K, x0)
        self.gamma = 1.0 / (2 * self.c0)
        self.lam = None if self.c1 == 0 else self.c0 / self.c1
        self.cohort_size = v.integer("cohort", batch.n if cohort is None else cohort, 1, batch.n)
        super().__init__(batch, x0=x0, mode=mode, **kw)

    def step(self) -> None:
        S = None if self.cohort_size == self.batch.n else self._cohort(self.cohort_size)
        Y = self.x.repeat(self.cohort_size, 1)
        self._local(Y, self.K, clients=S, clip=self.lam)
        self.x = self.batch.mean(Y)
        self.rounds += 1
        p = self.batch.p
        self._record(p, p, self.K)


class ClippedFedAvg(_Jump):
    """Clipped FedAvg (the official code's baseline): each client's update is clipped.

    Round: a cohort runs tau local steps of gamma from x to y_m; u_m = clip_lam((x - y_m) / tau)
    (``fedkern.robust.clip_rows_``; a non-finite row becomes 0); x <- x - server_lr mean_m u_m.

    Args:
        batch, gamma (default theory), local_steps tau (default 10), clip lam (> 0, required),
        server_lr (default 1), cohort (default all), mode, batch_size, x0, seed, record_every,
        diverge_factor.
    """

    name = "clipped_fedavg"
    config_attrs = ("gamma", "mode", "batch_size", "K", "lam", "server_lr", "cohort_size")
    cli_options = {**_Jump.cli_options, "gamma": OPT_GAMMA, "local_steps": OPT_LOCAL_STEPS,
                   "clip": OPT_CLIP, "server_lr": OPT_SERVER_LR, "cohort": OPT_COHORT,
                   "mode": OPT_MODE, "batch_size": OPT_BATCH}  # fmt: skip

    def __init__(self, batch, *, clip: float | None = None, gamma: float | None = None,
                 local_steps: int = 10, server_lr: float = 1.0, cohort: int | None = None,
                 x0=None, **kw):  # fmt: skip
        _check_batch(batch)
        self.batch = batch
        self.K = v.integer("local_steps", local_steps, 1)
        if clip is None:
            raise ValueError("clip (the level lam of each client's update) must be given")
        self.lam = v.positive("clip", clip)
        self._defaults(gamma, 1.0, 0.0, self.K, x0)
        self.server_lr = v.positive("server_lr", server_lr)
        self.cohort_size = v.integer("cohort", batch.n if cohort is None else cohort, 1, batch.n)
        super().__init__(batch, x0=x0, **kw)

    def step(self) -> None:
        from fedkern.robust import clip_rows_

        S = None if self.cohort_size == self.batch.n else self._cohort(self.cohort_size)
        Y = self.x.repeat(self.cohort_size, 1)
        self._local(Y, self.K, clients=S)
        U = (self.x - Y) / self.K
        clip_rows_(U, self.lam)
        self.x = self.x - self.server_lr * self.batch.mean(U)
        self.rounds += 1
        p = self.batch.p
        self._record(p, p, self.K)
