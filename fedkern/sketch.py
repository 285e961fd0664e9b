"""Random sketches for MAST (model-agnostic sparsified training): w = v + S (x - v), x -= gamma S g.

A sketch S of R^d is a random diagonal matrix with E[S] = I, drawn as a pure function of
(seed, step, node) -- regenerated where it is used, never stored or sent (a node is told the seed):

- ``Bernoulli(p)``: keeps coordinate j with probability p_j (a scalar or one per coordinate) and
  scales it by 1/p_j (weight-level DropConnect). The keep test compares a 24-bit Philox word with
  T_j = ceil(p_j 2^24), so P(keep) = T_j / 2^24 exactly and the scale is 2^24 / T_j: unbiased up to
  the fp32 rounding of that scale. Node i's mask is ``fedkern.random.bernoulli`` at
  (client_seed(seed, i), step).
- ``RandK(k)``: keeps k coordinates uniformly without replacement, scaled by d/k. Node i's set is
  the image of 0..k-1 under a keyed Feistel permutation of [0, d) (rand-k's, in its own stream).
- ``Partition(nodes)``: one keyed permutation of [0, d) per step shared by all nodes, cut into
  ``nodes`` contiguous blocks of positions; node i keeps its block (disjoint supports that cover
  [0, d)), scaled by d / |block_i| (= nodes when nodes divides d): independent subnetwork training.

Constants (``L_D(d)``, ``L_S_max(d)``): L_D = lambda_max(E[S^T S]) (1/p_min; d/k; d/|block|_min)
and L_S^max = sup lambda_max(S^T S) (1/p_min^2; (d/k)^2; (d/|block|_min)^2); f_D(x) = E f(v + S(x -
v)) is L_f L_D smooth and double-sketched SGD takes gamma <= 1 / (L_f L_S^max).

Ops (fused, on every backend; ``fedkern.ops.sketch``): ``apply(sketch, x, v=None, *, seed, step,
node)`` and ``grad_step_(sketch, x, g, gamma, *, seed, step, node)``, also over a tensor of node ids
(one row per node). Rand-K and partition read and write only the kept coordinates (O(k) work; apply
also writes its dense output), Bernoulli draws one word per coordinate and reads x, g only where
kept. The same (seed, step, node) gives the same mask and bits on the reference, C++ and Triton.
"""

from __future__ import annotations

import abc
import functools

import numpy as np
import torch

from fedkern import validation as val
from fedkern.ops import sketch as ops
from fedkern.random import (
    STREAM_BERNOULLI,
    STREAM_PARTITION,
    STREAM_SKETCH,
    client_seed,
    client_seeds,
    draw_key,
    draw_keys_tensor,
    feistel_keys,
    randk_keys_tensor,
)
from fedkern.reference import random as rnd

__all__ = [
    "Bernoulli",
    "MASTWrapper",
    "Partition",
    "RandK",
    "Sketch",
    "apply",
    "grad_step_",
    "sketched",
]

Tensor = torch.Tensor
_MAX_SEED = (1 << 63) - 1


def _nodes(node) -> tuple[Tensor, bool]:
    """(int64 CPU tensor of node ids, batched?) from an int or a 1-D tensor / sequence of ints."""
    if isinstance(node, bool):
        raise TypeError("node must be an int or a 1-D tensor of ints, got bool")
    if isinstance(node, int | np.integer):
        return torch.tensor([val.integer("node", node, 0, _MAX_SEED)]), False
    t = torch.as_tensor(node)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1 or t.numel() < 1:
        raise TypeError("node must be an int or a non-empty 1-D tensor of int ids")
    t = t.to(torch.int64).cpu()
    if int(t.min()) < 0:
        raise ValueError("node ids must be >= 0")
    return t, True


#: Node batches up to this size derive their keys with the scalar Philox (cached), larger ones with
#: the vectorized form: a sketch's apply and grad_step_ of one step share the derivation.
_SCALAR_NODES = 16


@functools.lru_cache(maxsize=256)
def _scalar_keys(stream: int, seed: int, step: int, nodes: tuple, feistel: bool) -> tuple:
    out = []
    for n in nodes:
        cs = client_seed(seed, n)
        out.append(feistel_keys(cs, step, stream=stream) if feistel else
                   draw_key(cs, step, stream=stream))  # fmt: skip
    return tuple(out)


def node_keys(stream: int, seed: int, step: int, nodes: Tensor, *, feistel: bool) -> Tensor:
    """int64 [R, 8] Feistel round keys (``feistel``) or [R, 4] draw key words of the seeds
    client_seed(seed, node) at ``step``, one row per node."""
    if nodes.numel() <= _SCALAR_NODES:
        rows = _scalar_keys(stream, seed, step, tuple(nodes.tolist()), feistel)
        return torch.tensor(rows, dtype=torch.int64)
    seeds = client_seeds(seed, nodes)
    if feistel:
        return randk_keys_tensor(seeds, step, stream=stream)
    return draw_keys_tensor(seeds, step, stream=stream)


class Sketch(abc.ABC):
    """A random diagonal sketch of R^d with E[S] = I, a pure function of (seed, step, node)."""

    kind = "sketch"

    @abc.abstractmethod
    def check(self, d: int) -> None:
        """Raise ValueError when the sketch cannot act on R^d."""

    @abc.abstractmethod
    def keep_probabilities(self, d: int) -> Tensor:
        """float64 [d]: P(coordinate j is kept) (for a partition: by a given node)."""

    @abc.abstractmethod
    def _scales(self, d: int) -> Tensor:
        """float64 [d] (Bernoulli) or the per-node scales: the largest scale of coordinate j."""

    def L_D(self, d: int) -> float:
        """lambda_max(E[S^T S]): f_D is L_f L_D smooth."""
        self.check(d)
        return float((self._scales(d) ** 2 * self.keep_probabilities(d)).max())

    def L_S_max(self, d: int) -> float:
        """sup lambda_max(S^T S): the step size of double-sketched SGD is <= 1 / (L_f L_S^max)."""
        self.check(d)
        return float((self._scales(d) ** 2).max())

    @abc.abstractmethod
    def _apply(self, x, v_, d, seed, step, nodes): ...

    @abc.abstractmethod
    def _grad_step(self, x, g, gamma, d, seed, step, nodes): ...

    # ---- dense views (tests, exact objectives of small problems) --------------------------------

    def diagonal(self, d: int, *, seed: int, step: int = 0, node: int = 0) -> Tensor:
        """The diagonal of S as a float32 [d] tensor: the scale where kept, 0 elsewhere (the
        values ``apply`` multiplies by)."""
        ones = torch.ones(d)
        return apply(self, ones, seed=seed, step=step, node=node)

    def support(self, d: int, *, seed: int, step: int = 0, node: int = 0) -> Tensor:
        """Ascending int64 indices of the kept coordinates (what a node receives and returns)."""
        return torch.nonzero(self.diagonal(d, seed=seed, step=step, node=node)).flatten()

    # ---- checkpoints and comparison -------------------------------------------------------------

    def config(self) -> dict:
        return {"kind": self.kind}

    def state_dict(self) -> dict:
        """The configuration (a sketch has no state: its randomness is keyed by its arguments)."""
        return self.config()

    def load_state_dict(self, state: dict) -> None:
        if state != self.config():
            raise ValueError(f"state is of sketch {state!r}, not {self.config()!r}")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sketch):
            return NotImplemented
        a, b = self.config(), other.config()
        return a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if isinstance(a[k], Tensor) else a[k] == b[k] for k in a
        )

    def __hash__(self) -> int:
        return hash(self.kind)


class Bernoulli(Sketch):
    """Keep coordinate j with probability p_j, scaled by its inverse (DropConnect on weights).

    Args:
        p: a probability in (0, 1] (rounded to fp32), or a float tensor [d] of them (one per
            coordinate; converted to float32).
    """

    kind = "bernoulli"

    def __init__(self, p):
        if isinstance(p, Tensor):
            val.tensor("p", p)
            if p.dim() != 1 or p.numel() < 1:
                raise ValueError(f"p must be a float or a 1-D tensor [d], got {list(p.shape)}")
            p32 = p.detach().to(torch.float32).cpu().contiguous()
            if not bool(((p32 > 0) & (p32 <= 1)).all()):
                raise ValueError("p must hold probabilities in (0, 1]")
            self.p: float | Tensor = p32
        else:
            self.p = ops.probability32(p)

    def check(self, d: int) -> None:
        if isinstance(self.p, Tensor) and self.p.numel() != d:
            raise ValueError(f"Bernoulli's p has {self.p.numel()} entries; the vector has {d}")

    def keep_probabilities(self, d: int) -> Tensor:
        if isinstance(self.p, Tensor):
            return rnd.thresholds(self.p).double() / rnd.TWO24
        return torch.full((d,), rnd.threshold(self.p) / rnd.TWO24, dtype=torch.float64)

    def _scales(self, d):
        return 1.0 / self.keep_probabilities(d)

    def _keys(self, seed, step, nodes, device):
        return node_keys(STREAM_BERNOULLI, seed, step, nodes, feistel=False).to(device)

    def _p_args(self, device):
        if isinstance(self.p, Tensor):
            return 1.0, self.p.to(device)
        return self.p, None

    def _apply(self, x, v_, d, seed, step, nodes):
        p, pt = self._p_args(x.device)
        return ops.sketch_bern_apply(x, v_, self._keys(seed, step, nodes, x.device), p, pt)

    def _grad_step(self, x, g, gamma, d, seed, step, nodes):
        p, pt = self._p_args(x.device)
        ops.sketch_bern_grad_step_(x, g, self._keys(seed, step, nodes, x.device), p, pt, gamma)

    def config(self) -> dict:
        return {"kind": self.kind, "p": self.p.clone() if isinstance(self.p, Tensor) else self.p}

    def __repr__(self) -> str:
        p = f"tensor[{self.p.numel()}]" if isinstance(self.p, Tensor) else f"{self.p:g}"
        return f"Bernoulli(p={p})"


class RandK(Sketch):
    """Keep k coordinates uniformly without replacement, scaled by d/k.

    Args:
        k: the number kept, 1 <= k <= d (checked when the sketch meets a vector), or
        ratio: the kept fraction in (0, 1] instead (k = max(1, round(ratio * d)) per vector).
    """

    kind = "randk"

    def __init__(self, k: int | None = None, *, ratio: float | None = None):
        if (k is None) == (ratio is None):
            raise ValueError("give exactly one of k and ratio")
        self.k = None if k is None else val.integer("k", k, 1)
        self.ratio = None if ratio is None else val.probability("ratio", ratio)

    def k_for(self, d: int) -> int:
        """The k used on R^d."""
        if self.k is not None:
            return self.k
        return max(1, min(d, round(self.ratio * d)))

    def check(self, d: int) -> None:
        if self.k is not None and not 1 <= self.k <= d:
            raise ValueError(f"k must be in [1, d = {d}], got {self.k}")

    def keep_probabilities(self, d: int) -> Tensor:
        return torch.full((d,), self.k_for(d) / d, dtype=torch.float64)

    def _scales(self, d):
        return torch.full((d,), d / self.k_for(d), dtype=torch.float64)

    def _args(self, d, seed, step, nodes, device):
        k = self.k_for(d)
        keys = node_keys(STREAM_SKETCH, seed, step, nodes, feistel=True)
        ranges = torch.tensor([[0, k]], dtype=torch.int64).expand(len(nodes), 2)
        scale = torch.full((len(nodes),), float(np.float32(d / k)))
        return keys.to(device), ranges.contiguous().to(device), scale.to(device)

    def _apply(self, x, v_, d, seed, step, nodes):
        return ops.sketch_perm_apply(x, v_, *self._args(d, seed, step, nodes, x.device))

    def _grad_step(self, x, g, gamma, d, seed, step, nodes):
        ops.sketch_perm_grad_step_(x, g, *self._args(d, seed, step, nodes, x.device), gamma)

    def config(self) -> dict:
        return {"kind": self.kind, "k": self.k, "ratio": self.ratio}

    def __repr__(self) -> str:
        return f"RandK(k={self.k})" if self.k is not None else f"RandK(ratio={self.ratio:g})"


class Partition(Sketch):
    """Disjoint random blocks, one per node: node i keeps block i of a shared permutation.

    Per step, one keyed permutation perm of [0, d) (seed, step; the same for every node) and the
    blocks of positions [i d // nodes, (i + 1) d // nodes); node i keeps perm(block_i), scaled by
    d / |block_i| (exactly ``nodes`` when nodes divides d; then mean_i S_i = I for every draw).

    Args:
        nodes: the number of nodes (blocks), >= 1; node ids in [0, nodes); d >= nodes.
    """

    kind = "partition"

    def __init__(self, nodes: int):
        self.nodes = val.integer("nodes", nodes, 1)

    def check(self, d: int) -> None:
        if d < self.nodes:
            raise ValueError(f"a partition into {self.nodes} blocks needs d >= {self.nodes}, "
                             f"got d = {d}")  # fmt: skip

    def block(self, d: int, node: int) -> tuple[int, int]:
        """Positions [lo, hi) of node's block."""
        return node * d // self.nodes, (node + 1) * d // self.nodes

    def keep_probabilities(self, d: int) -> Tensor:
        smallest = min(hi - lo for lo, hi in (self.block(d, i) for i in range(self.nodes)))
        return torch.full((d,), smallest / d, dtype=torch.float64)

    def _scales(self, d):
        return 1.0 / self.keep_probabilities(d)

    def _args(self, d, seed, step, nodes, device):
        if int(nodes.max()) >= self.nodes:
            raise ValueError(f"node ids must be in [0, {self.nodes}) for Partition({self.nodes})")
        keys = torch.tensor(_partition_keys(seed, step), dtype=torch.int64)
        blocks = [self.block(d, i) for i in nodes.tolist()]
        ranges = torch.tensor(blocks, dtype=torch.int64)
        scale = torch.tensor([float(np.float32(d / (hi - lo))) for lo, hi in blocks])
        keys = keys.expand(len(nodes), 8).contiguous()
        return keys.to(device), ranges.to(device), scale.to(device)

    def _apply(self, x, v_, d, seed, step, nodes):
        return ops.sketch_perm_apply(x, v_, *self._args(d, seed, step, nodes, x.device))

    def _grad_step(self, x, g, gamma, d, seed, step, nodes):
        ops.sketch_perm_grad_step_(x, g, *self._args(d, seed, step, nodes, x.device), gamma)

    def config(self) -> dict:
        return {"kind": self.kind, "nodes": self.nodes}

    def __repr__(self) -> str:
        return f"Partition(nodes={self.nodes})"


@functools.lru_cache(maxsize=64)
def _partition_keys(seed: int, step: int) -> tuple:
    return feistel_keys(seed, step, stream=STREAM_PARTITION)


def _sketch(sketch) -> Sketch:
    if not isinstance(sketch, Sketch):
        raise TypeError(f"sketch must be a fedkern.sketch.Sketch (Bernoulli, RandK, Partition), "
                        f"got {type(sketch).__name__}")  # fmt: skip
    return sketch


def _seeds(seed, step) -> tuple[int, int]:
    return val.integer("seed", seed, 0, _MAX_SEED), val.integer("step", step, 0, _MAX_SEED)


def apply(sketch: Sketch, x: Tensor, v: Tensor | None = None, *, seed: int, step: int = 0,
          node=0) -> Tensor:  # fmt: skip
    """w = v + S (x - v) for the sketch S of (seed, step, node); v = None means 0.

    Args:
        sketch: a ``Bernoulli``, ``RandK`` or ``Partition``.
        x: float32/bfloat16 tensor. With an int ``node``: any shape (flattened: d = x.numel()).
            With a tensor of R node ids: [d] (one x for every node) or [R, d] (one per node).
        v: None (0), or x's shape / [d] / [R, d] likewise (the pre-trained point). Not modified.
        seed, step: ints in [0, 2**63): the sketch is a pure function of (seed, step, node).
        node: an int id >= 0, or a 1-D tensor / sequence of R ids.

    Returns:
        A new tensor in x's dtype and device: x's shape (int node) or [R, d] (node ids), equal to
        v where S drops a coordinate (0 when v is None) and to round(v + s (x - v)) (no v:
        round(s x)) where S keeps it with scale s (fp32 arithmetic; ``fedkern.reference.sketch``).

    Raises:
        TypeError / ValueError naming the argument (dtype, shape, k > d, node ids, ...).
    """
    _sketch(sketch)
    seed, step = _seeds(seed, step)
    nodes, batched = _nodes(node)
    v_ = v
    val.float_tensor("x", x)
    if not batched:
        d = x.numel()
        sketch.check(d)
        x2 = x.reshape(1, d)
        v2 = None
        if v_ is not None:
            val.float_tensor("v", v_)
            if v_.numel() != d:
                raise ValueError(f"v must have x's {d} elements, got shape {tuple(v_.shape)}")
            v2 = v_.reshape(1, d)
        return sketch._apply(x2, v2, d, seed, step, nodes).reshape(x.shape)
    if x.dim() not in (1, 2):
        raise ValueError(f"with node ids, x must be [d] or [R, d], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    sketch.check(d)
    R = nodes.numel()
    x2 = x.reshape(-1, d)
    if x2.shape[0] not in (1, R):
        raise ValueError(f"x must be [d] or [R = {R}, d], got shape {tuple(x.shape)}")
    v2 = None
    if v_ is not None:
        val.float_tensor("v", v_)
        if v_.dim() not in (1, 2) or v_.shape[-1] != d:
            raise ValueError(f"v must be [d] or [R, d] with d = {d}, got {tuple(v_.shape)}")
        v2 = v_.reshape(-1, d)
    return sketch._apply(x2, v2, d, seed, step, nodes)


def grad_step_(sketch: Sketch, x: Tensor, g: Tensor, gamma: float, *, seed: int, step: int = 0,
               node=0) -> Tensor:  # fmt: skip
    """x -= gamma S^T g in place (S diagonal: S^T g is g scaled where kept, 0 elsewhere).

    Args:
        sketch: a ``Bernoulli``, ``RandK`` or ``Partition``.
        x: float32/bfloat16, contiguous, updated in place (must not require grad). With an int
            ``node``: any shape, g of x's numel. With R node ids: x [R, d] (row r steps with node
            r's sketch) or [d] (one x: x -= gamma sum_r S_r^T g_r, the rows applied in order).
        g: the gradient, x's dtype and device: x's shape / numel (int node) or [R, d]. Not
            modified; only its kept coordinates are read.
        gamma: the step size, a finite float (rounded to fp32; c = round32(gamma * s) per
            coordinate, then x = round(x - round32(c g))).
        seed, step, node: as in ``apply`` (the same arguments give the same S).

    Returns:
        x.

    Raises:
        TypeError / ValueError naming the argument, before x is modified.
    """
    _sketch(sketch)
    seed, step = _seeds(seed, step)
    nodes, batched = _nodes(node)
    val.float_tensor("x", x)
    val.float_tensor("g", g)
    val.writable("x", x)
    if not batched:
        d = x.numel()
        sketch.check(d)
        if g.numel() != d:
            raise ValueError(f"g must have x's {d} elements, got shape {tuple(g.shape)}")
        sketch._grad_step(x.view(1, d), g.reshape(1, d), gamma, d, seed, step, nodes)
        return x
    if x.dim() not in (1, 2):
        raise ValueError(f"with node ids, x must be [d] or [R, d], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    sketch.check(d)
    R = nodes.numel()
    if x.dim() == 2 and x.shape[0] != R:
        raise ValueError(f"x must be [d] or [R = {R}, d], got shape {tuple(x.shape)}")
    if g.dim() != 2 or tuple(g.shape) != (R, d):
        raise ValueError(f"g must be [R = {R}, d = {d}], got shape {tuple(g.shape)}")
    sketch._grad_step(x.view(-1, d), g, gamma, d, seed, step, nodes)
    return x


class _Sketched(torch.autograd.Function):
    """w = v + S (x - v) in forward; the gradient S^T g = S g (``apply`` of g with v = None)."""

    @staticmethod
    def forward(ctx, x, v_, sketch, seed, step, node):
        ctx.args = (sketch, seed, step, node)
        return apply(sketch, x.detach().contiguous(), v_, seed=seed, step=step, node=node)

    @staticmethod
    def backward(ctx, grad):
        sketch, seed, step, node = ctx.args
        g = apply(sketch, grad.contiguous(), None, seed=seed, step=step, node=node)
        return g, None, None, None, None, None


def sketched(x: Tensor, sketch: Sketch, v: Tensor | None = None, *, seed: int, step: int = 0,
             node: int = 0) -> Tensor:  # fmt: skip
    """Differentiable ``apply``: w = v + S (x - v), whose gradient with respect to x is S^T times
    the incoming one (v gets none: it is the fixed pre-trained point)."""
    return _Sketched.apply(x, v, sketch, seed, step, node)


class MASTWrapper(torch.nn.Module):
    """Train any module through sketched weights (MAST; weight-level DropConnect with Bernoulli).

    In training mode every forward uses w = v + S_t (x - v) for each selected parameter x (its own
    sketch stream: seed client_seed(seed, i) for the i-th parameter, step t, ``node``) and then
    advances t; backward gives x the gradient S_t^T grad f(w), so a plain SGD step on the module's
    parameters is a double-sketched SGD step (``fedkern.algorithms.DSGD``). In eval mode the module
    runs on x itself (the MAST solution). The parameters stay the module's own: optimizers,
    ``module.state_dict`` and DDP see them as usual.

    Args:
        module: the model. Its float32 / bfloat16 parameters selected by ``select`` are sketched.
        sketch: a ``Bernoulli``, ``RandK`` (use ``ratio`` for tensors of different sizes) or
            ``Partition`` (every parameter cut into the same number of blocks; ``node`` picks one).
        seed: int in [0, 2**63).
        v: None (0: train from scratch, w = S x), or "initial": the parameters' values now (the
            pre-trained point, kept as buffers).
        node: this worker's node id (distributed sketches), default 0.
        select: ``select(name, param) -> bool``, default every float32 / bfloat16 parameter.

    Attributes:
        step: the sketch step of the next training forward (saved in ``state_dict``).

    Raises:
        ValueError when the sketch cannot act on a selected parameter (k > numel, ...).
    """

    def __init__(self, module: torch.nn.Module, sketch: Sketch, *, seed: int = 0, v=None,
                 node: int = 0, select=None):  # fmt: skip
        super().__init__()
        _sketch(sketch)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if v not in (None, "initial"):
            raise ValueError(f"v must be None or 'initial', got {v!r}")
        self.module, self.sketch = module, sketch
        self.seed = val.integer("seed", seed, 0, _MAX_SEED)
        self.node = val.integer("node", node, 0, _MAX_SEED)
        self.names = [
            n for n, p in module.named_parameters()
            if p.dtype in (torch.float32, torch.bfloat16) and (select is None or select(n, p))
        ]  # fmt: skip
        params = dict(module.named_parameters())
        for n in self.names:
            sketch.check(params[n].numel())
        self.seeds = {n: client_seed(self.seed, i) for i, n in enumerate(self.names)}
        self.has_v = v == "initial"
        for i, n in enumerate(self.names):
            self.register_buffer(f"v{i}", params[n].detach().clone() if self.has_v else None)
        self.step = 0

    def sketched_parameters(self) -> dict[str, Tensor]:
        """{name: w} for the current step (differentiable in the parameters); does not advance."""
        params = dict(self.module.named_parameters())
        return {n: sketched(params[n], self.sketch, getattr(self, f"v{i}"), seed=self.seeds[n],
                            step=self.step, node=self.node)
                for i, n in enumerate(self.names)}  # fmt: skip

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.module(*args, **kwargs)
        from torch.func import functional_call

        w = self.sketched_parameters()
        self.step += 1
        return functional_call(self.module, w, args, kwargs, strict=False)

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = val.integer("step", state["step"], 0, _MAX_SEED)
