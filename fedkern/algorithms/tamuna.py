"""TAMUNA (Condat, Agarsky, Malinovsky, Richtarik 2023): local training, compression and partial
participation together, on a ``ClientBatch``.

State: the server model x and every client's control variate h_i (sum_i h_i = 0, start 0). A round:

1. the server draws a cohort Omega of c clients (uniform without replacement), a number of local
   steps K ~ Geometric(p) shared by the cohort, and the compression pattern q (below);
2. each i in Omega starts from x_i = x and runs K steps x_i <- x_i - gamma (g_i(x_i) - h_i);
3. client i sends the coordinates it holds under q (about s*p/c of the p floats);
4. the server averages the s values it received for every coordinate: x+ [r] = (1/s) sum of
   x_i[r] over the s holders of r;
5. each i in Omega updates h_i += (eta / gamma) q_i * (x+ - x_i) (only its held coordinates; the
   clients outside the cohort keep theirs), which keeps sum_i h_i = 0.

Pattern: coordinate r goes to the cohort slots (s*r + j) mod c, j = 0..s-1, and slot j to cohort
row ``fedkern.sampling.slot_permutation(c)[j]``, a fresh permutation each round keyed by the seed
and the round (so a client can rebuild its pattern from them). Every coordinate has exactly s
holders; steps 4 and 5 are the single fused op ``fedkern::tamuna_aggregate_``, which never builds
the d x c mask. At s = c every client holds everything and no permutation is drawn: TAMUNA is then
Scaffnew with the same partial participation, bit for bit.

fedkern's choice (documented in the specification it follows): step 5 happens in the round itself
(the exact algorithm). ``deferred=True`` is the authors' Flower code instead: a client applies
step 5 only at its next participation, with the server model of that later round, so sum_i h_i = 0
is lost (it drifts; tests show it).
"""

from __future__ import annotations

import math

import torch

from fedkern import sampling
from fedkern import validation as v
from fedkern.algorithms.federated import (
    OPT_COHORT,
    OPT_GAMMA,
    OPT_P,
    SLOT_COIN,
    SLOT_PATTERN,
    FederatedMethod,
    _require_batch,
)
from fedkern.ops import tamuna as ops

__all__ = ["TAMUNA", "chi"]


def chi(c: int, s: int) -> float:
    """TAMUNA's chi = c (s - 1) / (s (c - 1)) for a cohort of c >= 2 and s in [2, c]
    (eta's admissible range is p/2 <= eta <= p * chi; chi = 1 at s = c)."""
    return c * (s - 1) / (s * (c - 1))


class TAMUNA(FederatedMethod):
    """TAMUNA on a ``ClientBatch`` (module docstring: the round, the pattern, the choices).

    Args:
        batch: the ``fedkern.clients.ClientBatch`` (n >= 2 clients).
        cohort: c, clients per round, an int in [2, n] (default n).
        s: holders per coordinate, an int in [2, c] (default c: no compression, = Scaffnew).
        p: the probability of communicating after a local step, in (0, 1] (K ~ Geometric(p));
            default 1/sqrt(kappa), kappa = L/mu.
        gamma: local step size > 0 (default 1/L).
        eta: the control-variate step > 0 (default p * chi(c, s), the top of the admissible range
            [p/2, p chi]; other positive values are allowed, outside the theory).
        deferred: the authors' deferred control-variate update (see the module docstring).
        mode, batch_size: the local gradient ("gd", "sgd", "rr"; ``FederatedMethod``).
        seed, x0, diverge_factor: ``FederatedMethod``.

    History (per round, ``FederatedMethod``'s metrics): "floats_up" = s*p/c, the mean number of
    floats a cohort client sends; "floats_down" = p + s*p/c (the model at the start of the round
    and the held coordinates of x+ for step 5; p with ``deferred``); "local_steps" = K.

    State (``state_dict``): x [p], H [n, p] float32 on the batch's device, the local-step count;
    with ``deferred`` also every client's last sent model and pattern slot (-1: none pending).
    """

    name = "tamuna"
    config_attrs = ("gamma", "mode", "batch_size", "p", "eta", "cohort_size", "s", "deferred")
    cli_options = {
        **FederatedMethod.cli_options,
        "gamma": OPT_GAMMA,
        "p": OPT_P,
        "cohort": OPT_COHORT,
        "s": {"flag": "--s", "type": int,
              "help": "TAMUNA: holders per coordinate, 2..cohort (default cohort: no compression)"},
        "eta": {"flag": "--eta", "type": float,
                "help": "TAMUNA: control-variate step (default p * chi)"},
        "deferred": {"flag": "--deferred", "action": "store_true",
                     "help": "TAMUNA: the authors' deferred control-variate update"},
    }  # fmt: skip

    def __init__(self, batch, *, cohort: int | None = None, s: int | None = None,
                 p: float | None = None, gamma: float | None = None, eta: float | None = None,
                 deferred: bool = False, **kw):  # fmt: skip
        P = _require_batch(batch).problem
        if batch.n < 2:
            raise ValueError(f"TAMUNA needs at least 2 clients, the batch has {batch.n}")
        self.cohort_size = v.integer("cohort", batch.n if cohort is None else cohort, 2, batch.n)
        c = self.cohort_size
        self.s = v.integer("s", c if s is None else s, 2, c)
        self.p = v.probability("p", 1.0 / math.sqrt(P.L / P.mu) if p is None else p)
        self.gamma = v.positive("gamma", 1.0 / P.L if gamma is None else gamma)
        self.eta = v.positive("eta", self.p * chi(c, self.s) if eta is None else eta)
        self.deferred = v.boolean("deferred", deferred)
        self.H = batch.zeros()
        if self.deferred:
            self.Xlast = batch.zeros()
            self.slot = torch.full((batch.n,), -1, dtype=torch.int64, device=batch.device)
            self.state_attrs = ("x", "total_local_steps", "H", "Xlast", "slot")
        else:
            self.state_attrs = ("x", "total_local_steps", "H")
        super().__init__(batch, **kw)

    @property
    def coef(self) -> float:
        """eta / gamma, the control-variate coefficient of step 5."""
        return self.eta / self.gamma

    def pattern(self) -> torch.Tensor:
        """This round's slot -> cohort-row permutation (int64 [c] on the batch's device; the
        identity at s = c, where the pattern holds everything)."""
        c = self.cohort_size
        if self.s == c:
            perm = torch.arange(c, dtype=torch.int64)
        else:
            perm = sampling.slot_permutation(c, seed=self.seed, step=self.key(SLOT_PATTERN))
        return perm.to(self.batch.device)

    def _apply_pending(self, S: torch.Tensor, H: torch.Tensor) -> None:
        """Deferred step 5 of the cohort's earlier participations, with the current x (in place
        on H, the cohort's rows)."""
        slot = self.slot[S]
        todo = torch.nonzero(slot >= 0).flatten()
        if todo.numel() == 0:
            return
        c, s = self.cohort_size, self.s
        r = torch.arange(self.batch.p, dtype=torch.int64, device=H.device)
        held = torch.remainder(slot[todo, None] - s * r[None, :], c) < s
        rows = H[todo]
        upd = rows + self.coef * (self.x - self.Xlast[S[todo]])
        H[todo] = torch.where(held, upd, rows)

    def step(self) -> None:
        c, s, d = self.cohort_size, self.s, self.batch.p
        K = self.geometric(self.p, SLOT_COIN)
        S = self._cohort(c)
        X = self.x.repeat(c, 1)
        H = self.H[S].contiguous()
        if self.deferred:
            self._apply_pending(S, H)
        self._local(X, K, clients=S, H=H)
        perm = self.pattern()
        if self.deferred:
            x_new = ops.tamuna_aggregate_(X, None, perm, s, self.coef, check_perm=False)
            slot_of_row = torch.empty_like(perm)
            slot_of_row[perm] = torch.arange(c, dtype=torch.int64, device=perm.device)
            self.slot[S] = slot_of_row
            self.Xlast[S] = X
        else:
            x_new = ops.tamuna_aggregate_(X, H, perm, s, self.coef, check_perm=False)
        self.H[S] = H
        self.x = x_new
        self.rounds += 1
        up = s * d / c
        self._record(up, d if self.deferred else d + up, K)

    def __repr__(self) -> str:
        return (f"TAMUNA(rounds={self.rounds}, cohort={self.cohort_size}, s={self.s}, "
                f"p={self.p:.4g}, gamma={self.gamma:.4g}, eta={self.eta:.4g})")  # fmt: skip
