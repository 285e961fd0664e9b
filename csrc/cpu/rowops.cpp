// csrc/cpu/rowops.cpp -- geometric median, centered clipping, row clipping (fedkern/rowops.h).
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
      for (int64_t k = 0; k < len; ++k) acc[k] = 0.0;
      if (kMode == kCentered) {
        for (int64_t k = 0; k < len; ++k) vd[k] = z[k];
      }
      // The active rows four at a time: the same sequence of adds per column as one row at a
      // time, with a quarter of the accumulator loads and stores.
      int64_t a = 0;
      for (; a + 4 <= j.nactive; a += 4) {
        const int64_t* ii = j.active + a;
        const double c0 = j.coef[ii[0]], c1 = j.coef[ii[1]], c2 = j.coef[ii[2]], c3 = j.coef[ii[3]];
        const S* __restrict r0 = x + ii[0] * j.d + k0;
        const S* __restrict r1 = x + ii[1] * j.d + k0;
        const S* __restrict r2 = x + ii[2] * j.d + k0;
        const S* __restrict r3 = x + ii[3] * j.d + k0;
        for (int64_t k = 0; k < len; ++k) {
          const double x0 = T::load(r0, k), x1 = T::load(r1, k), x2 = T::load(r2, k),
                       x3 = T::load(r3, k);
          double s = acc[k];
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

}  // namespace fedkern
