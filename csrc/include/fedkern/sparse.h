// fedkern/sparse.h -- deterministic accumulation of sparse messages into a dense vector (CPU).
//
// sparse_add_batched: for m messages (values[i, :], indices[i, :]), i = 0..m-1, each of k entries,
// every coordinate j of `dense` becomes
//   acc = fp32(dense_j);  for i = 0..m-1 with j in indices[i, :]:  acc = acc + round32(alpha *
//   v_ij) dense_j <- round(acc)                               (fp32 arithmetic without FMA)
// i.e. one fp32 accumulation per coordinate in message order, rounded to the dtype once. No float
// atomics: the dense range is cut into chunks, each owned by one thread, which finds its slice of
// every message row by binary search, so the result never depends on the number of threads.
// Coordinates no message refers to are not written (round(fp32(x)) == x for them except for NaN
// payloads, which a bf16 store would canonicalise to 0x7fc0).
//
// m = 1 is the plain sparse add (dense[idx] += alpha * values).
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

// dense: dtype[n_dense], updated in place.  values: dtype[m, k] row-major.
// indices: int64[m, k] row-major, each row strictly ascending with entries in [0, n_dense).
// Rows that break this give an undefined sum but no write outside dense: an entry below the chunk
// being accumulated (negative, out of order) is dropped, one >= n_dense is never reached.
// alpha: an fp32 number. m >= 1, k >= 1 (int64).
void sparse_add_batched(void* dense, DType dtype, int64_t n_dense, const void* values,
                        const int64_t* indices, int64_t m, int64_t k, float alpha);

}  // namespace fedkern
