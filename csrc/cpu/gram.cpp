// csrc/cpu/gram.cpp -- fp64 Gram matrix (fedkern/gram.h), OpenMP.
//
// Gram: a symmetric rank-d update, GEMM-style. The rows are grouped by 4 (the last group padded
// with zero rows, n4 = 4 * groups). Per chunk of L columns (the summation order of the header)
// and per panel of kc columns inside it, the rows of the groups in play are packed into an fp64
// panel, k-major within a group (P[g][k][0..3] = X[4g..4g+3, k]), so that a group is both the
// 4 broadcast scalars and the one 4-wide vector of a micro-kernel step. The micro-kernel keeps a
// 4 x 12 tile of the chunk's partial in 12 AVX2 registers (rows of group gi, columns of groups
// gj..gj+2, gj >= gi: only tiles on or above the diagonal) and adds one product per k with an
// FMA, k in increasing order; the first panel of a chunk starts the tile from +0.0, the next
// ones continue from the stored partial, so every entry is the sequential sum of the header.
// Work items are (chunk, block of row groups): the chunks fix the numerics, the row blocks only
// split the work (so they may follow the thread count). The chunk partials are then summed in
// chunk order and mirrored.
//
// The kernel is compiled twice, with AVX2 (+FMA) and for the baseline ISA; the FMA of two
// fp32-valued doubles equals mul + add (the product is exact), so the two builds give the same
// bits.
#include "fedkern/gram.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_GRAM_AVX2 1
#include <immintrin.h>
#define FEDKERN_AVX2 __attribute__((target("avx2,fma")))
#else
#define FEDKERN_GRAM_AVX2 0
#endif

namespace fedkern {
namespace {

// ---- Gram --------------------------------------------------------------------------------------

constexpr int64_t kMinChunk = 4096;           // columns per chunk at least (header: C formula)
constexpr int64_t kMaxChunks = 64;            // chunks at most
constexpr int64_t kPartialDoubles = 1 << 23;  // all chunk partials together (64 MiB)
constexpr int64_t kPanelDoubles = 1 << 16;    // packed panel target (512 KiB: half of L2)
constexpr int64_t kMaxKc = 128;  // columns per panel at most: A + B micro-panels in half of L1
constexpr int64_t kMaxGroupsPerTile = 3;  // 4 x 12 micro-tile

struct GramPlan {
  int64_t n, d, groups, n4, chunks, len, kc;
};

GramPlan gram_plan(int64_t n, int64_t d) {
  GramPlan p;
  p.n = n;
  p.d = d;
  p.groups = (n + 3) / 4;
  p.n4 = 4 * p.groups;
  const int64_t by_mem = std::max<int64_t>(1, kPartialDoubles / (p.n4 * p.n4));
  p.chunks = std::min({(d + kMinChunk - 1) / kMinChunk, kMaxChunks, by_mem});
  p.len = (d + p.chunks - 1) / p.chunks;
  p.chunks = (d + p.len - 1) / p.len;  // ceil(d / ceil(d / C)) <= C: no empty chunk
  p.kc = std::clamp<int64_t>(kPanelDoubles / p.n4 / 4 * 4, 64, kMaxKc);
  return p;
}

// Pack groups [g0, g1) of columns [k0, k0 + kl) into P (group g at P + (g - g0) * 4 * kl).
template <class T>
void pack_base(const typename T::storage* x, const GramPlan& p, int64_t g0, int64_t g1, int64_t k0,
               int64_t kl, double* P) {
  for (int64_t g = g0; g < g1; ++g) {
    double* dst = P + (g - g0) * 4 * kl;
    for (int r = 0; r < 4; ++r) {
      const int64_t i = 4 * g + r;
      if (i < p.n) {
        const typename T::storage* src = x + i * p.d + k0;
        for (int64_t k = 0; k < kl; ++k) dst[4 * k + r] = static_cast<double>(T::load(src, k));
      } else {
        for (int64_t k = 0; k < kl; ++k) dst[4 * k + r] = 0.0;
      }
    }
  }
}

// C[r][4g + c] (+)= sum_k A[4k + r] * B[g * bs + 4k + c], r, c < 4, g < NG; k increasing.
template <int NG>
void micro_base(const double* A, const double* B, int64_t bs, int64_t kl, double* C, int64_t ldc,
                bool first) {
  double c[4][4 * NG];
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < 4 * NG; ++j) c[r][j] = first ? 0.0 : C[r * ldc + j];
  }
  for (int64_t k = 0; k < kl; ++k) {
    for (int r = 0; r < 4; ++r) {
      const double a = A[4 * k + r];
      for (int g = 0; g < NG; ++g) {
        for (int q = 0; q < 4; ++q) c[r][4 * g + q] = c[r][4 * g + q] + a * B[g * bs + 4 * k + q];
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < 4 * NG; ++j) C[r * ldc + j] = c[r][j];
  }
}

#if FEDKERN_GRAM_AVX2
FEDKERN_AVX2 inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
FEDKERN_AVX2 inline __m128 load4(const uint16_t* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}

template <class T>
FEDKERN_AVX2 void pack_avx2(const typename T::storage* x, const GramPlan& p, int64_t g0, int64_t g1,
                            int64_t k0, int64_t kl, double* P) {
  for (int64_t g = g0; g < g1; ++g) {
    double* dst = P + (g - g0) * 4 * kl;
    const int64_t i0 = 4 * g;
    if (i0 + 4 > p.n) {  // the padded last group
      pack_base<T>(x, p, g, g + 1, k0, kl, dst);
      continue;
    }
    const typename T::storage* s0 = x + i0 * p.d + k0;
    const typename T::storage* s1 = s0 + p.d;
    const typename T::storage* s2 = s1 + p.d;
    const typename T::storage* s3 = s2 + p.d;
    int64_t k = 0;
    for (; k + 4 <= kl; k += 4) {
      __m128 r0 = load4(s0 + k), r1 = load4(s1 + k), r2 = load4(s2 + k), r3 = load4(s3 + k);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm256_store_pd(dst + 4 * k, _mm256_cvtps_pd(r0));
      _mm256_store_pd(dst + 4 * k + 4, _mm256_cvtps_pd(r1));
      _mm256_store_pd(dst + 4 * k + 8, _mm256_cvtps_pd(r2));
      _mm256_store_pd(dst + 4 * k + 12, _mm256_cvtps_pd(r3));
    }
    for (; k < kl; ++k) {
      dst[4 * k + 0] = T::load(s0, k);
      dst[4 * k + 1] = T::load(s1, k);
      dst[4 * k + 2] = T::load(s2, k);
      dst[4 * k + 3] = T::load(s3, k);
    }
  }
}

// Twelve named accumulators (an array of them was kept in memory by GCC: a store per FMA).
template <int NG>
FEDKERN_AVX2 void micro_avx2(const double* A, const double* B, int64_t bs, int64_t kl, double* C,
                             int64_t ldc, bool first) {
  const __m256d z = _mm256_setzero_pd();
  __m256d c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z;
  __m256d c20 = z, c21 = z, c22 = z, c30 = z, c31 = z, c32 = z;
#define FEDKERN_LOAD_ROW(r)                                         \
  c##r##0 = _mm256_loadu_pd(C + r * ldc);                           \
  if constexpr (NG > 1) c##r##1 = _mm256_loadu_pd(C + r * ldc + 4); \
  if constexpr (NG > 2) c##r##2 = _mm256_loadu_pd(C + r * ldc + 8);
  if (!first) {
    FEDKERN_LOAD_ROW(0)
    FEDKERN_LOAD_ROW(1)
    FEDKERN_LOAD_ROW(2)
    FEDKERN_LOAD_ROW(3)
  }
#undef FEDKERN_LOAD_ROW
  const double* B1 = B + bs;
  const double* B2 = B + 2 * bs;
#define FEDKERN_FMA_ROW(r)                                           \
  {                                                                  \
    const __m256d a = _mm256_broadcast_sd(A + 4 * k + r);            \
    c##r##0 = _mm256_fmadd_pd(a, b0, c##r##0);                       \
    if constexpr (NG > 1) c##r##1 = _mm256_fmadd_pd(a, b1, c##r##1); \
    if constexpr (NG > 2) c##r##2 = _mm256_fmadd_pd(a, b2, c##r##2); \
  }
  for (int64_t k = 0; k < kl; ++k) {
    const __m256d b0 = _mm256_load_pd(B + 4 * k);
    const __m256d b1 = NG > 1 ? _mm256_load_pd(B1 + 4 * k) : z;
    const __m256d b2 = NG > 2 ? _mm256_load_pd(B2 + 4 * k) : z;
    FEDKERN_FMA_ROW(0)
    FEDKERN_FMA_ROW(1)
    FEDKERN_FMA_ROW(2)
    FEDKERN_FMA_ROW(3)
  }
#undef FEDKERN_FMA_ROW
#define FEDKERN_STORE_ROW(r)                                        \
  _mm256_storeu_pd(C + r * ldc, c##r##0);                           \
  if constexpr (NG > 1) _mm256_storeu_pd(C + r * ldc + 4, c##r##1); \
  if constexpr (NG > 2) _mm256_storeu_pd(C + r * ldc + 8, c##r##2);
  FEDKERN_STORE_ROW(0)
  FEDKERN_STORE_ROW(1)
  FEDKERN_STORE_ROW(2)
  FEDKERN_STORE_ROW(3)
#undef FEDKERN_STORE_ROW
}
#endif

using MicroFn = void (*)(const double*, const double*, int64_t, int64_t, double*, int64_t, bool);
template <class T>
using PackFn = void (*)(const typename T::storage*, const GramPlan&, int64_t, int64_t, int64_t,
                        int64_t, double*);

// One work item: chunk c, row groups [gi0, gi1), into the chunk's partial `part` ([n4, n4]).
template <class T>
void gram_item(const typename T::storage* x, const GramPlan& p, int64_t c, int64_t gi0, int64_t gi1,
               double* part, double* panel, PackFn<T> pack, const MicroFn* micro) {
  const int64_t kb = c * p.len, ke = std::min(p.d, kb + p.len);
  for (int64_t k0 = kb; k0 < ke; k0 += p.kc) {
    const int64_t kl = std::min(p.kc, ke - k0);
    pack(x, p, gi0, p.groups, k0, kl, panel);
    const int64_t bs = 4 * kl;
    for (int64_t gi = gi0; gi < gi1; ++gi) {
      const double* A = panel + (gi - gi0) * bs;
      for (int64_t gj = gi; gj < p.groups; gj += kMaxGroupsPerTile) {
        const int64_t ng = std::min(kMaxGroupsPerTile, p.groups - gj);
        micro[ng - 1](A, panel + (gj - gi0) * bs, bs, kl, part + 4 * gi * p.n4 + 4 * gj, p.n4,
                      k0 == kb);
      }
    }
  }
}

template <class T>
void gram_run(const void* xv, const GramPlan& p, double* g) {
  using S = typename T::storage;
  const S* x = static_cast<const S*>(xv);
  PackFn<T> pack = pack_base<T>;
  MicroFn micro[3] = {micro_base<1>, micro_base<2>, micro_base<3>};
#if FEDKERN_GRAM_AVX2
  if (detail::use_avx2(/*fma=*/true)) {
    pack = pack_avx2<T>;
    micro[0] = micro_avx2<1>;
    micro[1] = micro_avx2<2>;
    micro[2] = micro_avx2<3>;
  }
#endif
  // Row blocks: enough items for the threads (this split never changes the numerics). Group gi
  // costs ~ (groups - gi) micro-steps; blocks of near-equal cost.
  const int threads = detail::max_threads();
  const int64_t want_blocks = (4 * threads + p.chunks - 1) / p.chunks;
  const int64_t nblk = std::clamp<int64_t>(p.chunks >= 2 * threads ? 1 : want_blocks, 1, p.groups);
  std::vector<int64_t> bounds{0};
  {
    const double total = 0.5 * static_cast<double>(p.groups) * static_cast<double>(p.groups + 1);
    double acc = 0.0;
    for (int64_t gi = 0; gi < p.groups; ++gi) {
      acc += static_cast<double>(p.groups - gi);
      if (acc >= total * static_cast<double>(bounds.size()) / static_cast<double>(nblk) &&
          static_cast<int64_t>(bounds.size()) < nblk) {
        bounds.push_back(gi + 1);
      }
    }
    if (bounds.back() != p.groups) bounds.push_back(p.groups);
  }
  const int64_t blocks = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t items = p.chunks * blocks;
  const size_t plane = static_cast<size_t>(p.n4 * p.n4);
  std::unique_ptr<double[]> parts(new double[plane * static_cast<size_t>(p.chunks)]);
  const size_t panel_len = static_cast<size_t>(p.n4 * p.kc);
  const int nt = static_cast<int>(std::min<int64_t>(items, threads));
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<double[]> buf(new double[panel_len + 4]);
    // 32-byte aligned panel for the aligned vector loads.
    double* panel = buf.get();
    while (reinterpret_cast<uintptr_t>(panel) % 32 != 0) ++panel;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t c = it / blocks, b = it % blocks;
      gram_item<T>(x, p, c, bounds[b], bounds[b + 1], parts.get() + c * plane, panel, pack, micro);
    }
  }
  // G[i, j] = ((P_0 + P_1) + ...) for i <= j, mirrored.
  const int64_t n = p.n;
  const int ntr = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / 16)));
#pragma omp parallel for schedule(dynamic, 4) num_threads(ntr)
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) {
      const size_t o = static_cast<size_t>(i * p.n4 + j);
      double s = parts[o];
      for (int64_t c = 1; c < p.chunks; ++c) s = s + parts[c * plane + o];
      g[i * n + j] = s;
      g[j * n + i] = s;
    }
  }
}

}  // namespace

void gram(const void* x, DType dtype, int64_t n, int64_t d, double* g) {
  const GramPlan p = gram_plan(n, d);
  dispatch_dtype(dtype, [&](auto tag) { gram_run<decltype(tag)>(x, p, g); });
}
}  // namespace fedkern
