"""fedkern's MicroAdam side by side with its authors' MicroAdam and with fused AdamW.

    python bench/microadam_authors.py [--sizes 1e8,1e7] [--reps 20] [--warmup 3] [--out PATH]
    python bench/microadam_authors.py --device cpu | --dry-run     (CPU: the authors' part skipped)
    python bench/microadam_authors.py --unavailable REASON [--out PATH]   (records why not run)

The authors' MicroAdam (Modoranu et al., IST Austria DASLab) is ``ista_daslab_optimizers.MicroAdam``
from the pip packages ista-daslab-optimizers (Python) and ista-daslab-optimizers-cuda (CUDA C++
kernels compiled at install time); ``fedkern.benchmarks.peers.authors_microadam`` imports it.
Each size n is n bfloat16 parameters in 4 tensors (40/30/20/10 %, fedkern.benchmarks.microadam's
split) with gradients, the same values for all three optimizers: fedkern.optim.MicroAdam, the
authors' MicroAdam, torch.optim.AdamW(fused=True) (foreach=True on CPU) as the control; lr 1e-3,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01. After ``--warmup`` steps of each, ``--reps``
rounds time one step of each in turn (CUDA events on a synchronized device,
``fedkern.benchmarks.core.time_call``); medians are reported, with fedkern's time over the
authors' and over AdamW's (below 1: fedkern is faster) and each optimizer's state in bytes per
parameter. The authors' step overwrites p.grad with its update: their gradients are copied back
before every step, untimed.

Matched: window m = 10, density 1 % (k_init = 0.01), the 4-bit error feedback's bucket (256
elements: quant_block_size = 256), lr, betas, eps, weight decay (decoupled in both), alpha = 0 (no
densified update; fedkern has none). Their README's example uses quant_block_size = 100000, for
which their quantization kernels are written (one CUDA block of 1024 threads per bucket): that
setting is timed too ("authors_q1e5", same state size to 0.02 B/param), so that the matched ratio
is not a penalty of a setting they do not recommend. Not matched (printed and recorded): the top-k
selection block
(the authors' is set by the GPU's shared memory per SM, sharedMemPerMultiprocessor / 8 bytes, about
29k elements on an H200; fedkern's is 4096), the error-feedback statistics (bfloat16 min / max per
bucket there, float32 min / step here), the values kept per block (ceil(0.01 * block) of each).

The JSON (``--out``) holds meta (device, versions, commit), ``authors`` (status "ok", "not
installed", "skipped" (CPU), "unavailable" (``--unavailable``) or "failed", and why), the settings
and one record per size. It is written, and the exit status is 0, whatever the authors' status;
bench/gpu_targets.py turns it into the "authors' MicroAdam ratio reported" row.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

import fedkern
from fedkern.benchmarks.core import time_call
from fedkern.benchmarks.microadam import MICROADAM_SPLIT
from fedkern.benchmarks.peers import AUTHORS_OPTIONS, authors_microadam
from fedkern.optim import MicroAdam

HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
MATCHED = {**HYPER, "m": 10, "density": 0.01, "quant_bucket": 256, "alpha": 0}
UNMATCHED = [
    "top-k block: the authors' is the GPU's shared memory per SM / 8 bytes (about 29k elements on "
    "an H200), fedkern's 4096",
    "error-feedback statistics per 256-element bucket: bfloat16 min/max (authors), float32 "
    "min/step (fedkern)",
    "entries kept per block: ceil(0.01 * block) of each block size",
    "the authors' step overwrites p.grad (restored before each step, untimed)",
]
PACKAGES = ("ista-daslab-optimizers", "ista-daslab-optimizers-cuda")


def parse_size(text: str) -> int:
    return int(float(text))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))  # fmt: skip


def tensors(n: int, device: torch.device, seed: int = 0):
    """(initial values, gradients): bfloat16 tensors of n elements in all, MICROADAM_SPLIT."""
    sizes = [int(n * f) for f in MICROADAM_SPLIT]
    sizes[0] += n - sum(sizes)
    gen = torch.Generator(device=device).manual_seed(seed)
    init = [torch.randn(s, device=device, generator=gen).bfloat16() for s in sizes]
    grads = [(torch.randn(s, device=device, generator=gen) * 1e-2).bfloat16() for s in sizes]
    return init, grads


def params_of(init, grads, own_grads: bool = False):
    out = [torch.nn.Parameter(x.clone()) for x in init]
    for p, g in zip(out, grads, strict=True):
        p.grad = g.clone() if own_grads else g
    return out


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_authors(device: torch.device):
    """(class or None, status, detail) of the authors' MicroAdam on ``device``."""
    if device.type != "cuda":
        return None, "skipped", "the authors' kernels need a CUDA device"
    try:
        return authors_microadam(), "ok", ""
    except ModuleNotFoundError as exc:
        return None, "not installed", f"{exc} (bench/gpu_check.sh installs it from .peers/)"
    except Exception as exc:  # a broken build: say what failed
        return None, "failed", f"import failed: {type(exc).__name__}: {exc}"


def measure(n: int, device: torch.device, cls, reps: int, warmup: int) -> dict:
    """One size: median step times (ms), ratios and state bytes per parameter."""
    init, grads = tensors(n, device)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    sides = {
        "fedkern": MicroAdam(params_of(init, grads), **HYPER),
        "adamw": torch.optim.AdamW(params_of(init, grads), **HYPER, **fused),
    }
    rearm = {}
    variants = {"authors": AUTHORS_OPTIONS["quant_block_size"], "authors_q1e5": 10**5}
    for name, bucket in variants.items() if cls is not None else ():
        ps = params_of(init, grads, own_grads=True)
        authors = cls(ps, **{k: HYPER[k] for k in ("lr", "betas", "eps", "weight_decay")},
                      **{**AUTHORS_OPTIONS, "quant_block_size": bucket})  # fmt: skip
        authors.log_interval = 1 << 62  # no logging steps (wandb, extra norms) in the timed calls

        def restore(ps=ps) -> None:
            for p, g in zip(ps, grads, strict=True):
                p.grad.copy_(g)

        sides[name], rearm[name] = authors, restore
    times = {name: [] for name in sides}
    for rep in range(warmup + reps):
        for name, opt in sides.items():
            rearm.get(name, lambda: None)()
            t = time_call(opt.step, device)
            if rep >= warmup:
                times[name].append(t * 1e3)
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    rec = {"n": n, "dtype": "bf16", "reps": reps, "warmup": warmup, "status": "ok"}
    rec.update({f"{name}_ms": t for name, t in ms.items()})
    rec["fedkern_over_adamw"] = ms["fedkern"] / ms["adamw"]
    for name in ("authors", "authors_q1e5"):
        if name in ms:
            rec[f"fedkern_over_{name}"] = ms["fedkern"] / ms[name]
    rec["state_bytes_per_param"] = {name: state_bytes(opt) / n for name, opt in sides.items()}
    rec["minimum_ms"] = {name: min(ts) for name, ts in times.items()}
    return rec


def report(doc: dict) -> str:
    a = doc["authors"]
    lines = [f"authors' MicroAdam: {a['status']}" + (f" ({a['detail']})" if a["detail"] else ""),
             "matched: " + ", ".join(f"{k}={v}" for k, v in doc["settings"]["matched"].items()),
             "not matched: " + "; ".join(doc["settings"]["unmatched"])]  # fmt: skip
    lines.append("times: median ms of one step; ratios: fedkern's time over the other's "
                 "(below 1: fedkern is faster); authors_q1e5: quant_block_size=100000")  # fmt: skip
    sides = ("fedkern", "authors", "authors_q1e5", "adamw")
    fmt = "{:>6} " + " ".join("{:>12}" for _ in sides) + "  {}"
    lines.append(fmt.format("n", *sides, "fedkern/authors, /authors_q1e5, /AdamW; state B/param "
                            "(same order)"))  # fmt: skip
    for r in doc["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['n']:>6.0e} {r['status']}: {r.get('detail', '')}")
            continue
        sb = r["state_bytes_per_param"]
        times = ["-" if r.get(f"{k}_ms") is None else f"{r[f'{k}_ms']:.3f}" for k in sides]
        ratios = ["-" if r.get(f"fedkern_over_{k}") is None else f"{r[f'fedkern_over_{k}']:.2f}x"
                  for k in sides[1:]]  # fmt: skip
        state = ["-" if sb.get(k) is None else f"{sb[k]:.2f}" for k in sides]
        lines.append(fmt.format(f"{r['n']:.0e}", *times, ", ".join(ratios) + "; "
                                + ", ".join(state)))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e8,1e7", help="parameter counts, comma-separated")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, 1e5 parameters, 2 repetitions: the plumbing only")  # fmt: skip
    parser.add_argument("--unavailable", default=None, metavar="REASON",
                        help="record only why the authors' package is unavailable")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.sizes, args.reps, args.warmup = "cpu", "1e5", 2, 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    from fedkern.cli import environment

    meta = {**environment(device), "timestamp": stamp, "packages": versions()}
    meta.pop("backends", None)
    if args.unavailable is not None:
        cls, status, detail = None, "unavailable", args.unavailable
    else:
        cls, status, detail = load_authors(device)
    doc = {"meta": meta, "authors": {"status": status, "detail": detail},
           "settings": {"matched": MATCHED, "unmatched": UNMATCHED}, "results": []}  # fmt: skip
    if args.unavailable is None:
        for n in sizes:
            t0 = time.monotonic()
            try:
                rec = measure(n, device, cls, args.reps, args.warmup)
            except Exception as exc:  # one size failing (memory, a kernel error) is recorded
                rec = {"n": n, "dtype": "bf16", "status": "failed",
                       "detail": f"{type(exc).__name__}: {exc}"}  # fmt: skip
                traceback.print_exc()
            rec["seconds"] = time.monotonic() - t0
            doc["results"].append(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"{meta['device_name']} | torch {meta['torch']} | fedkern {fedkern.__version__} | "
          f"{', '.join(f'{k} {v}' for k, v in meta['packages'].items())}")  # fmt: skip
    print(report(doc))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
