"""DDP communication hooks (``fedkern.integrations.ddp``) with gloo in 2 and 4 processes.

Spawning ranks costs seconds, so each world size is launched once (a module-scoped fixture): the
ranks run every scenario in turn -- exactness against a hand-computed reference, training against
the dense all-reduce, checkpoint/restart, mismatched seeds, and last a rank that dies -- and save
what they saw to a file after each one; the tests below assert on those results. Processes talk
over a FileStore in tmp_path on loopback; every process group has a timeout, and the launcher kills
ranks that outlive the deadline, so nothing hangs. Argument checks that need no communication run
in the test process itself, on a DDP model over a process group with no working backend.

On a CUDA machine two more launches run concurrently (skipped without CUDA): NCCL with world size
1 and gloo over CUDA tensors with two ranks on one GPU. Each rank runs every hook on CUDA tensors
and, as the control, on CPU tensors (gloo), with gradients that are exact on both devices (a loss
linear in the parameters); the tests compare the two and the hand-computed average.
"""

from __future__ import annotations

import copy
import datetime
import io
import math
import os
import pickle
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from fedkern.integrations import ddp as fddp
from fedkern.random import randk_keys
from fedkern.reference.randk import randk_indices

WORLD_SIZES = (2, 4)
DEADLINE_S = 300  # a whole launch; the scenarios take ~30-60 s
PG_TIMEOUT = datetime.timedelta(seconds=30)
DEATH_TIMEOUT = datetime.timedelta(seconds=5)  # the group on which a rank dies
RATIO = 0.1

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


# ---------------------------------------------------------------- the model, the data, the steps


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _teacher_data(rank: int, n: int = 128):
    """Rank ``rank``'s shard of a regression problem (a fixed teacher; different x per rank)."""
    teacher = _mlp(1234)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, 20, generator=g)
    with torch.no_grad():
        y = teacher(x) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(rank * 1000 + step)
    x = torch.randn(32, 20, generator=g)
    return x, x[:, :1].sin() + 0.1 * torch.randn(32, 1, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -------------------------------------------------------------------- the independent reference


def _topk_idx(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x.abs(), k).indices.sort().values


class _Reference:
    """Every rank's view of the compressed-and-averaged gradient, recomputed in plain torch from
    all ranks' local gradients. The EF buffers are kept per parameter, and each bucket is handled
    as the hook saw it (its index and parameters, recorded per step), so a bucket rebuild is
    followed too."""

    def __init__(self, hook, world, numels, *, start_iter, seed, error_feedback, unbiased,
                 momentum=None):  # fmt: skip
        self.hook, self.world, self.numels = hook, world, numels
        self.start_iter, self.seed = start_iter, seed
        self.ef, self.unbiased, self.m = error_feedback, unbiased, momentum
        zeros = [torch.zeros(n) for n in numels]
        self.s = {kind: [copy.deepcopy(zeros) for _ in range(world)] for kind in ("e", "s", "u")}
        self.server = copy.deepcopy(zeros)

    def _velocity(self, r, layout, g):
        """Momentum correction: u_r = m u_r + g (returned; stored back by the caller's _put)."""
        return self.m * self._get(self.s["u"][r], layout) + g

    def _get(self, store, layout):
        return torch.cat([store[i] for i in layout])

    def _put(self, store, layout, flat):
        for i, piece in zip(layout, flat.split([self.numels[i] for i in layout]), strict=True):
            store[i] = piece.clone()

    def bucket(self, step, b, layout, grads):
        """grads[r][i]: rank r's local gradient of parameter i (flat float32)."""
        W = self.world
        g = [torch.cat([grads[r][i] for i in layout]) for r in range(W)]
        n = g[0].numel()
        k = max(1, min(n, math.ceil(RATIO * n)))
        ef21 = self.hook in ("topk_ef21", "randk_ef21")
        if step < self.start_iter:
            mean = sum(gr / W for gr in g)
            if self.m is not None:  # momentum SGD on the average during the dense phase
                mean = self._velocity(0, layout, mean)
                for r in range(W):
                    self._put(self.s["u"][r], layout, mean)
            if ef21 and step == self.start_iter - 1:
                for r in range(W):  # EF21 starts from what it tracks: g_r, or the velocity
                    self._put(self.s["s"][r], layout, g[r] if self.m is None else mean)
                self._put(self.server, layout, mean)
            return mean
        if self.m is not None:  # u_r = m u_r + g_r is what the rank compresses
            u = [self._velocity(r, layout, g[r]) for r in range(W)]
            g = u
        out = torch.zeros(n)
        masks = [None] * W
        if self.hook == "topk_ef14":
            for r in range(W):
                e = self._get(self.s["e"][r], layout) + g[r]
                idx = _topk_idx(e, k)
                out[idx] += e[idx]
                e[idx] = 0
                masks[r] = idx
                self._put(self.s["e"][r], layout, e)
            out = out / W
        elif ef21:
            server = self._get(self.server, layout)
            shared = randk_indices(n, k, randk_keys(self.seed, (step << 16) | b))
            for r in range(W):
                s = self._get(self.s["s"][r], layout)
                d = g[r] - s
                idx = _topk_idx(d, k) if self.hook == "topk_ef21" else shared
                s[idx] += d[idx]
                server[idx] += d[idx] / W
                self._put(self.s["s"][r], layout, s)
            self._put(self.server, layout, server)
            out = server
        else:
            idx = randk_indices(n, k, randk_keys(self.seed, (step << 16) | b))
            scale = float(np.float32(n / k)) if self.unbiased else 1.0
            for r in range(W):
                if self.ef:
                    e = self._get(self.s["e"][r], layout) + g[r]
                    c = e[idx] * scale
                    e[idx] -= c
                    masks[r] = idx
                    self._put(self.s["e"][r], layout, e)
                else:
                    c = g[r][idx] * scale
                out[idx] += c
            out = out / W
        if self.m is not None:
            for r in range(W):
                if masks[r] is not None:  # factor masking: the velocity restarts where sent
                    g[r][masks[r]] = 0
                self._put(self.s["u"][r], layout, g[r])
        return out


def _record_buckets(ddp, calls: list) -> None:
    """Make ``ddp.register_comm_hook`` wrap the hook so each call's (bucket index, parameter
    positions) lands in ``calls``; ``fddp.register`` is then used unchanged."""
    index = {id(p): i for i, p in enumerate(ddp.module.parameters())}

    def register_comm_hook(state, hook):
        def recording(state, bucket):
            calls.append((bucket.index(), tuple(index[id(p)] for p in bucket.parameters())))
            return hook(state, bucket)

        recording.__annotations__ = hook.__annotations__
        DDP.register_comm_hook(ddp, state, recording)

    ddp.register_comm_hook = register_comm_hook


# ------------------------------------------------------------------------ scenarios (in ranks)

#: (hook, register options, DDP options, start_iter). "layout: rebuild" starts compressing at
#: iteration 0 in two buckets, which DDP merges into one from iteration 1: the EF buffers must
#: follow the parameters. "layout: two buckets" keeps two buckets throughout.
TWO_BUCKETS = {"bucket_cap_mb": 0.002, "find_unused_parameters": True}
REBUILD = {"bucket_cap_mb_list": [0.002] * 8}
EXACT_CASES = {
    "topk_ef14": ("topk_ef14", {}, TWO_BUCKETS, 2),
    "topk_ef21": ("topk_ef21", {}, TWO_BUCKETS, 2),
    "randk": ("randk", {}, TWO_BUCKETS, 2),
    "randk-unbiased-noEF": ("randk", {"error_feedback": False, "unbiased": True}, TWO_BUCKETS, 2),
    "topk_ef14-rebuild": ("topk_ef14", {}, REBUILD, 0),
    "topk_ef21-rebuild": ("topk_ef21", {}, REBUILD, 1),
    "randk-rebuild": ("randk", {}, REBUILD, 0),
    "randk_ef21": ("randk_ef21", {}, TWO_BUCKETS, 2),
    "topk_ef14-momentum": ("topk_ef14", {"momentum": 0.9}, TWO_BUCKETS, 2),
    "topk_ef21-momentum": ("topk_ef21", {"momentum": 0.9}, TWO_BUCKETS, 2),
    "randk-momentum": ("randk", {"momentum": 0.9}, TWO_BUCKETS, 2),
    "randk_ef21-momentum-rebuild": ("randk_ef21", {"momentum": 0.5}, REBUILD, 1),
}
EXACT_STEPS = 5


def _exactness(rank, world):
    results = {}
    for name, (hook, opts, ddp_opts, start_iter) in EXACT_CASES.items():
        model = _mlp(1)
        plain = copy.deepcopy(model)
        ddp = DDP(model, **ddp_opts)
        calls = []
        _record_buckets(ddp, calls)
        fddp.register(ddp, hook, RATIO, start_iter=start_iter, seed=7, **opts)
        numels = [p.numel() for p in ddp.module.parameters()]
        ref = _Reference(hook, world, numels, start_iter=start_iter, seed=7,
                         error_feedback=opts.get("error_feedback", True),
                         unbiased=opts.get("unbiased", False),
                         momentum=opts.get("momentum"))  # fmt: skip
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        errors, layouts = [], []
        for step in range(EXACT_STEPS):
            x, y = _batch(rank, step)
            plain.load_state_dict(ddp.module.state_dict())
            plain.zero_grad()
            _loss(plain, x, y).backward()
            local = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
            everyone = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(everyone, local)
            grads = [list(g.split(numels)) for g in everyone]
            calls.clear()
            opt.zero_grad()
            _loss(ddp, x, y).backward()
            expected = [None] * len(numels)
            for b, layout in calls:
                flat = ref.bucket(step, b, layout, grads)
                for i, piece in zip(layout, flat.split([numels[i] for i in layout]), strict=True):
                    expected[i] = piece
            exp = torch.cat(expected)
            got = torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters()])
            errors.append(float((got - exp).abs().max() / exp.abs().max()))
            layouts.append(list(calls))
            opt.step()
        results[name] = {"errors": errors, "layouts": layouts}
    return results


TRAIN_HOOKS = (None, "topk_ef14", "topk_ef21", "randk")
TRAIN_STEPS = 100


def _training(rank, world):
    x, y = _teacher_data(rank)
    shards = [_teacher_data(r) for r in range(world)]
    x_all, y_all = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
    results = {}
    for hook in TRAIN_HOOKS:
        ddp = DDP(_mlp(5))
        state = fddp.register(ddp, hook, RATIO, start_iter=5, seed=3) if hook else None
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with torch.no_grad():
            first = float(_loss(ddp.module, x_all, y_all))
        for _ in range(TRAIN_STEPS):
            opt.zero_grad()
            _loss(ddp, x, y).backward()
            opt.step()
        with torch.no_grad():
            last = float(_loss(ddp.module, x_all, y_all))
        params = _flat_params(ddp.module)
        everyone = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(everyone, params)
        spread = max(float((p - params).abs().max()) for p in everyone)
        stats = state.compression_stats() if state else None
        results[str(hook)] = {"first": first, "last": last, "spread": spread, "stats": stats}
    return results


def _bfloat16(rank, world):
    x, y = (t.bfloat16() for t in _teacher_data(rank))
    results = {}
    for hook in fddp.HOOKS:
        ddp = DDP(_mlp(5).bfloat16())
        state = fddp.register(ddp, hook, RATIO, start_iter=2)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = _loss(ddp, x, y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        params = _flat_params(ddp.module).float()
        everyone = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(everyone, params)
        dtypes = {
            t.dtype for views in state.state_dict()["buffers"].values() for t in views.values()
        }
        results[hook] = {
            "first": losses[0],
            "last": losses[-1],
            "spread": max(float((p - params).abs().max()) for p in everyone),
            "dtypes": sorted(map(str, dtypes)),
        }
    return results


CKPT_BEFORE, CKPT_AFTER = 6, 4
#: Restart cases: (hook, DDP options). A restarted DDP forms its first iteration's bucket from the
#: parameters in model order, later ones in gradient-ready order. Top-k's selection does not depend
#: on the order inside a bucket, so default DDP restarts exactly; rand-k's mask is drawn over bucket
#: positions, so it is checked where DDP's buckets are the same in every iteration.
CKPT_CASES = {
    "topk_ef14": ("topk_ef14", {}),
    "topk_ef21": ("topk_ef21", {}),
    "topk_ef14-two-buckets": ("topk_ef14", TWO_BUCKETS),
    "topk_ef21-two-buckets": ("topk_ef21", TWO_BUCKETS),
    "randk-two-buckets": ("randk", TWO_BUCKETS),
}


def _run_steps(ddp, opt, rank, steps):
    trace = []
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad()
        _loss(ddp, x, y).backward()
        opt.step()
        trace.append(_flat_params(ddp.module).clone())
    return trace


def _restore(rank, ddp_opts, blob, steps, reference, attach):
    """Continue a checkpoint in a new DDP model; the largest parameter difference to
    ``reference`` (the uninterrupted run) over ``steps``."""
    ddp = DDP(_mlp(99), **ddp_opts)  # other weights: everything must come from the checkpoint
    blob.seek(0)
    saved = torch.load(blob)
    ddp.module.load_state_dict(saved["model"])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    attach(ddp, saved)
    trace = _run_steps(ddp, opt, rank, steps)
    return max(float((a - b).abs().max()) for a, b in zip(trace, reference, strict=True))


def _checkpoint(rank, world):
    results = {}
    cfg = {"start_iter": 2, "seed": 11}
    for case, (hook, ddp_opts) in CKPT_CASES.items():
        ddp = DDP(_mlp(2), **ddp_opts)
        state = fddp.register(ddp, hook, RATIO, **cfg)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        _run_steps(ddp, opt, rank, range(CKPT_BEFORE))
        blob = io.BytesIO()
        ckpt = {"model": ddp.module.state_dict(), "opt": opt.state_dict(),
                "hook": state.state_dict()}  # fmt: skip
        torch.save(ckpt, blob)
        pickled = pickle.dumps(state)
        after = range(CKPT_BEFORE, CKPT_BEFORE + CKPT_AFTER)
        reference = _run_steps(ddp, opt, rank, after)

        def via_state_dict(ddp2, saved, hook=hook):
            fddp.register(ddp2, hook, RATIO, **cfg).load_state_dict(saved["hook"])

        def via_pickle(ddp2, saved, pickled=pickled):
            state2 = pickle.loads(pickled)
            state2.bind(ddp2)
            ddp2.register_comm_hook(state2, fddp.comm_hook)

        def fresh(ddp2, saved, hook=hook):  # control: without the EF state the steps differ
            fddp.register(ddp2, hook, RATIO, **cfg).iter = CKPT_BEFORE

        out = {
            name: _restore(rank, ddp_opts, blob, after, reference, attach)
            for name, attach in (("state_dict", via_state_dict), ("pickle", via_pickle),
                                 ("fresh", fresh))
        }  # fmt: skip
        out["buffers"] = sorted(ckpt["hook"]["buffers"])
        other = fddp.register(DDP(_mlp(2), **ddp_opts), hook, RATIO, start_iter=2, seed=12)
        try:
            other.load_state_dict(ckpt["hook"])
            out["mismatch"] = "no error"
        except ValueError as e:
            out["mismatch"] = str(e)
        results[case] = out
    return results


def _seed_mismatch(rank, world):
    ddp = DDP(_mlp(3))
    try:
        fddp.register(ddp, "randk", RATIO, seed=rank)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def _death(rank, world, save):
    """The last rank exits mid-training; the others must get an error from backward()."""
    group = dist.new_group(timeout=DEATH_TIMEOUT)
    ddp = DDP(_mlp(4), process_group=group)
    fddp.register(ddp, "topk_ef21", RATIO, start_iter=1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    _run_steps(ddp, opt, rank, range(3))
    dist.barrier()
    if rank == world - 1:
        save({"died": True})
        os._exit(0)
    t0 = time.monotonic()
    try:
        _run_steps(ddp, opt, rank, range(3, 6))
        outcome = {"error": None}
    except RuntimeError as e:
        outcome = {"error": f"{type(e).__name__}: {e}"}
    outcome["seconds"] = time.monotonic() - t0
    return outcome


#: (name, hook, register options, optimizer): every hook under SGD momentum 0.9 and under Adam,
#: an MLP 64-64-10 on scikit-learn's digits, ratio 0.05 (the setting of a user report).
#: "+mc": momentum correction in the hook (then SGD without momentum).
OPT_CASES = [
    (f"{hook or 'dense'}{'+mc' if mc else ''}-{opt}", hook, {"momentum": 0.9} if mc else {}, opt)
    for opt in ("sgd", "adam")
    for hook, mc in ((None, False), ("topk_ef14", False), ("topk_ef21", False),
                     ("topk_ef14", True), ("randk", False), ("randk", True),
                     ("randk_ef21", False), ("randk_ef21", True))
    if not (mc and opt == "adam")
]  # fmt: skip
OPT_STEPS = 300
OPT_RATIO = 0.05


def _optimizers(rank, world):
    import warnings

    from fedkern import data

    A, y = data.load("digits")
    A = A[:, :-1].float()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    mine = train[rank::world]
    results = {}
    for name, hook, opts, opt_name in OPT_CASES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 10))  # fmt: skip
        ddp = DDP(model)
        if opt_name == "sgd":
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.0 if opts else 0.9)
        else:
            opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        if hook:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fddp.register(ddp, hook, OPT_RATIO, start_iter=10, seed=1, optimizer=opt, **opts)
            results.setdefault("warned", {})[name] = [str(w.message) for w in caught]
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(OPT_STEPS):
            idx = mine[torch.randint(0, len(mine), (32,), generator=g)]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(A[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            results[name] = float((model(A[test]).argmax(1) == y[test]).float().mean())
    return results


def _no_index_checks(rank, world):
    """Calls of the value-reading index check (a host sync on CUDA) during 3 compressed steps of
    each hook, and, as the control, during one default ``sparse_add_`` call."""
    import fedkern
    import fedkern.ops.sparse as sparse_ops

    real, calls = sparse_ops.check_index_values, [0]

    def counting(*args):
        calls[0] += 1
        return real(*args)

    sparse_ops.check_index_values = counting
    try:
        results = {}
        x, y = _batch(rank, 0)
        for hook in ("topk_ef14", "topk_ef21", "randk", "randk_ef21"):
            ddp = DDP(_mlp(2), **TWO_BUCKETS)
            fddp.register(ddp, hook, RATIO, start_iter=0, seed=1)
            calls[0] = 0
            for _ in range(3):
                ddp.zero_grad()
                _loss(ddp, x, y).backward()
            results[hook] = calls[0]
        calls[0] = 0
        fedkern.sparse_add_(torch.zeros(4), torch.ones(1), torch.tensor([2]))
        results["control: sparse_add_ default"] = calls[0]
        return results
    finally:
        sparse_ops.check_index_values = real


SCENARIOS = {
    "exactness": _exactness,
    "no_index_checks": _no_index_checks,
    "training": _training,
    "bfloat16": _bfloat16,
    "checkpoint": _checkpoint,
    "seed_mismatch": _seed_mismatch,
    "optimizers": lambda rank, world: _optimizers(rank, world) if world == 2 else {},
}


def _worker(rank, world, tmp, kind="cpu"):
    """One rank. kind "cpu": gloo on CPU tensors, every scenario of SCENARIOS, then the death;
    "nccl" / "gloo-cuda": the rank's GPU is cuda:0, the backend nccl / gloo, and it runs
    ``_on_cuda`` (the hooks on CUDA tensors and, as the control, on CPU tensors)."""
    path = Path(tmp) / f"rank{rank}.pt"
    results = {}

    def save(extra=None):
        if extra is not None:
            results["death"] = extra
        torch.save(results, f"{path}.part")
        os.replace(f"{path}.part", path)

    try:
        torch.set_num_threads(1)
        if sys.platform.startswith("linux"):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        if kind != "cpu":
            torch.cuda.set_device(0)
        store = dist.FileStore(str(Path(tmp) / "store"), world)
        dist.init_process_group("nccl" if kind == "nccl" else "gloo", store=store, rank=rank,
                                world_size=world, timeout=PG_TIMEOUT)  # fmt: skip
        if kind != "cpu":
            t0 = time.monotonic()
            results["on_cuda"] = _on_cuda(rank, world, kind)
            results["seconds"] = {"on_cuda": time.monotonic() - t0}
            save()
            return
        for name, scenario in SCENARIOS.items():
            t0 = time.monotonic()
            try:
                results[name] = scenario(rank, world)
            except Exception:
                results[name] = {"traceback": traceback.format_exc()}
            results.setdefault("seconds", {})[name] = time.monotonic() - t0
            save()
        try:
            save(_death(rank, world, save))
        except Exception:
            save({"traceback": traceback.format_exc()})
    except Exception:
        results["traceback"] = traceback.format_exc()
        save()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip process-group teardown: a peer is gone


def _start(world: int, tmp: Path, kind: str = "cpu") -> list:
    """The ranks of one world, started (spawned: CUDA and fork do not mix)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp), kind), daemon=True)
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    return procs


def _finish(procs: list, tmp: Path, deadline_s: float = DEADLINE_S) -> list[dict]:
    """Each rank's saved results once it exits; ranks alive after ``deadline_s`` are killed and
    marked "hung"."""
    deadline = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = []
    for r in range(len(procs)):
        path = tmp / f"rank{r}.pt"
        results.append(torch.load(path) if path.exists() else {})
    for r in hung:
        results[r]["hung"] = True
    return results


def _launch(world: int, tmp: Path) -> list[dict]:
    return _finish(_start(world, tmp), tmp)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"ddp{world}"))


def _get(ranks_results, name):
    """Each rank's result of a scenario; fails with the rank's traceback if it raised."""
    out = []
    for r, res in enumerate(ranks_results):
        assert "traceback" not in res, f"rank {r} failed to start:\n{res['traceback']}"
        assert name in res, f"rank {r} never finished {name!r} (hung: {res.get('hung', False)})"
        assert "traceback" not in res[name], f"rank {r}, {name}:\n{res[name]['traceback']}"
        out.append(res[name])
    return out


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_hook_equals_hand_computed_average(ranks, case):
    """(1) After backward, every rank's gradients equal the compressed-and-averaged gradient
    recomputed from all ranks' local gradients, step by step (dense steps included)."""
    world, results = ranks
    for r, res in enumerate(_get(results, "exactness")):
        errors = res[case]["errors"]
        assert max(errors) < 1e-5, f"rank {r}: relative errors per step {errors}"
    layouts = _get(results, "exactness")[0][case]["layouts"]
    buckets = [len(step) for step in layouts]
    if case.endswith("rebuild"):
        assert buckets[0] == 2 and buckets[-1] == 1, buckets  # the EF state changed buckets
    else:
        assert min(buckets) == 2, buckets


def test_hooks_skip_the_index_check(ranks):
    """The hooks build their indices and pass check_indices=False: no call of the check that
    reads index values (a host synchronization on CUDA) in 3 steps of each hook; the control, a
    default sparse_add_ in the same rank, calls it once."""
    world, results = ranks
    for r, res in enumerate(_get(results, "no_index_checks")):
        assert res.pop("control: sparse_add_ default") == 1, f"rank {r}: the control is broken"
        assert res == dict.fromkeys(("topk_ef14", "topk_ef21", "randk", "randk_ef21"), 0), res


def test_training_reaches_dense_loss(ranks):
    """(2) 100 SGD steps with each hook (ratio 0.1, start_iter 5) end within 30% of the dense
    all-reduce's final loss and below a third of the initial loss; all ranks keep equal models."""
    world, results = ranks
    per_rank = _get(results, "training")
    for r, res in enumerate(per_rank):
        for hook, rec in res.items():
            assert rec["spread"] == 0.0, f"rank {r}, {hook}: ranks' models differ"
            assert rec["first"] == per_rank[0][hook]["first"]
    res = per_rank[0]
    dense = res["None"]["last"]
    assert dense < res["None"]["first"] / 3
    for hook in TRAIN_HOOKS[1:]:
        rec = res[hook]
        assert rec["last"] <= 1.3 * dense, f"{hook}: {rec['last']:.4g} vs dense {dense:.4g}"
        rate, dense_bytes, sent = rec["stats"]
        assert rate > 2.0, f"{hook}: compression rate {rate}"


def test_bfloat16_models_train(ranks):
    """bfloat16 parameters: the buffers are bfloat16, the ranks stay equal, the loss halves."""
    world, results = ranks
    for r, res in enumerate(_get(results, "bfloat16")):
        for hook, rec in res.items():
            assert rec["spread"] == 0.0, f"rank {r}, {hook}: ranks' models differ"
            assert rec["dtypes"] == ["torch.bfloat16"], rec
            assert rec["last"] < rec["first"] / 2, f"rank {r}, {hook}: {rec}"


def test_hooks_under_sgd_momentum_and_adam(ranks):
    """Every hook trains an MLP on digits for 300 steps under SGD momentum 0.9 and under Adam
    (ratio 0.05). The top-k hooks match the dense all-reduce's test accuracy within 3 points
    under both optimizers; so does rand-k with EF21 under Adam. Rand-k at 5 % trails dense under
    SGD momentum (each coordinate arrives about every 20 steps): it trains (> 40 %; chance is
    10 %), and ``register`` warns about exactly these pairings, and about nothing else."""
    world, results = ranks
    if world != 2:
        pytest.skip("run in the 2-process world")
    acc = _get(results, "optimizers")[0]
    warned = acc.pop("warned")
    for opt in ("sgd", "adam"):
        dense = acc[f"dense-{opt}"]
        assert dense > 0.9, acc
        close = ["topk_ef14", "topk_ef21"]
        close.append("topk_ef14+mc" if opt == "sgd" else "randk_ef21")
        for hook in close:
            assert acc[f"{hook}-{opt}"] >= dense - 0.03, (hook, opt, acc)
        for name, a in acc.items():
            assert a > 0.4, (name, acc)
    noisy = {"randk-sgd", "randk_ef21-sgd"}
    for name, messages in warned.items():
        if name in noisy:
            assert any("momentum correction" in w for w in messages), (name, warned)
        else:
            assert not messages, (name, warned)


def test_register_checks_the_optimizer_pairing(offline_ddp):
    """The pairing rules of the module docstring (``register`` applies them before any
    communication, right after the state's own checks)."""
    from types import SimpleNamespace

    params = offline_ddp().parameters()
    sgd_m = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(offline_ddp().parameters())
    randk = SimpleNamespace(hook="randk", momentum=None)
    with pytest.raises(ValueError, match="optimizer must then have momentum 0"):
        fddp._check_optimizer(SimpleNamespace(hook="topk_ef14", momentum=0.9), sgd_m)
    with pytest.warns(UserWarning, match="momentum correction"):
        fddp._check_optimizer(randk, sgd_m)
    with pytest.warns(UserWarning, match="without the optimizer"):
        fddp._check_optimizer(randk, None)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        fddp._check_optimizer(randk, "sgd")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the safe pairings are quiet
        fddp._check_optimizer(randk, adam)
        fddp._check_optimizer(SimpleNamespace(hook="randk", momentum=0.9),
                              torch.optim.SGD(offline_ddp().parameters(), lr=0.1))  # fmt: skip
        fddp._check_optimizer(SimpleNamespace(hook="topk_ef14", momentum=None), sgd_m)
    with pytest.raises(ValueError, match="momentum must be None or in"):
        fddp.register(offline_ddp(), "topk_ef14", momentum=1.0)
    with pytest.raises(ValueError, match="needs error_feedback=True"):
        fddp.register(offline_ddp(), "randk", momentum=0.9, error_feedback=False)


def test_checkpoint_restart_is_exact(ranks):
    """(3) state_dict -> a new DDP model and a new state (or pickle -> bind) continues with
    bit-identical parameters; without the EF state it does not; a mismatched seed is refused."""
    world, results = ranks
    for r, res in enumerate(_get(results, "checkpoint")):
        for hook, rec in res.items():
            assert rec["state_dict"] == 0.0, f"rank {r}, {hook}: {rec}"
            assert rec["pickle"] == 0.0, f"rank {r}, {hook}: {rec}"
            assert rec["fresh"] > 0.0, f"rank {r}, {hook}: the EF state made no difference"
            assert "seed=11" in rec["mismatch"] and "seed=12" in rec["mismatch"], rec["mismatch"]
        assert res["topk_ef21"]["buffers"] == ["server", "state"]
        assert res["topk_ef14"]["buffers"] == res["randk-two-buckets"]["buffers"] == ["error"]


def test_mismatched_seeds_fail_on_every_rank(ranks):
    """(5) register() with a different seed per rank raises on every rank, listing the seeds."""
    world, results = ranks
    seeds = str(list(range(world)))
    for r, res in enumerate(_get(results, "seed_mismatch")):
        assert res["error"] is not None, f"rank {r} accepted mismatched seeds"
        assert f"seed per rank: {seeds}" in res["error"], res["error"]


def test_dead_rank_raises_instead_of_hanging(ranks):
    """(4) When a rank exits, backward() on the others raises within the group's timeout."""
    world, results = ranks
    death = _get(results, "death")
    assert death[-1] == {"died": True}
    for r, res in enumerate(death[:-1]):
        assert res["error"] is not None, f"rank {r} kept training without its peer"
        assert res["seconds"] < DEATH_TIMEOUT.total_seconds() + 10, res


# --------------------------------------------------------- argument checks (no communication)


@pytest.fixture(scope="module")
def offline_ddp():
    """A DDP model over a process group whose backend is not a real one: DDP's construction only
    needs its (no-op) collectives, and fedkern must refuse it before communicating."""
    from torch._C._distributed_c10d import FakeProcessGroup
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def make(dtype=torch.float32):
        pg = dist.ProcessGroup(FakeStore(), 0, 2)
        pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.CUSTOM,
                             FakeProcessGroup._create_internal(0, 2))  # fmt: skip
        return DDP(_mlp(0).to(dtype), process_group=pg)

    make()
    return make


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"hook": "topk"}, ValueError, "valid hooks are topk_ef14, topk_ef21, randk, randk_ef21"),
        ({"hook": 3}, TypeError, "hook must be a str"),
        ({"ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": -0.1}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": float("nan")}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": True}, TypeError, "ratio must be a float"),
        ({"start_iter": -1}, ValueError, "start_iter"),
        ({"start_iter": 2.5}, TypeError, "start_iter"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**63}, ValueError, "seed"),
        ({"error_feedback": False}, ValueError, "applies to the 'randk' hook only"),
        ({"unbiased": True}, ValueError, "applies to the 'randk' hook only"),
        ({"hook": "randk", "unbiased": 1}, TypeError, "unbiased must be a bool"),
    ],
)
def test_bad_arguments(offline_ddp, kwargs, exc, match):
    args = {"hook": "topk_ef21", "ratio": 0.01, **kwargs}
    with pytest.raises(exc, match=match):
        fddp.register(offline_ddp(), args.pop("hook"), args.pop("ratio"), **args)


def test_bad_model_and_group(offline_ddp):
    with pytest.raises(TypeError, match="model must be a torch.nn.parallel.Distributed"):
        fddp.register(_mlp(0), "topk_ef14", 0.1)
    with pytest.raises(ValueError, match="backend 'undefined' is not supported"):
        fddp.register(offline_ddp(), "topk_ef14", 0.1)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        fddp.register(offline_ddp(), "topk_ef14", 0.1, process_group=object())
    with pytest.raises(TypeError, match=r"parameter 'module.0.weight' has dtype torch.float64"):
        fddp.register(offline_ddp(torch.float64), "randk", 0.1)


# ------------------------------------------------------- on CUDA (skipped without a CUDA device)

#: (hook, register options, start_iter) of the CUDA runs: every hook, rand-k without error
#: feedback (unbiased), momentum correction; two dense steps first (EF21's warm start included).
CUDA_CASES = {
    "topk_ef14": ("topk_ef14", {}, 2),
    "topk_ef21": ("topk_ef21", {}, 2),
    "randk": ("randk", {}, 2),
    "randk-unbiased-noEF": ("randk", {"error_feedback": False, "unbiased": True}, 2),
    "randk_ef21": ("randk_ef21", {}, 2),
    "topk_ef14-momentum": ("topk_ef14", {"momentum": 0.9}, 2),
    "randk_ef21-momentum": ("randk_ef21", {"momentum": 0.5}, 1),
}
CUDA_STEPS = 5
CUDA_DEADLINE_S = 150  # both CUDA launches together (CUDA init, NCCL, kernel compiles)


class _Linear(torch.nn.Module):
    """``_mlp``'s parameters (so DDP buckets them as in the gloo tests) under a loss linear in
    them: loss = sum_i <p_i, c_i>, whose gradients are exactly the c_i on every device."""

    def __init__(self):
        super().__init__()
        self.net = _mlp(0)

    def forward(self, coefs):
        return sum((p * c).sum() for p, c in zip(self.net.parameters(), coefs, strict=True))


def _coefs(rank: int, step: int) -> list[torch.Tensor]:
    """Rank ``rank``'s gradients at ``step`` (CPU, float32), one per parameter of ``_Linear``."""
    g = torch.Generator().manual_seed(50_000 + 100 * rank + step)
    return [torch.randn(p.shape, generator=g) for p in _mlp(0).parameters()]


def _hook_grads(rank, device, group):
    """Per CUDA_CASES case: the gradients after each backward (flat, CPU copies) and the buckets
    the hook saw, with the model on ``device`` and the hooks communicating in ``group``."""
    import warnings

    out = {}
    for name, (hook, opts, start_iter) in CUDA_CASES.items():
        model = _Linear().to(device)
        ids = {"device_ids": [device.index]} if device.type == "cuda" else {}
        ddp = DDP(model, process_group=group, **TWO_BUCKETS, **ids)
        calls = []
        _record_buckets(ddp, calls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rand-k without momentum correction warns
            fddp.register(ddp, hook, RATIO, start_iter=start_iter, seed=7, **opts)
        grads, layouts = [], []
        for step in range(CUDA_STEPS):
            calls.clear()
            ddp.zero_grad()
            ddp([c.to(device) for c in _coefs(rank, step)]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu())
            layouts.append(list(calls))
        out[name] = {"grads": grads, "layouts": layouts}
    return out


def _on_cuda(rank, world, kind):
    """The hooks on CUDA tensors over the default group (nccl, or gloo), and the same hooks on
    CPU tensors over gloo (the default group, or a gloo group beside nccl) as the control."""
    cpu_group = dist.new_group(backend="gloo") if kind == "nccl" else None
    return {
        "backend": str(dist.get_backend()),
        "cuda": _hook_grads(rank, torch.device("cuda", 0), None),
        "cpu": _hook_grads(rank, torch.device("cpu"), cpu_group),
    }


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory):
    """The CUDA launches, concurrently: "nccl" (world size 1: one process per GPU, and one GPU)
    and "gloo-cuda" (world size 2, both ranks on cuda:0, gloo over CUDA tensors)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    started = {}
    if dist.is_nccl_available():
        started["nccl"] = (1, tmp_path_factory.mktemp("ddp-nccl"))
    if dist.is_gloo_available():
        started["gloo-cuda"] = (2, tmp_path_factory.mktemp("ddp-gloo-cuda"))
    procs = {kind: _start(world, tmp, kind) for kind, (world, tmp) in started.items()}
    deadline = time.monotonic() + CUDA_DEADLINE_S
    return {kind: _finish(procs[kind], started[kind][1], max(1.0, deadline - time.monotonic()))
            for kind in started}  # fmt: skip


def _check_on_cuda(runs, kind):
    """Every rank: the CUDA gradients equal the CPU control's (the same hook on the same
    gradients, the same buckets), and both equal the hand-computed average (``_Reference``)."""
    if kind not in runs:
        pytest.skip(f"torch.distributed has no {kind.split('-')[0]} backend here")
    per_rank = _get(runs[kind], "on_cuda")
    world = len(per_rank)
    numels = [p.numel() for p in _mlp(0).parameters()]
    everyone = [[torch.cat([c.reshape(-1) for c in _coefs(r, s)]) for r in range(world)]
                for s in range(CUDA_STEPS)]  # fmt: skip
    for r, res in enumerate(per_rank):
        assert kind.split("-")[0] in res["backend"], res["backend"]
        for name, (hook, opts, start_iter) in CUDA_CASES.items():
            got, ctl = res["cuda"][name], res["cpu"][name]
            if got["layouts"] == ctl["layouts"]:  # the same buckets: the same numbers
                for step, (a, b) in enumerate(zip(got["grads"], ctl["grads"], strict=True)):
                    diff = float((a - b).abs().max() / b.abs().max())
                    assert diff <= 1e-6, f"rank {r}, {name}, step {step}: CUDA vs CPU {diff}"
            for run in (got, ctl):  # each against the reference over the buckets it saw
                ref = _Reference(hook, world, numels, start_iter=start_iter, seed=7,
                                 error_feedback=opts.get("error_feedback", True),
                                 unbiased=opts.get("unbiased", False),
                                 momentum=opts.get("momentum"))  # fmt: skip
                for step in range(CUDA_STEPS):
                    grads = [list(g.split(numels)) for g in everyone[step]]
                    expected = [None] * len(numels)
                    for bucket, layout in run["layouts"][step]:
                        flat = ref.bucket(step, bucket, layout, grads)
                        for i, piece in zip(layout, flat.split([numels[i] for i in layout]),
                                            strict=True):  # fmt: skip
                            expected[i] = piece
                    exp = torch.cat(expected)
                    err = float((run["grads"][step] - exp).abs().max() / exp.abs().max())
                    assert err < 1e-5, f"rank {r}, {name}, step {step}: relative error {err}"


def test_hooks_on_cuda_over_nccl_equal_the_cpu_run(cuda_runs):
    """(a) Every hook on CUDA tensors with NCCL (world size 1, a real process group in a spawned
    process): the gradients DDP hands back equal the CPU/gloo run of the same hook on the same
    gradients, step by step, and the hand-computed reference."""
    _check_on_cuda(cuda_runs, "nccl")


def test_hooks_on_cuda_over_gloo_two_ranks_equal_the_cpu_run(cuda_runs):
    """(b) Two ranks on one GPU, gloo over CUDA tensors: equal to the same two ranks on CPU
    tensors and to the hand-computed average of both ranks' gradients."""
    _check_on_cuda(cuda_runs, "gloo-cuda")
