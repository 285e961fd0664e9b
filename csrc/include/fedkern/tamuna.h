// fedkern/tamuna.h -- TAMUNA's fused server step (CPU, OpenMP): the average of every coordinate
// over its s holders and the control-variate update of those holders, without the d x c pattern.
//
// Pattern (never stored): coordinate r is held by the cohort slots (s*r + j) mod c, j = 0..s-1;
// slot t belongs to cohort row perm[t] (perm: a permutation of 0..c-1). With h_j = perm[(s*r + j)
// mod c]:
//   xbar[r] = (((X[h_0, r] + X[h_1, r]) + ...) + X[h_{s-1}, r]) / float(s)       (fp32, slot order)
//   H[h_j, r] = H[h_j, r] + coef * (xbar[r] - X[h_j, r])                 (H non-null; j = 0..s-1)
// The sum starts from X[h_0, r] itself (not from +0.0, so that s = 1 keeps a -0.0), the division
// is IEEE, and the update is one fp32 subtraction, one multiply and one add (no FMA: the core is
// compiled with -ffp-contract=off): the same bits as fedkern.reference.tamuna and the Triton
// kernel. Only the s * p held entries of X are read and only the held entries of H are touched.
//
// Contract (validated in Python): X, H c * p contiguous floats (H may be null: no update), perm c
// int64 holding a permutation of 0..c-1, c, p >= 1, 1 <= s <= c, coef finite; xbar: p floats
// (output). Index arithmetic is int64 (s * r and row * p may exceed 2^31). Results never depend
// on the thread count.
#pragma once

#include <cstdint>

namespace fedkern {

void tamuna_aggregate(const float* X, float* H, const int64_t* perm, int64_t c, int64_t p,
                      int64_t s, float coef, float* xbar);

}  // namespace fedkern
