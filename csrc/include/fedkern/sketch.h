// fedkern/sketch.h -- MAST sketches: w = v + S (x - v) and x -= gamma S^T g, S diagonal and random.
//
// A sketch S of R^d is diagonal: S_jj = s_j if coordinate j is kept, else 0. Two kinds:
//   perm (Rand-K, partition): row r keeps {perm_r(t) : lo_r <= t < hi_r}, perm_r the keyed
//     Feistel permutation of [0, d) of randk.h under the round keys keys[8 r .. 8 r + 7], every
//     kept coordinate scaled by scale[r];
//   bernoulli: row r keeps coordinate j iff (word_j >> 8) < T_j, word_j the Philox word of entry
//     j of the draw with key words keys[4 r .. 4 r + 3] (random.h), T_j = ceil(p_j 2^24) (p_j =
//     p[j], or p_scalar when p is null), scaled by s_j = 2^24 / T_j.
// Every op works on `rows` sketches at once (one per node); x has row stride x_stride (0: one x
// shared by every row), v likewise (null: v = 0), out and g are [rows, d]. keys / range are int64
// (uint32 values; range[2 r], range[2 r + 1] = lo_r, hi_r), scale float32 [rows].
//   apply:      out[r, j] = round(v_j + round32(s (x_j - v_j)))  kept  (v null: round(s x_j))
//               out[r, j] = v_j (v null: +0)                      not kept
//   grad_step:  c = round32(gamma s);  x_j = round(x_j - round32(c g[r, j]))  kept; else unchanged.
//               With x shared (x_stride = 0) the rows are applied one after the other in row
//               order (x -= gamma sum_r S_r^T g_r, every coordinate's updates in row order).
// Only kept coordinates of x, v and g are read by the perm kernels (O(hi - lo) work per row, plus
// the dense write of out for apply); the bernoulli kernels draw a word per coordinate (Philox runs
// 8 or 4 instances per register in the AVX-512 / AVX2 builds, chosen at run time; the words are
// the same in every build) and read x, g only where kept. fp32 arithmetic without FMA; dtype
// float32 or bfloat16 (round = to dtype). Results never depend on the number of threads or ISA.
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

void sketch_perm_apply(const void* x, int64_t x_stride, const void* v, int64_t v_stride, void* out,
                       DType dtype, int64_t rows, int64_t d, const int64_t* keys,
                       const int64_t* range, const float* scale);

void sketch_perm_grad_step(void* x, int64_t x_stride, const void* g, DType dtype, int64_t rows,
                           int64_t d, const int64_t* keys, const int64_t* range, const float* scale,
                           float gamma);

void sketch_bern_apply(const void* x, int64_t x_stride, const void* v, int64_t v_stride, void* out,
                       DType dtype, int64_t rows, int64_t d, const int64_t* keys, float p_scalar,
                       const float* p);

void sketch_bern_grad_step(void* x, int64_t x_stride, const void* g, DType dtype, int64_t rows,
                           int64_t d, const int64_t* keys, float p_scalar, const float* p,
                           float gamma);

}  // namespace fedkern
