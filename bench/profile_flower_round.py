"""Where a Flower round's server time goes: ``aggregate_train`` of ScaffnewStrategy / TamunaStrategy
split into its phases (validate the replies, decode them into the stack, aggregate, build the model
record), fedkern's strategy against its NumPy twin (``fedkern.benchmarks.flower_methods``), on the
same c reply Messages; median of 3 per phase, CPU.

Run: ``python bench/profile_flower_round.py [scaffnew|tamuna] [s] [p] [c]`` (default tamuna 2 1e6
100). The phases are the strategies' own code paths, called one by one.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from fedkern.benchmarks import flower_methods as FM
from fedkern.integrations.flower import protocol as P


def median_ms(fn, reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def phases(st, replies, numpy: bool) -> dict:
    plan, c, p = st._plan, st.cohort_size, st.dim
    rows = list(range(c))

    def validate():
        plan.held = {}  # a round computes its held masks once
        plan.__dict__.pop("np_held", None)
        return st._replies(replies, plan, rows, "train")

    out = {"validate": median_ms(validate)}
    good, _, _ = validate()

    def decode():
        if numpy:
            X = np.empty((c, p), np.float32) if plan.s == c else np.zeros((c, p), np.float32)
            for row, msg in good.items():
                idx, vals = st._np_held(plan, row), msg.content[P.VALUES]["values"].numpy()
                if idx is None:
                    X[row] = vals
                else:
                    X[row, idx] = vals
            return X
        X = torch.zeros(c, p)
        for row, msg in good.items():
            vals = torch.from_numpy(np.array(msg.content[P.VALUES]["values"].numpy()))
            X[row, st._held(plan, row)] = vals
        return X

    out["decode"] = median_ms(decode)
    X = decode()
    plan.live = rows
    agg = (lambda: st.np_aggregate(X, plan)) if numpy else (lambda: st.aggregate_values(X, plan))
    out["aggregate"] = median_ms(agg)
    out["model record"] = median_ms(lambda: st.global_arrays)
    return out


def main() -> None:
    args = sys.argv[1:]
    method = args[0] if args else "tamuna"
    s = int(args[1]) if len(args) > 1 else 2
    p = int(float(args[2])) if len(args) > 2 else 10**6
    c = int(args[3]) if len(args) > 3 else 100
    rng = np.random.default_rng(0)
    X = rng.standard_normal((c, p), dtype=np.float32)
    x0 = rng.standard_normal(p, dtype=np.float32)
    fk = FM.make_strategy(method, c, s)
    tw = FM.make_strategy(method, c, s, numpy=True)
    replies = FM.make_round(fk, X, x0)
    FM.make_round(tw, X, x0)
    print(f"{method}, c = {c}, p = {p:.0e}, s = {fk.s}; ms per phase (median of 3)")
    res = {"fedkern": phases(fk, replies, False), "numpy": phases(tw, replies, True)}
    names = list(res["fedkern"])
    print("| side | " + " | ".join(names) + " | total |")
    print("|---|" + "---:|" * (len(names) + 1))
    for side, r in res.items():
        print(f"| {side} | " + " | ".join(f"{r[k]:.0f}" for k in names) +
              f" | {sum(r.values()):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
