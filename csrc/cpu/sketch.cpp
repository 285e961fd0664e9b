// csrc/cpu/sketch.cpp -- MAST sketch apply / gradient step (fedkern/sketch.h).
//
// perm kinds: the kept coordinates of row r are perm_r(lo_r .. hi_r - 1), evaluated in chunks of
// kChunk positions with randk.h's batched Feistel evaluation (randk_perm_range) into a stack
// buffer; the work items are (row, chunk) pairs handed to the threads statically. Within a row the
// kept coordinates are distinct, so chunks never write the same element; with one shared x the
// rows run one after the other (row order = the definition), each row's chunks in parallel.
// bernoulli: work items of kBlock coordinates of a row; per item the keep masks (one bit per
// coordinate, 4 coordinates per Philox call, 16 calls per mask word; the calls run 8 or 4 to a
// register with AVX-512 or AVX2 where the CPU has it, else rng::philox4x32), then a walk over the
// set bits touches only the kept coordinates (apply first copies v, or writes +0, over each mask
// word's 64 coordinates; a large output through non-temporal stores).
// With one shared x an item is a block of coordinates and applies every row to it in row order.
// Either way the result is a pure function of the inputs, whatever the thread count or ISA.
#include "fedkern/sketch.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "fedkern/randk.h"
#include "fedkern/random.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fedkern {
namespace {

constexpr int64_t kChunk = 2048;         // permutation positions per work item
constexpr int64_t kMinChunks = 8;        // work items per thread at least (~16k Feistel calls)
constexpr int64_t kMinStream = 1 << 18;  // elements of a dense pass per thread
constexpr int64_t kMinCoords = 1 << 15;  // Bernoulli coordinates per thread (8 blocks)

using detail::parallel_blocks;

// A fresh dense output of apply (torch.empty: untouched pages) is first written here. At tens of
// MB that first touch is mostly page faults, ~1 us per 4 KiB page (40 MB: ~10 ms, more than the
// whole op's arithmetic at 1e7 coordinates); with transparent huge pages (Linux, THP "madvise"
// mode) the same range costs ~20 faults (measured ~1.7 ms). So a large output's 2 MiB-aligned
// interior is advised to use them before the first write: no effect on the values, none where THP
// is off or always on, and none on memory already touched (it only keeps that range eligible).
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 8 * static_cast<int64_t>(kHuge)) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (a + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
#else
  (void)p;
  (void)bytes;
#endif
}

// Non-temporal stores of whole aligned 16-byte units (SSE2, baseline on x86-64; elsewhere plain
// copies): for outputs of kStreamBytes or more, past any cache, written once.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

FEDKERN_INLINE bool stream_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

FEDKERN_INLINE void stream_store(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<__m128i*>(dst);
  const auto* s = static_cast<const __m128i*>(src);
  for (size_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(d + i, _mm_load_si128(s + i));
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Orders a thread's non-temporal stores before it leaves the parallel region.
FEDKERN_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

struct RowKeys {
  uint32_t k[8];
};

RowKeys row_keys(const int64_t* keys, int64_t r, int count) {
  RowKeys out{};
  for (int t = 0; t < count; ++t) out.k[t] = static_cast<uint32_t>(keys[count * r + t]);
  return out;
}

// ---- Bernoulli keep masks ---------------------------------------------------------------------
// A keep mask is one uint64 per 64 coordinates [j, j + 64) of a row (j a multiple of 64): bit l
// set iff coordinate j + l is kept; bits at or past the end of the range are clear. Its 64 words
// are the 16 Philox groups j / 4 .. j / 4 + 15 of the row's draw. With a scalar p the keep test is
// the integer compare word < lim = 256 T, the same as (word >> 8) < T for the integer
// T = ceil(p 2^24) <= 2^24. A work item is a block of kBlock coordinates of one row: its masks (a
// stack buffer), then the kept coordinates, visited in increasing order through the set bits.
// Three builds of the mask generator: AVX-512 (8 Philox instances per register), AVX2 (4), and
// the scalar rng::philox4x32; integer operations only, so all three give the same words.
constexpr int64_t kMaskCoords = 64;
constexpr int64_t kBlock = 4096;  // coordinates per work item (64 masks, 1024 Philox calls)

struct BernP {
  float s_scalar;  // 2^24 / T of p_scalar
  uint64_t lim;    // 256 T of p_scalar
  const float* p;  // per-coordinate probabilities, or null (then p_scalar)
};

BernP bern_p(float p_scalar, const float* p) {
  const float t = rng::keep_threshold(p_scalar);
  return BernP{rng::keep_scale(t), static_cast<uint64_t>(t) << 8, p};
}

// Masks of coordinates [j0, j0 + n) (j0 a multiple of 64, n <= kBlock): ceil(n / 64) words.
using MaskFn = void (*)(const uint32_t* key, const BernP& bp, int64_t j0, int64_t n,
                        uint64_t* masks);

FEDKERN_INLINE uint64_t tail_bits(int64_t valid) {
  return valid >= 64 ? ~uint64_t{0} : (uint64_t{1} << valid) - 1;
}

// Keep bits of `valid` consecutive coordinates with their own probabilities p[0 .. valid).
FEDKERN_INLINE uint64_t per_p_bits(const uint32_t* words, const float* p, int64_t valid) {
  uint64_t bits = 0;
  for (int64_t l = 0; l < valid; ++l) {
    const float t = rng::keep_threshold(p[l]);
    bits |= static_cast<uint64_t>(static_cast<float>(words[l] >> 8) < t) << l;
  }
  return bits;
}

void bern_masks_base(const uint32_t* key, const BernP& bp, int64_t j0, int64_t n, uint64_t* masks) {
  for (int64_t m = 0; m * kMaskCoords < n; ++m) {
    const int64_t c0 = j0 + m * kMaskCoords;
    const int64_t valid = std::min(kMaskCoords, j0 + n - c0);
    uint32_t words[kMaskCoords];
    for (int i = 0; i < 16; ++i) {
      const rng::Words w = rng::group_words(static_cast<uint64_t>(c0 / 4 + i), key);
      std::memcpy(words + 4 * i, w.v, sizeof w.v);
    }
    uint64_t bits = 0;
    if (bp.p) {
      bits = per_p_bits(words, bp.p + c0, valid);
    } else {
      for (int l = 0; l < kMaskCoords; ++l) bits |= static_cast<uint64_t>(words[l] < bp.lim) << l;
    }
    masks[m] = bits & tail_bits(valid);
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_SKETCH_SIMD 1
// The vector builds run Philox4x32-10 on 64-bit lanes that hold the 32-bit state words in their
// low halves: vpmuludq reads only those, so the upper halves the full products leave behind never
// reach a result, and the final words are the low halves.

// kSpread[b]: bit i of the 4-bit b moved to bit 4 i (group i's word w lands on bit 4 i + w).
constexpr uint16_t kSpread[16] = {0x0000, 0x0001, 0x0010, 0x0011, 0x0100, 0x0101, 0x0110, 0x0111,
                                  0x1000, 0x1001, 0x1010, 0x1011, 0x1100, 0x1101, 0x1110, 0x1111};

// The round keys of a draw: key words 0 and 1 plus r times the Weyl constants.
FEDKERN_INLINE void round_keys(const uint32_t* key, uint64_t* k0, uint64_t* k1) {
  uint32_t a = key[0], b = key[1];
  for (int r = 0; r < 10; ++r) {
    k0[r] = a;
    k1[r] = b;
    a += 0x9E3779B9u;
    b += 0xBB67AE85u;
  }
}

// AVX2: c[w][v] lane i = word w of group g0 + 4 v + i (coordinate 4 g0 + 16 v + 4 i + w).
__attribute__((target("avx2"))) void bern_masks_avx2(const uint32_t* key, const BernP& bp,
                                                     int64_t j0, int64_t n, uint64_t* masks) {
  uint64_t k0s[10], k1s[10];
  round_keys(key, k0s, k1s);
  __m256i K0[10], K1[10];
  for (int r = 0; r < 10; ++r) {
    K0[r] = _mm256_set1_epi64x(static_cast<int64_t>(k0s[r]));
    K1[r] = _mm256_set1_epi64x(static_cast<int64_t>(k1s[r]));
  }
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
  const __m256i k2 = _mm256_set1_epi64x(key[2]), k3 = _mm256_set1_epi64x(key[3]);
  const __m256i low = _mm256_set1_epi64x(0xFFFFFFFFll);
  const __m256i lim = _mm256_set1_epi64x(static_cast<int64_t>(bp.lim));  // <= 2^32: signed is fine
  const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
  for (int64_t m = 0; m * kMaskCoords < n; ++m) {
    const int64_t c0 = j0 + m * kMaskCoords;
    const int64_t valid = std::min(kMaskCoords, j0 + n - c0);
    __m256i c[4][4];
    for (int v = 0; v < 4; ++v) {
      const __m256i g = _mm256_add_epi64(_mm256_set1_epi64x(c0 / 4 + 4 * v), lanes);
      c[0][v] = g;
      c[1][v] = _mm256_srli_epi64(g, 32);
      c[2][v] = k2;
      c[3][v] = k3;
    }
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < 4; ++v) {
        const __m256i p0 = _mm256_mul_epu32(c[0][v], m0);
        const __m256i p1 = _mm256_mul_epu32(c[2][v], m1);
        c[0][v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c[1][v]), K0[r]);
        c[2][v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c[3][v]), K1[r]);
        c[1][v] = p1;
        c[3][v] = p0;
      }
    }
    uint64_t bits = 0;
    if (bp.p) {
      uint32_t words[kMaskCoords];
      for (int v = 0; v < 4; ++v) {
        for (int w = 0; w < 4; ++w) {
          alignas(32) uint64_t lane[4];
          _mm256_store_si256(reinterpret_cast<__m256i*>(lane), c[w][v]);
          for (int i = 0; i < 4; ++i) words[16 * v + 4 * i + w] = static_cast<uint32_t>(lane[i]);
        }
      }
      bits = per_p_bits(words, bp.p + c0, valid);
    } else {
      for (int v = 0; v < 4; ++v) {
        for (int w = 0; w < 4; ++w) {
          const __m256i keep = _mm256_cmpgt_epi64(lim, _mm256_and_si256(c[w][v], low));
          const int b = _mm256_movemask_pd(_mm256_castsi256_pd(keep));
          bits |= static_cast<uint64_t>(kSpread[b]) << (16 * v + w);
        }
      }
    }
    masks[m] = bits & tail_bits(valid);
  }
}

// AVX-512: two masks per pass; c[w][v] lane i = word w of group g0 + 8 v + i (coordinate
// 4 g0 + 32 v + 4 i + w: mask v / 2, bit 32 (v % 2) + 4 i + w). The three-way xor is one vpternlog.
__attribute__((target("avx512f"))) void bern_masks_avx512(const uint32_t* key, const BernP& bp,
                                                          int64_t j0, int64_t n, uint64_t* masks) {
  uint64_t k0s[10], k1s[10];
  round_keys(key, k0s, k1s);
  __m512i K0[10], K1[10];
  for (int r = 0; r < 10; ++r) {
    K0[r] = _mm512_set1_epi64(static_cast<int64_t>(k0s[r]));
    K1[r] = _mm512_set1_epi64(static_cast<int64_t>(k1s[r]));
  }
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
  const __m512i k2 = _mm512_set1_epi64(key[2]), k3 = _mm512_set1_epi64(key[3]);
  const __m512i low = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i lim = _mm512_set1_epi64(static_cast<int64_t>(bp.lim));
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t m = 0; m * kMaskCoords < n; m += 2) {
    const int64_t c0 = j0 + m * kMaskCoords;
    __m512i c[4][4];
    for (int v = 0; v < 4; ++v) {
      const __m512i g = _mm512_add_epi64(_mm512_set1_epi64(c0 / 4 + 8 * v), lanes);
      c[0][v] = g;
      c[1][v] = _mm512_srli_epi64(g, 32);
      c[2][v] = k2;
      c[3][v] = k3;
    }
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < 4; ++v) {
        const __m512i p0 = _mm512_mul_epu32(c[0][v], m0);
        const __m512i p1 = _mm512_mul_epu32(c[2][v], m1);
        c[0][v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c[1][v], K0[r], 0x96);
        c[2][v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c[3][v], K1[r], 0x96);
        c[1][v] = p1;
        c[3][v] = p0;
      }
    }
    for (int h = 0; h < 2 && (m + h) * kMaskCoords < n; ++h) {
      const int64_t ch = c0 + h * kMaskCoords;
      const int64_t valid = std::min(kMaskCoords, j0 + n - ch);
      uint64_t bits = 0;
      if (bp.p) {
        uint32_t words[kMaskCoords];
        for (int q = 0; q < 2; ++q) {
          for (int w = 0; w < 4; ++w) {
            alignas(64) uint64_t lane[8];
            _mm512_store_si512(lane, c[w][2 * h + q]);
            for (int i = 0; i < 8; ++i) words[32 * q + 4 * i + w] = static_cast<uint32_t>(lane[i]);
          }
        }
        bits = per_p_bits(words, bp.p + ch, valid);
      } else {
        for (int q = 0; q < 2; ++q) {
          for (int w = 0; w < 4; ++w) {
            const unsigned b = _mm512_cmplt_epu64_mask(_mm512_and_si512(c[w][2 * h + q], low), lim);
            const uint64_t spread = kSpread[b & 15] | static_cast<uint64_t>(kSpread[b >> 4]) << 16;
            bits |= spread << (32 * q + w);
          }
        }
      }
      masks[m + h] = bits & tail_bits(valid);
    }
  }
}
#else
#define FEDKERN_SKETCH_SIMD 0
#endif

MaskFn mask_fn() {
#if FEDKERN_SKETCH_SIMD
  if (detail::use_avx512()) return bern_masks_avx512;
  if (detail::use_avx2()) return bern_masks_avx2;
#endif
  return bern_masks_base;
}

// fn(j) for the kept coordinates j of the masks of [j0, j0 + n), in increasing order.
template <class Fn>
FEDKERN_INLINE void for_kept(const uint64_t* masks, int64_t j0, int64_t n, Fn&& fn) {
  for (int64_t m = 0; m * kMaskCoords < n; ++m) {
    for (uint64_t bits = masks[m]; bits; bits &= bits - 1) {
      FEDKERN_DCHECK(m * kMaskCoords + __builtin_ctzll(bits) < n,
                     "Bernoulli kept coordinate past its block (mask tail not cleared)");
      fn(j0 + m * kMaskCoords + __builtin_ctzll(bits));
    }
  }
}

// fn(lo, hi) over contiguous ranges of the rows * blocks work items, one range per thread; `work`
// (coordinates in all) sets how many threads are worth waking.
template <class Fn>
void for_bern_items(int64_t rows, int64_t blocks, int64_t work, Fn&& fn) {
  const int64_t items = rows * blocks;
  if (items < 1) return;
  const int nb = static_cast<int>(std::min<int64_t>(detail::num_blocks(work, kMinCoords), items));
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    detail::block_range(items, nb, b, &lo, &hi);
    fn(lo, hi);
  }
}

// Calls fn(r, idx, cnt) for every chunk of kept coordinates of the rows in [r0, r1): idx holds cnt
// distinct coordinates. Chunks are spread over the threads.
template <class Fn>
void for_perm_chunks(int64_t r0, int64_t r1, int64_t d, const int64_t* keys, const int64_t* range,
                     Fn&& fn) {
  std::vector<int64_t> first(static_cast<size_t>(r1 - r0) + 1, 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t len = range[2 * r + 1] - range[2 * r];
    first[r - r0 + 1] = first[r - r0] + (len + kChunk - 1) / kChunk;
  }
  const int64_t items = first.back();
  parallel_blocks(items, kMinChunks, [&](int64_t lo, int64_t hi) {
    int64_t idx[kChunk];
    int64_t r = r0;
    for (int64_t it = lo; it < hi; ++it) {
      while (first[r - r0 + 1] <= it) ++r;
      const RowKeys rk = row_keys(keys, r, 8);
      const int64_t p0 = range[2 * r] + (it - first[r - r0]) * kChunk;
      const int64_t p1 = std::min(p0 + kChunk, range[2 * r + 1]);
      randk_perm_range(d, rk.k, p0, p1, idx);
      fn(r, idx, p1 - p0);
    }
  });
}

}  // namespace

void sketch_perm_apply(const void* x, int64_t x_stride, const void* v, int64_t v_stride, void* out,
                       DType dtype, int64_t rows, int64_t d, const int64_t* keys,
                       const int64_t* range, const float* scale) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* xp = static_cast<const S*>(x);
    const S* vp = static_cast<const S*>(v);
    S* op = static_cast<S*>(out);
    advise_huge_pages(op, rows * d * static_cast<int64_t>(sizeof(S)));
    // Dense part: out = v (or +0) on every row.
    parallel_blocks(rows * d, kMinStream, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi;) {
        const int64_t r = e / d, j = e - r * d, len = std::min(d - j, hi - e);
        if (vp) {
          std::memcpy(op + e, vp + r * v_stride + j, static_cast<size_t>(len) * sizeof(S));
        } else {
          std::memset(op + e, 0, static_cast<size_t>(len) * sizeof(S));  // +0 in both dtypes
        }
        e += len;
      }
    });
    for_perm_chunks(0, rows, d, keys, range, [&](int64_t r, const int64_t* idx, int64_t cnt) {
      const float s = scale[r];
      const S* xr = xp + r * x_stride;
      const S* vr = vp ? vp + r * v_stride : nullptr;
      S* orow = op + r * d;
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t j = idx[t];
        if (vr) {
          const float vj = T::load(vr, j);
          const float dx = T::load(xr, j) - vj;
          const float sd = s * dx;
          T::store(orow, j, vj + sd);
        } else {
          T::store(orow, j, s * T::load(xr, j));
        }
      }
    });
  });
}

void sketch_perm_grad_step(void* x, int64_t x_stride, const void* g, DType dtype, int64_t rows,
                           int64_t d, const int64_t* keys, const int64_t* range, const float* scale,
                           float gamma) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    S* xp = static_cast<S*>(x);
    const S* gp = static_cast<const S*>(g);
    auto update = [&](int64_t r, const int64_t* idx, int64_t cnt) {
      const float c = gamma * scale[r];
      S* xr = xp + r * x_stride;
      const S* gr = gp + r * d;
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t j = idx[t];
        const float step = c * T::load(gr, j);
        T::store(xr, j, T::load(xr, j) - step);
      }
    };
    if (x_stride != 0 || rows == 1) {
      for_perm_chunks(0, rows, d, keys, range, update);
    } else {
      for (int64_t r = 0; r < rows; ++r) for_perm_chunks(r, r + 1, d, keys, range, update);
    }
  });
}

void sketch_bern_apply(const void* x, int64_t x_stride, const void* v, int64_t v_stride, void* out,
                       DType dtype, int64_t rows, int64_t d, const int64_t* keys, float p_scalar,
                       const float* p) {
  const BernP bp = bern_p(p_scalar, p);
  const MaskFn masks_fn = mask_fn();
  const int64_t blocks = (d + kBlock - 1) / kBlock;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* xp = static_cast<const S*>(x);
    const S* vp = static_cast<const S*>(v);
    S* op = static_cast<S*>(out);
    const int64_t bytes = rows * d * static_cast<int64_t>(sizeof(S));
    advise_huge_pages(op, bytes);
    const bool stream = bytes >= kStreamBytes;
    for_bern_items(rows, blocks, d, [&](int64_t lo, int64_t hi) {
      uint64_t masks[kBlock / kMaskCoords];
      alignas(64) S buf[kMaskCoords];
      for (int64_t it = lo; it < hi; ++it) {
        const int64_t r = it / blocks, j0 = (it - r * blocks) * kBlock;
        const int64_t n = std::min(kBlock, d - j0);
        const S* xr = xp + r * x_stride;
        const S* vr = vp ? vp + r * v_stride : nullptr;
        S* orow = op + r * d;
        const RowKeys rk = row_keys(keys, r, 4);
        masks_fn(rk.k, bp, j0, n, masks);
        // The kept coordinate j of dst (dst[j - base]): v + s (x - v), or s x with no v.
        auto patch = [&](S* dst, int64_t base, int64_t j) {
          const float s = bp.p ? rng::keep_scale(rng::keep_threshold(bp.p[j])) : bp.s_scalar;
          if (vr) {
            const float vj = T::load(vr, j);
            const float dx = T::load(xr, j) - vj;
            const float sd = s * dx;
            T::store(dst, j - base, vj + sd);
          } else {
            T::store(dst, j - base, s * T::load(xr, j));
          }
        };
        // Per mask word: the dense part (out = v, or +0 in both dtypes), then its kept
        // coordinates. A large output goes through an L1 buffer and non-temporal stores, so its
        // lines are written once and never read for ownership (same values either way).
        for (int64_t m = 0; m * kMaskCoords < n; ++m) {
          const int64_t c0 = j0 + m * kMaskCoords;
          const int64_t valid = std::min(kMaskCoords, j0 + n - c0);
          const size_t len = static_cast<size_t>(valid) * sizeof(S);
          uint64_t bits = masks[m];
          if (stream && valid == kMaskCoords && stream_aligned(orow + c0)) {
            if (vr) {
              std::memcpy(buf, vr + c0, sizeof buf);
            } else {
              std::memset(buf, 0, sizeof buf);
            }
            for (; bits; bits &= bits - 1) patch(buf, c0, c0 + __builtin_ctzll(bits));
            stream_store(orow + c0, buf, sizeof buf);
            continue;
          }
          if (vr) {
            std::memcpy(orow + c0, vr + c0, len);
          } else {
            std::memset(orow + c0, 0, len);
          }
          for (; bits; bits &= bits - 1) patch(orow, 0, c0 + __builtin_ctzll(bits));
        }
      }
      if (stream) stream_fence();
    });
  });
}

void sketch_bern_grad_step(void* x, int64_t x_stride, const void* g, DType dtype, int64_t rows,
                           int64_t d, const int64_t* keys, float p_scalar, const float* p,
                           float gamma) {
  const BernP bp = bern_p(p_scalar, p);
  const float c_scalar = gamma * bp.s_scalar;
  const MaskFn masks_fn = mask_fn();
  const int64_t blocks = (d + kBlock - 1) / kBlock;
  std::vector<RowKeys> rks(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) rks[r] = row_keys(keys, r, 4);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    S* xp = static_cast<S*>(x);
    const S* gp = static_cast<const S*>(g);
    // Row r's kept coordinates of the block at j0 step (masks: scratch of kBlock / 64 words).
    auto block = [&](int64_t r, int64_t j0, uint64_t* masks) {
      const int64_t n = std::min(kBlock, d - j0);
      S* xr = xp + r * x_stride;
      const S* gr = gp + r * d;
      masks_fn(rks[r].k, bp, j0, n, masks);
      for_kept(masks, j0, n, [&](int64_t j) {
        const float c = bp.p ? gamma * rng::keep_scale(rng::keep_threshold(bp.p[j])) : c_scalar;
        const float step = c * T::load(gr, j);
        T::store(xr, j, T::load(xr, j) - step);
      });
    };
    if (x_stride != 0 || rows == 1) {
      for_bern_items(rows, blocks, d, [&](int64_t lo, int64_t hi) {
        uint64_t masks[kBlock / kMaskCoords];
        for (int64_t it = lo; it < hi; ++it) {
          const int64_t r = it / blocks;
          block(r, (it - r * blocks) * kBlock, masks);
        }
      });
    } else {  // shared x: every block applies the rows to its coordinates in row order
      for_bern_items(1, blocks, rows * d, [&](int64_t lo, int64_t hi) {
        uint64_t masks[kBlock / kMaskCoords];
        for (int64_t b = lo; b < hi; ++b) {
          for (int64_t r = 0; r < rows; ++r) block(r, b * kBlock, masks);
        }
      });
    }
  });
}

}  // namespace fedkern
