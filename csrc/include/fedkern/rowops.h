// fedkern/rowops.h -- row-wise robust aggregation and clipping (CPU, OpenMP): the gather-mean of
// index lists (NNM, Multi-Krum, bucketing), geometric median (smoothed Weiszfeld), centered
// clipping, in-place clipping of rows to a maximal norm.
//
// X is an [n, d] row-major matrix (row i = client i) of float32 or bfloat16.
//
//   gather_mean:    out[q, :] = round( (sum over t = 0..s-1 with idx[q, t] >= 0, in t order, of
//     fp32(X[idx[q, t], :])) / float(count_q) ),  out: [r, d] of X's dtype, idx: int64 [r, s].
//     The fp32 sum starts from the first valid term (so one term is copied exactly, -0.0 kept);
//     one IEEE fp32 division by count_q (skipped when count_q == 1, where it is exact anyway).
//     Entries < 0 are padding (-1, trailing by contract); count_q == 0 (outside the contract)
//     gives NaN. idx points to r*s int64 in [-1, n), out to r*d elements; r, s >= 1. Extra
//     memory: r * s + r int64 (the valid indices and counts). The AVX2 and baseline builds give
//     the same bits.
//
// Distance of row i to a float32 point z:
//   r_i(z) = sqrt( sum_k double(fp32(X[i,k]) - z_k)^2 )   (difference rounded in fp32; square and
//            sum in fp64, sqrt in fp64). Row i is "bad" when r_i is not finite (inf/NaN entry).
// Summation order of r_i here: the columns are cut into tiles of T columns (T = a power of two in
// [256, 2048] chosen from n and the dtype alone, see rowops.cpp); inside a tile, lane l (0..15)
// sums the squares of the columns k = l (mod 16) in increasing k from 0.0, the 16 lanes are added
// as a balanced binary tree ((l0+l1)+(l2+l3))+...; the tile sums are added in tile order from 0.0.
// The order is a function of (n, d, dtype) alone: never of the thread count or the ISA.
//
//   geometric_median(z0, iters, nu): z = z0 (fp32); for t = 1..iters:
//       w_i = 1 / max(r_i(z), nu) (fp64; bad rows: w_i = 0); W = sum_i w_i (fp64, row order);
//       W == 0 (every row bad): z = NaN everywhere, stop;  c_i = w_i / W (fp64);
//       z_k = float(sum over rows i with w_i > 0, in row order, from 0.0, of c_i * double(X[i,k]))
//     out = round(z). iters = 0: out = round(z0).
//   centered_clip(v0, iters, tau): v = v0 (fp32); for t = 1..iters:
//       s_i = min(1, tau / r_i(v)) (fp64; r_i == 0: s_i = 1; bad rows: s_i = 0);
//       a_k = sum over rows i with s_i > 0, in row order, from 0.0, of
//             (s_i / n) * (double(X[i,k]) - double(v_k))            (n counts the bad rows too)
//       v_k = float( double(v_k) + a_k )
//     out = round(v).
//   clip_rows (in place): norm_i = sqrt(sum_k double(X[i,k])^2) (fp64; summed in the order of r_i
//       with z = 0 and T = 2048 whatever n). norm_i not finite: row i := +0.0 and
//       norms_out[i] = +inf;  norm_i <= max_norm[i]: row untouched (bit for bit);  else
//       X[i,k] = round(float(min(1, max_norm[i] / norm_i)) * fp32(X[i,k])), one fp32 multiply.
//       norms_out[i] = norm_i otherwise (the norm before clipping).
// round() rounds fp32 to X's dtype (bf16: nearest even, NaN -> 0x7fc0). fp arithmetic without FMA.
//
// Passes over X: Weiszfeld and centered clipping fuse the update of iteration t with the distances
// of iteration t + 1 (a tile of T columns is updated, then its distances to the new point are
// taken while the tile is in cache), so `iters` iterations read X iters + 1 times. clip_rows reads
// each row twice, the second time from cache when a row fits in L2.
//
// Contract (the Python op layer validates, the kernels do not): x points to n*d contiguous elements
// of `dtype`; z0 / v0 to d floats, out to d elements of `dtype` (not overlapping x or z0 / v0);
// n >= 1, d >= 1, iters >= 0; max_norm[i] > 0 and finite. Results depend on the input alone.
// Extra memory: n * ceil(d / T) doubles of tile partials plus O(d + n).
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

// out[q] = mean of the rows idx[q, t] >= 0 of X, summed in t order in fp32 (see above).
void gather_mean(const void* x, DType dtype, int64_t n, int64_t d, const int64_t* idx, int64_t r,
                 int64_t s, void* out);

// Smoothed Weiszfeld iterations from z0 (see above). out: d elements of `dtype`.
void geometric_median(const void* x, DType dtype, int64_t n, int64_t d, const float* z0,
                      int64_t iters, double nu, void* out);

// Centered clipping iterations from v0 (see above). out: d elements of `dtype`.
void centered_clip(const void* x, DType dtype, int64_t n, int64_t d, const float* v0, int64_t iters,
                   double tau, void* out);

// Clips every row of x in place to norm max_norm[i]; writes the pre-clip norms (see above).
void clip_rows(void* x, DType dtype, int64_t n, int64_t d, const double* max_norm,
               double* norms_out);

}  // namespace fedkern
