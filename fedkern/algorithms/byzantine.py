"""Byz-VR-MARINA-PP (Malinovsky, Richtarik, Horvath, Gorbunov 2023; ALGORITHMS.md section 5).

Byzantine-robust variance-reduced learning with partial participation: clipping the (compressed)
gradient differences bounds what a Byzantine majority of a small sampled cohort can do.
"""

from __future__ import annotations

import math
import numbers

import torch

from fedkern import robust as R
from fedkern import sampling
from fedkern import validation as v
from fedkern.algorithms.base import Method
from fedkern.algorithms.federated import OPT_BATCH, OPT_COHORT, OPT_GAMMA, OPT_P
from fedkern.random import client_seed
from fedkern.robust import attacks
from fedkern.robust.aggregator import RULES

__all__ = ["ATTACKS", "STRONG", "ByzVRMarinaPP", "rule_aggregator"]

ATTACKS = ("shift_back", "bit_flip", "alie", "ipm", "none")

#: The standard strong settings of the attacks (constructor keywords), strong enough to break the
#: plain mean with 5 Byzantine clients of 20 (``fedkern run byzantine --matrix`` uses them):
#: IPM with eps = 10 > (n - f) / f = 3 reverses the mean's direction (the mean becomes
#: (n - f - f eps) / n = -1.75 times the honest mean); bit flip scaled by 10 likewise; ALIE with
#: z = 10 standard deviations on heterogeneous honest messages moves the mean by f z / n = 2.5
#: honest standard deviations per coordinate. (Baruch et al.'s z_max for n = 20, f = 5 is 0.52:
#: a subtle attack aimed at median-type rules, which the mean shrugs off: measured on breast
#: cancer over 20 iid clients, 80 rounds, the mean ends at 0.14 of the start gap with z = 5 and
#: above it with z = 10.)
STRONG = {"ipm_eps": 10.0, "alie_z": 10.0, "bit_flip_scale": 10.0}


def capped_aggregate(agg: R.Aggregator, X: torch.Tensor) -> torch.Tensor:
    """agg(X) with f capped to what agg's rule accepts for X's rows (after bucketing, when agg
    buckets): trimmed mean (rows - 1) // 2, Krum (rows - 3) // 2, any other rule rows - 1. For an
    aggregator built from a rule name, whose f is the number of Byzantine clients of the whole
    population while a round's cohort may be smaller. X: [n, d] on agg's device; not modified."""
    rows = X.shape[0] if agg.pre != "bucketing" else -(-X.shape[0] // agg.bucket_size)
    cap = {"trimmed_mean": (rows - 1) // 2, "krum": (rows - 3) // 2}.get(agg.rule, rows - 1)
    return agg(X, f=max(0, min(agg.f, cap)))


def rule_aggregator(rule: str, f: int, *, options=None, bucketing=None, seed: int = 0,
                    cohort: int) -> R.Aggregator:  # fmt: skip
    """The ``fedkern.robust.Aggregator`` that Byz-VR-MARINA-PP builds from a rule name (the
    simulator and ``ByzVRMarinaPPStrategy`` alike): ``rule`` one of ``RULES``, ``f`` Byzantine
    rows tolerated, ``options`` the rule's keywords (centered_clip defaults tau = 0.2 and a warm
    start), ``bucketing`` s (None or 1: none) seeded by ``seed``, ``cohort`` the smallest number of
    rows a round aggregates (before bucketing). Raises ValueError on an unknown rule, a bad
    bucketing, or krum with fewer than 3 rows per round."""
    if rule not in RULES:
        raise ValueError(f"aggregator must be one of {', '.join(RULES)} (or an Aggregator), "
                         f"got {rule!r}")  # fmt: skip
    s = 1 if bucketing is None else v.integer("bucketing", bucketing, 1)
    opts = dict(options or {})
    if rule == "centered_clip":
        opts.setdefault("tau", 0.2)
        opts.setdefault("warm_start", True)
    warm = opts.pop("warm_start", False)
    rows = -(-cohort // s)
    if rule == "krum" and rows < 3:
        raise ValueError(f"krum needs at least 3 rows per round; the smallest cohort gives "
                         f"{rows} (cohort {cohort}, bucketing {s})")  # fmt: skip
    return R.Aggregator(rule, f, pre="bucketing" if s > 1 else None, bucket_size=s, seed=seed,
                        warm_start=warm, **opts)  # fmt: skip


class ByzVRMarinaPP(Method):
    """Byz-VR-MARINA-PP over a federated problem with honest and Byzantine clients.

    Every round k (state x, g):
      1. a coin c ~ Bernoulli(p); a cohort S of ``full_cohort`` clients if c = 1, else ``cohort``
         (uniform without replacement over all n clients, honest and Byzantine);
      2. x+ = x - gamma g; lambda = alpha ||x+ - x||;
      3. an honest client in S sends grad f_i(x+) when c = 1, else Q(D_i) with D_i the difference
         of its gradients at x+ and x on one b-sample minibatch (the same samples at both points),
         formed, compressed and clipped at lambda by ``fedkern.robust.diff_compress_clip``;
         Byzantine clients in S send the attack's vectors;
      4. the server: c = 1: g+ = ARAgg(messages); c = 0: clip every message to lambda
         (``clip_rows_``; Byzantine ones included) and g+ = g + ARAgg(clipped), or the plain mean
         of the clipped messages with ``plus=True`` (Byz-VR-MARINA-PP+).
    With ``clip=False`` step 4 skips the clipping (the unclipped baseline the paper compares with).

    Args:
        problem: a ``fedkern.problems.LogisticRegression``-like object with ``n``, ``d``, ``L``,
            ``sizes``, ``grads(x, clients, samples)``, ``loss(x, clients)``, ``grad(x, clients)``
            and ``optimum(clients)``.
        byzantine: ids of the Byzantine clients (the rest are honest); the objective is the mean
            of the honest f_i.
        gamma: step size (default 1/L, fedkern's choice; the theory's bound is smaller).
        p: probability of a full round (default cohort / n, fedkern's choice).
        batch_size: b, samples per minibatch in compressed rounds (capped by a client's size).
        cohort: C, clients sampled in compressed rounds (default ceil(0.2 n)).
        full_cohort: C_hat, clients sampled in full rounds (default n: every client).
        alpha: the clipping multiplier (> 0).
        clip: clip the differences (True) or not (the unclipped baseline).
        aggregator: a ``fedkern.robust.Aggregator`` (default coordinate median with bucketing 2),
            any callable [c, d] -> [d], or a rule name of ``fedkern.robust.Aggregator`` ("mean",
            "coordinate_median", "trimmed_mean", "krum", "geometric_median", "centered_clip"):
            then the method builds ``Aggregator(rule, f, pre="bucketing" if bucketing else None,
            bucket_size=bucketing, seed=seed, **aggregator_options)`` with f the number of
            Byzantine clients, and every call uses the true count f capped to what the rule
            accepts for that round's stack (trimmed mean 2f < rows, Krum rows > 2f + 2), so a
            small cohort never makes the rule invalid. centered_clip defaults to tau = 0.2 with
            a warm start (suited to gradients of norm about 1, as on the bundled logistic
            problems; pass ``aggregator_options={"tau": ...}`` otherwise).
        aggregator_options: keywords for a rule name's Aggregator (``tau``, ``iters``, ...).
        bucketing: bucket size of a rule name's pre-aggregation (None or 1: none).
        compressor: None (dense differences), ``fedkern.compress.TopK`` or ``RandK`` (unbiased
            rand-k is the paper's Q; each client's mask is keyed by its id).
        attack: "shift_back" (when the Byzantine clients are a majority of S they send what moves
            the model back to x0, else they behave honestly), "bit_flip" (each sends -scale times
            its own honest message), "alie" (A Little Is Enough: every Byzantine client sends
            mean - z * std of the round's honest messages, per coordinate), "ipm" (Inner Product
            Manipulation: -eps times the honest messages' mean) or "none". ALIE and IPM are
            omniscient: they see the honest messages of the sampled cohort in that round (the
            honest clients' gradients in full rounds, their compressed and clipped differences
            in the others); with fewer honest messages than they need (ALIE 2, IPM 1) the
            Byzantine clients send their own honest messages.
        ipm_eps: IPM's eps (default 0.1, the small-eps setting; ``STRONG`` has 10).
        alie_z: ALIE's z; default None: Baruch et al.'s z_max for the cohort (``attacks.alie_z``
            of the number of sampled clients and of sampled Byzantine ones).
        bit_flip_scale: bit flip's scale (default 1: plain sign flip).
        plus: Byz-VR-MARINA-PP+ (mean of the clipped differences on c = 0 rounds).
        seed: keys the coins (``key(0)``), cohorts (``key(1)``) and each client's minibatches
            (``fedkern.sampling.uniform`` under ``client_seed(seed, i)`` at ``key(2)``), and the
            default aggregator's bucketing.
        x0: the start point, [d] (default zeros).
        dtype: dtype of the messages (float32 or bfloat16); the model and the loss are float64.

    History (``self.history``, lists per round): "loss" f(x) - f* where f* is known ("gap"),
    "grad_norm" ||grad f(x)||, "full" (the coin), "byzantine_majority", "floats_up" (floats one
    client sent that round, indices counted as floats), "floats_down" (d: the model).
    """

    name = "byz_vr_marina_pp"
    state_attrs = ("x", "g", "aggregator", "_lam")
    config_attrs = ("gamma", "p", "batch_size", "cohort_size", "full_cohort", "alpha", "clip",
                    "plus", "attack", "byzantine", "ipm_eps", "alie_z",
                    "bit_flip_scale")  # fmt: skip
    problems = ("byzantine",)
    cli_options = {
        "byzantine": {"flag": "--byzantine", "type": int,
                      "help": "Byzantine clients: the last F of --clients (default 0)"},
        "attack": {"flag": "--attack", "choices": ATTACKS,
                   "help": "the Byzantine clients' attack (default shift_back)"},
        "aggregator": {"flag": "--aggregator", "choices": RULES,
                       "help": "robust aggregation rule, f = the Byzantine count (default "
                               "coordinate_median with bucketing 2)"},
        "bucketing": {"flag": "--bucketing", "type": int,
                      "help": "bucket size of --aggregator's pre-aggregation (default none)"},
        "ipm_eps": {"flag": "--ipm-eps", "type": float, "help": "IPM's eps (default 0.1)"},
        "alie_z": {"flag": "--alie-z", "type": float,
                   "help": "ALIE's z (default Baruch et al.'s z_max)"},
        "bit_flip_scale": {"flag": "--bit-flip-scale", "type": float,
                           "help": "bit flip's scale (default 1)"},
        "cohort": {**OPT_COHORT, "help": "clients per compressed round (default 20%%)"},
        "full_cohort": {"flag": "--full-cohort", "type": int,
                        "help": "clients per full round (default all)"},
        "gamma": OPT_GAMMA,
        "p": OPT_P,
        "batch_size": OPT_BATCH,
        "byz_clip": {"flag": "--no-clip", "action": "store_false", "keyword": "clip",
                 "help": "Byz-VR-MARINA-PP: do not clip the differences (the unclipped baseline)"},
        "plus": {"flag": "--plus", "action": "store_true",
                 "help": "Byz-VR-MARINA-PP+: average the clipped differences"},
    }  # fmt: skip

    def __init__(self, problem, *, byzantine=(), gamma=None, p=None, batch_size=1, cohort=None,
                 full_cohort=None, alpha=1.0, clip=True, aggregator=None, compressor=None,
                 attack="shift_back", plus=False, seed=0, x0=None,
                 dtype=torch.float32, diverge_factor: float = 1e8, ipm_eps: float = 0.1,
                 alie_z: float | None = None, bit_flip_scale: float = 1.0,
                 aggregator_options: dict | None = None,
                 bucketing: int | None = None):  # fmt: skip
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        self.problem = problem
        n = problem.n
        if isinstance(byzantine, numbers.Integral) and not isinstance(byzantine, bool):
            f = v.integer("byzantine", byzantine, 0, n - 1)
            byzantine = range(n - f, n)  # a count: the last f clients
        self.byzantine = sorted({v.integer("byzantine", b, 0, n - 1) for b in byzantine})
        self.honest = [i for i in range(n) if i not in set(self.byzantine)]
        if not self.honest:
            raise ValueError("at least one client must be honest")
        self.gamma = v.positive("gamma", 1.0 / problem.L if gamma is None else gamma)
        self.cohort_size = v.integer("cohort", math.ceil(0.2 * n) if cohort is None else cohort,
                                     1, n)  # fmt: skip
        self.full_cohort = v.integer("full_cohort", n if full_cohort is None else full_cohort, 1, n)
        self.p = self.cohort_size / n if p is None else v.fp32_scalar("p", p)
        if not 0 < self.p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        self.batch_size = v.integer("batch_size", batch_size, 1)
        self.alpha = v.positive("alpha", alpha)
        self.clip = v.boolean("clip", clip)
        self.plus = v.boolean("plus", plus)
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
        self.attack = attack
        self.ipm_eps = v.fp32_scalar("ipm_eps", ipm_eps)
        self.alie_z = None if alie_z is None else v.fp32_scalar("alie_z", alie_z)
        self.bit_flip_scale = v.fp32_scalar("bit_flip_scale", bit_flip_scale)
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.dtype = dtype
        self._cap_f = isinstance(aggregator, str)
        if aggregator is None:
            aggregator = R.Aggregator("coordinate_median", pre="bucketing", seed=seed)
        elif self._cap_f:
            aggregator = self._rule_aggregator(aggregator, aggregator_options, bucketing, seed)
        elif aggregator_options is not None or bucketing is not None:
            raise ValueError("aggregator_options and bucketing apply to a rule name given as "
                             "aggregator, not to an aggregator object")  # fmt: skip
        self.aggregator = aggregator
        self.compressor = compressor
        d = problem.p
        self.x0 = torch.zeros(d, dtype=torch.float64) if x0 is None else x0.to(torch.float64)
        if self.x0.shape != (d,):
            raise ValueError(f"x0 must have shape ({d},), got {tuple(self.x0.shape)}")
        self.x = self.x0.clone()
        self.remember_start()
        self._lam = 0.0
        # f* of the honest objective, when the problem can compute it (the "gap" metric)
        optimum = getattr(problem, "optimum", None)
        self.f_star = optimum(self.honest)[1] if optimum is not None else None
        # g0: the aggregate of full gradients at x0 (a full round without a step)
        S0 = sampling.uniform(n, self.full_cohort, seed=self.seed, step=self.initial_key(1))
        self.g = self._full_round(self.x, S0.tolist())
        self._record(True, False, d)

    def _rule_aggregator(self, rule, options, bucketing, seed) -> R.Aggregator:
        """The Aggregator of a rule name (see ``aggregator`` in the class docstring)."""
        cohort = min(self.cohort_size, self.full_cohort)
        return rule_aggregator(rule, len(self.byzantine), options=options, bucketing=bucketing,
                               seed=seed, cohort=cohort)  # fmt: skip

    def _aggregate(self, X: torch.Tensor) -> torch.Tensor:
        """ARAgg(X); a rule-name aggregator gets f capped to what the rule accepts for X."""
        return capped_aggregate(self.aggregator, X) if self._cap_f else self.aggregator(X)

    # ---- one round ---------------------------------------------------------------------------

    def _sample(self, size: int) -> list[int]:
        return self.cohort(self.problem.n, size, 1).tolist()

    def _msg(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.dtype)

    def _byz_rows(self, S, honest_msgs, own_msgs, target) -> torch.Tensor | None:
        """The Byzantine clients' messages of this round ([b, d]) or None if none is sampled."""
        nb = sum(1 for i in S if i in self._byz_set)
        if nb == 0:
            return None
        if self.attack == "none" or (self.attack == "shift_back" and 2 * nb <= len(S)):
            return own_msgs  # behave honestly
        if self.attack == "shift_back":
            return attacks.shift_back(target.to(self.dtype), nb)
        if self.attack == "bit_flip":
            return attacks.bit_flip(own_msgs, self.bit_flip_scale)
        if honest_msgs is None or honest_msgs.shape[0] < (2 if self.attack == "alie" else 1):
            return own_msgs  # nothing to imitate
        if self.attack == "alie":
            return attacks.alie(honest_msgs, nb, self.alie_z)
        return attacks.ipm(honest_msgs, nb, self.ipm_eps)

    @property
    def _byz_set(self) -> set:
        return set(self.byzantine)

    def _split(self, S):
        hon = [i for i in S if i not in self._byz_set]
        byz = [i for i in S if i in self._byz_set]
        return hon, byz

    def _stack(self, hon_msgs, byz_msgs) -> torch.Tensor:
        parts = [m for m in (hon_msgs, byz_msgs) if m is not None and m.shape[0]]
        return torch.cat(parts) if parts else None

    def _full_round(self, x_new: torch.Tensor, S) -> torch.Tensor:
        hon, byz = self._split(S)
        hon_msgs = self._msg(self.problem.grads(x_new, hon)) if hon else None
        own = self._msg(self.problem.grads(x_new, byz)) if byz else None
        target = (x_new - self.x0) / self.gamma  # g+ that sends x++ = x+ - gamma g+ to x0
        X = self._stack(hon_msgs, self._byz_rows(S, hon_msgs, own, target))
        return self._aggregate(X).to(torch.float64)

    def _differences(self, clients, x_new):
        """D_i of the clients: minibatch gradient differences, compressed, clipped (honestly)."""
        if not clients:
            return None
        sizes = self.problem.sizes[clients].tolist()
        key = self.key(2)
        samples = [sampling.uniform(m, min(self.batch_size, m), seed=client_seed(self.seed, i),
                                    step=key)
                   for i, m in zip(clients, sizes, strict=True)]  # fmt: skip
        g_new = self._msg(self.problem.grads(x_new, clients, samples))
        g_old = self._msg(self.problem.grads(self.x, clients, samples))
        bound = self._lam if (self.clip and self._lam > 0) else None
        # rand-k masks are keyed by (seed, client id, round); other compressors ignore both
        out = R.diff_compress_clip(g_new, g_old, self.compressor, bound, clients=clients,
                                   step=self.rounds)  # fmt: skip
        if isinstance(out, tuple):  # sparse message -> dense rows for the aggregator
            values, indices = out
            dense = torch.zeros_like(g_new)
            return dense.scatter_(1, indices, values)
        return out

    def _compressed_round(self, x_new: torch.Tensor, S) -> torch.Tensor:
        hon, byz = self._split(S)
        hon_msgs = self._differences(hon, x_new)
        own = self._differences(byz, x_new)
        target = (x_new - self.x0) / self.gamma - self.g  # the aggregate that sends x back to x0
        X = self._stack(hon_msgs, self._byz_rows(S, hon_msgs, own, target))
        if self.clip:
            if self._lam > 0:
                R.clip_rows_(X, self._lam)
            else:
                X.zero_()
        agg = X.float().mean(0) if self.plus else self._aggregate(X)
        return self.g + agg.to(torch.float64)

    def step(self) -> None:
        """One round (steps 1-4 above); appends to ``history``."""
        full = self.coin(self.p, 0)
        S = self._sample(self.full_cohort if full else self.cohort_size)
        x_new = self.x - self.gamma * self.g
        self._lam = self.alpha * float((x_new - self.x).norm())
        nb = sum(1 for i in S if i in self._byz_set)
        if full:
            g_new = self._full_round(x_new, S)
            up = self.problem.p
        else:
            g_new = self._compressed_round(x_new, S)
            c = self.compressor
            up = self.problem.p if c is None else c.k_for(self.problem.p) * (
                2 if type(c).__name__ == "TopK" else 1)  # fmt: skip
        self.x, self.g = x_new, g_new
        self.rounds += 1
        self._record(full, 2 * nb > len(S), up)

    def _record(self, full: bool, majority: bool, up: int) -> None:
        P = self.problem
        finite = bool(torch.isfinite(self.x).all())
        loss = P.loss(self.x, self.honest) if finite else math.nan
        self.record(
            loss=loss,
            gap=loss - self.f_star if self.f_star is not None else math.nan,
            grad_norm=float(P.grad(self.x, self.honest).norm()) if finite else math.nan,
            full=full,
            byzantine_majority=majority,
            floats_up=up,
            floats_down=P.p,
        )
