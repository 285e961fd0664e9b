"""Benchmarks against the peer libraries a user would pick instead (``fedkern bench --peers``).

Each case times the fedkern call and the peer library's call on identical inputs, side by side (the
record's "eager" side is the peer). A peer that is not installed is skipped; none is required by
fedkern (``pip install "fedkern[peers]"`` brings them: ByzFL needs torchvision, and so a torch
build that matches it).

Robust aggregation over a stack X of m client vectors [m, n] (float32):

  median_vs_byzfl            byzfl.Median()(X)
  trimmed_mean_vs_byzfl      byzfl.TrMean(f)(X), f = m // 4
  krum_vs_byzfl              byzfl.Krum(f)(X)
  multikrum_vs_byzfl         byzfl.MultiKrum(f)(X): the mean of the m - f best rows
                             (fedkern.robust.krum(X, f, m=m - f))
  geometric_median_vs_byzfl  byzfl.GeometricMedian(nu=0.1, T=8)(X)
                             (fedkern.robust.geometric_median(X, iters=8, nu=0.1))
  centered_clip_vs_byzfl     byzfl.CenteredClipping(L=3, tau=1)(X), from zero
                             (fedkern.robust.centered_clip(X, tau=1, iters=3, center=zeros))
  nnm_vs_byzfl               byzfl.NNM(f)(X) (the pre-aggregator's mixed stack)
  median_vs_flower           flwr.server.strategy.aggregate.aggregate_median(results)
  trimmed_mean_vs_flower     aggregate_trimmed_avg(results, proportiontocut=f / m)
  krum_vs_flower             aggregate_krum(results, num_malicious=f, to_keep=0)
  bulyan_vs_flower           aggregate_bulyan(results, f, aggregate_krum, to_keep=0)
                             (fedkern.robust.bulyan(X, f), f = (m - 3) // 4 so that m >= 4f + 3)

Flower's functions take the replies as ``[(list of ndarrays, num_examples)]``; the list is built
once, outside the timed calls, as the strategy has it (aggregate_bulyan pops from the list it is
given, so each of its calls gets a fresh shallow copy, a few microseconds).

Low-bit optimizers (one step on n parameters in 4 tensors, weight decay 0.01, as
``microadam_vs_adamw``; the records carry both sides' state bytes per parameter):

  microadam_vs_torchao_8bit  torchao.optim.AdamW8bit
  microadam_vs_torchao_4bit  torchao.optim.AdamW4bit
  microadam_vs_bnb_8bit      bitsandbytes.optim.AdamW8bit
  microadam_vs_authors       the MicroAdam of its authors (IST Austria DASLab: pip packages
                             ista-daslab-optimizers and ista-daslab-optimizers-cuda, their CUDA
                             kernels), m = 10, k_init = 0.01, quant_block_size = 256 (fedkern's
                             window, density and 4-bit bucket); bfloat16 on CUDA only (its
                             kernels' one dtype and device). It overwrites p.grad with its
                             update, so its gradients are restored before every call, untimed.

Cases: the aggregators at m = 16 and 64 vectors of n = 1e5 and 1e6 (Bulyan: m = 16 at both n and
m = 64 at n = 1e5, since Flower's recomputes every distance at each of its theta Krum steps and
takes minutes at m = 64, n = 1e6); the optimizers at n = 1e7 (the authors' MicroAdam in bfloat16
on a CUDA device; bench/microadam_authors.py times it at 1e8 too).
The DDP hooks against PyTorch's PowerSGD and fp16 / bf16 compression hooks need several processes:
``python bench/bench_ddp.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch

import fedkern
from fedkern.benchmarks.core import Case, Prepared, cases, nothing, register, rows_footprint
from fedkern.benchmarks.core import stack_of as _stack_of
from fedkern.benchmarks.microadam import MICROADAM_K, _bytes, _footprint, _setup_microadam

#: The authors' MicroAdam's package (module name), and the modules it imports only for logging.
AUTHORS = "ista_daslab_optimizers"
LOGGING_ONLY = ("wandb", "gpustat")
#: op -> (peer module, fedkern family, fedkern op doing the work, position, the peer's call)
ROBUST = {
    "median_vs_byzfl": ("byzfl", "robust", "coordinate_median", 1000, "byzfl.Median()(X)"),
    "trimmed_mean_vs_byzfl": ("byzfl", "robust", "trimmed_mean", 1010, "byzfl.TrMean(f)(X)"),
    "krum_vs_byzfl": ("byzfl", "gram", "gram", 1020, "byzfl.Krum(f)(X)"),
    "multikrum_vs_byzfl": ("byzfl", "gram", "gram", 1030, "byzfl.MultiKrum(f)(X)"),
    "geometric_median_vs_byzfl": ("byzfl", "rowops", "geometric_median", 1040,
                                  "byzfl.GeometricMedian(nu=0.1, T=8)(X)"),
    "centered_clip_vs_byzfl": ("byzfl", "rowops", "centered_clip", 1050,
                               "byzfl.CenteredClipping(L=3, tau=1)(X)"),
    "nnm_vs_byzfl": ("byzfl", "rowops", "gather_mean", 1060, "byzfl.NNM(f)(X)"),
    "median_vs_flower": ("flwr", "robust", "coordinate_median", 1100,
                         "flwr aggregate_median(results)"),
    "trimmed_mean_vs_flower": ("flwr", "robust", "trimmed_mean", 1110,
                               "flwr aggregate_trimmed_avg(results, f / m)"),
    "krum_vs_flower": ("flwr", "gram", "gram", 1120, "flwr aggregate_krum(results, f, 0)"),
    "bulyan_vs_flower": ("flwr", "gram", "gram", 1130,
                         "flwr aggregate_bulyan(results, f, aggregate_krum, to_keep=0)"),
}  # fmt: skip
OPTIMIZERS = {
    "microadam_vs_torchao_8bit": ("torchao", "torchao.optim.AdamW8bit", 1200),
    "microadam_vs_torchao_4bit": ("torchao", "torchao.optim.AdamW4bit", 1210),
    "microadam_vs_bnb_8bit": ("bitsandbytes", "bitsandbytes.optim.AdamW8bit", 1220),
    "microadam_vs_authors": (AUTHORS, f"{AUTHORS}.MicroAdam", 1230),
}
#: The authors' MicroAdam's constructor options that match fedkern's MicroAdam defaults (window
#: m, density k_init, the 4-bit error feedback's bucket quant_block_size); alpha 0 is the paper's.
AUTHORS_OPTIONS = {"m": 10, "k_init": 0.01, "quant_block_size": 256, "alpha": 0}


def available(module: str) -> bool:
    """Whether a peer library imports here (any failure counts as not available)."""
    try:
        authors_microadam() if module == AUTHORS else importlib.import_module(module)
    except Exception:  # a missing or broken peer is skipped, never an error of fedkern's
        return False
    return True


def authors_microadam() -> type:
    """The authors' ``MicroAdam`` class (``ista_daslab_optimizers.MicroAdam``).

    Their package imports wandb and gpustat when it is imported, for the logs MicroAdam writes
    every ``log_interval`` steps (100); where those are not installed, empty stand-in modules take
    their place for the import only (removed from ``sys.modules`` afterwards), and the callers set
    ``log_interval`` beyond their runs. Raises ImportError (or what the import raised) when the
    package or its compiled kernels are missing.
    """
    added = []
    for name in LOGGING_ONLY:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    try:
        return importlib.import_module(AUTHORS).MicroAdam
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _robust_pair(op: str, x: torch.Tensor, f: int):
    m = x.shape[0]
    R = fedkern.robust
    if op.endswith("_vs_byzfl"):
        import byzfl

        peer = {
            "median_vs_byzfl": lambda: byzfl.Median(),
            "trimmed_mean_vs_byzfl": lambda: byzfl.TrMean(f=f),
            "krum_vs_byzfl": lambda: byzfl.Krum(f=f),
            "multikrum_vs_byzfl": lambda: byzfl.MultiKrum(f=f),
            "geometric_median_vs_byzfl": lambda: byzfl.GeometricMedian(nu=0.1, T=8),
            "centered_clip_vs_byzfl": lambda: byzfl.CenteredClipping(L=3, tau=1.0),
            "nnm_vs_byzfl": lambda: byzfl.NNM(f=f),
        }[op]()
        eager = lambda: peer(x)  # noqa: E731
    else:
        from flwr.server.strategy import aggregate as A

        results = [([row.numpy()], 1) for row in x.cpu()]
        eager = {
            "median_vs_flower": lambda: A.aggregate_median(results),
            "trimmed_mean_vs_flower": lambda: A.aggregate_trimmed_avg(results, f / m),
            "krum_vs_flower": lambda: A.aggregate_krum(results, f, 0),
            "bulyan_vs_flower": lambda: A.aggregate_bulyan(list(results), f, A.aggregate_krum,
                                                           to_keep=0),
        }[op]  # fmt: skip
    zeros = torch.zeros(x.shape[1], device=x.device)
    fk = {
        "median": lambda: R.coordinate_median(x),
        "trimmed": lambda: R.trimmed_mean(x, f),
        "krum": lambda: R.krum(x, f),
        "bulyan": lambda: R.bulyan(x, f),
        "multikrum": lambda: R.krum(x, f, m=m - f),
        "geometric": lambda: R.geometric_median(x, iters=8, nu=0.1),
        "centered": lambda: R.centered_clip(x, tau=1.0, iters=3, center=zeros),
        "nnm": lambda: R.nnm(x, f),
    }[op.split("_")[0]]
    return fk, eager


def _setup_robust(case, device, gen):
    x = _stack_of(case, device, gen)
    fk, eager = _robust_pair(case.op, x, case.k)
    return Prepared(fedkern=fk, eager=eager, rearm_fedkern=nothing, rearm_eager=nothing,
                    nbytes=case.m * case.n * case.dtype.itemsize, tensors={"x": x})  # fmt: skip


def _setup_optimizer(case, device, gen):
    prep = _setup_microadam(Case("microadam_vs_adamw", case.n, case.k, case.dtype), device, gen)
    module, path, _ = OPTIMIZERS[case.op]
    if module == AUTHORS:
        cls = authors_microadam()
    else:
        mod_name, cls_name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod_name), cls_name)
    params = [torch.nn.Parameter(torch.randn_like(g)) for g in prep.tensors["grads"]]
    for p, g in zip(params, prep.tensors["grads"], strict=True):
        p.grad = g.clone() if module == AUTHORS else g  # the authors' step overwrites p.grad
    opts = AUTHORS_OPTIONS if module == AUTHORS else {}
    peer = cls(params, lr=1e-3, weight_decay=0.01, **opts)
    if module == AUTHORS:
        peer.log_interval = 1 << 62  # no logging steps (wandb, extra norms) in the timed calls

        def rearm_peer() -> None:
            for p, g in zip(params, prep.tensors["grads"], strict=True):
                p.grad.copy_(g)

        prep.rearm_eager = rearm_peer
    peer.step()  # allocate the state outside the timed calls

    def state_bytes(opt) -> int:
        total = 0
        for st in opt.state.values():
            for t in st.values():
                if isinstance(t, torch.Tensor):
                    # torchao's quantized states are tensor subclasses: count their inner tensors
                    inner = getattr(t, "__tensor_flatten__", None)
                    if inner is not None:
                        names, _ = t.__tensor_flatten__()
                        total += sum(getattr(t, n).numel() * getattr(t, n).element_size()
                                     for n in names)  # fmt: skip
                    else:
                        total += t.numel() * t.element_size()
        return total

    prep.eager = peer.step
    prep.extra["eager_state_bytes_per_param"] = state_bytes(peer) / case.n
    return prep


for _op, (_peer, _family, _impl, _pos, _call) in ROBUST.items():
    register(_op, family=_family, setup=_setup_robust, position=_pos, by_size=False,
             stacked=True, impl_op=_impl, footprint=rows_footprint, eager=_call,
             nbytes=lambda c: c.m * c.n * c.dtype.itemsize)  # fmt: skip
for _op, (_peer, _path, _pos) in OPTIMIZERS.items():
    register(_op, family="microadam", setup=_setup_optimizer, position=_pos, by_size=False,
             eager=f"{_path}.step()", impl_op="microadam_step_", nbytes=_bytes,
             footprint=_footprint)  # fmt: skip


@cases("peers")
def _cases(suite, device, sizes):
    if suite != "peers":
        return []
    out = []
    for op, (peer, *_) in ROBUST.items():
        if not available(peer):
            continue
        if op == "bulyan_vs_flower":
            out += [Case(op, n, (m - 3) // 4, torch.float32, m)
                    for m, n in ((16, 10**5), (16, 10**6), (64, 10**5))]  # fmt: skip
        else:
            out += [Case(op, n, m // 4, torch.float32, m) for m in (16, 64) for n in (10**5, 10**6)]
    for op, (peer, *_) in OPTIMIZERS.items():
        if peer == AUTHORS:  # its kernels: bfloat16 on CUDA only
            if torch.device(device).type == "cuda" and available(peer):
                out.append(Case(op, 10**7, MICROADAM_K, torch.bfloat16))
        elif available(peer):
            out.append(Case(op, 10**7, MICROADAM_K, torch.float32))
    return out
