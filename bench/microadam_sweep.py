"""Launch choices of the Triton MicroAdam step on a GPU, side by side with fused AdamW.

For each variant of ``fedkern.kernels.microadam.TUNING`` (one change from the default at a time):
a correctness check against the reference backend on 1e6 parameters (state bit for bit, parameters
to rounding, 3 steps), then the median time of a step on 1e8 bfloat16 parameters in 4 tensors with
weight decay. Prints one table; run by bench/gpu_check.sh. Needs a CUDA device.
"""

from __future__ import annotations

import statistics

import torch
from fedkern.kernels import microadam as tk

import fedkern
from fedkern.optim import MicroAdam

DEFAULT = dict(tk.TUNING)
VARIANTS = [
    {},
    {"bits": 2},
    {"bits": 8},
    {"warps_select": 4},
    {"warps_select": 16},
    {"warps_window": 8},
    {"programs_per_sm": 8},
]
SIZES = (40_000_000, 30_000_000, 20_000_000, 10_000_000)


def params(sizes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen).to(dtype))
        p.grad = (torch.randn(n, device="cuda", generator=gen) * 1e-2).to(dtype)
        out.append(p)
    return out


def check() -> str:
    """'ok' when the Triton step equals the reference backend's on a small case."""
    sizes = (600_000, 300_001, 99_999)
    runs = {}
    for name in ("triton", "reference"):
        ps = params(sizes, torch.bfloat16, seed=1)
        opt = MicroAdam(ps, lr=1e-3, weight_decay=0.01)
        with fedkern.backend(name):
            for _ in range(3):
                opt.step()
        runs[name] = (ps, opt)
    for p, q in zip(runs["triton"][0], runs["reference"][0], strict=True):
        st, sr = runs["triton"][1].state[p], runs["reference"][1].state[q]
        for key in ("ef", "ef_min", "ef_scale", "idx", "val"):
            if not torch.equal(st[key], sr[key]):
                return f"state {key} differs"
        if not torch.allclose(p.float(), q.float(), rtol=2**-7, atol=1e-6):
            return "params differ"
    return "ok"


def step_ms(opt, reps=20) -> float:
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ps = params(SIZES, torch.bfloat16)
    adamw = step_ms(torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True))
    print(f"AdamW(fused=True), 1e8 bf16 parameters: {adamw:.3f} ms per step")
    print(f"{'variant':<28} {'check':<18} {'ms/step':>8} {'x AdamW':>8}")
    for change in VARIANTS:
        tk.TUNING.clear()
        tk.TUNING.update({**DEFAULT, **change})
        name = ", ".join(f"{k}={v}" for k, v in change.items()) or "default"
        try:
            ok = check()
            ps = params(SIZES, torch.bfloat16)
            ms = step_ms(MicroAdam(ps, lr=1e-3, weight_decay=0.01))
            print(f"{name:<28} {ok:<18} {ms:>8.3f} {adamw / ms:>8.2f}", flush=True)
        except Exception as exc:  # report and go on
            print(f"{name:<28} {type(exc).__name__}: {str(exc)[:80]}", flush=True)
        del ps
        torch.cuda.empty_cache()
    tk.TUNING.clear()
    tk.TUNING.update(DEFAULT)


if __name__ == "__main__":
    main()
