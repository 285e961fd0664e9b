"""Reference sparse accumulation: dense[I_i] += alpha * V_i for messages i = 0..m-1.

Each row of indices is strictly ascending. Per coordinate the sum runs in fp32 in message order,
acc = acc + (alpha * v) with both operations rounded to fp32, and is rounded to the dense dtype
once, on store.
"""

from __future__ import annotations


def sparse_add_batched_(dense, values, indices, alpha: float) -> None:
    """Mutates 1-D contiguous ``dense``; values/indices are [m, k]."""
    acc = dense.float()
    for i in range(values.shape[0]):
        # Rows hold distinct indices, so one indexed add per message keeps the message order.
        acc[indices[i]] += values[i].float() * alpha
    dense.copy_(acc.to(dense.dtype))
