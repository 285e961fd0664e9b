// fedkern/robust.h -- per-coordinate robust aggregation of n client vectors (CPU, OpenMP).
//
// X is an [n, d] row-major matrix (row i = client i) of float32 or bfloat16; every output
// coordinate j depends on column j only. Order within a column: by value, every NaN above +inf
// (all NaNs equal), -0.0 == +0.0, and equal values ranked by row index (lower row = lower rank);
// "the value of rank r" is the element X[i, j] of the row i holding rank r (0-based), bits and all.
//
//   coordinate_median: n odd:  out[j] = value of rank (n-1)/2 (copied exactly);
//                      n even: out[j] = round((lo + hi) * 0.5f), lo / hi = values of ranks
//                              n/2 - 1 and n/2 (fp32; NaN if either is NaN, inf + -inf = NaN).
//   trimmed_mean(f):   s = 0.0f; for i = 0..n-1 IN ROW ORDER: if rank(i) in [f, n-f-1]:
//                      s = s + fp32(X[i, j]);  out[j] = round(s / float(n - 2f)).
//                      (At most f NaNs in a column are all ranked last and dropped.)
// fp32 arithmetic without FMA; round() as in common.h (bf16: nearest even, NaN -> 0x7fc0).
//
// Contract (the Python op layer validates, the kernels do not): x points to n*d contiguous
// elements of `dtype`, out to d; n >= 1, d >= 1, 0 <= f and 2f < n. Results are a function of the
// input alone (never of the thread count). Extra memory: per thread a [n, 32] int32 tile (n <=
// 1024) or an n-element scratch column (larger n).
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

// out[j] = median of column j of X (see above). out: d elements of `dtype`.
void coordinate_median(const void* x, DType dtype, int64_t n, int64_t d, void* out);

// out[j] = mean of the values of ranks f .. n-f-1 of column j, summed in row order (see above).
void trimmed_mean(const void* x, DType dtype, int64_t n, int64_t d, int64_t f, void* out);

}  // namespace fedkern
