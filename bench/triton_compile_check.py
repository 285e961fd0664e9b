"""Ahead-of-time compile check of every Triton kernel of fedkern.kernels for sm_90 (H100 / H200).

    python bench/triton_compile_check.py [--only SUBSTRING] [--list]

No GPU is needed.  The kernel variants are not written by hand: every launcher of
fedkern.kernels is called (SCENARIOS below) on ``meta`` tensors, which carry a dtype and a shape
but no data, with ``JITFunction.run`` replaced by a recorder, so nothing is launched.  A ``meta``
device is not ``cpu``, so the launchers take their GPU launch shapes (blocks, num_warps).  Each
recorded launch is bound by Triton's own binder for the CUDA backend, giving the signature,
constexprs, specialisation attributes (divisibility by 16; ints equal to 1 become constants) and
options that ``JITFunction.run`` would compile on a GPU.  Each distinct variant is then compiled
by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a cubin (ptxas from Triton's
CUDA backend; no driver).

What it proves: the kernels pass Triton's frontend, the NVIDIA lowering and ptxas for sm_90 with
the argument types, dtypes and constexprs that the launchers use at the scenario sizes (errors the
interpreter, ``TRITON_INTERPRET=1``, does not see).  What it does not: it runs nothing, so it says
nothing about results, speed, or about constexprs taken only at other sizes.

Coverage is checked: every ``JITFunction`` of fedkern.kernels that is neither recorded from a
launcher nor in ``HELPERS`` / ``SKIPPED`` (with a reason) is reported as uncovered, a failure.
Exit status 0 when every variant compiles and every kernel is covered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TARGET_ARCH = 90
META = torch.device("meta")

#: @triton.jit functions only called from other kernels (compiled as part of their callers).
HELPERS = {
    "_common": (
        "load_f32",
        "round_to",
        "store_f32",
        "mix32",
        "feistel",
        "feistel_perm",
        "sample_index",
        "load_round_keys",
        "half_width",
    ),
    "clients": ("_div",),
    "manifolds": ("_div", "_sqrt", "_col", "_sym_product", "_apply"),
    "microadam": ("_ptr", "_f32_at", "_window_rows"),
    "robust": ("_key", "_load_keys", "_count_below", "_rank_key", "_tie_row"),
    "rowops": ("_row_norms",),
    "sparse": ("_lower_bound",),
    "topk": ("_key", "_source_key"),
    "random": (
        "philox",
        "entry_word",
        "c2_of",
        "log_f32",
        "sincos_turns",
        "gaussian_at",
        "keep_threshold",
        "key_words",
    ),
    "sketch": ("_lane_perm", "_perm_lanes", "_bern_lanes"),
}
#: Launched kernels deliberately not compiled here, with the reason ("module.name": reason).
SKIPPED: dict[str, str] = {}


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", TARGET_ARCH, 32)


def backend_missing() -> str | None:
    """Why the check cannot run here (no CUDA backend or no ptxas), or None when it can."""
    try:
        from triton.backends import backends
    except ImportError as e:  # pragma: no cover - triton without backends
        return f"triton has no backends: {e}"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(_target().arch).path
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"ptxas not found: {e}"
    if not os.access(ptxas, os.X_OK):
        return f"ptxas not executable: {ptxas}"
    return None


@dataclass
class Variant:
    """One compile unit: a kernel with the signature, constants and options of a launch."""

    name: str  # "module.kernel#i scenario"
    kernel: object  # triton JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    scenarios: list = field(default_factory=list)


@dataclass
class Result:
    """The outcome of compiling one Variant."""

    variant: Variant
    ok: bool
    seconds: float
    shared: int | None = None
    num_warps: int | None = None
    error: str = ""


def _kernel_id(fn) -> str:
    return f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


# ---- scenarios: the launchers, called on meta tensors -------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def _keys8():
    return [0x12345678 + 0x9E3779B9 * i & 0xFFFFFFFF for i in range(8)]


def _randk(dt):
    from fedkern.kernels import randk

    n, k = 1 << 20, 1 << 10
    randk.randk_compress(_t(n, dtype=dt), k, _keys8(), 1.0)
    randk.ef14_randk_(_t(n, dtype=dt), _t(n, dtype=dt), k, _keys8(), 0.1, 1.0)
    randk.ef21_randk_(_t(n, dtype=dt), _t(n, dtype=dt), k, _keys8(), 1.0)


def _topk(dt):
    from fedkern.kernels import topk

    n, k = 1 << 20, 1 << 10
    topk.topk_compress(_t(n, dtype=dt), k)
    topk.ef14_topk_(_t(n, dtype=dt), _t(n, dtype=dt), k, 0.1)
    topk.ef21_topk_(_t(n, dtype=dt), _t(n, dtype=dt), k)


def _large():
    """1-D passes over n > 2^31 elements: their size arguments become i64."""
    from fedkern.kernels import randk, random, sparse, topk

    n, k = (1 << 31) + 64, 1 << 10
    randk.ef14_randk_(_t(n), _t(n), k, _keys8(), 0.1, 1.0)
    topk.ef14_topk_(_t(n), _t(n), k, 0.1)
    sparse.sparse_add_batched_(_t(n), _t(8, k), _t(8, k, dtype=torch.int64), 0.5)
    random.gaussian_fill_(_t(n), [1, 2, 3, 4], 0.5)


def _sparse(dt):
    from fedkern.kernels import sparse

    sparse.sparse_add_batched_(_t(1 << 20, dtype=dt), _t(8, 1024, dtype=dt),
                               _t(8, 1024, dtype=torch.int64), 0.5)  # fmt: skip


def _microadam(dt):
    from fedkern.kernels import microadam

    D, K, Q, m = 4096, 41, 256, 10
    n = 3 * D + 100
    nb = -(-n // D)
    microadam.microadam_step_(
        [_t(n, dtype=dt)], [_t(n, dtype=dt)], [_t(nb * D // 2, dtype=torch.uint8)],
        [_t(nb * D // Q)], [_t(nb * D // Q)], [_t(m, nb * K, dtype=torch.int16)],
        [_t(m, nb * K, dtype=torch.bfloat16)], [0], [0.9], [0.99], 0.0, 1e-8, [0.1] * m,
        [0.01] * m, D, K, Q,
    )  # fmt: skip


def _clients(kind, mode):
    from fedkern.kernels import clients

    c, N, d, K = 64, 4096, 100, 5
    C = 10 if kind == 1 else 1
    p = C * d if kind == 1 else d
    keys = None if mode == 0 else _t(c, K, 8, dtype=torch.int64)
    for H in (None, _t(c, p)):
        clients.local_steps_(_t(c, p), _t(c, dtype=torch.int64), _t(N, d), _t(N),
                             _t(33, dtype=torch.int64), kind, C, K, 0.1, 1e-3, H, mode, 8, keys,
                             0.0, 0.0, None)  # fmt: skip
    clients.local_steps_(_t(c, p), _t(c, dtype=torch.int64), _t(N, d), _t(N),
                         _t(33, dtype=torch.int64), kind, C, K, 0.1, 1e-3, None, mode, 8, keys,
                         1.0, 0.5, _t(c, p))  # fmt: skip
    gmode = {0: 0, 1: 1, 2: 3}[mode]
    gkeys = _t(c, 8, dtype=torch.int64) if gmode == 1 else None
    samples = _t(c, 8, dtype=torch.int64) if gmode == 3 else None
    clients.client_grads(_t(c, p), _t(c, dtype=torch.int64), _t(N, d), _t(N),
                         _t(33, dtype=torch.int64), kind, C, 1e-3, gmode, 8, gkeys,
                         samples)  # fmt: skip


def _clients_rows():
    from fedkern.kernels import clients

    for p in (1000, 1 << 20):
        clients.scaffnew_sync_(_t(64, p), _t(64, p), 2.0)
        clients.weighted_sum(_t(64, p), _t(64, dtype=torch.float64))


def _quartic(mode):
    from fedkern.kernels import quartic

    c, d, K = 64, 100, 5
    keys = None if mode == 0 else _t(c, K, 8, dtype=torch.int64)
    for H in (None, _t(c, d)):
        quartic.local_steps_(_t(c, d), _t(c, dtype=torch.int64), _t(4096, d),
                             _t(33, dtype=torch.int64), K, 0.1, H, mode, 8, keys,
                             0.0)  # fmt: skip


def _robust(dt):
    from fedkern.kernels import robust

    for n in (16, 256, 1024):
        robust.coordinate_median(_t(n, 1 << 16, dtype=dt), _t(1 << 16, dtype=dt))
        robust.trimmed_mean(_t(n, 1 << 16, dtype=dt), 3, _t(1 << 16, dtype=dt))


def _gram(dt):
    from fedkern.kernels import gram

    for n in (16, 200):
        gram.gram(_t(n, 1 << 16, dtype=dt))


def _rowops(dt):
    from fedkern.kernels import rowops

    n, d = 64, 1 << 18
    x = _t(n, d, dtype=dt)
    rowops.gather_mean(x, _t(16, 8, dtype=torch.int64), _t(16, d, dtype=dt))
    rowops.geometric_median(x, _t(d), 0, 1e-6, _t(d, dtype=dt))
    rowops.geometric_median(x, _t(d), 2, 1e-6, _t(d, dtype=dt))
    rowops.centered_clip(x, _t(d), 2, 1.0, _t(d, dtype=dt))
    rowops.clip_rows_(x, _t(n, dtype=torch.float64))


def _diffclip(dt):
    from fedkern.kernels import diffclip

    rows, d, k = 16, 1 << 16, 512
    g, h = _t(rows, d, dtype=dt), _t(rows, d, dtype=dt)
    norm = _t(rows, dtype=torch.float64)
    diffclip.diff_topk_clip(g, h, k, norm, _t(rows, k, dtype=torch.int64), _t(rows, k, dtype=dt))
    diffclip.diff_randk_clip(g, h, k, _t(rows, 8, dtype=torch.int64), 2.0, norm,
                             _t(rows, k, dtype=torch.int64), _t(rows, k, dtype=dt))  # fmt: skip
    diffclip.diff_clip(g, h, norm, _t(rows, d, dtype=dt))


def _clipjump():
    from fedkern.kernels import clipjump

    c, p = 32, 1 << 18
    for G in (None, _t(1, dtype=torch.float64)):
        clipjump.clip_jump(_t(c, p), _t(p), _t(c, dtype=torch.float64), 1.0, 0.5, 0.5, G)


def _tamuna():
    from fedkern.kernels import tamuna

    for H in (None, _t(32, 1 << 18)):
        tamuna.tamuna_aggregate_(_t(32, 1 << 18), H, _t(32, dtype=torch.int64), 4, 0.5)


def _lora():
    from fedkern.kernels import lora

    m, n, r = 512, 768, 8
    key = [1, 2, 3, 4]
    lora.lora_merge_(_t(m, n), _t(m, r), _t(r, n), key, 0.02, 2.0)
    lora.lora_merge_(_t(m, n), None, _t(r, n), key, 0.02, 2.0)
    lora.lora_merge_(_t(m, n), _t(m, r), None, key, 0.02, 2.0)


def _manifolds(dt):
    from fedkern.kernels import manifolds

    for use_exp in (False, True):
        for transport in (0, 1):
            for V in (None, _t(8, 4096, dtype=dt)):
                manifolds.sphere_step_(_t(8, 4096, dtype=dt), _t(8, 4096, dtype=dt), V, 0.1,
                                       use_exp, transport)  # fmt: skip
    for n, p in ((64, 4), (256, 16)):
        for V in (None, _t(8, n, p, dtype=dt)):
            manifolds.stiefel_step_(_t(8, n, p, dtype=dt), _t(8, n, p, dtype=dt), V, 0.1)


def _random(dt):
    from fedkern.kernels import random

    random.gaussian_fill_(_t(1 << 20, dtype=dt), [1, 2, 3, 4], 0.5)
    random.bernoulli_fill_(_t(1 << 20, dtype=torch.bool), 0.25, [1, 2, 3, 4])
    random.bernoulli_fill_(_t(1 << 20, dtype=torch.bool), _t(1 << 20), [1, 2, 3, 4])


def _sketch(dt):
    from fedkern.kernels import sketch

    R, d = 4, 1 << 16
    # ranges is read on the host (lengths), so it is a CPU tensor; the recorder only needs its
    # dtype and alignment
    ranges = torch.tensor([[0, 4096], [4096, 8192], [8192, 12288], [0, 100]])
    keys8, keys4 = _t(R, 8, dtype=torch.int64), _t(R, 4, dtype=torch.int64)
    scale = _t(R)
    for xr, v in ((R, None), (1, _t(1, d, dtype=dt)), (R, _t(R, d, dtype=dt))):
        sketch.perm_apply(_t(xr, d, dtype=dt), v, keys8, ranges, scale)
        for p in (0.25, _t(d)):
            sketch.bern_apply(_t(xr, d, dtype=dt), v, keys4, p)
    for xr in (1, R):
        sketch.perm_grad_step_(_t(xr, d, dtype=dt), _t(R, d, dtype=dt), keys8, ranges, scale, 0.1)
        for p in (0.25, _t(d)):
            sketch.bern_grad_step_(_t(xr, d, dtype=dt), _t(R, d, dtype=dt), keys4, p, 0.1)


F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
_DT = {F32: "fp32", BF16: "bf16", F64: "fp64"}

#: (scenario name, call): each call runs launchers of one family on meta tensors.
SCENARIOS: list[tuple[str, Callable[[], None]]] = [
    *[(f"randk {_DT[dt]}", lambda dt=dt: _randk(dt)) for dt in (F32, BF16)],
    *[(f"topk {_DT[dt]}", lambda dt=dt: _topk(dt)) for dt in (F32, BF16)],
    ("1-D passes, n > 2^31, fp32", _large),
    *[(f"sparse {_DT[dt]}", lambda dt=dt: _sparse(dt)) for dt in (F32, BF16)],
    *[(f"microadam {_DT[dt]}", lambda dt=dt: _microadam(dt)) for dt in (F32, BF16)],
    *[
        (f"clients kind{kind} mode{mode}", lambda kind=kind, mode=mode: _clients(kind, mode))
        for kind in (0, 1, 2)
        for mode in (0, 1, 2)
    ],
    ("clients rows", _clients_rows),
    *[(f"quartic mode{mode}", lambda mode=mode: _quartic(mode)) for mode in (0, 1, 2)],
    *[(f"robust {_DT[dt]}", lambda dt=dt: _robust(dt)) for dt in (F32, BF16)],
    *[(f"gram {_DT[dt]}", lambda dt=dt: _gram(dt)) for dt in (F32, BF16)],
    *[(f"rowops {_DT[dt]}", lambda dt=dt: _rowops(dt)) for dt in (F32, BF16)],
    *[(f"diffclip {_DT[dt]}", lambda dt=dt: _diffclip(dt)) for dt in (F32, BF16)],
    ("clipjump", _clipjump),
    ("tamuna", _tamuna),
    ("lora", _lora),
    *[(f"manifolds {_DT[dt]}", lambda dt=dt: _manifolds(dt)) for dt in (F32, F64)],
    *[(f"random {_DT[dt]}", lambda dt=dt: _random(dt)) for dt in (F32, BF16)],
    *[(f"sketch {_DT[dt]}", lambda dt=dt: _sketch(dt)) for dt in (F32, BF16)],
]


# ---- recording ----------------------------------------------------------------------------------


def _bind(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) as JITFunction.run would compile them."""
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return signature, constexprs, attrs, opts.__dict__


def record(scenarios=None) -> tuple[list[Variant], list[tuple[str, str]]]:
    """Runs the scenarios with launches recorded instead of run; returns (distinct variants,
    [(scenario, error)] for scenarios that raised)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    backend = make_backend(_target())
    variants: dict[tuple, Variant] = {}
    failures = []
    current = [""]

    def fake_run(self, *args, grid, warmup, **kwargs):
        sig, consts, attrs, opts = _bind(self, args, kwargs, backend)
        key = (_kernel_id(self), repr(sig), repr(consts), repr(attrs), repr(sorted(opts.items())))
        v = variants.get(key)
        if v is None:
            v = variants[key] = Variant("", self, sig, consts, attrs, opts)
        if current[0] not in v.scenarios:
            v.scenarios.append(current[0])
        return None

    saved = JITFunction.run
    JITFunction.run = fake_run
    try:
        for name, call in scenarios if scenarios is not None else SCENARIOS:
            current[0] = name
            try:
                with torch.no_grad():
                    call()
            except Exception as e:  # noqa: BLE001 - reported, not raised
                failures.append((name, f"{type(e).__name__}: {e}"))
    finally:
        JITFunction.run = saved
    counts: dict[str, int] = {}
    out = []
    for v in variants.values():
        kid = _kernel_id(v.kernel)
        counts[kid] = counts.get(kid, 0) + 1
        v.name = f"{kid}#{counts[kid]} ({v.scenarios[0]})"
        out.append(v)
    return out, failures


def all_kernels() -> dict[str, object]:
    """Every JITFunction defined in fedkern.kernels, by "module.name"."""
    import fedkern.kernels as pkg
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[_kernel_id(obj)] = obj
    return found


def uncovered(variants) -> list[str]:
    """JITFunctions neither recorded from a launcher nor listed in HELPERS / SKIPPED."""
    covered = {_kernel_id(v.kernel) for v in variants}
    helpers = {f"{m}.{n}" for m, names in HELPERS.items() for n in names}
    return sorted(set(all_kernels()) - covered - helpers - set(SKIPPED))


def stale_lists() -> list[str]:
    """Names in HELPERS / SKIPPED that no longer exist in fedkern.kernels."""
    helpers = {f"{m}.{n}" for m, names in HELPERS.items() for n in names}
    return sorted((helpers | set(SKIPPED)) - set(all_kernels()))


# ---- compiling ----------------------------------------------------------------------------------


def compile_variant(v: Variant) -> Result:
    """Compiles one variant for sm_90 down to a cubin; never raises."""
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        src = ASTSource(v.kernel, v.signature, v.constexprs, v.attrs)
        k = triton.compile(src, target=_target(), options=dict(v.options))
        if "cubin" not in k.asm:
            raise RuntimeError(f"no cubin produced (stages: {list(k.asm)})")
        md = k.metadata
        return Result(v, True, time.perf_counter() - t0, md.shared, md.num_warps)
    except Exception as e:  # noqa: BLE001 - a compile error is the result
        msg = f"{type(e).__name__}: {e}".strip()
        return Result(v, False, time.perf_counter() - t0, error=msg)


def run_check(only: str | None = None, out=sys.stdout) -> bool:
    """Records, compiles and prints the table; True when everything compiled and is covered.
    ``only``: compile only the variants whose name contains it (coverage is still checked)."""
    variants, failures = record()
    missing, stale = uncovered(variants), stale_lists()
    todo = [v for v in variants if only is None or only in v.name]
    results = [compile_variant(v) for v in todo]
    width = max([len(r.variant.name) for r in results] + [20])
    print(f"{'variant':<{width}}  result   secs  shared  warps", file=out)
    for r in results:
        state = "ok" if r.ok else "ERROR"
        shared = "" if r.shared is None else str(r.shared)
        warps = "" if r.num_warps is None else str(r.num_warps)
        print(f"{r.variant.name:<{width}}  {state:<6} {r.seconds:5.1f}  {shared:>6}  {warps:>5}",
              file=out)  # fmt: skip
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"\n== {r.variant.name}\n   signature {r.variant.signature}\n"
              f"   constexprs {r.variant.constexprs}\n{r.error}", file=out)  # fmt: skip
    for name, err in failures:
        print(f"scenario {name!r} failed before compiling: {err}", file=out)
    for name in missing:
        print(f"uncovered kernel: {name} (no scenario launches it; add one or list it)", file=out)
    for name in stale:
        print(f"stale entry in HELPERS/SKIPPED: {name}", file=out)
    for name, why in SKIPPED.items():
        print(f"skipped: {name}: {why}", file=out)
    total = sum(r.seconds for r in results)
    print(f"\n{len(results) - len(bad)}/{len(results)} variants compiled for sm_{TARGET_ARCH} "
          f"({len({_kernel_id(v.kernel) for v in variants})} kernels) in {total:.1f} s",
          file=out)  # fmt: skip
    return not (bad or failures or missing or stale)


def main(argv=None) -> int:
    """Command line entry point: exit status 0 when every variant compiles and is covered."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="compile only variants whose name contains this")
    ap.add_argument("--list", action="store_true",
                    help="list the recorded variants and check coverage, no compile")  # fmt: skip
    ap.add_argument("--cache", action="store_true",
                    help="use Triton's cache (default: a fresh temporary cache)")  # fmt: skip
    args = ap.parse_args(argv)
    why = backend_missing()
    if why:
        print(f"cannot compile for sm_{TARGET_ARCH}: {why}")
        return 1
    if args.list:
        variants, failures = record()
        for v in variants:
            print(v.name, v.signature, v.constexprs)
        problems = [f"scenario {name!r} failed: {err}" for name, err in failures]
        problems += [f"uncovered kernel: {name}" for name in uncovered(variants)]
        problems += [f"stale entry in HELPERS/SKIPPED: {name}" for name in stale_lists()]
        for line in problems:
            print(line)
        kernels = len({_kernel_id(v.kernel) for v in variants})
        print(f"{len(variants)} variants of {kernels} kernels")
        return 1 if problems else 0
    if not args.cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-aot-")
    return 0 if run_check(args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
