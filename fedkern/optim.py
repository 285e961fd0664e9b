"""Memory-efficient optimizers: ``MicroAdam``.

MicroAdam (Modoranu et al., 2405.15593; ALGORITHMS.md section 10) keeps, per parameter tensor, a
4-bit error-feedback buffer and a ring window of the last m sparse gradients (block-local int16
indices, bfloat16 values) instead of Adam's two dense moments, and rebuilds both moments from the
window at every step. At the defaults (m = 10, density 1%, block 4096, bucket 256) the state is
about 0.93 bytes per parameter; torch's AdamW keeps 8.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

import torch

from fedkern.ops import microadam as ops
from fedkern.reference import microadam as ref

Tensor = torch.Tensor
MICRO_KEYS = ops.STATE
DENSE_KEYS = ("exp_avg", "exp_avg_sq")


def _real(name: str, x) -> float:
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def keep_count(density: float, block_size: int) -> int:
    """K, the entries kept per block: ceil(density * block_size), at least 1."""
    return min(block_size, max(1, math.ceil(round(density * block_size, 9))))


def microadam_bytes(numel: int, m: int, density: float, block_size: int, quant_bucket: int) -> int:
    """Bytes of MicroAdam state a tensor of ``numel`` elements needs (all state tensors)."""
    k = keep_count(density, block_size)
    shapes = ref.state_shapes(numel, block_size, k, quant_bucket, m)
    return sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in shapes.values())


class MicroAdam(torch.optim.Optimizer):
    """MicroAdam: Adam with a compressed, error-corrected gradient window (under 1 byte/param).

    Each step, per parameter tensor (flattened, cut into blocks of ``block_size`` elements):
    a = grad + dequantized error feedback; the top ``K = ceil(density * block_size)`` entries of
    |a| in every block (ties to the lower index) go into row (t-1) mod m of the window; the rest
    of a is quantized back to 4 bits per element (per ``quant_bucket`` elements: min and step,
    float32) as the new error feedback; both Adam moments are rebuilt from the window (weights
    (1 - beta) * beta^age) and the parameter takes a bias-corrected AdamW step with decoupled weight
    decay. Entries outside the window only decay. Exact numerics: ``fedkern.reference.microadam``.

    Args:
        params: iterable of tensors or of param-group dicts (every option below may be set per
            group). Parameters must be float32 or bfloat16 (no master copy is kept for bfloat16:
            the update is computed in float32 and rounded once), on CPU or any CUDA device.
        lr: learning rate, >= 0 (a Python number; LR schedulers work as with any optimizer).
        betas: (beta1, beta2), each in [0, 1).
        eps: > 0, added to the denominator.
        weight_decay: >= 0, decoupled (AdamW-style): p *= 1 - lr * weight_decay every step.
        m: window length (gradients remembered), >= 1.
        density: fraction of each block kept per step, in (0, 1].
        block_size: elements per selection block, a power of two in [64, 32768]. Fixed, not tuned
            to the GPU, so that checkpoints move between machines.
        quant_bucket: elements sharing one (min, step) pair of the 4-bit error feedback, a power of
            two in [2, block_size].
        maximize: must be False (not supported).

    State per parameter (``optimizer.state[p]``): ``step`` (int) and either the MicroAdam tensors
    ``ef`` uint8 [nb*block_size/2], ``ef_min`` / ``ef_scale`` float32 [nb*block_size/quant_bucket],
    ``idx`` int16 [m, nb*K], ``val`` bfloat16 [m, nb*K] (nb = ceil(numel / block_size)), or, for a
    tensor small enough that this would take more bytes than AdamW's two float32 moments (8 bytes
    per element; under about 480 elements at the defaults), dense AdamW state ``exp_avg`` /
    ``exp_avg_sq`` (float32, the parameter's shape). All state lives on the parameter's device.

    ``step(closure=None)``: parameters whose ``grad`` is None are skipped (their step count does
    not advance). Gradients are read, never modified. All groups are validated before any
    parameter or state changes: sparse or complex gradients, a gradient of another shape, dtype
    or device, and out-of-range hyperparameters raise TypeError/ValueError. On CPU the step runs in
    the C++ core (OpenMP over blocks), on CUDA in two Triton launches per device and dtype for all
    tensors (one CUDA C++ launch under ``fedkern.backend("cuda")``, not yet the default: it has
    not run on a GPU), elsewhere (or under ``fedkern.backend("reference")``) in plain PyTorch.

    ``state_dict()`` / ``load_state_dict()`` round-trip the state exactly, with the integer and
    bfloat16 state dtypes preserved (torch's default load would cast them to the parameter's
    dtype); a resumed run continues bit for bit as an uninterrupted one on the same backend.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        m: int = 10,
        density: float = 0.01,
        block_size: int = 4096,
        quant_bucket: int = 256,
        maximize: bool = False,
    ) -> None:
        if maximize is not False:
            raise ValueError("maximize must be False: MicroAdam only minimizes")
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "m": m,
            "density": density, "block_size": block_size, "quant_bucket": quant_bucket,
        }  # fmt: skip
        self._check_group(defaults, "defaults")
        super().__init__(params, defaults)

    # ---- validation ------------------------------------------------------------------------
    @staticmethod
    def _check_group(group: dict, where: str) -> dict:
        """Validated hyperparameters of one group (raises, naming the option, when bad)."""
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats ({where}), got {betas!r}")
        try:
            lr, b1, b2, eps, wd = ops.check_hyper(
                _real("lr", group["lr"]), _real("betas[0]", betas[0]),
                _real("betas[1]", betas[1]), _real("eps", group["eps"]),
                _real("weight_decay", group["weight_decay"]),
            )  # fmt: skip
            density = _real("density", group["density"])
            if not (0.0 < density <= 1.0):
                raise ValueError(f"density must be in (0, 1], got {density}")
            block, _, bucket, m = ops.check_config(
                group["block_size"], 1, group["quant_bucket"], group["m"]
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} ({where})") from None
        k = keep_count(density, block)
        return {
            "lr": lr, "betas": (b1, b2), "eps": eps, "weight_decay": wd, "m": m,
            "density": density, "block_size": block, "k": k, "quant_bucket": bucket,
        }  # fmt: skip

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; also checks the group's options and that
        its parameters are real float32/bfloat16 tensors."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        try:
            self._check_group(group, where)
            for i, p in enumerate(group["params"]):
                if p.is_complex():
                    raise TypeError(f"params[{i}] is complex ({where}); MicroAdam needs real ones")
                if p.dtype not in (torch.float32, torch.bfloat16):
                    raise TypeError(f"params[{i}] must be float32 or bfloat16 ({where}), "
                                    f"got {p.dtype}")  # fmt: skip
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _plan(self, gi: int, group: dict) -> dict:
        """Everything one group's step needs, checked; nothing is modified."""
        where = f"param group {gi}"
        hp = self._check_group(group, where)
        micro, dense = [], []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            name = f"params[{i}].grad ({where})"
            if g.is_sparse or g.layout != torch.strided:
                raise TypeError(f"{name} is sparse; MicroAdam does not support sparse gradients")
            if p.is_complex() or g.is_complex():
                raise TypeError(f"{name}: complex parameters are not supported")
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"params[{i}] must be float32 or bfloat16 ({where}), got {p.dtype}")
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise ValueError(
                    f"{name} must match its parameter (dtype {p.dtype}, shape {tuple(p.shape)}, "
                    f"device {p.device}), got {g.dtype}, {tuple(g.shape)}, {g.device}"
                )
            if p.numel() == 0:
                continue
            st = self.state.get(p, {})
            use_dense = self._is_dense(p, st, hp)
            self._check_state(p, st, hp, use_dense, f"state of params[{i}] ({where})")
            (dense if use_dense else micro).append(p)
        return {"hp": hp, "micro": micro, "dense": dense}

    @staticmethod
    def _is_dense(p: Tensor, st: dict, hp: dict) -> bool:
        if st:
            return "exp_avg" in st
        n = p.numel()
        return 8 * n <= microadam_bytes(
            n, hp["m"], hp["density"], hp["block_size"], hp["quant_bucket"]
        )

    @staticmethod
    def _check_state(p: Tensor, st: dict, hp: dict, use_dense: bool, where: str) -> None:
        if not st:
            return
        if use_dense:
            want = {key: (tuple(p.shape), torch.float32) for key in DENSE_KEYS}
        else:
            want = ref.state_shapes(
                p.numel(), hp["block_size"], hp["k"], hp["quant_bucket"], hp["m"]
            )
        for key, (shape, dtype) in want.items():
            t = st.get(key)
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                got = "missing" if not isinstance(t, Tensor) else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(
                    f"{where}: {key} must be {dtype} {tuple(shape)} for the group's m, density, "
                    f"block_size and quant_bucket (they cannot change after the first step), "
                    f"got {got}"
                )
        step = st.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: step must be an int >= 0, got {step!r}")

    # ---- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimization step over every parameter with a gradient; returns closure's loss.

        closure: optional callable that re-evaluates the model and returns the loss (run with
        gradients enabled). Parameters are updated in place; gradients are left untouched.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(gi, group) for gi, group in enumerate(self.param_groups)]
        for plan in plans:
            self._step_micro(plan["hp"], plan["micro"])
            self._step_dense(plan["hp"], plan["dense"])
        return loss

    def _step_micro(self, hp: dict, params: list[Tensor]) -> None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for device, ps in by_device.items():
            states = []
            for p in ps:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st.update(ref.new_state(p.numel(), hp["block_size"], hp["k"],
                                            hp["quant_bucket"], hp["m"], device))  # fmt: skip
                states.append(st)
            work = [p if p.is_contiguous() else p.contiguous() for p in ps]
            ops.microadam_step_(
                work, [p.grad for p in ps], states, [st["step"] + 1 for st in states],
                lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                block_size=hp["block_size"], k=hp["k"], quant_bucket=hp["quant_bucket"],
            )  # fmt: skip
            for p, w, st in zip(ps, work, states, strict=True):
                st["step"] += 1
                if w is not p:
                    p.copy_(w)

    def _step_dense(self, hp: dict, params: list[Tensor]) -> None:
        """AdamW for the tensors too small for MicroAdam's state to pay off (float32 moments)."""
        b1, b2 = hp["betas"]
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = 0
                for key in DENSE_KEYS:
                    st[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            st["step"] += 1
            t = st["step"]
            g = p.grad.to(torch.float32)
            st["exp_avg"].mul_(b1).add_(g, alpha=1.0 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
            pf = p.to(torch.float32)
            pf.mul_(1.0 - hp["lr"] * hp["weight_decay"])
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1.0 - b2**t)).add_(hp["eps"])
            pf.addcdiv_(st["exp_avg"], denom, value=-hp["lr"] / (1.0 - b1**t))
            p.copy_(pf)

    # ---- checkpoints -----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state tensor keeps its saved
        dtype (uint8, int16, bfloat16, float32) and moves to its parameter's device; the state
        is checked against the loaded groups' options."""
        saved = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
        keep = {
            key: {name: t for name, t in s.items() if isinstance(t, Tensor)}
            for key, s in saved.items()
            if isinstance(s, dict)
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for key, tensors in keep.items():
            p = params[key]
            for name, t in tensors.items():
                self.state[p][name] = t.to(device=p.device, copy=True)
        for gi, group in enumerate(self.param_groups):
            hp = self._check_group(group, f"param group {gi}")
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if st:
                    where = f"loaded state of params[{i}] (param group {gi})"
                    self._check_state(p, st, hp, "exp_avg" in st, where)

    def state_bytes(self) -> int:
        """Bytes held by all state tensors of all parameters."""
        return sum(
            t.numel() * t.element_size()
            for st in self.state.values()
            for t in st.values()
            if isinstance(t, Tensor)
        )
