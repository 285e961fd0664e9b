"""The one way fedkern's command line opens matplotlib (``fedkern run``'s curves, the Byzantine
matrix's heatmap, ``fedkern bench``'s speed-up picture)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def pyplot() -> Iterator[Any]:
    """``with pyplot() as plt:`` gives ``matplotlib.pyplot`` on the non-interactive Agg backend,
    or None when matplotlib is not installed. Warnings raised inside the block (notices from
    matplotlib's own dependencies) are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            plt = None
        yield plt
