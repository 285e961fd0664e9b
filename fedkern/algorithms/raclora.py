"""RAC-LoRA chains and their baselines as methods, and FedRACLoRA (ALGORITHMS.md section 8).

A round of these methods is one link of a chain: ``steps`` optimizer steps on the adapters' free
factors (``fedkern.lora``), then the merge (``merge_all_``) that starts the next link. The modes
(``LoRAChain.mode``): "rac" (RAC-LoRA: a fresh random frozen factor per link), "asymm" (AsymmLoRA:
one frozen factor forever), "cola" (Chain of LoRA: both factors trained, merged, re-initialised),
"lora" (both trained, never merged) and "fpft" (full fine-tuning, no adapter). Tasks:

- ``QuadraticTask`` (``--problem lora_quadratic``): f(W) = 1/2 tr((W - W*)^T H (W - W*)) over 3 x 3
  matrices, H = diag(10, 1, 1) (the 9 x 9 Hessian H (x) I: L = 10, mu = 1), W0 = 0, W* a fixed
  Gaussian draw; the model is a bias-free float64 ``nn.Linear(3, 3)`` evaluated at the identity.
- ``TransferTask`` (``--problem lora_transfer``): digits (8 x 8, standing in for MNIST): an MLP
  64-64-64-5 pre-trained on classes 0-4, adapted to classes 5-9 (labels 5..9 -> 0..4, the head
  reused), accuracy on a held-out split of 5-9.

``FedRACLoRA`` is the federated chain: per round the server fixes the link (the clients regenerate
its frozen factors from the seeds: nothing but the seed is sent for them), a cohort trains only the
free factors from zero with ``steps`` local full-batch GD steps (``fedkern.clients.ModuleClients``,
batched over the cohort with torch.func), the server averages the free factors -- exact, since the
frozen factor is shared -- and merges. Floats per client and direction: r (m or n) per layer.

Randomness: minibatch orders are keyed permutations of (seed, round), cohorts ``key(1)``, the
frozen factors the layers' seeds (``fedkern.lora.wrap``); every method resumes exactly from its
``state_dict`` (the model's state carries the link counters; the optimizer state is saved).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

from fedkern import data
from fedkern import lora as L
from fedkern import validation as val
from fedkern.algorithms.base import Method
from fedkern.random import gaussian, permutation_tensor

__all__ = ["FedRACLoRA", "LoRAChain", "QuadraticTask", "TransferTask"]

F64 = torch.float64
SLOT_COHORT = 1

OPT_RANK = {"flag": "--rank", "type": int, "help": "LoRA rank r (default 1)"}
OPT_LR = {"flag": "--lr", "type": float, "help": "LoRA learning rate (default: the task's)"}
OPT_STEPS = {"flag": "--link-steps", "type": int,
             "help": "optimizer steps per link / round (default: the task's)"}  # fmt: skip
OPT_FROZEN = {"flag": "--frozen", "choices": ("A", "B", "coin"),
              "help": "RAC-LoRA frozen factor (default A)"}  # fmt: skip


class QuadraticTask:
    """The 9-parameter quadratic of RAC-LoRA's first experiment (see the module docstring).

    Args:
        hessian: the diagonal of H (default (10, 1, 1)).
        seed: W* = gaussian((3, 3), seed=seed) in float64.
    """

    kind = "quadratic"
    defaults = {"lr": 0.1, "steps": 5, "optimizer": "sgd", "init_std": 1.0, "precondition": True,
                "batch_size": None}  # fmt: skip
    metric = "dist"

    def __init__(self, hessian=(10.0, 1.0, 1.0), *, seed: int = 0):
        self.h = torch.tensor([val.positive("hessian", h) for h in hessian], dtype=F64)
        self.m = self.h.numel()
        self.W_star = gaussian((self.m, self.m), seed=seed, dtype=F64)
        self.L, self.mu = float(self.h.max()), float(self.h.min())

    def model(self) -> nn.Module:
        """A fresh bias-free float64 Linear with W0 = 0 (in a Sequential: ``wrap`` replaces it)."""
        lin = nn.Linear(self.m, self.m, bias=False, dtype=F64)
        with torch.no_grad():
            lin.weight.zero_()
        return nn.Sequential(lin)

    def weight(self, model) -> torch.Tensor:
        """The model's effective weight: its output at the identity, transposed."""
        return model(torch.eye(self.m, dtype=F64)).T

    def loss(self, model, batch=None) -> torch.Tensor:
        E = self.weight(model) - self.W_star
        return 0.5 * (self.h[:, None] * E * E).sum()

    def batch(self, index: int, seed: int, batch_size):
        return None

    def steps_per_link(self, batch_size) -> int:
        return self.defaults["steps"]

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        E = self.weight(model) - self.W_star
        return {"loss": float(0.5 * (self.h[:, None] * E * E).sum()), "dist": float(E.norm())}

    def __repr__(self) -> str:
        return f"QuadraticTask(H=diag{tuple(self.h.tolist())})"


@functools.lru_cache(maxsize=4)
def _pretrained(seed: int, hidden: int, epochs: int, lr: float):
    """(state_dict, splits) of the MLP pre-trained on digits 0-4: deterministic in its arguments."""
    A, y = data.load("digits")
    x = A[:, :-1].float()  # the bias column dropped: the MLP has biases
    old = torch.nonzero(y < 5).flatten()
    new = torch.nonzero(y >= 5).flatten()

    def halves(idx, step):
        perm = idx[permutation_tensor(idx.numel(), seed, step)]
        cut = (2 * idx.numel()) // 3
        return perm[:cut], perm[cut:]

    old_tr, old_te = halves(old, 0)
    new_tr, new_te = halves(new, 1)
    net = _mlp(x.shape[1], hidden, 5, seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n = old_tr.numel()
    for epoch in range(epochs):
        order = old_tr[permutation_tensor(n, seed, 1000 + epoch)]
        for b in torch.split(order, 128):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    with torch.no_grad():
        acc_old = float((net(x[old_te]).argmax(1) == y[old_te]).float().mean())
    splits = {"x": x, "y": y, "new_train": new_tr, "new_test": new_te, "old_accuracy": acc_old}
    return {k: t.clone() for k, t in net.state_dict().items()}, splits


def _mlp(d_in: int, hidden: int, out: int, seed: int) -> nn.Sequential:
    """The MLP d_in-hidden-hidden-out with ReLU, initialised from fedkern's Gaussian draws."""
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, out))  # fmt: skip
    with torch.no_grad():
        for i, layer in enumerate(m for m in net if isinstance(m, nn.Linear)):
            fan = layer.weight.shape[1]
            layer.weight.copy_(gaussian(layer.weight.shape, seed=seed, step=i, std=1 / fan**0.5))
            layer.bias.zero_()
    return net


class TransferTask:
    """Digits transfer: pre-train on classes 0-4, adapt to 5-9 (the paper's MNIST experiment).

    Args:
        seed: keys the split (2/3 train, 1/3 test of each half), the MLP's initialisation and the
            pre-training minibatches.
        hidden: the MLP's hidden width (default 64: 64-64-64-5).
        pretrain_epochs, pretrain_lr: Adam pre-training on classes 0-4 (default 30, 1e-2).

    Attributes:
        x, y: the data; train / test: index tensors of the adaptation split (labels y - 5);
        old_accuracy: the pre-trained model's test accuracy on classes 0-4.
    """

    kind = "transfer"
    defaults = {"lr": 1e-2, "steps": None, "optimizer": "adamw", "init_std": None,
                "precondition": False, "batch_size": 128}  # fmt: skip
    metric = "test_error"

    def __init__(self, *, seed: int = 0, hidden: int = 64, pretrain_epochs: int = 30,
                 pretrain_lr: float = 1e-2):  # fmt: skip
        self.seed = val.integer("seed", seed, 0, (1 << 63) - 1)
        self.hidden = val.integer("hidden", hidden, 1)
        epochs = val.integer("pretrain_epochs", pretrain_epochs, 0)
        state, s = _pretrained(
            self.seed, self.hidden, epochs, val.positive("pretrain_lr", pretrain_lr)
        )
        self._state = state
        self.x, self.y = s["x"], s["y"]
        self.train, self.test = s["new_train"], s["new_test"]
        self.old_accuracy = s["old_accuracy"]
        self.targets = self.y - 5
        self.federation: dict = {}

    def model(self) -> nn.Module:
        """A fresh copy of the pre-trained MLP."""
        net = _mlp(self.x.shape[1], self.hidden, 5, self.seed)
        net.load_state_dict(self._state)
        return net

    def steps_per_link(self, batch_size) -> int:
        return math.ceil(self.train.numel() / batch_size)

    def batch(self, index: int, seed: int, batch_size):
        """Minibatch ``index`` of the run: epochs of ceil(N / b) batches, epoch e in the keyed
        order permutation(N, seed, e) (the last batch of an epoch may be shorter)."""
        n = self.train.numel()
        per_epoch = math.ceil(n / batch_size)
        epoch, j = divmod(index, per_epoch)
        order = self.train[permutation_tensor(n, seed, epoch)]
        return order[j * batch_size : (j + 1) * batch_size]

    def loss(self, model, batch) -> torch.Tensor:
        idx = self.train if batch is None else batch
        return nn.functional.cross_entropy(model(self.x[idx]), self.targets[idx])

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        acc = float((model(self.x[self.test]).argmax(1) == self.targets[self.test]).float().mean())
        return {"loss": float(self.loss(model, None)), "test_accuracy": acc,
                "test_error": 1.0 - acc}  # fmt: skip

    def client_parts(self, clients: int, how: str = "iid", *, seed: int = 0, same: bool = False):
        """Index tensors into ``train`` of each client (``same``: every client all of it)."""
        if same:
            return [torch.arange(self.train.numel()) for _ in range(clients)]
        return data.split(self.targets[self.train], clients, how, seed=seed)

    def __repr__(self) -> str:
        return (f"TransferTask(digits 0-4 -> 5-9, MLP 64-{self.hidden}-{self.hidden}-5, "
                f"train {self.train.numel()}, test {self.test.numel()})")  # fmt: skip


def _task(task):
    if not isinstance(task, QuadraticTask | TransferTask):
        raise TypeError(f"task must be a QuadraticTask or a TransferTask, got "
                        f"{type(task).__name__}")  # fmt: skip
    return task


class _OptimizerSlot:
    """The method's optimizer as a state_attrs entry: loading rebuilds it over the current
    parameters first (a coin link may have replaced the free factor)."""

    def __init__(self, method):
        self.method = method

    def state_dict(self):
        return self.method.opt.state_dict()

    def load_state_dict(self, state):
        self.method._new_optimizer()
        self.method.opt.load_state_dict(state)


class LoRAChain(Method):
    """A chain of low-rank adapters on a task: one round = one link (``steps`` optimizer steps on
    the free factors, then the merge); see the module docstring for the modes.

    Args:
        task: a ``QuadraticTask`` or a ``TransferTask``.
        mode: "rac", "asymm", "cola", "lora" or "fpft" (the registered subclasses fix it).
        rank, alpha: the adapter's r and alpha (scaled alpha / r; default 1, 1: the paper's rank
            1 with the official code's alpha = 1).
        lr, steps, optimizer ("sgd" or "adamw"), init_std, precondition, batch_size: default the
            task's (quadratic: SGD at 1/L, 5 steps per link, init std 1 as the paper, the exact
            projected step for rac / asymm; transfer: AdamW 1e-2, one epoch of batches of 128 per
            link, init std 1/sqrt(fan)).
        frozen: "A", "B" or "coin" (rac / asymm).
        weight_decay: AdamW's (default 0).
        seed: keys the frozen factors (``wrap``) and the minibatch orders.

    The optimizer starts afresh at every merge (a new link trains new factors); "lora" and "fpft"
    keep theirs for the whole run.
    """

    name = "lorachain"
    mode = "rac"
    problems = ("lora_quadratic", "lora_transfer")
    state_attrs = ("model", "opt_slot")
    config_attrs = ("mode", "rank", "alpha", "lr", "steps", "optimizer", "frozen", "precondition",
                    "init_std", "batch_size", "weight_decay")  # fmt: skip
    cli_options = {"rank": OPT_RANK, "lr": OPT_LR, "steps": OPT_STEPS, "frozen": OPT_FROZEN}

    def __init__(self, task, *, mode: str | None = None, rank: int = 1, alpha: float = 1.0,
                 lr: float | None = None, steps: int | None = None, optimizer: str | None = None,
                 frozen: str = "A", init_std: float | None = None,
                 precondition: bool | None = None, batch_size: int | None = None,
                 weight_decay: float = 0.0, seed: int = 0,
                 diverge_factor: float = 1e8):  # fmt: skip
        self.task = _task(task)
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        d = task.defaults
        self.mode = type(self).mode if mode is None else mode
        if self.mode not in (*L.MODES, "fpft"):
            raise ValueError(f"mode must be one of {', '.join(L.MODES)}, 'fpft'; got {self.mode!r}")
        self.rank, self.alpha, self.frozen = rank, alpha, frozen
        self.lr = val.positive("lr", d["lr"] if lr is None else lr)
        self.optimizer = d["optimizer"] if optimizer is None else optimizer
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        bs = d["batch_size"] if batch_size is None else batch_size
        self.batch_size = None if bs is None else val.integer("batch_size", bs, 1)
        self.steps = val.integer("steps", task.steps_per_link(self.batch_size) if steps is None
                                 else steps, 1)  # fmt: skip
        self.init_std = d["init_std"] if init_std is None else init_std
        pre = d["precondition"] if precondition is None else precondition
        self.precondition = bool(pre) and self.mode in ("rac", "asymm")
        self.weight_decay = val.fp32_scalar("weight_decay", weight_decay, nonneg=True)
        self.model = task.model()
        if self.mode != "fpft":
            L.wrap(self.model, rank, alpha, mode=self.mode, frozen=frozen, seed=self.seed,
                   init_std=self.init_std, precondition=self.precondition)  # fmt: skip
        self.opt_slot = _OptimizerSlot(self)
        self._new_optimizer()
        self._start = None
        self._record()
        self._start = self.history[task.metric][0]

    def state_dict(self) -> dict:
        """``Method.state_dict`` with the model's and optimizer's tensors copied (they are
        updated in place as the run goes on)."""
        state = super().state_dict()
        state["attrs"] = copy.deepcopy(state["attrs"])
        return state

    def trainable(self) -> list[nn.Parameter]:
        if self.mode == "fpft":
            return list(self.model.parameters())
        return L.free_parameters(self.model)

    def _new_optimizer(self) -> None:
        params = self.trainable()
        if self.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def _record(self, **extra) -> None:
        self.record(**self.task.evaluate(self.model), **extra)

    def diverged(self) -> bool:
        last = [v for v in (self.history[k][-1] for k in self.history if k != "diverged")
                if isinstance(v, float)]  # fmt: skip
        if any(not math.isfinite(v) for v in last):
            return True
        metric = self.history[self.task.metric][-1]
        return metric > self.diverge_factor * (1 + abs(self._start or 0.0))

    def step(self) -> None:
        train_loss = math.nan
        for t in range(self.steps):
            batch = self.task.batch(self.rounds * self.steps + t, self.seed, self.batch_size)
            self.opt.zero_grad()
            loss = self.task.loss(self.model, batch)
            loss.backward()
            self.opt.step()
            train_loss = float(loss.detach())
            if not math.isfinite(train_loss):
                break
        if self.mode not in ("lora", "fpft") and L.merge_all_(self.model):
            self._new_optimizer()
        self.rounds += 1
        self._record(train_loss=train_loss)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, rounds={self.rounds}, lr={self.lr:g})"


class RACLoRA(LoRAChain):
    """RAC-LoRA: a fresh random frozen factor per link (``LoRAChain`` with mode "rac")."""

    name, mode = "raclora", "rac"


class AsymmLoRA(LoRAChain):
    """AsymmLoRA: one random frozen factor, never redrawn (``LoRAChain`` with mode "asymm")."""

    name, mode = "asymmlora", "asymm"


class COLA(LoRAChain):
    """Chain of LoRA: both factors trained, merged and re-initialised per link (mode "cola")."""

    name, mode = "cola", "cola"


class LoRA(LoRAChain):
    """LoRA: both factors trained, never merged (mode "lora")."""

    name, mode = "lora", "lora"


class FPFT(LoRAChain):
    """Full fine-tuning of every parameter (mode "fpft"; no adapter): the reference of the
    transfer experiment."""

    name, mode = "fpft", "fpft"


class _FreeView(nn.Module):
    """A module whose parameters are exactly the free factors of a wrapped model's current link;
    its forward is the wrapped model's with those factors substituted (what ``ModuleClients``
    trains: the frozen factors and base weights stay the model's own)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = [model]  # not a submodule: its parameters are not the view's
        self.names = []
        for lname, layer in model.named_modules():
            if isinstance(layer, L.RACLoRALinear):
                for pname in ("lora_A", "lora_B"):
                    if pname in layer._parameters:
                        key = f"{lname}.{pname}".replace(".", "__")
                        self.register_parameter(key, nn.Parameter(torch.zeros_like(
                            layer._parameters[pname]), requires_grad=False))  # fmt: skip
                        self.names.append((key, f"{lname}.{pname}"))

    def forward(self, x):
        from torch.func import functional_call

        params = {full: getattr(self, key) for key, full in self.names}
        return functional_call(self._model[0], params, (x,), strict=False)


class FedRACLoRA(Method):
    """Federated RAC-LoRA on a ``TransferTask``: clients train the free factors, the server
    averages them and merges (see the module docstring).

    Args:
        task: a ``TransferTask``.
        clients: number of clients (default 10, or the task's ``federation`` settings, which
            ``fedkern run`` fills from --clients / --split); split: "iid" / "label_sorted" /
            "dirichlet" of the adaptation training data, or same_data=True: every client holds
            all of it.
        cohort: clients per round (default all), uniform without replacement (``key(1)``).
        rank, alpha, frozen, init_std: the adapters' (``fedkern.lora.wrap``).
        lr: the clients' GD step (default 0.5); steps: local full-batch GD steps per round
            (default 10).
        seed: keys the frozen factors, the split and the cohorts.

    History: the task's metrics, "floats_up" / "floats_down" (per participating client: the free
    factors, r (m or n) per layer) and "floats_dense" (m n per layer: what sending the merged
    update would cost).
    """

    name = "fedraclora"
    problems = ("lora_transfer",)
    state_attrs = ("model",)
    config_attrs = ("rank", "alpha", "frozen", "lr", "steps", "n_clients", "cohort_size", "split",
                    "same_data", "init_std")  # fmt: skip
    cli_options = {"rank": OPT_RANK, "lr": OPT_LR, "steps": OPT_STEPS, "frozen": OPT_FROZEN,
                   "cohort": {"flag": "--cohort", "type": int,
                              "help": "clients per round (default all)"}}  # fmt: skip

    def __init__(self, task, *, clients: int | None = None, split: str | None = None,
                 same_data: bool = False,
                 cohort: int | None = None, rank: int = 1, alpha: float = 1.0, frozen: str = "A",
                 init_std: float | None = None, lr: float = 0.5, steps: int = 10,
                 seed: int = 0, diverge_factor: float = 1e8):  # fmt: skip
        if not isinstance(task, TransferTask):
            raise TypeError(f"task must be a TransferTask, got {type(task).__name__}")
        super().__init__(seed=seed, diverge_factor=diverge_factor)
        self.task = task
        fed = getattr(task, "federation", {})
        clients = fed.get("clients", 10) if clients is None else clients
        split = fed.get("split", "iid") if split is None else split
        self.n_clients = val.integer("clients", clients, 1, task.train.numel())
        self.cohort_size = val.integer("cohort", self.n_clients if cohort is None else cohort, 1,
                                       self.n_clients)  # fmt: skip
        self.split, self.same_data = split, val.boolean("same_data", same_data)
        self.rank, self.alpha, self.frozen, self.init_std = rank, alpha, frozen, init_std
        self.lr = val.positive("lr", lr)
        self.steps = val.integer("steps", steps, 1)
        self.model = L.wrap(task.model(), rank, alpha, mode="rac", frozen=frozen, seed=self.seed,
                            init_std=init_std)  # fmt: skip
        self.parts = task.client_parts(self.n_clients, split, seed=self.seed, same=same_data)
        self.floats_dense = sum(layer.m * layer.n for layer in L.lora_layers(self.model))
        self._start = None
        self._record(0)
        self._start = self.history[task.metric][0]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["attrs"] = copy.deepcopy(state["attrs"])
        return state

    def _record(self, floats: int) -> None:
        self.record(**self.task.evaluate(self.model), floats_up=floats, floats_down=floats,
                    floats_dense=self.floats_dense)  # fmt: skip

    def diverged(self) -> bool:
        return not math.isfinite(self.history["loss"][-1])

    def step(self) -> None:
        from fedkern.clients import ModuleClients

        view = _FreeView(self.model)
        inputs = self.task.x[self.task.train]
        targets = self.task.targets[self.task.train]

        def loss(out, tgt):
            return nn.functional.cross_entropy(out, tgt, reduction="none")

        mc = ModuleClients(view, loss, inputs, targets, self.parts)
        S = self.cohort(self.n_clients, self.cohort_size, SLOT_COHORT)
        X = torch.zeros(S.numel(), mc.P)
        mc.local_steps_(X, gamma=self.lr, steps=self.steps, clients=S)
        mean = X.double().mean(0).float()
        with torch.no_grad():
            for (key, full), part in zip(view.names, mean.split(mc.sizes), strict=True):
                self.model.get_parameter(full).copy_(part.view(getattr(view, key).shape))
        L.merge_all_(self.model)
        self.rounds += 1
        self._record(mc.P)
