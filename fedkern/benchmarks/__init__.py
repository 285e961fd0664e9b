"""Benchmark cases: each fedkern op against the way a competent user writes it in eager PyTorch.

The same cases drive ``fedkern bench`` (fedkern.cli) and the pytest-benchmark suites in bench/.
``core`` holds the machinery (:class:`Case`, :class:`Prepared`, timing, :func:`run_case`,
:func:`run_suite`, :func:`suite`) and the registry; every other module of this package is one op
family (``topk``, ``randk``, ``sparse``, ``microadam``, ``robust``, ``gram``, ``rowops``,
``diffclip``, ``clients``, ``tamuna`` with ``tamuna_rounds``, ``flower_methods``: a Flower
strategy's server round against NumPy twins) with its eager baselines, input setups, byte counts and
case lists; its docstring lists its baselines and cases. ``peers`` adds the cases against the peer
libraries (ByzFL, Flower's own aggregation, torchao, bitsandbytes) to the families they compare,
and ``crossover`` (no cases) measures the size crossovers of the "auto" dispatch. Importing
this package imports every module in it, and each module registers its ops and cases when
imported: a new family adds a module here and edits nothing else.

Registry API (``fedkern.benchmarks.core``), used by a family module at import time:

``register(op, *, family, setup, eager, nbytes, position, by_size=True, stacked=False,
impl_op=None, full_pass=False, footprint=None, ops_module=None)`` -- one benchmarked op:

- ``op``: the case name in the records and case ids (a fedkern op, or a name for a composed
  function or a second baseline, e.g. ``krum``, ``microadam_vs_adamw``); unique.
- ``family``: the op family; the backend a record reports is looked up in the ``IMPLS`` table of
  ``ops_module`` (default ``fedkern.ops.<family>``) under ``impl_op`` (default: ``op``), the fedkern
  op that does the work.
- ``setup(case, device, gen) -> Prepared``: fresh inputs from ``gen`` (seeded with ``SEED``) and the
  two calls: ``fedkern`` and ``eager`` (no arguments), ``rearm_fedkern`` / ``rearm_eager`` (restore
  what a call mutates, untimed; ``nothing`` and ``restore(dst, src)`` help), ``nbytes``
  (``min_bytes(case)``), optional ``tensors`` (for tests) and ``extra`` (merged into the record).
- ``eager``: the eager baseline in a line (the report's "Eager baselines" list).
- ``nbytes(case) -> int``: the bytes the op must move (reads of its inputs, writes of its outputs),
  the numerator of GB/s.
- ``position``: where the op's cases run; unique. Now: topk_compress 100, randk_compress 110,
  ef14_topk_ 120, ef21_topk_ 130, ef14_randk_ 140, ef21_randk_ 150, sparse_add_batched_ 200,
  microadam_step_ 300, microadam_vs_adamw 310, microadam_cuda_vs_adamw 320, coordinate_median 400,
  trimmed_mean 410, krum 500, nnm 600, geometric_median 610, centered_clip 620, clip_rows_ 630,
  diff_compress_clip 700, local_steps_vs_loop 800, local_steps_vs_vmap 810, module_steps_vs_loop
  820, tamuna_aggregate_ 910, tamuna_round_vs_loop 920, fivegcs_round_vs_loop 930,
  flower_scaffnew_round 940, flower_tamuna_round 950; the peer comparisons: median_vs_byzfl 1000,
  trimmed_mean_vs_byzfl 1010, krum_vs_byzfl 1020, multikrum_vs_byzfl 1030,
  geometric_median_vs_byzfl 1040, centered_clip_vs_byzfl 1050, nnm_vs_byzfl 1060,
  median_vs_flower 1100, trimmed_mean_vs_flower 1110, krum_vs_flower 1120, bulyan_vs_flower 1130,
  microadam_vs_torchao_8bit 1200, microadam_vs_torchao_4bit 1210, microadam_vs_bnb_8bit 1220,
  microadam_vs_authors 1230 (tests/test_bench_registry.py checks this list against the
  registry). A new family takes a free number (e.g. 960 and up).
- ``by_size``: the cases of by-size ops run size by size, interleaved with the other by-size
  families' (1-D ops); the others run after them, in position order.
- ``stacked``: the case has m client vectors or messages (the table shows m next to n).
- ``full_pass``: fedkern's kernel must read the whole input (the record gets ``x_read``, fedkern
  time over one read of the input at copy bandwidth).
- ``footprint(case) -> int``: rough bytes both sides need at once; on CUDA a case that does not fit
  the free memory is skipped (default: that of a 1-D op).

``@cases(family)`` on ``fn(suite, device, sizes) -> list[Case]``: the family's cases of a suite;
``suite`` is "quick" (``fedkern bench``), "full" (what ``fedkern bench --full`` adds after the quick
cases; repeats are dropped) or "custom" (the smoke-test sizes ``sizes``, k = 1%); ``device`` is a
torch.device (the large sizes are for CUDA). Helpers: ``dense_cases`` (the 1-D ops' sizes),
``stack_cases`` / ``stack_of`` / ``rows_footprint`` (ops over a stack of client vectors),
``prepare_feedback`` (an error-feedback op), ``randn``, ``k_of``.

A family module, in short::

    from fedkern.benchmarks.core import Case, Prepared, cases, min_bytes, nothing, randn, register

    def _setup(case, device, gen):
        x = randn(case.n, case, device, gen)
        return Prepared(fedkern=lambda: fedkern.my_op(x, case.k), eager=lambda: my_eager(x),
                        rearm_fedkern=nothing, rearm_eager=nothing, nbytes=min_bytes(case))

    register("my_op", family="myfamily", setup=_setup, eager="x.my_eager()", position=900,
             nbytes=lambda c: c.n * c.dtype.itemsize)

    @cases("myfamily")
    def _cases(suite, device, sizes):
        n = sizes or [10**6]
        return [Case("my_op", m, max(1, m // 100)) for m in n] if suite != "full" else []

The quick suite (``fedkern bench``) runs, in this order: the 1-D ops at n = 1e6 then 1e7 fp32
(k = 1%; topk_compress also in bf16 at 1e7; sparse_add_batched_ of 16 messages of 1e5 into 1e7;
a MicroAdam step on 1e7 parameters against both baselines), then the stacked cases
(coordinate-wise aggregators over m = 64 vectors of 1e6, the whole-row ones over m = 16, a round
of local steps for 1000 clients, TAMUNA's server step for a cohort of 100 at p = 1e4).
"""

from __future__ import annotations

import importlib
import pkgutil

from fedkern.benchmarks.core import (
    DTYPE_NAMES,
    DTYPES,
    LR,
    SEED,
    Budget,
    Case,
    Prepared,
    cases,
    copy_bandwidth,
    fmt_n,
    k_of,
    min_bytes,
    ops,
    peak_memory,
    register,
    resolve_backend,
    run_case,
    run_suite,
    spec,
    suite,
    synchronize,
    time_call,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "core":
        importlib.import_module(f"{__name__}.{_mod}")

from fedkern.benchmarks.clients import CLIENT_OPS  # noqa: E402
from fedkern.benchmarks.microadam import MICROADAM_K, microadam_bytes_moved  # noqa: E402
from fedkern.benchmarks.randk import eager_ef14_randk_, eager_ef21_randk_, eager_randk  # noqa: E402
from fedkern.benchmarks.sparse import (  # noqa: E402
    M_MESSAGES,
    eager_sparse_add_batched_,
    sparse_indices,  # noqa: E402
)
from fedkern.benchmarks.topk import eager_ef14_topk_, eager_ef21_topk_, eager_topk  # noqa: E402

#: Every registered op, in position order.
OPS = ops()
#: The ops whose cases hold a stack of m client vectors or messages (m is shown next to n).
STACKED = tuple(op for op in OPS if spec(op).stacked)

__all__ = [
    "CLIENT_OPS",
    "DTYPES",
    "DTYPE_NAMES",
    "LR",
    "MICROADAM_K",
    "M_MESSAGES",
    "OPS",
    "SEED",
    "STACKED",
    "Budget",
    "Case",
    "Prepared",
    "cases",
    "copy_bandwidth",
    "eager_ef14_randk_",
    "eager_ef14_topk_",
    "eager_ef21_randk_",
    "eager_ef21_topk_",
    "eager_randk",
    "eager_sparse_add_batched_",
    "eager_topk",
    "fmt_n",
    "k_of",
    "microadam_bytes_moved",
    "min_bytes",
    "ops",
    "peak_memory",
    "register",
    "resolve_backend",
    "run_case",
    "run_suite",
    "sparse_indices",
    "spec",
    "suite",
    "synchronize",
    "time_call",
]
