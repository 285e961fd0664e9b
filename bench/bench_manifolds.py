"""Fused Riemannian steps against eager PyTorch and against geoopt (when installed).

Run: ``python bench/bench_manifolds.py [--quick] [--device cpu|cuda]``. Cases, on inputs from a
fixed seed, each timed interleaved with its baselines on identical inputs (the mutated X and V
re-armed, untimed, before every call), medians of ``--reps`` calls:

* sphere step [b, n] = [1e4, 1e3] (``--quick``: [2e3, 1e3]), float32: projection of u, the
  exponential map, renormalization and the parallel transport of v, fused
  (``fedkern.manifolds.Sphere.step``) vs the same formulas in eager PyTorch vs geoopt's
  ``Sphere`` (``proj_``/``egrad2rgrad``, ``expmap``, ``transp`` -- geoopt's transport is the
  projection one, a cheaper operation than the parallel transport fedkern and eager compute);
* Stiefel step [b, n, p] = [1000, 100, 10] float32: projection, QR retraction (Q with positive
  diag(R)) and projection transport, fused (``Stiefel.step``) vs eager ``torch.linalg.qr`` with
  the sign fix vs geoopt's ``EuclideanStiefel`` (``proj``, ``retr``, ``transp``).

Prints a markdown table (ratio = baseline / fedkern) and writes
bench/results/manifolds-<device>-<UTC stamp>.json. Not a pytest-benchmark suite: bench/conftest.py
collects it when pytest is pointed at bench/, and it defines no tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

import fedkern
from fedkern.benchmarks import synchronize, time_call
from fedkern.manifolds import Sphere, Stiefel, gaussian

try:  # optional: the popular library to compare with
    import geoopt
except ImportError:
    geoopt = None


def eager_sphere(x, u, v, eta):
    """What a competent user writes: the same math in eager ops (x, v updated in place)."""
    g = u - (x * u).sum(-1, keepdim=True) * x
    gn = g.norm(dim=-1, keepdim=True)
    t = eta * gn
    y = torch.cos(t) * x - torch.sin(t) / gn * g
    xn = y / y.norm(dim=-1, keepdim=True)
    v -= ((v * xn).sum(-1, keepdim=True) / (1 + (x * xn).sum(-1, keepdim=True))) * (x + xn)
    x.copy_(xn)


def geoopt_sphere(man, x, u, v, eta):
    g = man.egrad2rgrad(x, u)
    xn = man.expmap(x, -eta * g)
    v.copy_(man.transp(x, xn, v))
    x.copy_(xn)


def eager_stiefel(x, u, v, eta):
    a = x.transpose(-1, -2) @ u
    g = u - x @ ((a + a.transpose(-1, -2)) / 2)
    q, r = torch.linalg.qr(x - eta * g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    b = q.transpose(-1, -2) @ v
    v -= q @ ((b + b.transpose(-1, -2)) / 2)
    x.copy_(q)


def geoopt_stiefel(man, x, u, v, eta):
    g = man.egrad2rgrad(x, u)
    xn = man.retr(x, -eta * g)
    v.copy_(man.transp(x, xn, v))
    x.copy_(xn)


def bench_case(name, shape, x0, u, v0, impls, device, reps):
    """Median seconds of every impl on the same (x0, u, v0), interleaved, re-armed untimed."""
    times = {k: [] for k in impls}
    x, v = x0.clone(), v0.clone()
    for fn in impls.values():  # warm-up (compilation, allocator)
        x.copy_(x0)
        v.copy_(v0)
        fn(x, u, v)
    for _ in range(reps):
        for k, fn in impls.items():
            x.copy_(x0)
            v.copy_(v0)
            synchronize(device)
            times[k].append(time_call(lambda fn=fn: fn(x, u, v), device))
    return {
        "case": name,
        "shape": list(shape),
        **{k: statistics.median(t) for k, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sphere batch, fewer reps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    dev = torch.device(args.device)
    reps = args.reps or (5 if args.quick else 15)
    rows = []
    eta = 0.1
    b = 2000 if args.quick else 10_000
    S = Sphere(1000)
    x0 = S.random(b, seed=1, device=dev)
    u = gaussian((b, 1000), 2, device=dev)
    v0 = S.random_tangent(x0, seed=3)
    impls = {
        "fedkern": lambda x, u, v: S.step(x, u, eta, v, exp=True, transport="parallel"),
        "eager": lambda x, u, v: eager_sphere(x, u, v, eta),
    }
    if geoopt is not None:
        gs = geoopt.Sphere()
        impls["geoopt"] = lambda x, u, v: geoopt_sphere(gs, x, u, v, eta)
    rows.append(bench_case("sphere step (exp + parallel transport)", (b, 1000), x0, u, v0, impls,
                           dev, reps))  # fmt: skip
    St = Stiefel(100, 10)
    X0 = St.random(1000, seed=4, device=dev)
    U = gaussian((1000, 100, 10), 5, device=dev)
    V0 = St.random_tangent(X0, seed=6)
    impls = {
        "fedkern": lambda x, u, v: St.step(x, u, eta, v),
        "eager": lambda x, u, v: eager_stiefel(x, u, v, eta),
    }
    if geoopt is not None:
        gst = geoopt.EuclideanStiefel()
        impls["geoopt"] = lambda x, u, v: geoopt_stiefel(gst, x, u, v, eta)
    rows.append(bench_case("Stiefel step (QR retraction + projection transport)",
                           (1000, 100, 10), X0, U, V0, impls, dev, reps))  # fmt: skip
    print(f"\nfedkern {fedkern.__version__}, torch {torch.__version__}, device {dev}, backend "
          f"{fedkern.current_backend()}, geoopt {getattr(geoopt, '__version__', 'not installed')}, "
          f"threads {torch.get_num_threads()}, reps {reps}\n")  # fmt: skip
    print("| case | shape | fedkern ms | eager ms | ratio eager/fedkern | geoopt ms | "
          "ratio geoopt/fedkern |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g = r.get("geoopt")
        gcols = f"{g * 1e3:.2f} | {g / r['fedkern']:.2f}" if g else "- | -"
        print(f"| {r['case']} | {r['shape']} | {r['fedkern'] * 1e3:.2f} | {r['eager'] * 1e3:.2f} "
              f"| {r['eager'] / r['fedkern']:.2f} | {gcols} |")  # fmt: skip
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(__file__).resolve().parent / "results" / f"manifolds-{dev.type}-{stamp}.json"
    meta = {"torch": torch.__version__, "fedkern": fedkern.__version__, "device": str(dev),
            "geoopt": getattr(geoopt, "__version__", None), "reps": reps, "quick": args.quick,
            "threads": torch.get_num_threads()}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
