// csrc/cpu/randk.cpp -- rand-k index sets (keyed Feistel permutation) and rand-k compressors.
//
// idx = ascending {perm(i) : i < k}, perm a balanced 8-round Feistel network on b = 2h bits
// (2^b >= n) made a permutation of [0, n) by cycle walking; see randk.h for the exact definition.
// O(k) work: perm(i) for every i < k (OpenMP), then sorting. The k values are distinct and below
// n, so they are sorted by a stable LSD radix sort on ceil(bit_length(n-1) / 12) digits, or, when
// k is a sizeable fraction of n, by setting bits in an n-bit bitmap and reading it back in order.
// Either way the result is a set in ascending order: independent of the number of threads.
#include "fedkern/randk.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

namespace fedkern {
namespace {

// Minimum work per thread (below it, stay serial): ~0.3-1 ms of work each, so the cost of waking
// a thread and of the closing barrier -- a scheduler time slice when the cores are oversubscribed
// -- stays small next to the work. (k = 1e5 rand-k runs serially in ~1.5 ms.)
constexpr int64_t kMinPerm = 1 << 17;    // Feistel evaluations (~10 ns each)
constexpr int64_t kMinGather = 1 << 16;  // random accesses at the k indices
constexpr int64_t kMinStream = 1 << 19;  // elements of a streaming pass over n
constexpr int64_t kMinRadix = 1 << 18;   // elements of one radix pass
constexpr int64_t kMinWords = 1 << 17;   // bitmap words

inline uint32_t mix32(uint32_t x) {  // "lowbias32" integer hash, uint32 wrap-around arithmetic
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline int bit_length(uint64_t v) {
  int b = 0;
  while (v) {
    ++b;
    v >>= 1;
  }
  return b;
}

// Half width h of the network for n: b = max(bit_length(n - 1), 2) rounded up to even, h = b / 2.
inline int half_bits(int64_t n) {
  int b = std::max(bit_length(static_cast<uint64_t>(n - 1)), 2);
  b += b & 1;
  return b / 2;
}

inline uint64_t feistel(uint64_t x, int h, uint32_t mask, const uint32_t* keys) {
  uint32_t left = static_cast<uint32_t>(x >> h), right = static_cast<uint32_t>(x) & mask;
  for (int r = 0; r < 8; ++r) {
    const uint32_t t = left ^ (mix32(right ^ keys[r]) & mask);
    left = right;
    right = t;
  }
  return (static_cast<uint64_t>(left) << h) | right;
}

inline uint32_t half_mask(int h) { return h >= 32 ? 0xffffffffu : (uint32_t{1} << h) - 1; }

// The 8 rounds on m independent (left, right) pairs in place: a branch-free loop over uint32
// lanes that compilers vectorise; integer only, so every instruction set gives the same bits
// (GCC/Clang build an AVX2 clone too, picked at run time where the CPU has it).
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(__AVX2__) && \
    defined(__ELF__)
__attribute__((target_clones("avx2", "default")))
#endif
void feistel_rounds(uint32_t* __restrict left, uint32_t* __restrict right, int m, uint32_t mask,
                    const uint32_t* __restrict keys) {
  const uint32_t k0 = keys[0], k1 = keys[1], k2 = keys[2], k3 = keys[3], k4 = keys[4], k5 = keys[5],
                 k6 = keys[6], k7 = keys[7];
  for (int t = 0; t < m; ++t) {
    uint32_t l = left[t], r = right[t], x;
#define FEDKERN_ROUND(K)           \
  x = l ^ (mix32(r ^ (K)) & mask); \
  l = r;                           \
  r = x;
    FEDKERN_ROUND(k0)
    FEDKERN_ROUND(k1)
    FEDKERN_ROUND(k2)
    FEDKERN_ROUND(k3)
    FEDKERN_ROUND(k4)
    FEDKERN_ROUND(k5)
    FEDKERN_ROUND(k6)
    FEDKERN_ROUND(k7)
#undef FEDKERN_ROUND
    left[t] = l;
    right[t] = r;
  }
}

// perm(i) of [0, n): the network, re-applied while the value is >= n (cycle walking).
struct Perm {
  uint64_t n;
  int h;
  uint32_t mask;
  const uint32_t* keys;
  Perm(int64_t n_, const uint32_t* keys_)
      : n(static_cast<uint64_t>(n_)), h(half_bits(n_)), mask(half_mask(h)), keys(keys_) {}
  uint64_t operator()(uint64_t i) const {
    uint64_t x = feistel(i, h, mask, keys);
    while (x >= n) x = feistel(x, h, mask, keys);
    return x;
  }
  // out[j] = perm(lo + j) for j < cnt <= kBatch. One evaluation of the network is a ~100-cycle
  // dependency chain, and whether to walk on is a coin flip, so perm(i) one at a time is bound by
  // latency and branch misses. Here each evaluation runs over a whole batch of independent values
  // held as uint32 halves (4 or 8 SIMD lanes), and the values still >= n are compacted and
  // walked on as a batch again.
  static constexpr int kBatch = 512;
  void batch(uint64_t lo, int cnt, int64_t* out) const {
    uint64_t xs[kBatch];
    uint32_t left[kBatch], right[kBatch];
    uint16_t pos[kBatch];
    for (int j = 0; j < cnt; ++j) xs[j] = lo + static_cast<uint64_t>(j);
    // Round r of the walk evaluates the network on the m values listed in pos (all at first).
    int m = cnt;
    for (int j = 0; j < cnt; ++j) pos[j] = static_cast<uint16_t>(j);
    while (m > 0) {
      for (int t = 0; t < m; ++t) {
        const uint64_t x = xs[pos[t]];
        left[t] = static_cast<uint32_t>(x >> h);
        right[t] = static_cast<uint32_t>(x) & mask;
      }
      feistel_rounds(left, right, m, mask, keys);
      int m2 = 0;
      for (int t = 0; t < m; ++t) {
        const uint64_t x = (static_cast<uint64_t>(left[t]) << h) | right[t];
        xs[pos[t]] = x;
        pos[m2] = pos[t];
        m2 += x >= n;
      }
      m = m2;
    }
    for (int j = 0; j < cnt; ++j) out[j] = static_cast<int64_t>(xs[j]);
  }
  // out[j] = perm(lo + j) for j < hi - lo.
  void range(int64_t lo, int64_t hi, int64_t* out) const {
    for (int64_t t = lo; t < hi; t += kBatch) {
      const int cnt = static_cast<int>(std::min<int64_t>(kBatch, hi - t));
      batch(static_cast<uint64_t>(t), cnt, out + (t - lo));
    }
  }
};

using detail::parallel_blocks;

// One stable counting-sort pass of src[0..k) into dst on `bits` bits starting at `shift`:
// per-block histograms, offsets ordered by (digit, block), then each block scatters in order.
void radix_pass(const int64_t* src, int64_t* dst, int64_t k, int shift, int bits) {
  const int nbins = 1 << bits;
  const uint64_t dmask = static_cast<uint64_t>(nbins - 1);
  const int nb = detail::num_blocks(k, kMinRadix);
  std::vector<int64_t> hist(static_cast<size_t>(nb) * nbins, 0);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    detail::block_range(k, nb, b, &lo, &hi);
    int64_t* h = &hist[static_cast<size_t>(b) * nbins];
    for (int64_t i = lo; i < hi; ++i) ++h[(static_cast<uint64_t>(src[i]) >> shift) & dmask];
  }
  int64_t pos = 0;
  for (int d = 0; d < nbins; ++d) {
    for (int b = 0; b < nb; ++b) {
      int64_t& h = hist[static_cast<size_t>(b) * nbins + d];
      const int64_t c = h;
      h = pos;
      pos += c;
    }
  }
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    detail::block_range(k, nb, b, &lo, &hi);
    int64_t* h = &hist[static_cast<size_t>(b) * nbins];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t v = src[i];
      dst[h[(static_cast<uint64_t>(v) >> shift) & dmask]++] = v;
    }
  }
}

// Dense case: mark the k values in an n-bit bitmap, then list the set bits in order.
void indices_by_bitmap(int64_t n, int64_t k, const Perm& perm, int64_t* idx) {
  const int64_t words = (n + 63) / 64;
  std::unique_ptr<std::atomic<uint64_t>[]> bm(new std::atomic<uint64_t>[words]);
  parallel_blocks(words, kMinWords, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) bm[w].store(0, std::memory_order_relaxed);
  });
  parallel_blocks(k, kMinPerm, [&](int64_t lo, int64_t hi) {
    int64_t vals[Perm::kBatch];
    for (int64_t t = lo; t < hi; t += Perm::kBatch) {
      const int cnt = static_cast<int>(std::min<int64_t>(Perm::kBatch, hi - t));
      perm.batch(static_cast<uint64_t>(t), cnt, vals);
      for (int j = 0; j < cnt; ++j) {
        const uint64_t v = static_cast<uint64_t>(vals[j]);
        bm[v >> 6].fetch_or(uint64_t{1} << (v & 63), std::memory_order_relaxed);
      }
    }
  });
  const int nb = detail::num_blocks(words, kMinWords);
  std::vector<int64_t> off(nb + 1, 0);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi, c = 0;
    detail::block_range(words, nb, b, &lo, &hi);
    for (int64_t w = lo; w < hi; ++w)
      c += __builtin_popcountll(bm[w].load(std::memory_order_relaxed));
    off[b + 1] = c;
  }
  for (int b = 0; b < nb; ++b) off[b + 1] += off[b];
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi, o = off[b];
    detail::block_range(words, nb, b, &lo, &hi);
    for (int64_t w = lo; w < hi; ++w) {
      uint64_t bits = bm[w].load(std::memory_order_relaxed);
      while (bits) {
        idx[o++] = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
      }
    }
  }
}

}  // namespace

uint64_t randk_feistel(uint64_t x, int h, const uint32_t keys[8]) {
  return feistel(x, h, half_mask(h), keys);
}

uint64_t randk_perm(uint64_t i, int64_t n, const uint32_t keys[8]) { return Perm(n, keys)(i); }

void randk_perm_range(int64_t n, const uint32_t keys[8], int64_t lo, int64_t hi, int64_t* out) {
  Perm(n, keys).range(lo, hi, out);
}

void randk_indices(int64_t n, int64_t k, const uint32_t keys[8], int64_t* idx) {
  const Perm perm(n, keys);
  const int bits = bit_length(static_cast<uint64_t>(n - 1));
  const int passes = (bits + 11) / 12;
  // The bitmap costs ~n/64 word operations, the radix sort ~passes * k element moves.
  if (n / 32 <= k * std::max(passes, 1)) {
    indices_by_bitmap(n, k, perm, idx);
    return;
  }
  // Start in the buffer that makes the last radix pass land in idx.
  std::vector<int64_t> tmp(passes > 0 ? k : 0);
  int64_t* a = (passes % 2) ? tmp.data() : idx;
  int64_t* b = (passes % 2) ? idx : tmp.data();
  parallel_blocks(k, kMinPerm, [&](int64_t lo, int64_t hi) { perm.range(lo, hi, a + lo); });
  const int digit = passes ? (bits + passes - 1) / passes : 0;
  for (int p = 0; p < passes; ++p) {
    radix_pass(a, b, k, p * digit, std::min(digit, bits - p * digit));
    std::swap(a, b);
  }
}

void randk_compress(const void* x, DType dtype, int64_t n, int64_t k, const uint32_t keys[8],
                    float scale, int64_t* idx, void* val) {
  randk_indices(n, k, keys, idx);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* xp = static_cast<const S*>(x);
    S* v = static_cast<S*>(val);
    parallel_blocks(k, kMinGather, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) v[j] = T::round(T::load(xp, idx[j]) * scale);
    });
  });
}

void ef14_randk(const void* grad, void* err, DType dtype, int64_t n, int64_t k,
                const uint32_t keys[8], float lr, float scale, int64_t* idx, void* val) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* g = static_cast<const S*>(grad);
    S* e = static_cast<S*>(err);
    S* v = static_cast<S*>(val);
    // a = round(e + round32(lr * g)) for every coordinate, in place.
    parallel_blocks(n, kMinStream, [&](int64_t lo, int64_t hi) {
      const S* gp = g + lo;
      S* ep = e + lo;
      const int64_t cnt = hi - lo;
      for (int64_t j = 0; j < cnt; ++j) {
        const float p = lr * T::load(gp, j);
        ep[j] = T::round(T::load(ep, j) + p);
      }
    });
    randk_indices(n, k, keys, idx);
    parallel_blocks(k, kMinGather, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t i = idx[j];
        const float a = T::load(e, i);
        const S c = T::round(a * scale);
        T::store(e, i, a - T::load(&c, 0));
        v[j] = c;
      }
    });
  });
}

void ef21_randk(const void* grad, void* state, DType dtype, int64_t n, int64_t k,
                const uint32_t keys[8], float scale, int64_t* idx, void* val) {
  randk_indices(n, k, keys, idx);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* g = static_cast<const S*>(grad);
    S* s = static_cast<S*>(state);
    S* v = static_cast<S*>(val);
    parallel_blocks(k, kMinGather, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t i = idx[j];
        const float si = T::load(s, i);
        const S d = T::round(T::load(g, i) - si);
        const S c = T::round(T::load(&d, 0) * scale);
        T::store(s, i, si + T::load(&c, 0));
        v[j] = c;
      }
    });
  });
}

}  // namespace fedkern
