// csrc/cpu/clipjump.cpp -- the fused clipped server jump (fedkern/clipjump.h).
//
// Two sweeps over the columns in fixed tiles: the first forms d = x - ybar (row sums in row order,
// each tile's rows read contiguously) into `out` and each tile's sum of squares; the second, once
// the norm and theta are known, turns out into x - coef * d. Tiles are handed to the threads
// dynamically; their partial sums are combined in tile order.
#include "fedkern/clipjump.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fedkern {
namespace {
constexpr int64_t kTile = 1024;
}  // namespace

void clip_jump(const float* Y, int64_t c, int64_t p, const float* x, const double* w, double s,
               double c0, double c1, const double* G, float* out, double* stats) {
  const int64_t tiles = (p + kTile - 1) / kTile;
  std::vector<double> part(static_cast<size_t>(tiles), 0.0);
#ifdef _OPENMP
#pragma omp parallel if (c * p > (int64_t{1} << 16))
#endif
  {
    std::vector<double> acc(static_cast<size_t>(kTile));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t lo = t * kTile, hi = std::min(p, lo + kTile), n = hi - lo;
      std::fill(acc.begin(), acc.begin() + n, 0.0);
      for (int64_t r = 0; r < c; ++r) {
        const float* y = Y + r * p + lo;
        const double wr = w[r];
        for (int64_t k = 0; k < n; ++k) acc[k] = acc[k] + wr * static_cast<double>(y[k]);
      }
      double sq = 0.0;
      for (int64_t k = 0; k < n; ++k) {
        const float dk = x[lo + k] - static_cast<float>(acc[k]);
        out[lo + k] = dk;
        sq = sq + static_cast<double>(dk) * static_cast<double>(dk);
      }
      part[static_cast<size_t>(t)] = sq;
    }
  }
  double sq = 0.0;
  for (int64_t t = 0; t < tiles; ++t) sq = sq + part[static_cast<size_t>(t)];
  const double gnorm = s * std::sqrt(sq);
  const double theta = 1.0 / (c0 + c1 * (G ? *G : gnorm));
  const float coef = static_cast<float>(theta * s);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (p > (int64_t{1} << 16))
#endif
  for (int64_t k = 0; k < p; ++k) out[k] = x[k] - coef * out[k];
  stats[0] = gnorm;
  stats[1] = theta;
}

}  // namespace fedkern
