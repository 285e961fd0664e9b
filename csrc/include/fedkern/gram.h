// fedkern/gram.h -- the fp64 Gram matrix of n client vectors (CPU, OpenMP): the distances of
// Krum, Multi-Krum and NNM.
//
// X is an [n, d] row-major matrix (row i = client i) of float32 or bfloat16.
//
//   gram:  G[i, j] = sum_k double(X[i, k]) * double(X[j, k]),  G: [n, n] float64.
//     Every product of two fp32 values is exact in fp64, so only the additions round (an fp64
//     FMA equals mul + add here). Summation order: the columns are split into C consecutive
//     chunks of L columns (the last one shorter), L and C functions of (n, d) only (never of the
//     thread count): C = min(ceil(d / 4096), 64, max(1, 2^23 / n4^2)) with n4 = n rounded up to a
//     multiple of 4, L = ceil(d / C). Per chunk c the partial P_c[i, j] = (((0.0 + p_0) + p_1) +
//     ...) sums the products in increasing k, starting from +0.0; then G[i, j] = ((P_0 + P_1) +
//     ...) + P_{C-1}, chunks in order. Entries with i <= j are computed, G[j, i] = G[i, j] is a
//     copy, so G is symmetric bit for bit. Non-finite inputs propagate (inf / NaN entries).
//
// Contract (the Python op layer validates, the kernels do not): x points to n*d contiguous
// elements of `dtype`, g to n*n doubles; n, d >= 1. Results are a function of the input alone
// (never of the thread count or the instruction set: the AVX2 and baseline builds give the same
// bits). Extra memory: C partial [n4, n4] fp64 matrices (<= 64 MiB in all, or one when n4 > 2896)
// and per thread a packed fp64 panel of n4 x kc doubles (kc = 64..128 columns).
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

// G = X X^T in fp64 (see above). g: n*n doubles, row-major, both triangles written.
void gram(const void* x, DType dtype, int64_t n, int64_t d, double* g);

}  // namespace fedkern
