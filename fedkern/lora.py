"""RAC-LoRA: chains of low-rank adapters with one random frozen factor, merged into the weights.

An adapted linear layer computes y = x W^T + b + (alpha / r) x A^T B^T with W [m, n] (out x in),
B [m, r], A [r, n]: the effective weight is W + (alpha / r) B A. ``RACLoRALinear`` trains it as a
chain of links. In each link one factor is random and frozen -- Gaussian, regenerated from
(seed, link) by ``fedkern.random.gaussian`` wherever it is needed (forward, backward, merge), never
stored as a parameter or saved for backward -- and the other starts at zero and is trained (any
optimizer, ``free_parameters``). ``merge_()`` folds (alpha / r) B A into W with one fused op
(``fedkern.ops.lora``: no [m, n] temporary, the frozen factor generated in the kernel) and starts
the next link with a fresh frozen factor. Which factor is frozen: "A" (train B), "B" (train A) or
"coin" (a fair coin per link, from (seed, link)).

The paper's baselines are modes of the same class:
  "rac"    RAC-LoRA: the frozen factor is redrawn at every merge;
  "asymm"  AsymmLoRA: one random frozen factor, never redrawn (merging changes nothing: the reach
           stays W0 + span of that factor);
  "cola"   Chain of LoRA: both factors trained (A random, B zero at the start of each link),
           merged and re-initialised;
  "lora"   LoRA: both trained, never merged (``merge_`` is a no-op).

The exact step the theory covers (the tests' ground truth) is ``projected_step``: with B frozen,
W - gamma B (B^T B)^+ B^T grad f(W); with A frozen, W - gamma grad f(W) A^T (A A^T)^+ A. One plain
gradient step of the zero free factor followed by a merge equals it only with the (B^T B)^+
(resp. (A A^T)^+) preconditioning of the free factor's gradient (divided by (alpha / r)^2):
``precondition=True`` installs it as a gradient hook, and then plain SGD with lr gamma on the free
factor runs exact projected steps.

``wrap(model, r, alpha, target_modules=...)`` replaces named ``nn.Linear`` layers of any model
(peft-style names), ``merge_all_(model)`` merges them all, and the model's ``state_dict`` carries
each layer's link counter and current side (extra state), so a chain resumes exactly.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from fedkern import sampling
from fedkern import validation as v
from fedkern.ops import lora as ops
from fedkern.random import client_seed, gaussian

__all__ = [
    "MODES",
    "RACLoRALinear",
    "free_parameters",
    "lora_layers",
    "merge_all_",
    "projected_step",
    "wrap",
]

MODES = ("rac", "asymm", "cola", "lora")
FROZEN = ("A", "B", "coin")
Tensor = torch.Tensor


class _FrozenLinear(torch.autograd.Function):
    """F.linear(inp, G) with G = std * gaussian(shape, seed, step) regenerated in backward (G has
    no gradient and is never saved: only its key is)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(inp, shape, seed, step, std):
        G = gaussian(shape, seed=seed, step=step, std=std, dtype=inp.dtype, device=inp.device)
        return nn.functional.linear(inp, G)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.shape, ctx.seed, ctx.step, ctx.std = inputs

    @staticmethod
    def backward(ctx, grad_out):
        G = gaussian(ctx.shape, seed=ctx.seed, step=ctx.step, std=ctx.std, dtype=grad_out.dtype,
                     device=grad_out.device)  # fmt: skip
        return grad_out @ G, None, None, None, None


def frozen_linear(inp: Tensor, shape, *, seed: int, step: int, std: float) -> Tensor:
    """inp @ G^T for the generated G = std * gaussian(shape, seed, step) ([out, in]), with G
    regenerated in backward rather than saved. inp [..., in] float32/float64."""
    return _FrozenLinear.apply(inp, tuple(shape), seed, step, std)


class RACLoRALinear(nn.Module):
    """A linear layer adapted by a chain of rank-r adapters (see the module docstring).

    Args:
        base: the ``nn.Linear`` to adapt (float32 or float64 weight [m, n] = [out, in]). Its weight
            receives the merges in place; its parameters are frozen (requires_grad False).
        r: the rank, 1 <= r <= min(m, n).
        alpha: a finite float; the adapter is scaled by alpha / r.
        mode: "rac" (default), "asymm", "cola" or "lora".
        frozen: which factor is random and frozen in "rac" / "asymm": "A" (default; B is trained,
            starting at zero), "B" (A is trained) or "coin" (a fair coin per link; for "asymm",
            the coin of link 0). Ignored by "cola" / "lora", which train both.
        seed: int in [0, 2**63): the frozen factors are ``gaussian`` draws at (seed, link) ("asymm":
            link 0 always), and so is the random A at the start of a "cola" / "lora" link.
        init_std: the standard deviation of the random factor: default 1 / sqrt(n) for A [r, n]
            and 1 / sqrt(m) for B [m, r] (so A A^T or B^T B is near the identity for r << n, m and
            a plain step of the free factor is near the projected step); the paper's experiments
            use 1.
        precondition: "rac" / "asymm" only: the free factor's gradient is multiplied by the
            pseudo-inverse Gram of the frozen factor over (alpha / r)^2 (a hook), making a plain
            SGD step an exact ``projected_step``.

    Attributes:
        link: the current link (merges so far); side: the frozen factor of this link ("A", "B",
        or None in "cola" / "lora"); lora_A [r, n] / lora_B [m, r]: the trained factor(s), as
        parameters (a frozen factor is not a parameter).

    The free factor is a new Parameter when a "coin" link changes the side: build the optimizer
    over ``free_parameters`` again after ``merge_`` (a fresh optimizer per link is also what the
    theory assumes; with a fixed side the parameter object is reused, zeroed in place).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float = 1.0, *, mode: str = "rac",
                 frozen: str = "A", seed: int = 0, init_std: float | None = None,
                 precondition: bool = False):  # fmt: skip
        super().__init__()
        settings = _check_settings(base, r, alpha, mode, frozen, seed, init_std, precondition)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.m, self.n = base.weight.shape
        self.r, self.alpha, self.mode, self.frozen, self.seed = settings[:5]
        self.init_std, self.precondition = settings[5:]
        self.scaling = self.alpha / self.r
        self.link = 0
        self.side: str | None = None
        self._start_link()

    # ---- the chain -------------------------------------------------------------------------------

    def std_for(self, side: str) -> float:
        """The standard deviation of a random factor on ``side``."""
        if self.init_std is not None:
            return self.init_std
        return 1.0 / math.sqrt(self.n if side == "A" else self.m)

    def draw_step(self) -> int:
        """The ``gaussian`` step of this link's random factor ("asymm": always 0)."""
        return 0 if self.mode == "asymm" else self.link

    def _side_of_link(self) -> str | None:
        if self.mode in ("cola", "lora"):
            return None
        if self.frozen != "coin":
            return self.frozen
        return "A" if sampling.coin(0.5, seed=self.seed, step=self.draw_step()) else "B"

    def frozen_factor(self) -> Tensor:
        """This link's frozen factor, generated (A [r, n] or B [m, r]) in the weight's dtype."""
        if self.side is None:
            raise RuntimeError(f"mode {self.mode!r} has no frozen factor")
        shape = (self.r, self.n) if self.side == "A" else (self.m, self.r)
        return gaussian(shape, seed=self.seed, step=self.draw_step(), std=self.std_for(self.side),
                        dtype=self.base.weight.dtype, device=self.base.weight.device)  # fmt: skip

    def _param(self, name: str, value: Tensor) -> None:
        """Set factor ``name`` to ``value``: in place when the parameter exists with that shape."""
        cur = getattr(self, name, None)
        if isinstance(cur, nn.Parameter) and cur.shape == value.shape:
            with torch.no_grad():
                cur.copy_(value)
            return
        if name in self._parameters:
            del self._parameters[name]
        p = nn.Parameter(value.clone())
        self.register_parameter(name, p)
        if self.precondition:
            p.register_hook(lambda grad, name=name: self._precondition(grad, name))

    def _drop(self, name: str) -> None:
        if name in self._parameters:
            del self._parameters[name]

    def _start_link(self) -> None:
        """Draw the side and (re)initialise the trained factor(s) of the current link."""
        w = self.base.weight
        self.side = self._side_of_link()
        zeros_B = torch.zeros(self.m, self.r, dtype=w.dtype, device=w.device)
        zeros_A = torch.zeros(self.r, self.n, dtype=w.dtype, device=w.device)
        if self.side == "A":
            self._drop("lora_A")
            self._param("lora_B", zeros_B)
        elif self.side == "B":
            self._drop("lora_B")
            self._param("lora_A", zeros_A)
        else:
            A = gaussian((self.r, self.n), seed=self.seed, step=self.link, std=self.std_for("A"),
                         dtype=w.dtype, device=w.device)  # fmt: skip
            self._param("lora_A", A)
            self._param("lora_B", zeros_B)

    def _precondition(self, grad: Tensor, name: str) -> Tensor:
        """grad (B^T B)^+ ... : the free factor's gradient turned into the projected step."""
        F = self.frozen_factor().to(grad.dtype)
        if name == "lora_B":  # A frozen [r, n]: grad_B (A A^T)^+
            return grad @ torch.linalg.pinv(F @ F.T) / self.scaling**2
        return torch.linalg.pinv(F.T @ F) @ grad / self.scaling**2  # B frozen [m, r]

    @torch.no_grad()
    def merge_(self) -> bool:
        """Fold (alpha / r) B A into the weight (one fused op) and start the next link.

        Returns False (and changes nothing) in mode "lora", which never merges.
        """
        if self.mode == "lora":
            return False
        W = self.base.weight
        seed, step = self.seed, self.draw_step()
        if self.side == "A":
            ops.lora_merge_(W, self.lora_B.detach(), None, seed, step, self.std_for("A"),
                            self.scaling)  # fmt: skip
        elif self.side == "B":
            ops.lora_merge_(W, None, self.lora_A.detach(), seed, step, self.std_for("B"),
                            self.scaling)  # fmt: skip
        else:
            ops.lora_merge_(W, self.lora_B.detach(), self.lora_A.detach(), 0, 0, 1.0,
                            self.scaling)  # fmt: skip
        self.link += 1
        self._start_link()
        return True

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A as a new tensor (the layer's effective weight); nothing changes."""
        W = self.base.weight.detach().clone()
        B = self.lora_B.detach() if "lora_B" in self._parameters else None
        A = self.lora_A.detach() if "lora_A" in self._parameters else None
        std = self.std_for(self.side) if self.side else 1.0
        ops.lora_merge_(W, B, A, self.seed, self.draw_step(), std, self.scaling)
        return W

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        s = self.scaling
        if self.side == "A":
            u = frozen_linear(x, (self.r, self.n), seed=self.seed, step=self.draw_step(),
                              std=self.std_for("A"))  # fmt: skip
            return y + s * nn.functional.linear(u, self.lora_B)
        if self.side == "B":
            u = nn.functional.linear(x, self.lora_A)
            return y + s * frozen_linear(u, (self.m, self.r), seed=self.seed,
                                         step=self.draw_step(), std=self.std_for("B"))  # fmt: skip
        return y + s * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)

    def free_parameters(self) -> list[nn.Parameter]:
        """The trained factor(s) of the current link."""
        return [self._parameters[k] for k in ("lora_A", "lora_B") if k in self._parameters]

    # ---- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"link": self.link, "side": self.side, "mode": self.mode, "frozen": self.frozen,
                "seed": self.seed, "r": self.r, "alpha": self.alpha, "init_std": self.init_std,
                "precondition": self.precondition}  # fmt: skip

    def set_extra_state(self, state: dict) -> None:
        for key in ("mode", "frozen", "seed", "r", "alpha", "init_std", "precondition"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state was saved with {key} = {state.get(key)!r}; this layer "
                                 f"has {key} = {getattr(self, key)!r}")  # fmt: skip
        link = v.integer("link", state["link"], 0)
        if link != self.link or state["side"] != self.side:
            self.link = link
            self._start_link()
            if self.side != state["side"]:
                raise ValueError(f"state's side {state['side']!r} is not link {link}'s")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "_extra_state"
        if key in state_dict:  # first: the link decides which factor is a parameter, and its shape
            self.set_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"m={self.m}, n={self.n}, r={self.r}, alpha={self.alpha:g}, mode={self.mode!r}, "
                f"frozen={self.frozen!r}, link={self.link}, side={self.side!r}")  # fmt: skip


def _check_settings(base, r, alpha, mode, frozen, seed, init_std, precondition):
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
    if base.weight.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"base's weight must be float32 or float64, got {base.weight.dtype}")
    m, n = base.weight.shape
    r = v.integer("r", r, 1, min(m, n))
    alpha = v.finite("alpha", alpha)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if frozen not in FROZEN:
        raise ValueError(f"frozen must be one of {', '.join(map(repr, FROZEN))}, got {frozen!r}")
    seed = v.integer("seed", seed, 0, (1 << 63) - 1)
    if init_std is not None:
        init_std = v.positive("init_std", init_std)
    precondition = v.boolean("precondition", precondition)
    if precondition and mode not in ("rac", "asymm"):
        raise ValueError(f"precondition needs a frozen factor (mode 'rac' or 'asymm'), got "
                         f"mode {mode!r}")  # fmt: skip
    return r, alpha, mode, frozen, seed, init_std, precondition


def _matches(name: str, targets) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def wrap(model: nn.Module, r: int, alpha: float = 1.0, target_modules=None, *, mode: str = "rac",
         frozen: str = "A", seed: int = 0, init_std: float | None = None,
         precondition: bool = False) -> nn.Module:  # fmt: skip
    """Replace the named ``nn.Linear`` layers of ``model`` by ``RACLoRALinear`` adapters, in place.

    Args:
        model: any module.
        r, alpha, mode, frozen, init_std, precondition: as in ``RACLoRALinear`` (per layer).
        target_modules: which layers: None (every ``nn.Linear``), a list of names (a module matches
            when its qualified name equals an entry or ends with "." + entry, as in peft), or a
            string: a regular expression the whole qualified name must match.
        seed: int; layer i (in ``named_modules`` order among the targets) gets the seed
            ``fedkern.random.client_seed(seed, i)``, so its frozen factors are its own.

    Returns:
        ``model``, with every other parameter frozen (requires_grad False): only the adapters'
        free factors train (``free_parameters(model)``).

    Raises:
        TypeError when a named target is not an ``nn.Linear`` (or is already wrapped),
        ValueError when nothing matches or a setting is invalid (r > min(m, n), ...); nothing is
        modified then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError("target_modules must be None, a regex string or a list of names")
    seed = v.integer("seed", seed, 0, (1 << 63) - 1)
    found = []
    adapted = [n for n, mod in model.named_modules() if isinstance(mod, RACLoRALinear)]
    for name, mod in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if any(name == a or name.startswith(a + ".") for a in adapted):
            if target_modules is None:
                continue  # already adapted: left as it is
            raise TypeError(f"target {name!r} is already adapted")
        if isinstance(mod, nn.Linear):
            found.append((name, mod))
        elif target_modules is not None:
            raise TypeError(f"target {name!r} is a {type(mod).__name__}, not an nn.Linear")
    if not found:
        raise ValueError(f"no nn.Linear of the model matches target_modules={target_modules!r}")
    for i, (_, mod) in enumerate(found):  # every setting checked before anything changes
        _check_settings(mod, r, alpha, mode, frozen, client_seed(seed, i), init_std, precondition)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, (name, mod) in enumerate(found):
        parent, attr = _parent(model, name)
        layer = RACLoRALinear(mod, r, alpha, mode=mode, frozen=frozen, seed=client_seed(seed, i),
                              init_std=init_std, precondition=precondition)  # fmt: skip
        setattr(parent, attr, layer)
    return model


def _parent(model: nn.Module, name: str):
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def lora_layers(model: nn.Module) -> list[RACLoRALinear]:
    """The ``RACLoRALinear`` layers of a model, in ``modules`` order."""
    return [m for m in model.modules() if isinstance(m, RACLoRALinear)]


def merge_all_(model: nn.Module) -> int:
    """``merge_()`` every adapter of the model (starting its next link); returns how many merged."""
    return sum(layer.merge_() for layer in lora_layers(model))


def free_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained factors of every adapter's current link (what the optimizer steps)."""
    return [p for layer in lora_layers(model) for p in layer.free_parameters()]


def projected_step(W: Tensor, grad: Tensor, factor: Tensor, *, side: str, gamma: float) -> Tensor:
    """The exact RAC-LoRA step W - gamma * H grad, a random rank-r projection of gradient descent.

    Args:
        W: [m, n] the current weight; grad: [m, n] the gradient of f at W (same dtype; float64
            for exact tests).
        factor: the frozen factor: B [m, r] with side "B", A [r, n] with side "A".
        side: "B": W - gamma B (B^T B)^+ B^T grad (the column space of B);
              "A": W - gamma grad A^T (A A^T)^+ A (the row space of A).
        gamma: the step size, a finite float.

    Returns:
        A new [m, n] tensor (pseudo-inverses by ``torch.linalg.pinv``).
    """
    v.tensor("W", W)
    v.tensor("grad", grad)
    v.tensor("factor", factor)
    if W.dim() != 2 or grad.shape != W.shape:
        raise ValueError(f"W and grad must be [m, n] of one shape, got {list(W.shape)} and "
                         f"{list(grad.shape)}")  # fmt: skip
    gamma = v.finite("gamma", gamma)
    m, n = W.shape
    if side == "B":
        if factor.dim() != 2 or factor.shape[0] != m:
            raise ValueError(f"side 'B' needs factor B [m = {m}, r], got {list(factor.shape)}")
        B = factor.to(W.dtype)
        return W - gamma * (B @ torch.linalg.pinv(B.T @ B) @ (B.T @ grad))
    if side == "A":
        if factor.dim() != 2 or factor.shape[1] != n:
            raise ValueError(f"side 'A' needs factor A [r, n = {n}], got {list(factor.shape)}")
        A = factor.to(W.dtype)
        return W - gamma * ((grad @ A.T) @ torch.linalg.pinv(A @ A.T) @ A)
    raise ValueError(f"side must be 'A' or 'B', got {side!r}")
