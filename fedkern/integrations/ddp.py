"""DDP communication hooks built on fedkern's fused compression ops.

Usage::

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = fedkern.integrations.ddp.register(ddp, "topk_ef21", ratio=0.01, start_iter=10, seed=0)
    ...  # train as usual; checkpoint with state.state_dict(), restore with state.load_state_dict()

DDP hands a hook one gradient bucket at a time: a flat vector g of n entries (the local gradients
of a few parameters). Every hook compresses the whole bucket with k = ceil(ratio * n) (at least 1)
and returns a future of the bucket holding the averaged (estimated) gradient. W is the world size.

``topk_ef14``  Classic error feedback (Seide et al. 2014; Stich et al. 2018). Per rank, fused in
    ``ef14_topk_``: e += g; c = topk(e); e -= c. The ranks' (indices, values) travel in one
    fixed-size all_gather (k per rank), and the bucket becomes sum_r c_r / W
    (``sparse_add_batched_``, divided by W by the hook).
``topk_ef21``  EF21 (Richtarik, Sokolov, Fatkhullin 2021). Per rank, fused in ``ef21_topk_``:
    c = topk(g - s); s += c. Each rank also keeps the server's estimate s_bar = mean_r s_r: after
    the all_gather of the c_r, s_bar += sum_r c_r / W, and the bucket becomes s_bar (dense, while
    only the c_r travel). At the last dense step (iteration start_iter - 1) s = g and
    s_bar = mean_r g (no extra communication), so compression starts from the exact average; with
    start_iter = 0 s and s_bar start at zero. Memory: two buffers of the model's size.
``randk``  Rand-k with indices that are never sent: every rank draws the same k indices from
    (seed, iteration, bucket index) -- the mask is a pure function of its key (``fedkern.random``),
    key step = iteration * 2**16 + bucket index -- and only the k values are all-reduced.
    Default (``error_feedback=True, unbiased=False``): EF14 with the biased, contractive rand-k that
    error-feedback theory covers, fused in ``ef14_randk_``: e += g; c = e[I]; e[I] = 0.
    ``error_feedback=False`` sends randk(g) each step (no buffer); ``unbiased=True`` scales the sent
    values by n/k, so E[c] = g but the variance grows like n/k (lower the learning rate).

``randk_ef21``  EF21 over the same shared rand-k mask, fused in ``ef21_randk_``:
    c = (g - s)[I]; s[I] += c; only the k values are all-reduced and each rank keeps
    s_bar = mean_r s_r (s_bar[I] += mean_r c_r); the bucket becomes s_bar. Memory: two buffers.

Optimizers. Error-feedback sparsifiers send a coordinate now and then with what accumulated in the
meantime; an optimizer's momentum amplifies those delayed bursts. Measured (2 ranks, an MLP
64-64-10 on digits, ratio 0.05, 300 steps; docs/benchmarks.md): the top-k hooks match dense test
accuracy under SGD momentum 0.9 and under Adam; rand-k at 5 % trails dense under SGD momentum
(71 % vs 97 %; 80 % with momentum correction after 1,500 steps) and comes closer under Adam
(``randk_ef21`` 94.5 % vs 95.2 %). ``momentum=m`` moves the momentum into the hook (momentum
correction with factor masking, after Deep Gradient Compression, Lin et al. 2018): per rank
u = m u + g; the EF14 hooks compress e + u and zero u where they sent (the EF21 hooks track u);
the optimizer must then have no momentum (``SGD(momentum=0)``). Before ``start_iter`` it is
momentum SGD on the exact average. ``register(..., optimizer=opt)`` checks the pairing: a hook
momentum on top of an SGD momentum is an error; a rand-k hook under SGD momentum without momentum
correction warns; without ``optimizer`` a rand-k hook without momentum correction warns once that
the pairing cannot be checked. Recommended: ``topk_ef21`` (any optimizer), ``topk_ef14`` with
``momentum=m`` for SGD, ``randk_ef21`` with Adam-type optimizers when indices must not travel.

Before ``start_iter`` every hook runs the plain all-reduce average. Iterations are counted as in
PowerSGD: one per backward pass, advanced when DDP hands over its last bucket (``is_last()``).
Compression applies to every bucket, however small; ratio = 1 sends more than the dense all-reduce.

Bytes a rank hands to the collectives per step (element size b, 2 for bfloat16, 4 for float32):
dense all-reduce n*b; top-k k*(4 + b) (indices as int32 when n < 2**31, else int64), and it
receives W*k*(4 + b) (all_gather grows with W, all-reduce does not); rand-k k*b.
``state.compression_stats()`` counts them.

No host synchronization: the hooks build every index they add themselves (from the fused top-k /
rand-k ops, or the ranks' all_gathered top-k messages), so they call ``sparse_add_`` /
``sparse_add_batched_`` with ``check_indices=False``, which skips the check that reads the indices
(on CUDA a device-to-host copy that would stall DDP's overlap of communication and backward).

State (the contract of PyTorch's PowerSGD hook): one ``DDPCompressionState`` holds the
hyperparameters, the iteration counter and the error-feedback buffers, one flat buffer per bucket
keyed by bucket index. Unlike PowerSGD's, the buffers are also addressed per parameter, so they
survive DDP rebuilding its buckets (after iteration 0 of every DDP object, e.g. right after a
restart), ``start_iter`` may be 0, and ``state_dict()`` is independent of the bucket layout.
A restart (new DDP model, ``register``, ``load_state_dict``) continues bit-identically when the new
model's buckets hold the same parameters as the saved run's. Top-k selection does not depend on the
order inside a bucket. The rand-k mask does, because it is drawn over bucket positions. DDP orders
a new model's first-iteration bucket by parameter order and the later ones by the order gradients
become ready. So with the default DDP settings, the first rand-k step after a restart draws a
different mask. That mask is just as valid, and the EF residual still belongs to the right
parameters.

Backends: the hooks only call ``all_gather`` and ``all_reduce`` on the process group and run the ops
on the bucket's device, so they work with every backend torch ships that implements both for the
model's device: gloo (CPU, CUDA), nccl (CUDA), mpi, ucc, xccl (XPU). Parameters must be float32 or
bfloat16 (the fused ops' dtypes).
"""

from __future__ import annotations

import numbers
import struct
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fedkern import validation as v
from fedkern.compress import TopK
from fedkern.ops.randk import ef14_randk_, ef21_randk_, randk_compress
from fedkern.ops.sparse import sparse_add_, sparse_add_batched_
from fedkern.ops.topk import ef14_topk_, ef21_topk_

__all__ = ["HOOKS", "SUPPORTED_BACKENDS", "DDPCompressionState", "comm_hook", "register"]

#: The hook names ``register`` accepts.
HOOKS = ("topk_ef14", "topk_ef21", "randk", "randk_ef21")
#: The hooks that keep EF21's state s and server estimate s_bar.
EF21_HOOKS = ("topk_ef21", "randk_ef21")
#: Process-group backends known to implement all_gather and all_reduce.
SUPPORTED_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")

_DTYPES = (torch.float32, torch.bfloat16)
_MAX_SEED = (1 << 63) - 1
_BUCKET_BITS = 16  # rand-k key step = iteration << 16 | bucket index
_CONFIG = ("hook", "ratio", "seed", "start_iter", "error_feedback", "unbiased", "momentum")
_VERSION = 2


def _check_config(hook, ratio, start_iter, seed, error_feedback, unbiased, momentum=None):
    """Validate the pure arguments (no model, no communication); returns them normalized."""
    if not isinstance(hook, str):
        raise TypeError(f"hook must be a str, one of {', '.join(HOOKS)}; got {type(hook).__name__}")
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}: valid hooks are {', '.join(HOOKS)}")
    compressor = TopK(ratio=ratio)  # ratio must be a float in (0, 1]
    start_iter = v.integer("start_iter", start_iter, 0)
    seed = v.integer("seed", seed, 0, _MAX_SEED)
    if hook != "randk":  # error_feedback / unbiased are options of the EF14 rand-k hook only
        for name, val, default in (("error_feedback", error_feedback, True),
                                   ("unbiased", unbiased, False)):  # fmt: skip
            if val is not None and v.boolean(name, val) != default:
                raise ValueError(f"{name}={val} applies to the 'randk' hook only, not {hook!r}")
    error_feedback = True if error_feedback is None else v.boolean("error_feedback", error_feedback)
    unbiased = False if unbiased is None else v.boolean("unbiased", unbiased)
    if momentum is not None:
        momentum = v.finite("momentum", momentum)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be None or in [0, 1), got {momentum}")
        if hook == "randk" and not error_feedback:
            raise ValueError("momentum correction accumulates into the error-feedback buffer: "
                             "it needs error_feedback=True for the 'randk' hook")  # fmt: skip
    return hook, compressor, start_iter, seed, error_feedback, unbiased, momentum


def _backend_name(group, device_type: str) -> str:
    try:
        spec = dist.get_backend(group)
    except (ValueError, RuntimeError):  # a group that is not in torch.distributed's registry
        spec = group.name()
    spec = str(spec).lower()
    if ":" in spec:  # "cpu:gloo,cuda:nccl"
        per_device = dict(part.split(":", 1) for part in spec.split(","))
        if device_type not in per_device:
            raise ValueError(
                f"process_group has no backend for {device_type} tensors (it has {spec}), "
                "where the model's parameters are"
            )
        spec = per_device[device_type]
    return spec


def _check_group(group, device: torch.device) -> None:
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None, "
            f"got {type(group).__name__}"
        )
    name = _backend_name(group, device.type)
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"process_group backend {name!r} is not supported: the hooks need all_gather and "
            f"all_reduce, which {', '.join(SUPPORTED_BACKENDS)} implement"
        )
    devices = getattr(dist.Backend, "backend_capability", {}).get(name)
    if devices is not None and device.type not in devices:
        raise ValueError(
            f"process_group backend {name!r} does not support {device.type} tensors (it supports "
            f"{', '.join(devices)}); the model's parameters are on {device}"
        )


class DDPCompressionState:
    """Hyperparameters and error-feedback state of the fedkern DDP hooks (one per DDP model).

    Build it with ``register`` (which also checks that all ranks agree and registers the hook), or
    directly and then ``ddp_model.register_comm_hook(state, comm_hook)``. Construction validates
    every argument (naming it) and does no communication.

    Args:
        model: the ``DistributedDataParallel`` model; its parameters that require grad must be
            float32 or bfloat16, on one device. The state remembers the parameters' order.
        hook: ``"topk_ef14"``, ``"topk_ef21"`` or ``"randk"`` (module docstring).
        ratio: float in (0, 1]; each bucket of n entries sends k = max(1, ceil(ratio * n)).
        start_iter: int >= 0; iterations before it use the plain all-reduce average.
        seed: int in [0, 2**63): the rand-k masks' key (must be equal on every rank).
        process_group: the group to communicate in; None: the DDP model's group. Its backend must
            implement all_gather and all_reduce for the parameters' device (``SUPPORTED_BACKENDS``).
        error_feedback: rand-k only: keep an EF14 residual (default True).
        unbiased: rand-k only: scale the sent values by n/k (default False).
        momentum: None, or m in [0, 1): momentum correction (module docstring, "Optimizers"):
            the hook keeps a local velocity and sends compressed momentum updates; use it with
            an optimizer without momentum (``SGD(momentum=0)``).

    Attributes:
        iter: iterations seen (backward passes); ``iter < start_iter`` means dense all-reduce.
        bytes_sent: bytes this rank has handed to collectives (payload; see module docstring).
        bytes_dense: bytes a dense all-reduce of the same buckets would have handed over.

    The buffers live on the parameters' device in their dtype: EF14 hooks hold one residual e per
    bucket, ``topk_ef21`` holds s and s_bar; rand-k without error feedback holds none; momentum
    correction adds the velocity u.
    ``state_dict()`` / ``load_state_dict()`` checkpoint them per parameter. Pickling works as for
    ``PowerSGDState`` (the process group and the model binding are left out): after unpickling,
    call ``state.bind(ddp_model)`` before registering it.
    """

    def __init__(
        self, model, hook: str, ratio: float = 0.01, *, start_iter: int = 10, seed: int = 0,
        process_group=None, error_feedback: bool | None = None, unbiased: bool | None = None,
        momentum: float | None = None,
    ):  # fmt: skip
        hook, compressor, start_iter, seed, error_feedback, unbiased, momentum = _check_config(
            hook, ratio, start_iter, seed, error_feedback, unbiased, momentum
        )
        self.hook, self.ratio, self._compressor = hook, compressor.ratio, compressor
        self.start_iter, self.seed = start_iter, seed
        self.error_feedback, self.unbiased, self.momentum = error_feedback, unbiased, momentum
        self.iter, self.bytes_sent, self.bytes_dense = 0, 0, 0
        self._views: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in self._kinds()}
        self.process_group = None
        self._param_index = None
        self.bind(model, process_group)

    def _kinds(self) -> tuple[str, ...]:
        extra = ("velocity",) if self.momentum is not None else ()
        if self.hook in EF21_HOOKS:
            return ("state", "server", *extra)
        return (("error",) if self.error_feedback else ()) + extra

    def bind(self, model, process_group=None) -> None:
        """Attach the state to a DDP model (done by the constructor; needed after unpickling).

        Validates the model (a ``DistributedDataParallel`` with float32/bfloat16 parameters on one
        device), the process group (None: the model's) and, for a state that already holds buffers,
        that the parameters' sizes match them. Raises TypeError / ValueError naming the argument,
        before anything is changed. The buffers move to the parameters' device and dtype when their
        bucket is next reduced.
        """
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(
                "model must be a torch.nn.parallel.DistributedDataParallel, "
                f"got {type(model).__name__}"
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters that require grad")
        for name, p in named:
            if p.dtype not in _DTYPES:
                raise TypeError(
                    f"model parameter {name!r} has dtype {p.dtype}: the compressed hooks support "
                    "float32 and bfloat16 parameters"
                )
            if p.device != named[0][1].device:
                raise ValueError(
                    f"model parameters must be on one device: {name!r} is on {p.device}, "
                    f"{named[0][0]!r} on {named[0][1].device}"
                )
        device = named[0][1].device
        group = model.process_group if process_group is None else process_group
        _check_group(group, device)
        params = [p for _, p in named]
        for kind, views in self._views.items():
            for i, t in views.items():
                if i >= len(params) or t.numel() != params[i].numel():
                    raise ValueError(
                        f"model does not match this state: its {kind} buffer of parameter {i} "
                        f"has {t.numel()} entries, the model has "
                        f"{params[i].numel() if i < len(params) else 'no such parameter'}"
                    )
        self.process_group, self._device = group, device
        self._param_index = {id(p): i for i, p in enumerate(params)}
        self._numels = [p.numel() for p in params]
        self._buffers: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in self._views}
        self._layouts: dict[int, tuple[int, ...]] = {}

    def compression_stats(self) -> tuple[float, int, int]:
        """``(rate, bytes_dense, bytes_sent)``: bytes a dense all-reduce would have handed to the
        collectives so far, bytes this rank did hand over, and their ratio (0 before any step)."""
        rate = self.bytes_dense / self.bytes_sent if self.bytes_sent else 0.0
        return rate, self.bytes_dense, self.bytes_sent

    def state_dict(self) -> dict:
        """A checkpoint: the configuration, the counters and the buffers per parameter.

        Returns:
            A dict of plain Python values and tensors (``torch.save``-able). ``"buffers"`` maps each
            buffer kind (``"error"``; ``"state"``, ``"server"`` for EF21) to ``{parameter position
            among the model's parameters that require grad: 1-D clone of its slice}``; a parameter
            whose bucket was never compressed has no entry (its buffer is zero). The tensors are
            copies, on the parameters' device.
        """
        out = {"version": _VERSION, **{key: getattr(self, key) for key in _CONFIG}}
        out.update(iter=self.iter, bytes_sent=self.bytes_sent, bytes_dense=self.bytes_dense)
        out["buffers"] = {
            kind: {i: t.detach().reshape(-1).clone() for i, t in sorted(views.items())}
            for kind, views in self._views.items()
        }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()`` (from this or another run with the same configuration).

        The configuration (hook, ratio, seed, start_iter, error_feedback, unbiased) must match this
        state's and the buffers must fit the bound model; the counters and buffers are replaced.
        Tensors are copied (to the parameters' device and dtype when their bucket is next reduced).

        Raises:
            TypeError / ValueError naming the offending key, before anything is changed.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = {"momentum": None, **state_dict}  # version-1 checkpoints had no momentum
        missing = [k for k in (*_CONFIG, "iter", "buffers") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing {', '.join(map(repr, missing))}")
        for key in _CONFIG:
            if state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict has {key}={state_dict[key]!r}, this state has "
                    f"{key}={getattr(self, key)!r}"
                )
        counters = {key: v.integer(f"state_dict[{key!r}]", state_dict.get(key, 0), 0)
                    for key in ("iter", "bytes_sent", "bytes_dense")}  # fmt: skip
        buffers = state_dict["buffers"]
        if not isinstance(buffers, dict) or set(buffers) != set(self._views):
            got = sorted(buffers) if isinstance(buffers, dict) else type(buffers).__name__
            raise ValueError(
                f"state_dict['buffers'] must have the kinds {sorted(self._views)} of hook "
                f"{self.hook!r}, got {got}"
            )
        for kind, entries in buffers.items():
            if not isinstance(entries, dict):
                raise TypeError(f"state_dict['buffers'][{kind!r}] must be a dict")
            for i, t in entries.items():
                where = f"state_dict['buffers'][{kind!r}][{i!r}]"
                if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                    raise TypeError(f"{where}: keys must be parameter positions (int)")
                if not 0 <= i < len(self._numels):
                    raise ValueError(f"{where}: the model has {len(self._numels)} parameters")
                v.float_tensor(where, t)
                if t.numel() != self._numels[i]:
                    raise ValueError(
                        f"{where} has {t.numel()} entries, parameter {i} has {self._numels[i]}"
                    )
        self._views = {
            kind: {int(i): t.detach().reshape(-1).to(self._device, copy=True)
                   for i, t in entries.items()}
            for kind, entries in buffers.items()
        }  # fmt: skip
        self._buffers = {kind: {} for kind in self._views}
        self._layouts = {}
        self.iter, self.bytes_sent, self.bytes_dense = (counters[k] for k in counters)

    def __getstate__(self) -> dict:
        """What pickling saves: ``state_dict()`` (no process group, no model binding)."""
        return self.state_dict()

    def __setstate__(self, state: dict) -> None:
        """Restore a pickled state; it is unbound until ``bind(ddp_model)``."""
        hook, compressor, *rest = _check_config(**{k: state.get(k) for k in _CONFIG})
        self.hook, self.ratio, self._compressor = hook, compressor.ratio, compressor
        self.start_iter, self.seed, self.error_feedback, self.unbiased, self.momentum = rest
        self.iter = state["iter"]
        self.bytes_sent, self.bytes_dense = state["bytes_sent"], state["bytes_dense"]
        self._views = {kind: dict(entries) for kind, entries in state["buffers"].items()}
        self.process_group, self._param_index, self._device = None, None, None

    def __repr__(self) -> str:
        extra = (f", error_feedback={self.error_feedback}, unbiased={self.unbiased}"
                 if self.hook == "randk" else "")  # fmt: skip
        if self.momentum is not None:
            extra += f", momentum={self.momentum}"
        return (
            f"DDPCompressionState(hook={self.hook!r}, ratio={self.ratio}, "
            f"start_iter={self.start_iter}, seed={self.seed}{extra}, iter={self.iter})"
        )


def _bucket_buffers(state: DDPCompressionState, bucket) -> dict[str, torch.Tensor]:
    """The state's flat buffers of this bucket, (re)assembled per parameter when the bucket's
    parameters differ from last time (first use, DDP rebuilt its buckets, a checkpoint loaded)."""
    b = bucket.index()
    params = bucket.parameters()
    try:
        layout = tuple(state._param_index[id(p)] for p in params)
    except KeyError:
        raise RuntimeError(
            "a DDP bucket holds a parameter of another model than the one this state is bound to"
        ) from None
    if state._layouts.get(b) != layout:
        buf = bucket.buffer()
        numels = [state._numels[i] for i in layout]
        if sum(numels) != buf.numel():
            raise RuntimeError(
                f"bucket {b} has {buf.numel()} entries, its parameters {sum(numels)}"
            )
        for kind, views in state._views.items():
            flat = torch.zeros(buf.numel(), dtype=buf.dtype, device=buf.device)
            for i, piece in zip(layout, flat.split(numels), strict=True):
                if i in views:  # the parameter's slice in its previous bucket, or a loaded one
                    piece.copy_(views[i])
                views[i] = piece
            state._buffers[kind][b] = flat
        state._layouts[b] = layout
        # Another bucket that held one of these parameters is stale: rebuild it on its next use
        # (its other parameters' views keep the old flat buffer alive until then).
        moved = set(layout)
        for other in [o for o, lay in state._layouts.items() if o != b and moved.intersection(lay)]:
            del state._layouts[other]
            for buffers in state._buffers.values():
                buffers.pop(other, None)
    return {kind: buffers[b] for kind, buffers in state._buffers.items()}


def _dense(state, bucket, buf, group, world: int, warm: bool):
    # The plain average; at EF21's last dense step also s = g (local) and s_bar = the average.
    # With momentum correction the dense phase is momentum SGD on the average: u = m u + mean g.
    mom = state.momentum is not None
    bufs = _bucket_buffers(state, bucket) if (warm or mom) else None
    if warm and not mom:
        bufs["state"].copy_(buf)
    buf.div_(world)
    state.bytes_sent += buf.numel() * buf.element_size()
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

    def finish(fut):
        fut.value()  # re-raises a communication error
        if mom:
            bufs["velocity"].mul_(state.momentum).add_(buf)
            buf.copy_(bufs["velocity"])
        if warm:  # EF21 starts from the exact average of what it tracks (g, or the velocity)
            bufs["server"].copy_(buf)
            if mom:
                bufs["state"].copy_(buf)
        return buf

    return fut.then(finish)


def _exchange(state, buf, group, world: int, values, indices, server):
    # One fixed-size all_gather of each rank's packed message [indices | values] (bytes).
    k = values.numel()
    idx_dtype = torch.int32 if buf.numel() <= torch.iinfo(torch.int32).max else torch.int64
    msg = torch.cat([indices.to(idx_dtype).view(torch.uint8), values.view(torch.uint8)])
    out = msg.new_empty(world, msg.numel())
    state.bytes_sent += msg.numel()
    work = dist.all_gather(list(out.unbind(0)), msg, group=group, async_op=True)
    split = k * idx_dtype.itemsize

    def finish(fut):
        fut.value()
        all_indices = out[:, :split].contiguous().view(idx_dtype).to(torch.int64)
        all_values = out[:, split:].contiguous().view(buf.dtype)
        if server is None:  # EF14: the average of the messages
            buf.zero_()
            sparse_add_batched_(
                buf, all_values, all_indices, alpha=1.0 / world, check_indices=False
            )
        else:  # EF21: s_bar += average of the messages; the gradient estimate is s_bar
            sparse_add_batched_(
                server, all_values, all_indices, alpha=1.0 / world, check_indices=False
            )
            buf.copy_(server)
        return buf

    return work.get_future().then(finish)


def _randk(state, bucket, buf, group, world: int, step: int, k: int):
    b = bucket.index()
    if b >> _BUCKET_BITS:
        raise RuntimeError(f"the randk hook supports up to {1 << _BUCKET_BITS} buckets, got {b}")
    key = (step << _BUCKET_BITS) | b
    if state.error_feedback:
        bufs = _bucket_buffers(state, bucket)
        g = _momentum(state, bufs, buf)
        values, indices = ef14_randk_(g, bufs["error"], k, seed=state.seed, step=key,
                                      unbiased=state.unbiased)  # fmt: skip
        _mask(state, bufs, indices)
    else:
        values, indices = randk_compress(buf, k, seed=state.seed, step=key, unbiased=state.unbiased)
    state.bytes_sent += values.numel() * values.element_size()
    fut = dist.all_reduce(values, group=group, async_op=True).get_future()

    def finish(fut):
        fut.value()
        buf.zero_()
        sparse_add_(buf, values, indices, alpha=1.0 / world, check_indices=False)
        return buf

    return fut.then(finish)


def _randk_ef21(state, bucket, buf, group, world: int, step: int, k: int):
    # EF21 over a shared rand-k mask: c = (g - s)[I]; s[I] += c; s_bar[I] += mean_r c_r, so
    # s_bar[I] is the exact average of the ranks' latest values at I and s_bar = mean_r s_r.
    b = bucket.index()
    if b >> _BUCKET_BITS:
        raise RuntimeError(f"the randk hooks support up to {1 << _BUCKET_BITS} buckets, got {b}")
    bufs = _bucket_buffers(state, bucket)
    g = _momentum(state, bufs, buf)
    values, indices = ef21_randk_(g, bufs["state"], k, seed=state.seed,
                                  step=(step << _BUCKET_BITS) | b)  # fmt: skip
    state.bytes_sent += values.numel() * values.element_size()
    fut = dist.all_reduce(values, group=group, async_op=True).get_future()

    def finish(fut):
        fut.value()
        sparse_add_(bufs["server"], values, indices, alpha=1.0 / world, check_indices=False)
        buf.copy_(bufs["server"])
        return buf

    return fut.then(finish)


def comm_hook(state: DDPCompressionState, bucket: dist.GradBucket) -> torch.futures.Future:
    """The DDP communication hook of every fedkern method (``state.hook`` picks it).

    Args:
        state: a bound ``DDPCompressionState``.
        bucket: DDP's gradient bucket; ``bucket.buffer()`` is a flat float32/bfloat16 vector of the
            local gradients, on the parameters' device. It is overwritten in place with the result.

    Returns:
        A ``torch.futures.Future`` of ``bucket.buffer()``, completed when the collectives are done
        and the buffer holds the averaged (compressed) gradient; communication errors (a peer that
        died, a timeout) complete it with the error, which DDP raises from ``backward()``.
    """
    if state._param_index is None:
        raise RuntimeError("this DDPCompressionState is not bound to a model: call state.bind(ddp)")
    group = state.process_group
    world = group.size()
    buf = bucket.buffer()
    step = state.iter
    if bucket.is_last():
        state.iter += 1
    state.bytes_dense += buf.numel() * buf.element_size()
    if step < state.start_iter:
        warm = state.hook in EF21_HOOKS and step == state.start_iter - 1
        return _dense(state, bucket, buf, group, world, warm)
    k = state._compressor.k_for(buf.numel())
    if state.hook == "randk":
        return _randk(state, bucket, buf, group, world, step, k)
    if state.hook == "randk_ef21":
        return _randk_ef21(state, bucket, buf, group, world, step, k)
    bufs = _bucket_buffers(state, bucket)
    g = _momentum(state, bufs, buf)
    if state.hook == "topk_ef14":
        values, indices = ef14_topk_(g, bufs["error"], k)
        _mask(state, bufs, indices)
        return _exchange(state, buf, group, world, values, indices, None)
    values, indices = ef21_topk_(g, bufs["state"], k)
    return _exchange(state, buf, group, world, values, indices, bufs["server"])


def _momentum(state, bufs, buf):
    """Momentum correction: u = m u + g (in place on the velocity); returns what to compress."""
    if state.momentum is None:
        return buf
    u = bufs["velocity"]
    u.mul_(state.momentum).add_(buf)
    return u


def _mask(state, bufs, indices) -> None:
    """Factor masking (DGC): the velocity is zeroed where the accumulated value was sent."""
    if state.momentum is not None:
        bufs["velocity"].index_fill_(0, indices, 0)


# DDP checks the hook's annotations as objects; ``from __future__ import annotations`` made them
# strings.
comm_hook.__annotations__ = {
    "state": DDPCompressionState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _check_same_across_ranks(state: DDPCompressionState) -> None:
    # One small all_gather of the configuration; every rank sees the same table, so a mismatch
    # raises the same error on every rank instead of a hang or silently different masks.
    ratio_bits = struct.unpack("<q", struct.pack("<d", state.ratio))[0]
    mom = (
        -1 if state.momentum is None else struct.unpack("<q", struct.pack("<d", state.momentum))[0]
    )
    row = [state.seed, HOOKS.index(state.hook), ratio_bits, state.start_iter,
           int(state.error_feedback), int(state.unbiased), mom]  # fmt: skip
    group = state.process_group
    mine = torch.tensor(row, dtype=torch.int64, device=state._device)
    table = mine.new_empty(group.size(), len(row))
    dist.all_gather(list(table.unbind(0)), mine, group=group)
    table = table.cpu().tolist()
    decode = {
        "hook": lambda x: HOOKS[x] if 0 <= x < len(HOOKS) else x,
        "ratio": lambda x: struct.unpack("<d", struct.pack("<q", x))[0],
        "error_feedback": bool,
        "unbiased": bool,
        "momentum": lambda x: None if x == -1 else struct.unpack("<d", struct.pack("<q", x))[0],
    }
    names = ("seed", "hook", "ratio", "start_iter", "error_feedback", "unbiased", "momentum")
    diffs = []
    for j, name in enumerate(names):
        column = [decode.get(name, int)(r[j]) for r in table]
        if len(set(column)) > 1:
            diffs.append(f"{name} per rank: {column}")
    if diffs:
        raise ValueError(
            "fedkern DDP hook: the ranks were registered with different settings ("
            + "; ".join(diffs)
            + "); every rank must call register() with the same hook, ratio, start_iter, seed "
            "and options"
        )


def _optimizer_momentum(optimizer) -> float:
    """The largest momentum (SGD) or first-moment decay (Adam-type betas[0]) of the optimizer."""
    top = 0.0
    for group in optimizer.param_groups:
        if "momentum" in group:
            top = max(top, float(group["momentum"]))
        elif "betas" in group:
            top = max(top, float(group["betas"][0]))
    return top


def _check_optimizer(state: DDPCompressionState, optimizer) -> None:
    # The pairings the module docstring's "Optimizers" section describes.
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")  # fmt: skip
    randk = state.hook in ("randk", "randk_ef21")
    if optimizer is None:
        if randk and state.momentum is None:
            warnings.warn(
                f"fedkern {state.hook} hook registered without momentum correction and without the "
                "optimizer: with SGD momentum (e.g. 0.9) error-feedback rand-k can fail to train. "
                "Pass momentum=0.9 (and SGD(momentum=0)), or optimizer=... to have the pairing "
                "checked.", UserWarning, stacklevel=3)  # fmt: skip
        return
    opt_m = _optimizer_momentum(optimizer)
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    if state.momentum is not None and is_sgd and opt_m > 0:
        raise ValueError(f"momentum={state.momentum} moves the momentum into the hook; the "
                         f"optimizer must then have momentum 0, got {opt_m}")  # fmt: skip
    if randk and state.momentum is None and is_sgd and opt_m > 0:
        warnings.warn(
            f"fedkern {state.hook} hook under SGD momentum {opt_m} without momentum correction: "
            "error-feedback rand-k then trains poorly (see fedkern.integrations.ddp, "
            "'Optimizers'); use register(..., momentum=m) with SGD(momentum=0).",
            UserWarning, stacklevel=3)  # fmt: skip


def register(
    model, hook: str, ratio: float = 0.01, *, start_iter: int = 10, seed: int = 0,
    process_group=None, error_feedback: bool | None = None, unbiased: bool | None = None,
    momentum: float | None = None, optimizer: torch.optim.Optimizer | None = None,
) -> DDPCompressionState:  # fmt: skip
    """Enable a fedkern compression hook on a DDP model, in one call, on every rank.

    Validates the arguments (``DDPCompressionState``), checks with one small all_gather that every
    rank passed the same hook, ratio, start_iter, seed and options, then calls
    ``model.register_comm_hook(state, comm_hook)``. Must be called by every rank of the group
    (it communicates), before the first backward pass, once per model.

    Args:
        model: a ``torch.nn.parallel.DistributedDataParallel`` (float32/bfloat16 parameters).
        hook: ``"topk_ef14"``, ``"topk_ef21"`` or ``"randk"``.
        ratio: float in (0, 1]: the fraction of each bucket's entries sent.
        start_iter: int >= 0: iterations of plain all-reduce before compression starts.
        seed: int in [0, 2**63), the same on every rank (rand-k masks).
        process_group: None (the model's group) or a ProcessGroup whose backend implements
            all_gather and all_reduce for the model's device.
        error_feedback, unbiased: rand-k only (defaults True, False); see the module docstring.
        momentum: None or m in [0, 1): momentum correction with factor masking inside the hook
            (module docstring, "Optimizers"); then the optimizer must have no momentum.
        optimizer: the training loop's optimizer (optional, never modified): lets ``register``
            check the pairing -- a ValueError for an optimizer momentum on top of the hook's, a
            warning for ``randk`` without momentum correction under SGD momentum. Without it,
            ``randk`` without momentum correction warns once that the pairing is unchecked.

    Returns:
        The ``DDPCompressionState``; checkpoint it with ``state_dict()`` and restore into a state
        registered the same way with ``load_state_dict()``.

    Raises:
        TypeError / ValueError naming the argument; ValueError on every rank when the ranks'
        settings differ (the message lists them per rank).
    """
    state = DDPCompressionState(
        model, hook, ratio, start_iter=start_iter, seed=seed, process_group=process_group,
        error_feedback=error_feedback, unbiased=unbiased, momentum=momentum,
    )  # fmt: skip
    _check_optimizer(state, optimizer)
    _check_same_across_ranks(state)
    model.register_comm_hook(state, comm_hook)
    return state
