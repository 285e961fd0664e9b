// csrc/cpu/quartic.cpp -- batched local steps on the quartic (fedkern/quartic.h).
//
// One cohort row (one client's K steps) per OpenMP task, rows handed out dynamically; rows are
// independent, so the thread count never changes a result. Per sample, D = x - x_j is formed once
// into a thread-local buffer, its squared norm summed in 8 lanes (the loops the compilers
// vectorise), then s_j * D is added to the gradient sum: two sweeps over d per sample. sgd / rr
// evaluate a step's permutation for all its indices at once (randk_perm_range of randk.h).
#include "fedkern/quartic.h"

#include <cmath>
#include <vector>

#include "fedkern/randk.h"

namespace fedkern {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kMinWork = int64_t{1} << 20;  // multiply-adds before threads pay off

// Lane l sums v[k]^2 over k = l (mod 8), then the fixed tree (fedkern/quartic.h).
template <class T>
T sum_squares(const float* v, int64_t d) {
  T lane[kLanes] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T e = static_cast<T>(v[k + l]);
      lane[l] = lane[l] + e * e;
    }
  }
  for (int l = 0; k + l < d; ++l) {
    const T e = static_cast<T>(v[k + l]);
    lane[l] = lane[l] + e * e;
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

struct Job {
  int64_t d, K, b;
  int mode;
  float gamma;
  double clip;
  const float* points;
  const int64_t* offsets;
  const float* H;
  const int64_t* keys;
};

void run_row(const Job& j, int64_t r, int64_t client, float* x, std::vector<float>& diff,
             std::vector<float>& gsum, std::vector<int64_t>& perm) {
  const int64_t d = j.d;
  const int64_t lo = j.offsets[client], m = j.offsets[client + 1] - lo;
  const float* P = j.points + lo * d;
  const float* h = j.H ? j.H + r * d : nullptr;
  float* D = diff.data();
  float* g = gsum.data();
  if (j.mode != 0 && m > 0) perm.resize(static_cast<size_t>(m));
  for (int64_t t = 0; t < j.K; ++t) {
    int64_t count = m, bsz = m, batches = 1;
    if (j.mode != 0 && m > 0) {
      uint32_t keys[8];
      for (int q = 0; q < 8; ++q) keys[q] = static_cast<uint32_t>(j.keys[(r * j.K + t) * 8 + q]);
      count = j.mode == 1 ? std::min(j.b, m) : m;
      randk_perm_range(m, keys, 0, count, perm.data());
      bsz = j.mode == 1 ? count : j.b;
      batches = j.mode == 1 ? 1 : (m + j.b - 1) / j.b;
    }
    for (int64_t bi = 0; bi < batches; ++bi) {
      const int64_t start = bi * bsz, end = std::min(start + bsz, count);
      for (int64_t k = 0; k < d; ++k) g[k] = 0.0f;
      for (int64_t q = start; q < end; ++q) {
        const int64_t row = j.mode == 0 ? q : perm[static_cast<size_t>(q)];
        const float* p = P + row * d;
        for (int64_t k = 0; k < d; ++k) D[k] = x[k] - p[k];
        const float s = sum_squares<float>(D, d);
        for (int64_t k = 0; k < d; ++k) g[k] = g[k] + s * D[k];
      }
      const int64_t nb = end - start;
      const float c4 = nb > 0 ? 4.0f / static_cast<float>(nb) : 0.0f;
      for (int64_t k = 0; k < d; ++k) {
        float u = c4 * g[k];
        if (h) u = u - h[k];
        g[k] = u;
      }
      if (j.clip > 0) {
        const double nrm = std::sqrt(sum_squares<double>(g, d));
        if (nrm > j.clip) {
          const float scale = static_cast<float>(j.clip / nrm);
          for (int64_t k = 0; k < d; ++k) g[k] = scale * g[k];
        }
      }
      for (int64_t k = 0; k < d; ++k) x[k] = x[k] - j.gamma * g[k];
    }
  }
}

}  // namespace

void quartic_local_steps(float* X, int64_t c, int64_t d, const int64_t* clients,
                         const float* points, const int64_t* offsets, int64_t K, float gamma,
                         const float* H, int mode, int64_t b, const int64_t* keys, double clip) {
  if (c <= 0 || K <= 0) return;
  const Job job{d, K, b, mode, gamma, clip, points, offsets, H, keys};
  // Threads only for enough work: a parallel region costs a wake-up of every thread (a busy
  // machine can take milliseconds to schedule them), far more than a small cohort's steps.
  int64_t work = 0;
  for (int64_t r = 0; r < c; ++r) work += (offsets[clients[r] + 1] - offsets[clients[r]]) * d * K;
#ifdef _OPENMP
#pragma omp parallel if (c > 1 && work >= kMinWork)
#endif
  {
    std::vector<float> diff(static_cast<size_t>(d)), gsum(static_cast<size_t>(d));
    std::vector<int64_t> perm;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t r = 0; r < c; ++r) run_row(job, r, clients[r], X + r * d, diff, gsum, perm);
  }
}

}  // namespace fedkern
