"""One MARINA round of 1000 clients: fedkern's batched round against a loop over the clients.

Run: ``python bench/bench_marina.py [--quick] [--clients 1000] [--d 100] [--m 50]``. Logistic
regression on synthetic data from a fixed seed (``--clients`` clients with ``--m`` samples of
``--d`` features each). The timed work is one compressed MARINA round (the coin's tails side,
the costly one): every client's full local gradients at x+ and x, its rand-k (k = d/10) message
of the difference, and the server's mean of the messages.

* fedkern: ``MARINA.client_messages`` (two ``fedkern::client_grads`` calls for the whole cohort,
  one fused ``diff_randk_clip`` for every message, keyed by (seed, round, client)) and
  ``RowCompressor.mean`` (``sparse_add_batched_``);
* loop: what a competent user writes without the batched kernels: per client, the gradients in
  eager PyTorch on its slice of the data, ``torch.randperm`` for the mask, and the sum of the
  scaled values into a dense accumulator.

Timed interleaved, medians of ``--reps``; prints a markdown table (ratio = loop / fedkern) and
writes bench/results/marina-cpu-<UTC stamp>.json. Not a pytest-benchmark suite (no tests here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

import fedkern
from fedkern.algorithms.compressed import MARINA
from fedkern.benchmarks import time_call
from fedkern.clients import ClientBatch
from fedkern.problems import Problem


def loop_round(A, y, parts, x_new, x, k, gen):
    d = A.shape[1]
    acc = torch.zeros(d)
    for rows in parts:
        a, s = A[rows], 2 * y[rows] - 1
        g1 = (-s * torch.sigmoid(-s * (a @ x_new))) @ a / len(rows)
        g0 = (-s * torch.sigmoid(-s * (a @ x))) @ a / len(rows)
        diff = g1 - g0  # (the l2 terms cancel up to l2 (x+ - x): added below)
        idx = torch.randperm(d, generator=gen)[:k]
        acc[idx] += diff[idx] * (d / k)
    return acc / len(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 9)
    n, d, m = args.clients, args.d, args.m
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n * m, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n * m, generator=g) < 0.5).double()
    parts = [torch.arange(i * m, (i + 1) * m) for i in range(n)]
    batch = ClientBatch(Problem(A, y, parts, "logistic", 0.01), seed=0)
    k = max(1, d // 10)
    method = MARINA(batch, k=k, seed=0)
    x = torch.randn(d, generator=g) * 0.1
    x_new = x - 0.1 * method.g
    method.x = x
    A32, y32 = A.float(), y.float()
    gen = torch.Generator().manual_seed(1)

    def fed():
        return method.comp.mean(method.client_messages(x_new, heads=False))

    def loop():
        return loop_round(A32, y32, parts, x_new, x, k, gen)

    fed(), loop()  # warm-up
    t_fed, t_loop = [], []
    for _ in range(reps):
        t_fed.append(time_call(fed, "cpu"))
        t_loop.append(time_call(loop, "cpu"))
    tf, tl = statistics.median(t_fed), statistics.median(t_loop)
    info = f"backend {fedkern.current_backend()}, threads {torch.get_num_threads()}, reps {reps}"
    print(f"\nfedkern {fedkern.__version__}, torch {torch.__version__}, {info}\n")
    print("| case | clients | d | samples/client | k | fedkern ms | loop ms | ratio loop/fedkern |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| MARINA compressed round | {n} | {d} | {m} | {k} | {tf * 1e3:.1f} | {tl * 1e3:.1f} | "
          f"{tl / tf:.1f} |")  # fmt: skip
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(__file__).resolve().parent / "results" / f"marina-cpu-{stamp}.json"
    row = {"case": "marina_round", "clients": n, "d": d, "m": m, "k": k, "fedkern_s": tf,
           "loop_s": tl, "ratio": tl / tf}  # fmt: skip
    meta = {"torch": torch.__version__, "fedkern": fedkern.__version__, "reps": reps,
            "threads": torch.get_num_threads()}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "results": [row]}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
