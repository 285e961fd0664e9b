// csrc/cpu/pairwise.cpp -- fp64 Gram matrix and gather-mean (fedkern/pairwise.h), OpenMP.
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
// Gather-mean: per work item a tile of columns (rows x columns ~ a quarter of L2) and a block of
// output rows; when output rows share input rows (NNM) the tile is walked in sub-tiles that stay
// in L1 while every output row of the block reads them (the next sub-tile prefetched). Per output
// row the columns go 64 at a time through 8 registers, adding the listed rows in t order; large
// outputs are written with streaming stores (they would evict the rows being reused).
//
// Both kernels are compiled twice, with AVX2 (+FMA) and for the baseline ISA; the FMA of two
// fp32-valued doubles equals mul + add (the product is exact), so the two builds give the same
// bits.
#include "fedkern/pairwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_PAIRWISE_AVX2 1
#include <immintrin.h>
#define FEDKERN_AVX2 __attribute__((target("avx2,fma")))
#else
#define FEDKERN_PAIRWISE_AVX2 0
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

#if FEDKERN_PAIRWISE_AVX2
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
#if FEDKERN_PAIRWISE_AVX2
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

// ---- gather-mean -------------------------------------------------------------------------------

constexpr int64_t kTileBytes = 256 << 10;  // rows x columns of a tile: a quarter of L2
constexpr int64_t kSubBytes = 16 << 10;    // rows x columns of a sub-tile: half of L1
constexpr int64_t kStreamBytes = 8 << 20;  // outputs this large are written around the caches
constexpr int kVec = 64;                   // columns per register block (8 AVX2 registers)

struct GatherJob {
  const void* x;
  void* out;
  int64_t d;
  const int64_t* rows;    // [r, s]: the valid indices of row q first, in t order
  const int64_t* counts;  // [r]
  int64_t s;
  bool stream;  // streaming (non-temporal) stores of the output
};

// Columns [j0, j1) of output row q, scalar (the baseline build; the tail of the AVX2 one).
template <class T>
void gather_cols_base(const GatherJob& job, int64_t q, int64_t j0, int64_t j1) {
  using S = typename T::storage;
  const S* x = static_cast<const S*>(job.x);
  S* out = static_cast<S*>(job.out) + q * job.d;
  const int64_t* rows = job.rows + q * job.s;
  const int64_t cnt = job.counts[q];
  if (cnt == 0) {
    const float nan = std::nanf("");
    for (int64_t j = j0; j < j1; ++j) T::store(out, j, nan);
    return;
  }
  const float div = static_cast<float>(cnt);
  for (int64_t jb = j0; jb < j1; jb += kVec) {
    const int w = static_cast<int>(std::min<int64_t>(kVec, j1 - jb));
    float acc[kVec];
    const S* x0 = x + rows[0] * job.d + jb;
    for (int l = 0; l < w; ++l) acc[l] = T::load(x0, l);
    for (int64_t t = 1; t < cnt; ++t) {
      const S* xt = x + rows[t] * job.d + jb;
      for (int l = 0; l < w; ++l) acc[l] = acc[l] + T::load(xt, l);
    }
    if (cnt > 1) {
      for (int l = 0; l < w; ++l) acc[l] = acc[l] / div;
    }
    for (int l = 0; l < w; ++l) T::store(out, jb + l, acc[l]);
  }
}

#if FEDKERN_PAIRWISE_AVX2
FEDKERN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FEDKERN_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FEDKERN_AVX2 inline void store8(float* p, __m256 v, bool nt) {
  if (nt) {
    _mm256_stream_ps(p, v);
  } else {
    _mm256_storeu_ps(p, v);
  }
}
// round to bf16 (nearest even, NaN -> 0x7fc0) and store 8 halves.
FEDKERN_AVX2 inline void store8(uint16_t* p, __m256 v, bool nt) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i h =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
  if (nt) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
}

template <class T>
FEDKERN_AVX2 void gather_cols_avx2(const GatherJob& job, int64_t q, int64_t j0, int64_t j1) {
  using S = typename T::storage;
  const S* x = static_cast<const S*>(job.x);
  S* out = static_cast<S*>(job.out) + q * job.d;
  const int64_t* rows = job.rows + q * job.s;
  const int64_t cnt = job.counts[q];
  if (cnt == 0) {
    gather_cols_base<T>(job, q, j0, j1);
    return;
  }
  const __m256 div = _mm256_set1_ps(static_cast<float>(cnt));
  int64_t jb = j0;
  for (; jb + kVec <= j1; jb += kVec) {
    __m256 acc[kVec / 8];
    const S* x0 = x + rows[0] * job.d + jb;
    for (int v = 0; v < kVec / 8; ++v) acc[v] = load8(x0 + 8 * v);
    for (int64_t t = 1; t < cnt; ++t) {
      const S* xt = x + rows[t] * job.d + jb;
      for (int v = 0; v < kVec / 8; ++v) acc[v] = _mm256_add_ps(acc[v], load8(xt + 8 * v));
    }
    if (cnt > 1) {
      for (int v = 0; v < kVec / 8; ++v) acc[v] = _mm256_div_ps(acc[v], div);
    }
    // Streaming stores for large outputs (no read for ownership, X stays in L1); they need
    // 16-byte (bf16) / 32-byte (fp32) alignment.
    const bool nt = job.stream && reinterpret_cast<uintptr_t>(out + jb) % (16 * sizeof(S)) == 0;
    for (int v = 0; v < kVec / 8; ++v) store8(out + jb + 8 * v, acc[v], nt);
  }
  for (; jb + 8 <= j1; jb += 8) {
    __m256 acc = load8(x + rows[0] * job.d + jb);
    for (int64_t t = 1; t < cnt; ++t) acc = _mm256_add_ps(acc, load8(x + rows[t] * job.d + jb));
    if (cnt > 1) acc = _mm256_div_ps(acc, div);
    store8(out + jb, acc, false);
  }
  if (jb < j1) gather_cols_base<T>(job, q, jb, j1);
}
#endif

template <class T>
void gather_run(const GatherJob& job, int64_t n, int64_t r) {
  using Fn = void (*)(const GatherJob&, int64_t, int64_t, int64_t);
  Fn fn = gather_cols_base<T>;
#if FEDKERN_PAIRWISE_AVX2
  if (detail::use_avx2()) {
    fn = gather_cols_avx2<T>;
  }
#endif
  const int64_t d = job.d;
  const int64_t esize = static_cast<int64_t>(sizeof(typename T::storage));
  // The distinct rows read (prefetched ahead of each sub-tile).
  std::vector<char> seen(static_cast<size_t>(n), 0);
  std::vector<int64_t> used;
  for (int64_t q = 0; q < r; ++q) {
    for (int64_t t = 0; t < job.counts[q]; ++t) {
      const int64_t i = job.rows[q * job.s + t];
      if (!seen[i]) {
        seen[i] = 1;
        used.push_back(i);
      }
    }
  }
  std::sort(used.begin(), used.end());
  const int64_t rows_used = std::max<int64_t>(1, static_cast<int64_t>(used.size()));
  const int64_t tw = std::max<int64_t>(kVec, kTileBytes / (rows_used * esize) / kVec * kVec);
  const int64_t tiles = (d + tw - 1) / tw;
  // Sub-tiles pay off when output rows share input rows (NNM); without reuse, long runs per row.
  int64_t entries = 0;
  for (int64_t q = 0; q < r; ++q) entries += job.counts[q];
  const int64_t sw =
      entries >= 2 * rows_used
          ? std::clamp<int64_t>(kSubBytes / (rows_used * esize) / kVec * kVec, kVec, tw)
          : tw;
  const int threads = detail::max_threads();
  // Output rows per item: all of them when there are enough column tiles for the threads.
  const int64_t qblocks = std::clamp<int64_t>((4 * threads + tiles - 1) / tiles, 1, r);
  // Work ~ r * s * d adds: no threads for tiny jobs.
  const int64_t work = r * job.s * d;
  const int64_t items = tiles * qblocks;
  const int nt = static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(work >> 16, threads), 1,
                                                      std::min<int64_t>(items, threads)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t tt = it / qblocks, qb = it % qblocks;
    int64_t q0, q1;
    detail::block_range(r, static_cast<int>(qblocks), static_cast<int>(qb), &q0, &q1);
    const int64_t j0 = tt * tw, j1 = std::min(d, j0 + tw);
    // Sub-tiles that stay in L1 while every output row of the block reads them.
    for (int64_t s0 = j0; s0 < j1; s0 += sw) {
      const int64_t s1 = std::min(j1, s0 + sw);
      // Prefetch the next sub-tile: its rows are too many streams for the hardware prefetcher.
      const int64_t p1 = sw < tw ? std::min(d, s1 + sw) : s1;
      for (const int64_t i : used) {
        const char* row = static_cast<const char*>(job.x) + (i * d) * esize;
        for (int64_t b = s1 * esize; b < p1 * esize; b += 64) __builtin_prefetch(row + b);
      }
      for (int64_t q = q0; q < q1; ++q) fn(job, q, s0, s1);
    }
#if FEDKERN_PAIRWISE_AVX2
    _mm_sfence();  // order the streaming stores before the end of the parallel region
#endif
  }
}

}  // namespace

void pairwise_gram(const void* x, DType dtype, int64_t n, int64_t d, double* g) {
  const GramPlan p = gram_plan(n, d);
  dispatch_dtype(dtype, [&](auto tag) { gram_run<decltype(tag)>(x, p, g); });
}

void gather_mean(const void* x, DType dtype, int64_t n, int64_t d, const int64_t* idx, int64_t r,
                 int64_t s, void* out) {
  // The valid entries of each index row, in t order (padding need not trail here).
  std::vector<int64_t> rows(static_cast<size_t>(r * s)), counts(static_cast<size_t>(r));
  for (int64_t q = 0; q < r; ++q) {
    int64_t c = 0;
    for (int64_t t = 0; t < s; ++t) {
      const int64_t i = idx[q * s + t];
      if (i >= 0 && i < n) rows[q * s + c++] = i;
    }
    counts[q] = c;
  }
  const int64_t out_bytes = r * d * (dtype == DType::kBFloat16 ? 2 : 4);
  const GatherJob job{x, out, d, rows.data(), counts.data(), s, out_bytes >= kStreamBytes};
  dispatch_dtype(dtype, [&](auto tag) { gather_run<decltype(tag)>(job, n, r); });
}

}  // namespace fedkern
