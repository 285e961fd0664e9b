"""Benchmark of the quartic op family and the fused clipped jump (clipjump), fedkern vs eager.

  python bench/bench_quartic.py [--quick] [--device cpu|cuda]

Cases (inputs from a fixed seed, timed interleaved on identical inputs, medians):
  round: one Clip-LocalGDJ round of 1000 quartic clients (100 points each, tau local GD steps):
         fedkern (ClientBatch local steps + clip_jump) vs a Python client loop of eager steps and
         vs torch.func.vmap over the clients (the same math in float32)
  jump:  the fused server pass (mean, pseudo-gradient, norm, theta, step) vs eager torch ops
Prints a markdown table (ratio = eager / fedkern), writes bench/results/quartic-<device>-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedkern.benchmarks import synchronize, time_call
from fedkern.clients import ClientBatch
from fedkern.ops.clipjump import clip_jump
from fedkern.problems import Quartic


def eager_grad(x, P):
    D = x - P
    return (4.0 / P.shape[-2]) * (((D * D).sum(-1, keepdim=True)) * D).sum(-2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    reps = 3 if args.quick else 10
    n, m, d, tau = (1000, 100, 100, 2) if args.quick else (1000, 100, 100, 10)
    q = Quartic.sorted_split(Quartic.uniform_points(n * m, d, seed=0), n)
    batch = ClientBatch(q, device=dev)
    P = batch.A.view(n, m, d)
    x = torch.full((d,), 5.0, device=dev)
    gamma, c0, c1 = 1e-6, 1e3, 1e-2
    w = torch.full((n,), 1.0 / n, dtype=torch.float64, device=dev)

    def fk_round():
        Y = x.expand(n, -1).contiguous()
        batch.local_steps_(Y, gamma=gamma, steps=tau)
        return clip_jump(Y, x, w, 1 / (gamma * tau), c0, c1, None)[0]

    def loop_round():
        ys = []
        for i in range(n):
            y = x.clone()
            for _ in range(tau):
                y = y - gamma * eager_grad(y, P[i])
            ys.append(y)
        g = (x - torch.stack(ys).double().mean(0).float()) / (gamma * tau)
        return x - g / (c0 + c1 * g.norm())

    vgrad = torch.func.vmap(eager_grad)

    def vmap_round():
        Y = x.expand(n, -1)
        for _ in range(tau):
            Y = Y - gamma * vgrad(Y, P)
        g = (x - Y.double().mean(0).float()) / (gamma * tau)
        return x - g / (c0 + c1 * g.norm())

    Yj = x + 0.01 * torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(dev)

    def fk_jump():
        return clip_jump(Yj, x, w, 10.0, c0, c1, None)[0]

    def eager_jump():
        g = 10.0 * (x - (w[:, None] * Yj.double()).sum(0).float())
        return x - g / (c0 + c1 * g.double().norm()).float()

    cases = {"round": [("fedkern", fk_round), ("client loop", loop_round), ("vmap", vmap_round)],
             "jump": [("fedkern", fk_jump), ("eager", eager_jump)]}  # fmt: skip
    rows, out = [], {}
    for case, fns in cases.items():
        for _, f in fns:
            f()
        times = {name: [] for name, _ in fns}
        for _ in range(reps):
            for name, f in fns:
                times[name].append(time_call(f, dev))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[case] = med
        for name, t in med.items():
            rows.append((case, name, t, med[name] / med["fedkern"]))
    synchronize(dev)
    print(
        f"| case | impl | median ms | ratio (eager / fedkern) |  (n={n}, m={m}, d={d}, tau={tau})"
    )
    print("|---|---|---|---|")
    for case, name, t, r in rows:
        print(f"| {case} | {name} | {t * 1e3:.3f} | {r:.2f} |")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(__file__).parent / "results" / f"quartic-{dev.type}-{stamp}.json"
    path.write_text(json.dumps({"device": str(dev), "n": n, "m": m, "d": d, "tau": tau,
                                "medians_s": out}, indent=1))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
