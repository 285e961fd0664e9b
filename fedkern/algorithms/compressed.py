"""Compressed-communication methods on a ``ClientBatch``: MARINA, DIANA and EF21.

Each round is written as a client side (``client_messages``: what every client computes from the
broadcast model, its own state and (seed, key); batched over the clients) and a server side (the
aggregation and the step), so that the same round runs across real clients (Flower) with the same
seeds. All randomness is keyed: the shared coin by ``key(0)``, the clients' minibatches by
``key(3)`` (``ClientBatch.grads``), the rand-k masks by ``randk_keys(client_seed(seed, i),
key(4))`` -- a client and the server derive a mask from (seed, round, client) alone, so a rand-k
message is k values. Floats are counted exactly per participating client ("floats_up": values, and
indices for top-k; "floats_down": the broadcast model), and "grad_evals" counts per-sample
gradient evaluations (``fedkern.algorithms.vr.GradientMethod``). History index 0 books the
initialization (a full gradient round where the method needs one).
"""

from __future__ import annotations

import math

import torch

from fedkern import validation as v
from fedkern.algorithms.federated import (
    OPT_BATCH,
    OPT_GAMMA,
    OPT_MODE,
    SLOT_COIN,
    _require_batch,
)
from fedkern.algorithms.messages import COMPRESSORS, RowCompressor
from fedkern.algorithms.vr import OPT_VR_P, SLOT_MASK, GradientMethod

__all__ = ["DIANA", "EF21", "MARINA"]

OPT_COMPRESSOR = {
    "flag": "--compressor",
    "choices": COMPRESSORS,
    "help": "message compressor (MARINA/DIANA: randk, EF21: topk by default)",
}
OPT_K = {"flag": "--k", "type": int, "help": "coordinates kept per message (default 10%%)"}
OPT_ALPHA = {"flag": "--shift-step", "type": float,
             "help": "DIANA's shift step (default 1/(omega + 1); 0: no shifts)"}  # fmt: skip
OPT_FEEDBACK = {"flag": "--no-feedback", "action": "store_false",
                "help": "EF21: send C(grad) without the feedback state (the baseline)"}  # fmt: skip
_CLI = {"mode": OPT_MODE, "batch_size": OPT_BATCH, "gamma": OPT_GAMMA, "compressor": OPT_COMPRESSOR,
        "k": OPT_K}  # fmt: skip


class _Compressed(GradientMethod):
    """Shared setup: the compressor of the messages and the clients' gradient mode."""

    def _setup(self, batch, compressor, k, ratio, unbiased):
        self.comp = RowCompressor(compressor, d=batch.p, k=k, ratio=ratio, seed=self._seed,
                                  unbiased=unbiased)  # fmt: skip
        self.compressor_kind, self.k = self.comp.kind, self.comp.k

    def _local(self, X):
        """The clients' gradients at X for this round (mode gd: full, sgd: the keyed minibatch)."""
        return self._grads(X, self.mode, self.batch_size)

    @property
    def _ids(self) -> torch.Tensor:
        return torch.arange(self.batch.n)


class MARINA(_Compressed):
    """MARINA (Gorbunov, Burlachenko, Li and Richtarik 2021) with an unbiased compressor Q.

    Round k (x, g): x+ = x - gamma g (broadcast); a shared coin c ~ Bernoulli(p):
      c = 1: every client sends grad f_i(x+) (dense, p floats); g+ = mean of them;
      c = 0: every client sends Q_i(grad f_i(x+) - grad f_i(x)); g+ = g + mean of them.
    mode "sgd" is VR-MARINA: the differences are on a b-sample minibatch (the same samples at x+
    and x), the c = 1 gradients full. Starts with g = grad f(x0) (a full round, history index 0).

    Args:
        batch: the ClientBatch. compressor: "randk" (default; the paper's unbiased rand-k, scaled
            by d/k, masks from (seed, round, client)) or "none" (dense: MARINA becomes GD with
            p = 1). k / ratio: coordinates kept (default ratio 0.1).
        p: default k / d (the expected density of rand-k, the paper's zeta_Q / d).
        gamma: default 1 / (L (1 + sqrt((1 - p) omega / (p n)))), the paper's step with
            L_- = L_+ = L (the problem's L, a bound of both) and omega = d/k - 1.
        mode, batch_size: "gd" (full local gradients) or "sgd" (VR-MARINA's minibatches, b).
    """

    name = "marina"
    state_attrs = ("x", "total_local_steps", "g")
    config_attrs = ("gamma", "mode", "batch_size", "p", "compressor_kind", "k")
    cli_options = {**_CLI, "p": OPT_VR_P}

    def __init__(self, batch, *, gamma: float | None = None, p: float | None = None,
                 compressor: str = "randk", k: int | None = None, ratio: float | None = None,
                 seed: int = 0, **kw):  # fmt: skip
        P = _require_batch(batch).problem
        if compressor == "topk":
            raise ValueError("MARINA needs an unbiased compressor: 'randk' or 'none', not 'topk'")
        self._seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self._setup(batch, compressor, k, ratio, True)
        self.p = v.probability("p", self.comp.k / batch.p if p is None else p)
        if gamma is None:
            gamma = 1 / (P.L * (1 + math.sqrt((1 - self.p) * self.comp.omega / (self.p * P.n))))
        self.gamma = v.positive("gamma", gamma)
        super().__init__(batch, seed=seed, **kw)
        self.g = self.batch.mean(self._grads(self.x))
        self._charge_start(batch.p)

    def client_messages(self, x_new: torch.Tensor, heads: bool):
        """Every client's message of this round: its gradient at x+ ([n, p]) when heads, else
        the compressed difference (values, indices) (dense [n, p] for "none")."""
        if heads:
            return self._grads(x_new)
        G_new, G_old = self._local(x_new), self._local(self.x)
        return self.comp.diff(G_new, G_old, clients=self._ids, step=self.key(SLOT_MASK))

    def step(self) -> None:
        heads = self.coin(self.p, SLOT_COIN)
        x_new = self.x - self.gamma * self.g
        msg = self.client_messages(x_new, heads)
        self.g = self.batch.mean(msg) if heads else self.g + self.comp.mean(msg)
        self.x = x_new
        self.rounds += 1
        p = self.batch.p
        self._record(p if heads else self.comp.floats, p, 1)


class DIANA(_Compressed):
    """DIANA (Mishchenko, Gorbunov, Takac and Richtarik 2019): compressed gradient differences to
    learned shifts.

    Client i keeps a shift h_i (h_i = 0 at the start), the server h = mean_i h_i. Round k:
      client: g_i = grad f_i(x) (mode sgd: a b-minibatch); m_i = Q(g_i - h_i) (sent);
              h_i += alpha m_i;
      server: g = h + mean_i m_i;  h += alpha mean_i m_i;  x+ = x - gamma g.
    With alpha = 0 (``shift_step=0``) the shifts stay 0 and this is compressed GD,
    x+ = x - gamma mean_i Q(g_i) (the baseline that stalls at a noise floor where the local
    gradients at the optimum differ).

    Args:
        batch: the ClientBatch. compressor: "randk" (default, unbiased) or "none". k / ratio.
        shift_step: alpha, the shift step (``self.alpha``); default 1/(omega + 1).
        gamma: default 1 / (L (1 + 6 omega / n)) (fedkern's choice: the step bound of the unified
            analyses of DIANA, e.g. Gorbunov, Hanzely and Richtarik 2020, with alpha = 1/(omega+1)).
        mode, batch_size: the clients' gradients (full, or b-minibatches).
    """

    name = "diana"
    state_attrs = ("x", "total_local_steps", "H", "h")
    config_attrs = ("gamma", "mode", "batch_size", "alpha", "compressor_kind", "k")
    cli_options = {**_CLI, "shift_step": OPT_ALPHA}

    def __init__(self, batch, *, gamma: float | None = None, shift_step: float | None = None,
                 compressor: str = "randk", k: int | None = None, ratio: float | None = None,
                 seed: int = 0, **kw):  # fmt: skip
        P = _require_batch(batch).problem
        if compressor == "topk":
            raise ValueError("DIANA needs an unbiased compressor: 'randk' or 'none', not 'topk'")
        self._seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self._setup(batch, compressor, k, ratio, True)
        omega = self.comp.omega
        alpha = 1 / (omega + 1) if shift_step is None else shift_step
        self.alpha = v.fp32_scalar("shift_step", alpha,
                                   nonneg=True)  # fmt: skip
        if self.alpha > 1:
            raise ValueError(f"shift_step must be in [0, 1], got {alpha}")
        self.gamma = v.positive("gamma", 1 / (P.L * (1 + 6 * omega / P.n)) if gamma is None
                                else gamma)  # fmt: skip
        self.H = batch.zeros()
        self.h = torch.zeros(batch.p, device=batch.device)
        super().__init__(batch, seed=seed, **kw)

    def client_messages(self):
        """Every client's message Q(g_i - h_i) of this round; updates the clients' shifts."""
        G = self._local(self.x)
        msg = self.comp.diff(G, self.H, clients=self._ids, step=self.key(SLOT_MASK))
        if self.alpha:
            self.comp.add_(self.H, msg, self.alpha)
        return msg

    def step(self) -> None:
        m = self.comp.mean(self.client_messages())
        g = self.h + m
        if self.alpha:
            self.h = self.h + self.alpha * m
        self.x = self.x - self.gamma * g
        self.rounds += 1
        self._record(self.comp.floats, self.batch.p, 1)


class EF21(_Compressed):
    """EF21 (Richtarik, Sokolov and Fatkhullin 2021): error feedback with a contractive compressor.

    Client i keeps g_i, the server g = mean_i g_i. Round k: x+ = x - gamma g (broadcast); client:
    c_i = C(grad f_i(x+) - g_i) (sent), g_i += c_i; server: g += mean_i c_i. It starts with
    g_i = C(grad f_i(x0)) (sent; history index 0).
    With ``feedback=False`` the clients send C(grad f_i(x+)) and the server steps with their mean
    (the biased top-k baseline that stalls away from the optimum).

    Args:
        batch: the ClientBatch. compressor: "topk" (default), "randk" (biased: not scaled) or
            "none". k / ratio: default ratio 0.1.
        gamma: default 1 / (L + L sqrt(beta / theta)), theta = 1 - sqrt(1 - a),
            beta = (1 - a) / (1 - sqrt(1 - a)), a = k/d: the paper's step with L and the
            quadratic mean of the clients' constants both bounded by the problem's L.
        feedback: the EF21 state (True) or plain compressed gradients (False).
        mode, batch_size: the clients' gradients (full, or b-minibatches).
    """

    name = "ef21"
    state_attrs = ("x", "total_local_steps", "G", "g")
    config_attrs = ("gamma", "mode", "batch_size", "compressor_kind", "k", "feedback")
    cli_options = {**_CLI, "feedback": OPT_FEEDBACK}

    def __init__(self, batch, *, gamma: float | None = None, compressor: str = "topk",
                 k: int | None = None, ratio: float | None = None, feedback: bool = True,
                 seed: int = 0, **kw):  # fmt: skip
        P = _require_batch(batch).problem
        self._seed = v.integer("seed", seed, 0, (1 << 63) - 1)
        self._setup(batch, compressor, k, ratio, False)
        self.feedback = v.boolean("feedback", feedback)
        a = self.comp.alpha
        if gamma is None:
            s = math.sqrt(1 - a)  # beta / theta = (1 - a) / (1 - s)^2
            gamma = 1 / P.L if a >= 1 else 1 / (P.L * (1 + math.sqrt((1 - a) / (1 - s) ** 2)))
        self.gamma = v.positive("gamma", gamma)
        super().__init__(batch, seed=seed, **kw)
        self.G = batch.zeros()
        msg = self.comp.diff(self._local(self.x), self.G, clients=self._ids,
                             step=self.initial_key(SLOT_MASK))  # fmt: skip
        self.comp.add_(self.G, msg)
        self.g = self.comp.mean(msg)
        self._charge_start(self.comp.floats)

    def client_messages(self, x_new: torch.Tensor):
        """Every client's c_i of this round (feedback: C(grad - g_i), and g_i += c_i)."""
        G = self._local(x_new)
        ref = self.G if self.feedback else torch.zeros_like(G)
        msg = self.comp.diff(G, ref, clients=self._ids, step=self.key(SLOT_MASK))
        if self.feedback:
            self.comp.add_(self.G, msg)
        return msg

    def step(self) -> None:
        x_new = self.x - self.gamma * self.g
        m = self.comp.mean(self.client_messages(x_new))
        self.g = self.g + m if self.feedback else m
        self.x = x_new
        self.rounds += 1
        self._record(self.comp.floats, self.batch.p, 1)
