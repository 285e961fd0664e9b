// fedkern/topk.h -- top-k compression and the error-feedback updates built on it (CPU, OpenMP).
//
// topk_select(key, k): the k elements with the largest selection key (common.h), equal keys
// resolved toward the LOWER index, returned as int64 indices in strictly ascending order. The set
// is fully determined by the input, so results never depend on the number of threads.
//
// Shared contract of the functions below (the Python op layer validates, the kernels do not):
//   * pointers are to contiguous 1-D arrays of n elements of `dtype` (float32 = float, bfloat16 =
//     uint16 bits), 1 <= k <= n, n is any int64 (2^31 and beyond included);
//   * idx: int64[k] output, ascending; val: dtype[k] output, val[j] belongs to idx[j];
//   * arithmetic is fp32 without FMA, rounded once to the dtype on store ("round").
// Extra memory: per-thread 4096-bin histograms plus a candidate list of about k + (elements in the
// threshold's histogram bin) (index, key) pairs; never a full-size temporary.
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

// idx = topk_select(key(x), k); val = x[idx] (exact copy). x is not modified.
void topk_compress(const void* x, DType dtype, int64_t n, int64_t k, int64_t* idx, void* val);

// Classic error feedback (EF14) with top-k, in place on `err`:
//   a_j = round(e_j + round32(lr * g_j)) for all j;  err <- a;
//   idx = topk_select(key(a), k);  val = a[idx];  err[idx] <- 0.
// The pass that computes a also builds the first selection histogram.
void ef14_topk(const void* grad, void* err, DType dtype, int64_t n, int64_t k, float lr,
               int64_t* idx, void* val);

// EF21 with top-k, in place on `state` at the selected coordinates only:
//   d_j = round(g_j - s_j) (recomputed when needed, never stored in full);
//   idx = topk_select(key(d), k);  val = d[idx];  state[idx] <- round(s[idx] + d[idx]).
void ef21_topk(const void* grad, void* state, DType dtype, int64_t n, int64_t k, int64_t* idx,
               void* val);

// Top-k of a difference, non-mutating (the selection of ef21_topk without its state update):
//   d_j = round(a_j - b_j) (recomputed when needed, never stored in full);
//   idx = topk_select(key(d), k);  val = d[idx].  a and b are not modified.
void diff_topk_compress(const void* a, const void* b, DType dtype, int64_t n, int64_t k,
                        int64_t* idx, void* val);

}  // namespace fedkern
