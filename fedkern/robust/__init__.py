"""Byzantine-robust aggregation of client vectors.

Aggregators over a stack X of n client vectors [n, d] (float32 or bfloat16, CPU or CUDA; or a list
of n 1-D tensors of one shape, dtype and device, see ``as_stack``) return [d] in X's dtype:
``coordinate_median``, ``trimmed_mean``, ``krum`` (and Multi-Krum), ``bulyan`` (over Krum),
``geometric_median`` (smoothed Weiszfeld) and ``centered_clip``. Pre-aggregators return a new stack:
``bucketing`` and ``nnm``. Clipping: ``clip_rows_`` (in place) and ``diff_compress_clip`` (the
client side of Byz-VR-MARINA: difference, compress, clip). ``Aggregator`` chains a pre-aggregator
and an aggregator; ``fedkern.robust.attacks`` builds Byzantine messages for tests and benchmarks.

NaN rows (a Byzantine client's garbage) are data, not errors; each function says what they do.
Per-coordinate values are ordered with NaN above +inf, so a minority of NaN rows cannot poison
the median or the trimmed mean; Krum gives a row with a non-finite entry an infinite score.
Exact numerics: ``fedkern.reference.robust``, ``gram``, ``rowops`` and ``diffclip``.

Modules: ``rules`` (the aggregation rules), ``preaggregate`` (bucketing, NNM), ``clipping``
(clip_rows_, diff_compress_clip), ``aggregator`` (Aggregator), ``attacks``; this package only
re-exports them.
"""

from fedkern.robust.aggregator import Aggregator
from fedkern.robust.clipping import clip_rows_, diff_compress_clip
from fedkern.robust.preaggregate import bucketing, nnm
from fedkern.robust.rules import (
    as_stack,
    bulyan,
    centered_clip,
    coordinate_median,
    geometric_median,
    krum,
    pairwise_sqdist,
    trimmed_mean,
)

__all__ = [
    "Aggregator",
    "as_stack",
    "bucketing",
    "bulyan",
    "centered_clip",
    "clip_rows_",
    "coordinate_median",
    "diff_compress_clip",
    "geometric_median",
    "krum",
    "nnm",
    "pairwise_sqdist",
    "trimmed_mean",
]
