// fedkern/diffclip.h -- per-client difference -> compression -> norm clipping, batched over rows
// (CPU, OpenMP).
//
// G_new, G_old: [n, d] row-major, one client per row, float32 or bfloat16 (same dtype). Per row i:
//   diff_j  = round(fp32(G_new[i, j]) - fp32(G_old[i, j]))   (never stored as a whole [n, d])
//   message c: top-k of diff | rand-k of diff (times scale) | the dense diff row
//   norm_i  = sqrt(sum over the message of double(c)^2)        (fp64; the order is below)
//   s_i     = min(1, max_norm[i] / norm_i)                     (fp64)
//   values: norm_i <= max_norm[i]: c untouched (bit for bit); norm_i not finite: +0.0 everywhere;
//           otherwise round(float(s_i) * fp32(c)) (s_i rounded to fp32 once, one fp32 multiply).
//   norms_out[i] = norm_i (before clipping).
// Summation order of norm_i (fixed, so the bytes never depend on the thread count): the message is
// cut into chunks of kDiffClipChunk values; within a chunk value j goes to lane j % 8, the 8 lanes
// are combined as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), and the chunk sums are added
// in chunk order starting from 0.0. The square of an fp32 value is exact in fp64.
//
// Contract (the Python op layer validates, the kernels do not): contiguous arrays, n >= 1,
// d >= 1, 1 <= k <= d; max_norm[n] float64, each > 0 and finite; idx int64 [n, k] (row i's
// indices ascending), val [n, k] and out [n, d] in the inputs' dtype; norms_out float64 [n].
// fp32 arithmetic without FMA; round() as in common.h. Rows run in parallel when n >= threads
// (each row's work single-threaded then), otherwise one row at a time with the row's work split.
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

constexpr int64_t kDiffClipChunk = 4096;

// Top-k message: idx/val = fedkern::topk_compress(diff row, k) (keys of common.h: ties to the lower
// index, NaN above inf, indices ascending), then clipped.
void diff_topk_clip(const void* g_new, const void* g_old, DType dtype, int64_t n, int64_t d,
                    int64_t k, const double* max_norm, int64_t* idx, void* val, double* norms_out);

// Rand-k message: idx = randk_indices(d, k, keys of row i) (randk.h), c = round(fp32(scale) *
// fp32(diff[idx])), then clipped. keys: [n, 8] int64 holding uint32 values (row i's round keys).
// Only the k chosen entries of a row are read.
void diff_randk_clip(const void* g_new, const void* g_old, DType dtype, int64_t n, int64_t d,
                     int64_t k, const int64_t* keys, float scale, const double* max_norm,
                     int64_t* idx, void* val, double* norms_out);

// Dense message: out[i] = clip(diff row i), [n, d]. One pass writes diff into out and sums its
// squares; a second pass over out scales (or zeroes) the rows that need it.
void diff_clip(const void* g_new, const void* g_old, DType dtype, int64_t n, int64_t d,
               const double* max_norm, void* out, double* norms_out);

}  // namespace fedkern
