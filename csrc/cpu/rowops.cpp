// csrc/cpu/rowops.cpp -- gather-mean, geometric median, centered clipping, row clipping
// (fedkern/rowops.h).
//
// Gather-mean: per work item a tile of columns (rows x columns ~ a quarter of L2) and a block of
// output rows; when output rows share input rows (NNM) the tile is walked in sub-tiles that stay
// in L1 while every output row of the block reads them (the next sub-tile prefetched). Per output
// row the columns go 64 at a time through 8 AVX2 registers (intrinsics), adding the listed rows in
// t order; large outputs are written with streaming stores (they would evict the rows being
// reused).
//
// Weiszfeld and centered clipping: X is cut into tiles of T adjacent columns (all n rows), a
// "slab" of n * T elements sized to stay in L2 (kSlabBytes). One fused pass per iteration walks
// the tiles; per tile it
//   1. updates the point on the tile's columns: acc[k] (fp64, T entries, in L1) accumulates the
//      rows in row order -- each row segment is read contiguously, so the slab streams from memory;
//   2. takes every row's squared distance to the new point over the tile (the slab is now in L2)
//      and stores it as the partial part[i][tile].
// The partials of a row are then added in tile order. The first pass only takes distances and the
// last one only updates, so `iters` iterations cost iters + 1 reads of X (an unfused loop: 2
// iters). Groups of tiles are handed out to the threads dynamically; the tile size and every
// summation order depend on (n, d, dtype) alone, so the bytes never depend on the thread count.
//
// clip_rows: rows in parallel (each row: chunk sums of squares in chunk order, then the scaling,
// while the row is still in cache); when there are fewer rows than threads, every row's columns
// are split over the threads (chunk partials, a barrier, the same fixed-order sum in each thread).
// The chunks are the same in both modes, so both give the same norms bit for bit.
//
// Vector code: the lane loops (16 fp64 lanes of squares, the tile-wide fp64 accumulators) are
// written so that GCC/Clang vectorise them; the hot functions are compiled for AVX2 (chosen at run
// time) and for the baseline ISA. Only IEEE add/sub/mul/div/sqrt and conversions: identical bits.
#include "fedkern/rowops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_ROWOPS_AVX2 1
#include <immintrin.h>
#define FEDKERN_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define FEDKERN_ROWOPS_AVX2 0
#endif

namespace fedkern {
namespace {

constexpr int kLanes = 16;                  // fp64 partial sums per row and tile
constexpr int64_t kSlabBytes = 512 * 1024;  // n * T elements: half of a 1 MiB L2
constexpr int64_t kMinTile = 256, kMaxTile = 2048;
constexpr int64_t kClipChunk = 2048;   // clip_rows: columns per partial sum
constexpr int64_t kMinWork = 1 << 18;  // elements per thread at least

// Columns per tile: the largest power of two in [kMinTile, kMaxTile] whose slab fits kSlabBytes.
int64_t tile_cols(int64_t n, DType dtype) {
  const int64_t elem = dtype == DType::kBFloat16 ? 2 : 4;
  int64_t t = kMaxTile;
  while (t > kMinTile && n * t * elem > kSlabBytes) t /= 2;
  return t;
}

FEDKERN_INLINE double lane_tree(const double* a) {
  double b[kLanes / 2];
  for (int l = 0; l < kLanes / 2; ++l) b[l] = a[2 * l] + a[2 * l + 1];
  double c[kLanes / 4];
  for (int l = 0; l < kLanes / 4; ++l) c[l] = b[2 * l] + b[2 * l + 1];
  return (c[0] + c[1]) + (c[2] + c[3]);
}

// sum over k < len of double(fp32(x[k]) - z[k])^2 (z = 0 without kHasZ): lane k % 16, lane tree.
template <class T, bool kHasZ>
FEDKERN_INLINE double sum_squares(const typename T::storage* __restrict x,
                                  const float* __restrict z, int64_t len) {
  double acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = kHasZ ? T::load(x, k + l) - z[k + l] : T::load(x, k + l);
      const double dv = v;
      acc[l] = acc[l] + dv * dv;
    }
  }
  for (int l = 0; k + l < len; ++l) {
    const float v = kHasZ ? T::load(x, k + l) - z[k + l] : T::load(x, k + l);
    const double dv = v;
    acc[l] = acc[l] + dv * dv;
  }
  return lane_tree(acc);
}

// ---- Weiszfeld / centered clipping ----------------------------------------------------------

enum Mode { kDistOnly = 0, kWeiszfeld = 1, kCentered = 2 };

struct IterJob {
  const void* x;
  int64_t n, d, tile, ntiles;
  float* z;               // the current point, updated tile by tile
  const double* coef;     // per row: c_i (Weiszfeld) or s_i / n (centered)
  const int64_t* active;  // the rows with w_i > 0 / s_i > 0, ascending (bad rows are never read)
  int64_t nactive;
  double* part;  // [ntiles][n] squared distances per tile and row
};

// Tiles [lo, hi) of one pass. acc, vd: `tile` doubles of scratch.
template <class T, int kMode, bool kDist>
FEDKERN_INLINE void pass_tiles(const IterJob& j, int64_t lo, int64_t hi, double* __restrict acc,
                               double* __restrict vd) {
  using S = typename T::storage;
  const S* x = static_cast<const S*>(j.x);
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t k0 = t * j.tile, len = std::min(j.tile, j.d - k0);
    float* __restrict z = j.z + k0;
    if (kMode != kDistOnly) {
      if (kMode == kCentered) {
        for (int64_t k = 0; k < len; ++k) vd[k] = z[k];
      }
      // The active rows four at a time: the same sequence of adds per column as one row at a
      // time, with a quarter of the accumulator loads and stores.
      // The first group starts from 0.0 in a register (the same adds as from a zeroed acc).
      int64_t a = 0;
      for (; a + 4 <= j.nactive; a += 4) {
        const bool first = a == 0;
        const int64_t* ii = j.active + a;
        const double c0 = j.coef[ii[0]], c1 = j.coef[ii[1]], c2 = j.coef[ii[2]], c3 = j.coef[ii[3]];
        const S* __restrict r0 = x + ii[0] * j.d + k0;
        const S* __restrict r1 = x + ii[1] * j.d + k0;
        const S* __restrict r2 = x + ii[2] * j.d + k0;
        const S* __restrict r3 = x + ii[3] * j.d + k0;
        for (int64_t k = 0; k < len; ++k) {
          const double x0 = T::load(r0, k), x1 = T::load(r1, k), x2 = T::load(r2, k),
                       x3 = T::load(r3, k);
          double s = first ? 0.0 : acc[k];
          if (kMode == kWeiszfeld) {
            s = s + c0 * x0;
            s = s + c1 * x1;
            s = s + c2 * x2;
            s = s + c3 * x3;
          } else {
            const double v = vd[k];
            s = s + c0 * (x0 - v);
            s = s + c1 * (x1 - v);
            s = s + c2 * (x2 - v);
            s = s + c3 * (x3 - v);
          }
          acc[k] = s;
        }
      }
      if (a == 0) {
        for (int64_t k = 0; k < len; ++k) acc[k] = 0.0;  // fewer than 4 active rows
      }
      for (; a < j.nactive; ++a) {
        const double c = j.coef[j.active[a]];
        const S* __restrict row = x + j.active[a] * j.d + k0;
        if (kMode == kWeiszfeld) {
          for (int64_t k = 0; k < len; ++k) {
            acc[k] = acc[k] + c * static_cast<double>(T::load(row, k));
          }
        } else {
          for (int64_t k = 0; k < len; ++k) {
            acc[k] = acc[k] + c * (static_cast<double>(T::load(row, k)) - vd[k]);
          }
        }
      }
      if (kMode == kWeiszfeld) {
        for (int64_t k = 0; k < len; ++k) z[k] = static_cast<float>(acc[k]);
      } else {
        for (int64_t k = 0; k < len; ++k) z[k] = static_cast<float>(vd[k] + acc[k]);
      }
    }
    if (kDist) {
      for (int64_t i = 0; i < j.n; ++i) {
        j.part[t * j.n + i] = sum_squares<T, true>(x + i * j.d + k0, z, len);
      }
    }
  }
}

using PassFn = void (*)(const IterJob&, int64_t, int64_t, double*, double*);

template <class T, int kMode, bool kDist>
void pass_base(const IterJob& j, int64_t lo, int64_t hi, double* acc, double* vd) {
  pass_tiles<T, kMode, kDist>(j, lo, hi, acc, vd);
}
#if FEDKERN_ROWOPS_AVX2
template <class T, int kMode, bool kDist>
FEDKERN_TARGET_AVX2 void pass_avx2(const IterJob& j, int64_t lo, int64_t hi, double* acc,
                                   double* vd) {
  pass_tiles<T, kMode, kDist>(j, lo, hi, acc, vd);
}
#endif

// Tiles are handed out dynamically in groups (several per thread), so that a thread slowed down by
// another process on its core does not hold the others up; which thread takes a tile never
// changes its results.
template <class T, int kMode, bool kDist>
void run_pass(const IterJob& j) {
  PassFn fn = pass_base<T, kMode, kDist>;
#if FEDKERN_ROWOPS_AVX2
  if (detail::use_avx2()) fn = pass_avx2<T, kMode, kDist>;
#endif
  const int nb = detail::num_blocks(j.ntiles, std::max<int64_t>(1, kMinWork / (j.n * j.tile)));
  const int64_t ngroups = nb == 1 ? 1 : std::min<int64_t>(j.ntiles, int64_t{8} * nb);
#pragma omp parallel num_threads(nb)
  {
    std::vector<double> acc(static_cast<size_t>(j.tile)), vd(static_cast<size_t>(j.tile));
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < ngroups; ++g) {
      int64_t lo, hi;
      detail::block_range(j.ntiles, static_cast<int>(ngroups), static_cast<int>(g), &lo, &hi);
      fn(j, lo, hi, acc.data(), vd.data());
    }
  }
}

// r[i] = sqrt(sum of row i's tile partials, in tile order from 0.0); vectorised over the rows.
void reduce_rows(const IterJob& j, double* r) {
  for (int64_t i = 0; i < j.n; ++i) r[i] = 0.0;
  for (int64_t t = 0; t < j.ntiles; ++t) {
    const double* p = j.part + t * j.n;
    for (int64_t i = 0; i < j.n; ++i) r[i] = r[i] + p[i];
  }
  for (int64_t i = 0; i < j.n; ++i) r[i] = std::sqrt(r[i]);
}

// The Weiszfeld (gm = true) or centered clipping loop; `hyper` is nu or tau.
template <class T>
void iterate(const void* x, int64_t n, int64_t d, const float* p0, int64_t iters, double hyper,
             bool gm, DType dtype, void* out) {
  using S = typename T::storage;
  std::vector<float> z(p0, p0 + d);
  if (iters > 0) {
    const int64_t tile = tile_cols(n, dtype), ntiles = (d + tile - 1) / tile;
    std::vector<double> part(static_cast<size_t>(n * ntiles)), coef(n), r(n);
    std::vector<int64_t> active(n);
    IterJob j{x, n, d, tile, ntiles, z.data(), coef.data(), active.data(), 0, part.data()};
    run_pass<T, kDistOnly, true>(j);
    for (int64_t t = 1; t <= iters; ++t) {
      reduce_rows(j, r.data());
      const bool last = t == iters;
      j.nactive = 0;
      if (gm) {
        double W = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          coef[i] = std::isfinite(r[i]) ? 1.0 / std::max(r[i], hyper) : 0.0;
          W = W + coef[i];
          if (coef[i] > 0.0) active[j.nactive++] = i;
        }
        if (W == 0.0) {
          std::fill(z.begin(), z.end(), std::numeric_limits<float>::quiet_NaN());
          break;
        }
        for (int64_t i = 0; i < n; ++i) coef[i] = coef[i] / W;
        last ? run_pass<T, kWeiszfeld, false>(j) : run_pass<T, kWeiszfeld, true>(j);
      } else {
        const double dn = static_cast<double>(n);
        for (int64_t i = 0; i < n; ++i) {
          const double s =
              !std::isfinite(r[i]) ? 0.0 : (r[i] == 0.0 ? 1.0 : std::min(1.0, hyper / r[i]));
          coef[i] = s / dn;
          if (s > 0.0) active[j.nactive++] = i;
        }
        last ? run_pass<T, kCentered, false>(j) : run_pass<T, kCentered, true>(j);
      }
    }
  }
  S* o = static_cast<S*>(out);
  for (int64_t k = 0; k < d; ++k) T::store(o, k, z[k]);
}

// ---- clip_rows ------------------------------------------------------------------------------

// Squared norm of chunks [c_lo, c_hi) of a row, each chunk's sum stored to part[c].
template <class T>
FEDKERN_INLINE void chunk_sums(const typename T::storage* row, int64_t d, int64_t c_lo,
                               int64_t c_hi, double* part) {
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const int64_t k0 = c * kClipChunk;
    part[c] = sum_squares<T, false>(row + k0, nullptr, std::min(kClipChunk, d - k0));
  }
}

// Applies the clipping decision for a row of norm `norm` to its columns [k_lo, k_hi).
template <class T>
FEDKERN_INLINE void clip_apply(typename T::storage* __restrict row, int64_t k_lo, int64_t k_hi,
                               double norm, double max_norm) {
  using S = typename T::storage;
  if (!std::isfinite(norm)) {
    std::memset(row + k_lo, 0, static_cast<size_t>(k_hi - k_lo) * sizeof(S));  // +0.0
  } else if (!(norm <= max_norm)) {
    const float s = static_cast<float>(std::min(1.0, max_norm / norm));
    for (int64_t k = k_lo; k < k_hi; ++k) T::store(row, k, s * T::load(row, k));
  }
}

inline double norm_out(double norm) {
  return std::isfinite(norm) ? norm : std::numeric_limits<double>::infinity();
}

// Rows [lo, hi), each whole: chunk sums in chunk order, then the scaling (row still in cache).
template <class T>
FEDKERN_INLINE void clip_row_block(typename T::storage* x, int64_t d, int64_t lo, int64_t hi,
                                   const double* max_norm, double* norms) {
  for (int64_t i = lo; i < hi; ++i) {
    typename T::storage* row = x + i * d;
    double s = 0.0;
    for (int64_t k0 = 0; k0 < d; k0 += kClipChunk) {
      s = s + sum_squares<T, false>(row + k0, nullptr, std::min(kClipChunk, d - k0));
    }
    const double norm = std::sqrt(s);
    norms[i] = norm_out(norm);
    clip_apply<T>(row, 0, d, norm, max_norm[i]);
  }
}

template <class T>
void clip_rows_base(typename T::storage* x, int64_t d, int64_t lo, int64_t hi, const double* mx,
                    double* norms) {
  clip_row_block<T>(x, d, lo, hi, mx, norms);
}
template <class T>
void chunk_sums_base(const typename T::storage* row, int64_t d, int64_t lo, int64_t hi,
                     double* part) {
  chunk_sums<T>(row, d, lo, hi, part);
}
template <class T>
void clip_apply_base(typename T::storage* row, int64_t lo, int64_t hi, double norm, double mx) {
  clip_apply<T>(row, lo, hi, norm, mx);
}
#if FEDKERN_ROWOPS_AVX2
template <class T>
FEDKERN_TARGET_AVX2 void clip_rows_avx2(typename T::storage* x, int64_t d, int64_t lo, int64_t hi,
                                        const double* mx, double* norms) {
  clip_row_block<T>(x, d, lo, hi, mx, norms);
}
template <class T>
FEDKERN_TARGET_AVX2 void chunk_sums_avx2(const typename T::storage* row, int64_t d, int64_t lo,
                                         int64_t hi, double* part) {
  chunk_sums<T>(row, d, lo, hi, part);
}
template <class T>
FEDKERN_TARGET_AVX2 void clip_apply_avx2(typename T::storage* row, int64_t lo, int64_t hi,
                                         double norm, double mx) {
  clip_apply<T>(row, lo, hi, norm, mx);
}
#endif

template <class T>
void clip_rows_impl(void* xv, int64_t n, int64_t d, const double* max_norm, double* norms) {
  using S = typename T::storage;
  S* x = static_cast<S*>(xv);
  auto rows_fn = clip_rows_base<T>;
  auto sums_fn = chunk_sums_base<T>;
  auto apply_fn = clip_apply_base<T>;
#if FEDKERN_ROWOPS_AVX2
  if (detail::use_avx2()) {
    rows_fn = clip_rows_avx2<T>;
    sums_fn = chunk_sums_avx2<T>;
    apply_fn = clip_apply_avx2<T>;
  }
#endif
  const int64_t nchunks = (d + kClipChunk - 1) / kClipChunk;
  // Blocks wanted for the whole matrix; rows in parallel when they split evenly enough.
  const int nb = detail::num_blocks(n * d, kMinWork);
  if (nb <= 1 || n % nb == 0 || n >= 8 * static_cast<int64_t>(nb)) {
    // Row groups handed out dynamically (see run_pass).
    const int nr = static_cast<int>(std::min<int64_t>(nb, n));
    const int ngroups = nr == 1 ? 1 : static_cast<int>(std::min<int64_t>(n, 8 * nr));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nr)
    for (int g = 0; g < ngroups; ++g) {
      int64_t lo, hi;
      detail::block_range(n, ngroups, g, &lo, &hi);
      rows_fn(x, d, lo, hi, max_norm, norms);
    }
    return;
  }
  // Few rows: each row's chunks are split over nc blocks (at most one block per chunk).
  const int nc = static_cast<int>(std::min<int64_t>(nb, nchunks));
  std::vector<double> part(static_cast<size_t>(nchunks));
#pragma omp parallel num_threads(nc)
  for (int64_t i = 0; i < n; ++i) {
    S* row = x + i * d;
#pragma omp for schedule(static)
    for (int b = 0; b < nc; ++b) {
      int64_t lo, hi;
      detail::block_range(nchunks, nc, b, &lo, &hi);
      sums_fn(row, d, lo, hi, part.data());
    }  // implicit barrier: every chunk sum is in part
#pragma omp for schedule(static)
    for (int b = 0; b < nc; ++b) {
      double s = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) s = s + part[c];
      const double norm = std::sqrt(s);
      if (b == 0) norms[i] = norm_out(norm);
      int64_t lo, hi;
      detail::block_range(nchunks, nc, b, &lo, &hi);
      apply_fn(row, lo * kClipChunk, std::min(hi * kClipChunk, d), norm, max_norm[i]);
    }  // implicit barrier: part may be reused by the next row
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

#if FEDKERN_ROWOPS_AVX2
FEDKERN_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FEDKERN_TARGET_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FEDKERN_TARGET_AVX2 inline void store8(float* p, __m256 v, bool nt) {
  if (nt) {
    _mm256_stream_ps(p, v);
  } else {
    _mm256_storeu_ps(p, v);
  }
}
// round to bf16 (nearest even, NaN -> 0x7fc0) and store 8 halves.
FEDKERN_TARGET_AVX2 inline void store8(uint16_t* p, __m256 v, bool nt) {
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
FEDKERN_TARGET_AVX2 void gather_cols_avx2(const GatherJob& job, int64_t q, int64_t j0, int64_t j1) {
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
#if FEDKERN_ROWOPS_AVX2
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
#if FEDKERN_ROWOPS_AVX2
    _mm_sfence();  // order the streaming stores before the end of the parallel region
#endif
  }
}

}  // namespace

void geometric_median(const void* x, DType dtype, int64_t n, int64_t d, const float* z0,
                      int64_t iters, double nu, void* out) {
  dispatch_dtype(
      dtype, [&](auto tag) { iterate<decltype(tag)>(x, n, d, z0, iters, nu, true, dtype, out); });
}

void centered_clip(const void* x, DType dtype, int64_t n, int64_t d, const float* v0, int64_t iters,
                   double tau, void* out) {
  dispatch_dtype(
      dtype, [&](auto tag) { iterate<decltype(tag)>(x, n, d, v0, iters, tau, false, dtype, out); });
}

void clip_rows(void* x, DType dtype, int64_t n, int64_t d, const double* max_norm,
               double* norms_out) {
  dispatch_dtype(dtype,
                 [&](auto tag) { clip_rows_impl<decltype(tag)>(x, n, d, max_norm, norms_out); });
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
