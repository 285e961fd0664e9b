// csrc/cpu/diffclip.cpp -- difference -> top-k / rand-k / dense -> norm clipping, batched over
// rows (fedkern/diffclip.h), OpenMP.
//
// Top-k reuses the radix select of topk.cpp through diff_topk_compress (the EF21 key source
// key(round(a - b)), recomputed in each pass, so the [n, d] difference is never stored); rand-k
// reuses randk_indices (Feistel permutation) and reads only the k chosen entries of a row. Rows are
// independent: with at least as many rows as threads, a parallel loop over rows runs each row's
// selection single-threaded (each thread of the loop sets its own nthreads-var to 1, so the core's
// parallel regions, nested there, run as one block on that thread); with fewer rows the rows run
// one after another and the core splits each row over the threads.
// The dense path makes one pass that writes diff into out and sums squares per chunk of
// kDiffClipChunk values, and a second pass over out (still in cache for rows up to a few MB) only
// for rows that must be scaled or zeroed. Chunk sums are the same numbers whichever thread computes
// them and are added in chunk order, so the bytes never depend on the thread count. The chunk
// loops are compiled twice, with AVX2 (picked at run time where the CPU has it) and for the
// baseline ISA; both give the same bits (IEEE fp32/fp64 operations only, no FMA).
#include "fedkern/diffclip.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fedkern/randk.h"
#include "fedkern/topk.h"

namespace fedkern {
namespace {

constexpr int64_t kChunk = kDiffClipChunk;
constexpr int64_t kMinWork = 1 << 18;  // elements per thread at least (a pass takes ~0.1 ms)

// Sum of double(v_j)^2 over one chunk (cnt <= kChunk) in the order of diffclip.h: lane j % 8,
// lanes combined pairwise. The 8 lanes are the SIMD lanes of the loop.
template <class T>
FEDKERN_INLINE double chunk_sumsq(const typename T::storage* __restrict v, int64_t cnt) {
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 8 <= cnt; j += 8) {
    for (int l = 0; l < 8; ++l) {
      const double x = T::load(v, j + l);
      acc[l] += x * x;
    }
  }
  for (int l = 0; j + l < cnt; ++l) {
    const double x = T::load(v, j + l);
    acc[l] += x * x;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// out = round(a - b) over one chunk; returns the chunk's sum of squares of out.
template <class T>
FEDKERN_INLINE double chunk_diff(const typename T::storage* __restrict a,
                                 const typename T::storage* __restrict b,
                                 typename T::storage* __restrict out, int64_t cnt) {
  for (int64_t j = 0; j < cnt; ++j) out[j] = T::round(T::load(a, j) - T::load(b, j));
  return chunk_sumsq<T>(out, cnt);
}

template <class T>
FEDKERN_INLINE void chunk_scale(typename T::storage* __restrict v, int64_t cnt, float s) {
  for (int64_t j = 0; j < cnt; ++j) v[j] = T::round(s * T::load(v, j));
}

// The chunk loops for one ISA.
template <class T>
struct ChunkOps {
  using S = typename T::storage;
  double (*diff)(const S*, const S*, S*, int64_t);
  double (*sumsq)(const S*, int64_t);
  void (*scale)(S*, int64_t, float);
};

template <class T>
double diff_base(const typename T::storage* a, const typename T::storage* b,
                 typename T::storage* out, int64_t cnt) {
  return chunk_diff<T>(a, b, out, cnt);
}
template <class T>
double sumsq_base(const typename T::storage* v, int64_t cnt) {
  return chunk_sumsq<T>(v, cnt);
}
template <class T>
void scale_base(typename T::storage* v, int64_t cnt, float s) {
  chunk_scale<T>(v, cnt, s);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_DIFFCLIP_AVX2 1
template <class T>
__attribute__((target("avx2"))) double diff_avx2(const typename T::storage* a,
                                                 const typename T::storage* b,
                                                 typename T::storage* out, int64_t cnt) {
  return chunk_diff<T>(a, b, out, cnt);
}
template <class T>
__attribute__((target("avx2"))) double sumsq_avx2(const typename T::storage* v, int64_t cnt) {
  return chunk_sumsq<T>(v, cnt);
}
template <class T>
__attribute__((target("avx2"))) void scale_avx2(typename T::storage* v, int64_t cnt, float s) {
  chunk_scale<T>(v, cnt, s);
}
#else
#define FEDKERN_DIFFCLIP_AVX2 0
#endif

template <class T>
ChunkOps<T> chunk_ops() {
#if FEDKERN_DIFFCLIP_AVX2
  if (detail::use_avx2()) {
    return {diff_avx2<T>, sumsq_avx2<T>, scale_avx2<T>};
  }
#endif
  return {diff_base<T>, sumsq_base<T>, scale_base<T>};
}

// What clipping does to a message of norm `norm`: nothing (0), zero it (1), or scale it by *s (2).
inline int clip_action(double norm, double max_norm, float* s) {
  if (norm <= max_norm) return 0;
  if (!std::isfinite(norm)) return 1;
  *s = static_cast<float>(std::min(1.0, max_norm / norm));
  return 2;
}

// Norm of v[0..cnt) (chunk order), then v clipped in place; returns the norm. Serial.
template <class T>
double clip_serial(const ChunkOps<T>& ops, typename T::storage* v, int64_t cnt, double max_norm) {
  double ss = 0.0;
  for (int64_t c = 0; c < cnt; c += kChunk) ss += ops.sumsq(v + c, std::min(kChunk, cnt - c));
  const double norm = std::sqrt(ss);
  float s = 1.0f;
  const int act = clip_action(norm, max_norm, &s);
  if (act == 1) std::fill(v, v + cnt, typename T::storage{});
  if (act == 2) {
    for (int64_t c = 0; c < cnt; c += kChunk) ops.scale(v + c, std::min(kChunk, cnt - c), s);
  }
  return norm;
}

// Runs row(i) for i in [0, n): in parallel over rows when there are at least as many rows as
// threads and enough work (each row single-threaded), otherwise in order on this thread (the
// row's own work may then use the threads). Rows are independent, so the schedule changes nothing.
template <class Fn>
void for_rows(int64_t n, int64_t work_per_row, Fn&& row) {
  const int64_t min_rows = std::max<int64_t>(1, kMinWork / std::max<int64_t>(work_per_row, 1));
  const int nb = detail::num_blocks(n, min_rows);
  if (nb > 1 && n >= detail::max_threads()) {
#pragma omp parallel num_threads(nb)
    {
#ifdef _OPENMP
      // nthreads-var of this implicit task only: the core's parallel regions inside row() see one
      // thread (one block, no nested team) whatever OMP_MAX_ACTIVE_LEVELS says.
      omp_set_num_threads(1);
#endif
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) row(i);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) row(i);
  }
}

}  // namespace

void diff_topk_clip(const void* g_new, const void* g_old, DType dtype, int64_t n, int64_t d,
                    int64_t k, const double* max_norm, int64_t* idx, void* val, double* norms_out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* a = static_cast<const S*>(g_new);
    const S* b = static_cast<const S*>(g_old);
    S* v = static_cast<S*>(val);
    const ChunkOps<T> ops = chunk_ops<T>();
    for_rows(n, 2 * d, [&](int64_t i) {
      diff_topk_compress(a + i * d, b + i * d, dtype, d, k, idx + i * k, v + i * k);
      norms_out[i] = clip_serial<T>(ops, v + i * k, k, max_norm[i]);
    });
  });
}

void diff_randk_clip(const void* g_new, const void* g_old, DType dtype, int64_t n, int64_t d,
                     int64_t k, const int64_t* keys, float scale, const double* max_norm,
                     int64_t* idx, void* val, double* norms_out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* a = static_cast<const S*>(g_new);
    const S* b = static_cast<const S*>(g_old);
    S* v = static_cast<S*>(val);
    const ChunkOps<T> ops = chunk_ops<T>();
    // ~10 ns per index (permutation, sort) against ~0.5 ns per element of a streaming pass.
    for_rows(n, 16 * k, [&](int64_t i) {
      uint32_t kr[8];
      for (int r = 0; r < 8; ++r) kr[r] = static_cast<uint32_t>(keys[i * 8 + r]);
      int64_t* ir = idx + i * k;
      randk_indices(d, k, kr, ir);
      const S* ar = a + i * d;
      const S* br = b + i * d;
      S* vr = v + i * k;
      for (int64_t j = 0; j < k; ++j) {
        const S diff = T::round(T::load(ar, ir[j]) - T::load(br, ir[j]));
        vr[j] = T::round(T::load(&diff, 0) * scale);
      }
      norms_out[i] = clip_serial<T>(ops, vr, k, max_norm[i]);
    });
  });
}

void diff_clip(const void* g_new, const void* g_old, DType dtype, int64_t n, int64_t d,
               const double* max_norm, void* out, double* norms_out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* a = static_cast<const S*>(g_new);
    const S* b = static_cast<const S*>(g_old);
    S* o = static_cast<S*>(out);
    const ChunkOps<T> ops = chunk_ops<T>();
    const int64_t chunks = (d + kChunk - 1) / kChunk;
    const int split = detail::num_blocks(chunks, std::max<int64_t>(1, kMinWork / kChunk));
    if (split == 1 || n >= detail::max_threads()) {
      // Whole rows: the diff pass, then the clip pass over the row just written (in cache).
      for_rows(n, d, [&](int64_t i) {
        const S* ar = a + i * d;
        const S* br = b + i * d;
        S* orow = o + i * d;
        double ss = 0.0;
        for (int64_t c = 0; c < d; c += kChunk) {
          ss += ops.diff(ar + c, br + c, orow + c, std::min(kChunk, d - c));
        }
        const double norm = std::sqrt(ss);
        norms_out[i] = norm;
        float s = 1.0f;
        const int act = clip_action(norm, max_norm[i], &s);
        if (act == 1) std::fill(orow, orow + d, S{});
        if (act == 2) {
          for (int64_t c = 0; c < d; c += kChunk) ops.scale(orow + c, std::min(kChunk, d - c), s);
        }
      });
      return;
    }
    // Few long rows: each row's chunks are split over the threads (contiguous blocks of chunks);
    // the per-chunk sums are added in chunk order afterwards.
    std::vector<double> part(static_cast<size_t>(chunks));
    for (int64_t i = 0; i < n; ++i) {
      const S* ar = a + i * d;
      const S* br = b + i * d;
      S* orow = o + i * d;
#pragma omp parallel for schedule(static, 1) num_threads(split)
      for (int blk = 0; blk < split; ++blk) {
        int64_t lo, hi;
        detail::block_range(chunks, split, blk, &lo, &hi);
        for (int64_t c = lo; c < hi; ++c) {
          const int64_t j = c * kChunk;
          part[c] = ops.diff(ar + j, br + j, orow + j, std::min(kChunk, d - j));
        }
      }
      double ss = 0.0;
      for (int64_t c = 0; c < chunks; ++c) ss += part[c];
      const double norm = std::sqrt(ss);
      norms_out[i] = norm;
      float s = 1.0f;
      const int act = clip_action(norm, max_norm[i], &s);
      if (act == 0) continue;
#pragma omp parallel for schedule(static, 1) num_threads(split)
      for (int blk = 0; blk < split; ++blk) {
        int64_t lo, hi;
        detail::block_range(chunks, split, blk, &lo, &hi);
        const int64_t j0 = lo * kChunk, j1 = std::min(hi * kChunk, d);
        if (act == 1) {
          std::fill(orow + j0, orow + j1, S{});
        } else {
          for (int64_t j = j0; j < j1; j += kChunk)
            ops.scale(orow + j, std::min(kChunk, j1 - j), s);
        }
      }
    }
  });
}

}  // namespace fedkern
