"""Benchmarks of the microadam family: one MicroAdam step on n parameters in 4 tensors
(40/30/20/10%), default options, weight decay 0.01.

  microadam_step_      against the same optimizer on the reference backend (plain PyTorch, the
                       eager way to write MicroAdam)
  microadam_vs_adamw   the same fedkern step against torch.optim.AdamW (foreach=True on CPU,
                       fused=True on CUDA) on the same parameters
  microadam_cuda_vs_adamw  CUDA only: the same, with the step forced to the CUDA C++ kernel
                       (csrc/cuda/microadam.cu), which "auto" does not pick until a GPU run has
                       measured it (fedkern.ops._dispatch.AUTO_ORDER): both kernels side by side

The records also carry the optimizer state in bytes per parameter of both sides. Cases: quick
n = 1e7 fp32; full adds bf16 and, on CUDA, n = 1e8 and the CUDA C++ case at 1e7 and 1e8 bf16.
k = MICROADAM_K, the default density.
"""

from __future__ import annotations

import torch

import fedkern
from fedkern.benchmarks.core import Case, Prepared, cases, min_bytes, nothing, randn, register

MICROADAM_K = 41  # keep_count(0.01, 4096): the default density and block size
OPS = ("microadam_step_", "microadam_vs_adamw")
FORCED = {"microadam_cuda_vs_adamw": "cuda"}  # case -> the backend its fedkern side is forced to


def microadam_bytes_moved(n: int, es: int, *, m: int = 10, k: int = 41, block: int = 4096,
                          bucket: int = 256, decay: bool = True) -> int:  # fmt: skip
    """Bytes one MicroAdam step must move for n parameters of ``es`` bytes: read the gradient,
    read and write the 4-bit error feedback and its bucket statistics, write one window row,
    read the whole window, and read + write the parameters (only the window's entries when
    there is no weight decay)."""
    stats = 2 * 2 * 4 * n // bucket
    window_row = n * k // block * 4
    params = 2 * n * es if decay else 2 * m * window_row // 4 * es
    return n * es + n + stats + window_row + m * window_row + params


MICROADAM_SPLIT = (0.4, 0.3, 0.2, 0.1)


def _setup_microadam(case, device, gen):
    from fedkern.optim import MicroAdam

    sizes = [int(case.n * f) for f in MICROADAM_SPLIT]
    sizes[0] += case.n - sum(sizes)
    init = [randn(s, case, device, gen) for s in sizes]
    grads = [randn(s, case, device, gen, 1e-2) for s in sizes]

    def params():
        out = [torch.nn.Parameter(x.clone()) for x in init]
        for p, g in zip(out, grads, strict=True):
            p.grad = g
        return out

    opts = {"lr": 1e-3, "weight_decay": 0.01}
    fk = MicroAdam(params(), **opts)
    if case.op == "microadam_step_":
        eg = MicroAdam(params(), **opts)

        def eager() -> None:
            with fedkern.backend("reference"):
                eg.step()

    else:
        flag = {"fused": True} if device.type == "cuda" else {"foreach": True}
        eg = torch.optim.AdamW(params(), **opts, **flag)
        eager = eg.step
    fk_step = fk.step
    if case.op in FORCED:

        def fk_step() -> None:
            with fedkern.backend(FORCED[case.op]):
                fk.step()

    fk_step()  # allocate the state outside the timed calls
    eager()

    def state_bytes(opt) -> int:
        return sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )

    return Prepared(
        fedkern=fk_step,
        eager=eager,
        rearm_fedkern=nothing,  # a step costs the same whatever the parameter values
        rearm_eager=nothing,
        nbytes=min_bytes(case),
        tensors={"grads": grads, "fedkern_optimizer": fk, "eager_optimizer": eg},
        extra={
            "state_bytes_per_param": state_bytes(fk) / case.n,
            "eager_state_bytes_per_param": state_bytes(eg) / case.n,
        },  # fmt: skip
    )


def _bytes(case):
    return microadam_bytes_moved(case.n, case.dtype.itemsize)


def _footprint(case):  # params + grads twice, AdamW moments, reference temporaries
    return 4 * case.n * case.dtype.itemsize + 8 * case.n + 40 * case.n


register("microadam_step_", family="microadam", setup=_setup_microadam, position=300,
         eager="MicroAdam.step() on the reference backend (plain PyTorch)",
         nbytes=_bytes, footprint=_footprint)  # fmt: skip
register("microadam_vs_adamw", family="microadam", setup=_setup_microadam,
         position=310,
         eager="torch.optim.AdamW.step() (foreach=True on CPU, fused=True on CUDA)",
         impl_op="microadam_step_", nbytes=_bytes, footprint=_footprint)  # fmt: skip
register("microadam_cuda_vs_adamw", family="microadam", setup=_setup_microadam,
         position=320, eager="torch.optim.AdamW.step(fused=True)",
         impl_op="microadam_step_", nbytes=_bytes, footprint=_footprint)  # fmt: skip


@cases("microadam")
def _cases(suite, device, sizes):
    def micro(n, dtype):
        return [Case(op, n, MICROADAM_K, dtype) for op in OPS]

    f32, b16 = torch.float32, torch.bfloat16
    if suite == "custom":
        return [c for n in sizes for c in micro(n, f32)]
    if suite == "quick":
        return micro(10**7, f32)
    big = torch.device(device).type == "cuda"
    forced = [Case(op, n, MICROADAM_K, b16) for op in FORCED for n in (10**7, 10**8)] if big else []
    return (
        (micro(10**8, f32) if big else []) + micro(10**7, b16) + (micro(10**8, b16) if big else [])
        + forced
    )  # fmt: skip
