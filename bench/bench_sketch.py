"""Benchmark: MAST sketch ops and the RAC-LoRA layer against the eager way (standalone script).

    python bench/bench_sketch.py [--quick]

Cases (CPU, fixed seed, fedkern and eager timed interleaved on identical inputs, medians):

- ``sketch.apply`` (w = v + S (x - v)) and ``sketch.grad_step_`` (x -= gamma S^T g) for
  RandK(1%) and Bernoulli(1%) at d = 1e7 (--quick: 1e6). Eager: a scaled mask tensor drawn with
  torch's generator (``randperm(d)[:k]`` scattered into zeros, or ``rand(d) < p``), then dense
  multiplies (what a user writes without a fused sparse op).
  The apply rows also time ``v.clone()`` (column "floor"): a fresh dense output of d floats, which
  apply must produce; on a CPU whose fresh pages cost more than the arithmetic, that is the floor.
- ``RACLoRALinear`` forward + backward (frozen A regenerated from the seed, B trained) against an
  eager LoRA layer (base linear + stored A and B parameters, ``(x A^T) B^T``) at equal rank; the
  memory column is the bytes the adapter keeps (parameters, buffers) besides the base weight.

Page faults: a fresh 40 MB tensor costs ~10k first-touch faults (~10 ms on the 2-core dev VM,
more than fedkern's Bernoulli arithmetic at 1e7). fedkern's apply advises transparent huge pages
for its dense output (csrc/cpu/sketch.cpp); eager PyTorch gets the same only with
THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator then advises every large allocation). Run both ways
for a like-for-like allocation policy; the JSON records the setting and the kernel's THP mode.

Prints a markdown table (ratio = eager / fedkern) and writes bench/results/sketch-cpu-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

import torch
from torch import nn

import fedkern.lora
import fedkern.sketch as sk
from fedkern.benchmarks import synchronize, time_call


def interleaved(fns: dict, reps: int, device="cpu", rearm=None) -> dict:
    """Median seconds of each callable, the calls interleaved; ``rearm()`` runs untimed first."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if rearm is not None:
                rearm()
            synchronize(device)
            times[k].append(time_call(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def sketch_cases(d: int, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=gen)
    v = torch.randn(d, generator=gen)
    g = torch.randn(d, generator=gen)
    x0 = x.clone()
    q = 0.01
    k = int(q * d)
    tgen = torch.Generator().manual_seed(1)

    def mask_randk():
        m = torch.zeros(d)
        m[torch.randperm(d, generator=tgen)[:k]] = d / k
        return m

    def mask_bern():
        return (torch.rand(d, generator=tgen) < q).float() / q

    rows = []
    step = [0]  # a fresh sketch step per call
    for name, sketch, mask in (("RandK(1%)", sk.RandK(ratio=q), mask_randk),
                               ("Bernoulli(1%)", sk.Bernoulli(q), mask_bern)):  # fmt: skip

        def fk_apply(sketch=sketch):
            step[0] += 1
            return sk.apply(sketch, x, v, seed=3, step=step[0])

        def eager_apply(mask=mask):
            return v + mask() * (x - v)

        # floor: a fresh dense copy of v (an output of d new pages, what apply must produce)
        t = interleaved({"fedkern": fk_apply, "eager": eager_apply, "floor": v.clone}, reps)
        rows.append({"case": f"apply {name}", "d": d, **t})

        def rearm():
            x.copy_(x0)

        def fk_step(sketch=sketch):
            step[0] += 1
            sk.grad_step_(sketch, x, g, 0.1, seed=3, step=step[0])

        def eager_step(mask=mask):
            x.sub_(0.1 * (mask() * g))

        t = interleaved({"fedkern": fk_step, "eager": eager_step}, reps, rearm=rearm)
        rows.append({"case": f"grad_step_ {name}", "d": d, **t})
    return rows


class EagerLoRA(nn.Module):
    """A plain LoRA layer: frozen base, stored A [r, n] and B [m, r] parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        m, n = base.weight.shape
        self.A = nn.Parameter(torch.randn(r, n) / n**0.5, requires_grad=False)
        self.B = nn.Parameter(torch.zeros(m, r))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * ((x @ self.A.T) @ self.B.T)


def adapter_bytes(layer: nn.Module) -> int:
    base = {id(t) for t in layer.base.parameters()} | {id(t) for t in layer.base.buffers()}
    own = [t for t in (*layer.parameters(), *layer.buffers()) if id(t) not in base]
    return sum(t.numel() * t.element_size() for t in own)


def lora_case(m: int, n: int, r: int, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(n, m)
    fk = fedkern.lora.RACLoRALinear(nn.Linear(n, m), r, 1.0, mode="rac", seed=0)
    fk.base.load_state_dict(base.state_dict())
    eager = EagerLoRA(base, r, 1.0)
    xin = torch.randn(batch, n, generator=torch.Generator().manual_seed(2))

    def run(layer):
        def fn():
            layer.zero_grad(set_to_none=True)
            layer(xin).square().mean().backward()

        return fn

    t = interleaved({"fedkern": run(fk), "eager": run(eager)}, reps)
    return {"case": f"RACLoRALinear fwd+bwd {m}x{n} r={r} batch={batch}", "d": m * n, **t,
            "adapter_bytes_fedkern": adapter_bytes(fk),
            "adapter_bytes_eager": adapter_bytes(eager)}  # fmt: skip


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"; "" off Linux)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="d = 1e6, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None,
                    help="interleaved repetitions per case (default 21, --quick 5)")  # fmt: skip
    args = ap.parse_args()
    d, reps = (10**6, 5) if args.quick else (10**7, 21)
    if args.reps is not None:
        if args.reps < 1:
            ap.error("--reps must be >= 1")
        reps = args.reps
    rows = sketch_cases(d, reps)
    rows.append(lora_case(1024, 1024, 8, 256, 3 * reps))
    print("| case | d | fedkern ms | eager ms | ratio | floor ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        row["ratio"] = row["eager"] / row["fedkern"]
        floor = f"{1e3 * row['floor']:.2f}" if "floor" in row else ""
        print(f"| {row['case']} | {row['d']:.0e} | {1e3 * row['fedkern']:.2f} | "
              f"{1e3 * row['eager']:.2f} | {row['ratio']:.1f}x | {floor} |")  # fmt: skip
    lora = rows[-1]
    print(f"\nadapter memory besides the base weight: fedkern {lora['adapter_bytes_fedkern']} B "
          f"(no stored frozen factor), eager {lora['adapter_bytes_eager']} B")  # fmt: skip
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(__file__).parent / "results" / f"sketch-cpu-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
            "thp_mode": _thp_mode()}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
