// fedkern/clipjump.h -- the fused clipped server jump of the (L0, L1) local methods (CPU, OpenMP):
// the pseudo-gradient, its norm and the clipped step in one pass, no intermediate tensors.
//
//   ybar_k = float(sum over rows r in row order of w[r] * double(Y[r, k]))      (fp64)
//   d_k    = x_k - ybar_k                                                         (fp32)
//   gnorm  = s * sqrt(sum_k double(d_k)^2)                                        (fp64)
//   theta  = 1 / (c0 + c1 * (G ? *G : gnorm))                                     (fp64)
//   out_k  = x_k - float(theta * s) * d_k                                         (fp32)
//   stats  = {gnorm, theta}
//
// Summation order of the norm: the columns in fixed tiles of kTile (independent of the thread
// count), each tile's squares summed in column order, the tile sums added in tile order; the row
// sums of ybar are in row order. Results never depend on the thread count.
// Contract (validated in Python): Y c * p floats, x and out p floats, w c doubles, c, p >= 1,
// c0 > 0, c1 >= 0, s > 0; G null or one double; stats two doubles.
#pragma once

#include <cstdint>

namespace fedkern {

void clip_jump(const float* Y, int64_t c, int64_t p, const float* x, const double* w, double s,
               double c0, double c1, const double* G, float* out, double* stats);

}  // namespace fedkern
