"""DDP communication hooks: bytes on the wire and time per step, against the dense all-reduce,
PyTorch's fp16 / bf16 compression hooks and its PowerSGD hook (rank 1 and 4), on one MLP (~1.05M
float32 parameters).

Run: ``python bench/bench_ddp.py [--world 2] [--ratio 0.01] [--steps 30] [--json out.json]``.
It spawns ``--world`` processes on this machine (gloo over loopback, CPU, one thread each; nccl and
the GPU with ``--device cuda`` when there are enough GPUs), trains the same model from the same
initial weights with each method, and prints one table.

Bytes: what one rank hands to its collectives per compressed step (payload), counted by the hooks
themselves (``state.compression_stats()``; PowerSGD: its compression stats, float32 elements of P,
Q and the uncompressed tensors; fp16 / bf16: 2 bytes per element of every bucket the hook
compresses, counted by a wrapper around PyTorch's hook, which compresses from the first step). The
traffic a rank actually sends over the network depends on the collective's algorithm: for a ring
all-reduce it is 2(W-1)/W times the payload, for an all_gather (W-1) times it -- with W = 2 both
equal the payload, so the column is also the wire traffic there.
All methods run with the whole model in one DDP bucket (``--bucket-cap-mb 100``): PowerSGD's hook
issues its second and third all-reduce from future callbacks, and with gloo and more than one
bucket those interleave differently on different ranks (torch 2.13: "Received data size doesn't
match expected size", then an abort or a hang). fedkern's hooks issue every collective from the hook
call itself, in DDP's bucket order, and run with any number of buckets.
Time: median wall time of a whole step (forward, backward with the hook, SGD step) after warm-up;
it is a CPU/loopback figure, dominated by compute rather than by the network.

Not a pytest-benchmark suite (it needs several processes); bench/conftest.py collects this file when
pytest is pointed at bench/, and it defines no tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
from torch.nn.parallel import DistributedDataParallel as DDP

METHODS = ("dense", "topk_ef14", "topk_ef21", "randk", "fp16", "bf16", "powersgd-r1", "powersgd-r4")
HALF_HOOKS = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
WARMUP = 5
START_ITER = 2  # compression from the third step on, for every method


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )  # fmt: skip


def _attach(ddp, method: str, ratio: float):
    """Register the method's hook; returns a function giving the bytes handed over so far."""
    from fedkern.integrations import ddp as fddp

    if method == "dense":
        numel = sum(p.numel() * p.element_size() for p in ddp.parameters())
        steps = [0]

        def count():
            return numel * steps[0]

        return count, steps
    if method in HALF_HOOKS:
        hook, sent = HALF_HOOKS[method], [0]

        def counted(state, bucket):  # PyTorch's hook casts the whole bucket to 2-byte floats
            sent[0] += 2 * bucket.buffer().numel()
            return hook(state, bucket)

        ddp.register_comm_hook(None, counted)
        return (lambda: sent[0]), None
    if method.startswith("powersgd"):
        rank = int(method.rsplit("r", 1)[1])
        state = psgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=START_ITER
        )
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
        return (lambda: 4 * state.total_numel_after_compression), None
    state = fddp.register(ddp, method, ratio, start_iter=START_ITER, seed=0)
    return (lambda: state.bytes_sent), None


def _worker(rank, world, store_path, args, queue):
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=dist.FileStore(store_path, world), rank=rank,
        world_size=world, timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 512, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    rows = []
    for method in METHODS:
        ddp = DDP(_model().to(device), device_ids=[rank] if cuda else None,
                  bucket_cap_mb=args.bucket_cap_mb)  # fmt: skip
        count, dense_steps = _attach(ddp, method, args.ratio)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        times, before = [], 0
        for step in range(WARMUP + args.steps):
            if step == WARMUP:
                before = count()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if dense_steps is not None:
                dense_steps[0] += 1
        sent = (count() - before) / args.steps
        step_times = torch.tensor(times[WARMUP:])
        # every rank's median: report the slowest rank's (the step time the job sees)
        median = torch.tensor([statistics.median(step_times.tolist())], device=device)
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
        rows.append({"method": method, "bytes": sent, "ms": 1e3 * float(median)})
    if rank == 0:
        numel = sum(p.numel() for p in _model().parameters())
        queue.put({"numel": numel, "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def _table(result, args) -> str:
    rows = result["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [
        f"DDP hooks, {args.world} processes, {args.device}, MLP {result['numel']:,} params, "
        f"batch {args.batch}, top-k/rand-k ratio {args.ratio}, median of {args.steps} steps",
        "",
        "| method | bytes/step/rank | vs dense | ms/step | vs dense |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        smaller = "1x" if r is dense else f"{dense['bytes'] / r['bytes']:.1f}x smaller"
        lines.append(
            f"| {r['method']} | {r['bytes']:,.0f} | {smaller} "
            f"| {r['ms']:.2f} | {r['ms'] / dense['ms']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=100.0,
        help="DDP bucket size (default: the whole model in one bucket)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        parser.error(f"--device cuda needs {args.world} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(args.world, os.path.join(tmp, "store"), args, queue),
            nprocs=args.world, start_method="spawn",
        )  # fmt: skip
    result = queue.get()
    print(_table(result, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
