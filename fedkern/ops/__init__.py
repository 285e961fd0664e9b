"""Op schemas (torch.library namespace "fedkern"), argument validation and backend dispatch.

Importing this package registers the ops: ``torch.ops.fedkern.<name>``. The public, documented
entry points are re-exported from ``fedkern``.
"""

from fedkern.ops import (  # noqa: F401  (importing registers the ops)
    diffclip,  # diff_topk_clip, diff_randk_clip, diff_clip
    gram,  # gram
    microadam,  # microadam_step_
    robust,  # coordinate_median, trimmed_mean
    rowops,  # gather_mean, geometric_median, centered_clip, clip_rows_
    tamuna,  # tamuna_aggregate_
)
from fedkern.ops._crossover import crossovers, set_crossover
from fedkern.ops._dispatch import backend, backends, current_backend
from fedkern.ops.randk import ef14_randk_, ef21_randk_, randk_compress
from fedkern.ops.sparse import sparse_add_, sparse_add_batched_
from fedkern.ops.topk import ef14_topk_, ef21_topk_, topk_compress

__all__ = [
    "backend",
    "backends",
    "crossovers",
    "current_backend",
    "ef14_randk_",
    "ef14_topk_",
    "ef21_randk_",
    "ef21_topk_",
    "randk_compress",
    "set_crossover",
    "sparse_add_",
    "sparse_add_batched_",
    "topk_compress",
]
