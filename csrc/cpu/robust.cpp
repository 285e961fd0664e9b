// csrc/cpu/robust.cpp -- coordinate-wise median and trimmed mean (fedkern/robust.h), OpenMP.
//
// Columns are processed in tiles of kLanes adjacent coordinates; the kLanes lanes of a tile are
// the SIMD lanes of every loop below, so the row-major layout of X is used as it is (no
// transpose). Per tile:
//   1. keys: buf[i][l] = key(X[i, j0 + l]), an int32 whose order is the spec's value order
//      (sign-magnitude -> two's complement, so -0 and +0 both map to 0; every NaN -> kNanKey).
//   2. selection of the keys K_r at the needed ranks r: a Batcher odd-even merge sorting network
//      over the n rows (lanes = columns, each comparator a vector min/max), restricted to the
//      comparators that can reach the needed output positions. Padding rows up to the next power
//      of two hold kPadKey, the largest key; since comparators put the minimum at the lower
//      position a padding row never changes, so comparators touching one are dropped. For
//      n > kMaxNetwork: std::nth_element per column on a scratch copy instead.
//   3a. median: value(K) decodes the key, except for K = 0 (+0 or -0) and K = kNanKey (NaN
//       payloads), where the row of rank r is found by a scan: it is the (r - #{keys < K})-th
//       row, in row order, with key K, and its element is copied.
//   3b. trimmed mean: KL = K_f, KH = K_{n-f-1}; a counting pass gives lt = #{keys < KL} and
//       #{keys < KH}; the summing pass walks the rows in order with per-lane counts of keys equal
//       to KL / KH seen so far, so the rank of row i is lt(key) + (equal keys before it), and
//       adds X[i, j] (or +0.0f, which leaves s unchanged: s starts at +0 and is never -0) when the
//       rank lies in [f, n-f-1].
// Everything is integer compares plus the fp32 sum in the spec's row order, so every code path
// (AVX2 or baseline x86-64, any thread count) gives the same bits.
#include "fedkern/robust.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace fedkern {
namespace {

constexpr int kLanes = 32;               // coordinates per tile = SIMD lanes of the loops
constexpr int64_t kMaxNetwork = 1024;    // larger n: nth_element per column
constexpr int32_t kNanKey = 0x7f800001;  // every NaN; +inf is 0x7f800000
constexpr int32_t kPadKey = 0x7fffffff;  // padding rows of the network, above every key
constexpr int64_t kMinWork = 1 << 14;    // comparators (x kLanes lanes) per thread at least
constexpr int64_t kKeepKeys = 64;        // trimmed mean: rows whose keys are kept
constexpr int64_t kAhead = 4;            // tiles between a prefetch and the use

// Order-preserving key (see the file comment). |v| bits a <= 0x7f800000 unless v is NaN.
inline int32_t order_key(float v) {
  const uint32_t u = f32_bits(v), a = u & 0x7fffffffu;
  const int32_t k = (u >> 31) ? -static_cast<int32_t>(a) : static_cast<int32_t>(a);
  return a > 0x7f800000u ? kNanKey : k;
}

// The value of a key other than 0 and kNanKey (those are resolved from the data).
inline float key_value(int32_t k) {
  const uint32_t neg = k < 0 ? 0x80000000u : 0u;  // branch-free: the lane loops vectorise it
  return bits_f32((k < 0 ? static_cast<uint32_t>(-k) : static_cast<uint32_t>(k)) | neg);
}

// One comparator on kLanes lanes: lo <- min(lo, hi), hi <- max(lo, hi). GCC/Clang vector types:
// with plain loops the compiler must assume lo and hi overlap and would not vectorise.
#if defined(__GNUC__)
typedef int32_t KeyVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
FEDKERN_INLINE void compare_exchange(int32_t* lo, int32_t* hi) {
  KeyVec a, b;
  std::memcpy(&a, lo, sizeof a);
  std::memcpy(&b, hi, sizeof b);
  const KeyVec mn = a < b ? a : b, mx = a < b ? b : a;
  std::memcpy(lo, &mn, sizeof mn);
  std::memcpy(hi, &mx, sizeof mx);
}
#else
FEDKERN_INLINE void compare_exchange(int32_t* lo, int32_t* hi) {
  for (int l = 0; l < kLanes; ++l) {
    const int32_t a = lo[l], b = hi[l];
    lo[l] = a < b ? a : b;
    hi[l] = a < b ? b : a;
  }
}
#endif

// Comparators (lo, hi) of Batcher's odd-even merge sort on n rows (padded to a power of two),
// keeping those that can influence the sorted positions in `want`; offsets pre-multiplied by
// kLanes.
std::vector<int32_t> make_network(int64_t n, const std::vector<int64_t>& want) {
  int64_t N = 1;
  while (N < n) N *= 2;
  std::vector<std::pair<int32_t, int32_t>> all;
  for (int64_t p = 1; p < N; p *= 2) {
    for (int64_t k = p; k >= 1; k /= 2) {
      for (int64_t j = k % p; j + k < N; j += 2 * k) {
        for (int64_t i = 0; i < k && i + j + k < N; ++i) {
          const int64_t a = i + j, b = i + j + k;
          if (a / (2 * p) == b / (2 * p) && b < n) {
            all.emplace_back(static_cast<int32_t>(a), static_cast<int32_t>(b));
          }
        }
      }
    }
  }
  std::vector<char> live(n, 0);
  for (int64_t r : want) live[r] = 1;
  std::vector<int32_t> out;
  for (size_t c = all.size(); c-- > 0;) {
    const auto [a, b] = all[c];
    if (live[a] || live[b]) {
      live[a] = live[b] = 1;
      out.push_back(b * kLanes);
      out.push_back(a * kLanes);
    }
  }
  std::reverse(out.begin(), out.end());  // pairs back in network order, (lo, hi)
  return out;
}

// A tile: element (i, l) of the tile is x[i * stride + l], l < kLanes.
template <class T>
struct Tile {
  const typename T::storage* x;
  int64_t stride;
  float val(int64_t i, int l) const { return T::load(x, i * stride + l); }
};

// Software prefetch of the rows of the tile kAhead tiles on (`next`: its first row, or nullptr),
// spread over the work on this one: the n rows lie in n different pages, too many streams for the
// hardware prefetcher, so without it every tile waits for memory (n = 256: ~40% of the time).
// Into L2 (the network's buffer fills L1). One tile ahead is too late for DRAM; 2-4 are best here.
template <class T>
struct Prefetch {
  const typename T::storage* next;
  int64_t stride;
  int64_t rows;
  FEDKERN_INLINE void row(int64_t i) const {
    if (next != nullptr && i < rows) {
      const char* p = reinterpret_cast<const char*>(next + i * stride);
      constexpr int kBytes = kLanes * static_cast<int>(sizeof(typename T::storage));
      for (int b = 0; b < kBytes; b += 64) __builtin_prefetch(p + b, 0, 2);
    }
  }
};

// K[r][l] = key of rank want[r] in lane l (want ascending). buf: [n][kLanes] (network) or n
// (scratch column for nth_element).
template <class T>
FEDKERN_INLINE void select_ranks(const Tile<T>& t, int64_t n, const std::vector<int32_t>& net,
                                 const std::vector<int64_t>& want, int32_t* buf,
                                 int32_t (*K)[kLanes], const Prefetch<T>& pf,
                                 int32_t* keys = nullptr) {
  if (n <= kMaxNetwork) {
    for (int64_t i = 0; i < n; ++i) {
      int32_t* b = buf + i * kLanes;
      for (int l = 0; l < kLanes; ++l) b[l] = order_key(t.val(i, l));
      if (keys != nullptr) std::memcpy(keys + i * kLanes, b, kLanes * sizeof(int32_t));
    }
    // One row of the next tile prefetched every `every` comparators.
    const int64_t ncomp = static_cast<int64_t>(net.size() / 2);
    const int64_t every = std::max<int64_t>(1, ncomp / std::max<int64_t>(1, n));
    const int32_t* c = net.data();
    int64_t next_row = 0;
    for (int64_t q = 0; q < ncomp; ++q) {
      if (q % every == 0) pf.row(next_row++);
      int32_t* lo = buf + c[2 * q];
      int32_t* hi = buf + c[2 * q + 1];
      compare_exchange(lo, hi);
    }
    for (; next_row < n; ++next_row) pf.row(next_row);
    for (size_t r = 0; r < want.size(); ++r) {
      for (int l = 0; l < kLanes; ++l) K[r][l] = buf[want[r] * kLanes + l];
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) pf.row(i);
  for (int l = 0; l < kLanes; ++l) {
    for (int64_t i = 0; i < n; ++i) buf[i] = order_key(t.val(i, l));
    int64_t from = 0;
    for (size_t r = 0; r < want.size(); ++r) {
      std::nth_element(buf + from, buf + want[r], buf + n);
      K[r][l] = buf[want[r]];
      from = want[r] + 1;
    }
  }
}

// The element of rank r in lane l, whose key is k (exact storage bits).
template <class T>
typename T::storage rank_element(const Tile<T>& t, int64_t n, int64_t r, int l, int32_t k) {
  using S = typename T::storage;
  if (k != 0 && k != kNanKey) return T::round(key_value(k));  // exact: a value of this dtype
  int64_t lt = 0;
  for (int64_t i = 0; i < n; ++i) lt += order_key(t.val(i, l)) < k;
  int64_t skip = r - lt;
  for (int64_t i = 0; i < n; ++i) {
    if (order_key(t.val(i, l)) == k && skip-- == 0) return t.x[i * t.stride + l];
  }
  return S{};  // unreachable: rank r holds key k
}

template <class T>
FEDKERN_INLINE void median_tile(const Tile<T>& t, int64_t n, const std::vector<int32_t>& net,
                                const std::vector<int64_t>& want, int32_t* buf,
                                typename T::storage* out, int lanes, const Prefetch<T>& pf) {
  using S = typename T::storage;
  int32_t K[2][kLanes];
  select_ranks(t, n, net, want, buf, K, pf);
  const bool two = want.size() == 2;
  const int32_t* KH = K[two ? 1 : 0];
  // All lanes at once from the keys (vectorised); a lane whose key is 0 or kNanKey (its bits
  // come from the data) is redone by rank_element below.
  int special = 0;
  S o[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const int32_t a = K[0][l], b = KH[l];
    special |= (a == 0) | (a == kNanKey) | (b == 0) | (b == kNanKey);
    const float lo = key_value(a), hi = key_value(b);
    o[l] = two ? T::round((lo + hi) * 0.5f) : T::round(lo);
  }
  if (special) {
    for (int l = 0; l < lanes; ++l) {
      const int32_t a = K[0][l], b = KH[l];
      if (!((a == 0) | (a == kNanKey) | (b == 0) | (b == kNanKey))) continue;
      const S lo = rank_element(t, n, want[0], l, a);
      if (!two) {
        o[l] = lo;
      } else {
        const S hi = rank_element(t, n, want[1], l, b);
        o[l] = T::round((T::load(&lo, 0) + T::load(&hi, 0)) * 0.5f);
      }
    }
  }
  for (int l = 0; l < lanes; ++l) out[l] = o[l];
}

template <class T>
FEDKERN_INLINE void trimmed_tile(const Tile<T>& t, int64_t n, int64_t f,
                                 const std::vector<int32_t>& net, const std::vector<int64_t>& want,
                                 int32_t* buf, typename T::storage* out, int lanes,
                                 const Prefetch<T>& pf) {
  int32_t K[2][kLanes];
  // Up to kKeepKeys rows the keys in row order are kept (buf + n * kLanes; both copies stay in
  // L1), not recomputed from X in each pass.
  int32_t* keys = n <= kKeepKeys ? buf + n * kLanes : nullptr;
  select_ranks(t, n, net, want, buf, K, pf, keys);
  auto key = [&](int64_t i, int l) {
    return keys != nullptr ? keys[i * kLanes + l] : order_key(t.val(i, l));
  };
  const int32_t* KL = K[0];
  const int32_t* KH = K[want.size() - 1];
  const int32_t first = static_cast<int32_t>(f), last = static_cast<int32_t>(n - f - 1);
  // ltL = #{keys < KL}, leH = #{keys <= KH}. When ltL = first and leH = last + 1 (no key equal
  // to KL ranks below first, none equal to KH above last: always so without ties there), the
  // kept elements are exactly those with KL <= key <= KH.
  int32_t ltL[kLanes] = {}, leH[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) {
    for (int l = 0; l < kLanes; ++l) {
      const int32_t k = key(i, l);
      ltL[l] += k < KL[l];
      leH[l] += k <= KH[l];
    }
  }
  int ties = 0;
  for (int l = 0; l < kLanes; ++l) ties |= (ltL[l] != first) | (leH[l] != last + 1);
  float s[kLanes];
  for (int l = 0; l < kLanes; ++l) s[l] = 0.0f;
  if (!ties) {
    for (int64_t i = 0; i < n; ++i) {
      for (int l = 0; l < kLanes; ++l) {
        const int32_t k = key(i, l);
        const float v = t.val(i, l);
        s[l] = s[l] + ((k >= KL[l]) & (k <= KH[l]) ? v : 0.0f);
      }
    }
  } else {
    // The general rule: the rank of row i is #{keys < key} + #{earlier rows with that key}.
    int32_t rL[kLanes], rH[kLanes];  // rank the next key equal to KL / KH gets
    for (int l = 0; l < kLanes; ++l) {
      rL[l] = ltL[l];
      rH[l] = 0;
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int l = 0; l < kLanes; ++l) rH[l] += key(i, l) < KH[l];
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = t.val(i, l);
        const int32_t k = key(i, l);
        const int eqL = k == KL[l], eqH = k == KH[l];
        const int in = ((k > KL[l]) & (k < KH[l])) | (eqL & (rL[l] >= first) & (rL[l] <= last)) |
                       (eqH & (rH[l] >= first) & (rH[l] <= last));
        rL[l] += eqL;
        rH[l] += eqH;
        s[l] = s[l] + (in ? v : 0.0f);
      }
    }
  }
  const float m = static_cast<float>(n - 2 * f);
  for (int l = 0; l < lanes; ++l) out[l] = T::round(s[l] / m);
}

// One call's job; run_tiles processes tiles [lo, hi) of it. The last, partial tile reads a
// zero-padded copy of its columns.
struct Job {
  const void* x;
  void* out;
  int64_t n, d, f;  // f unused by the median
  const std::vector<int32_t>* net;
  const std::vector<int64_t>* want;
};

template <class T, bool kMedian>
FEDKERN_INLINE void run_tiles(const Job& job, int64_t lo, int64_t hi, int32_t* buf) {
  using S = typename T::storage;
  const S* x = static_cast<const S*>(job.x);
  S* out = static_cast<S*>(job.out);
  const int64_t n = job.n, d = job.d;
  std::vector<S> pad;
  for (int64_t tt = lo; tt < hi; ++tt) {
    const int64_t j0 = tt * kLanes;
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, d - j0));
    Tile<T> t{x + j0, d};
    // Tile tt + kAhead of this block, when it is a full one (the partial one reads its padded
    // copy).
    const int64_t ahead = j0 + kAhead * kLanes;
    const Prefetch<T> pf{tt + kAhead < hi && ahead + kLanes <= d ? x + ahead : nullptr, d, n};
    if (lanes < kLanes) {
      pad.assign(static_cast<size_t>(n) * kLanes, S{});
      for (int64_t i = 0; i < n; ++i) {
        std::copy(x + i * d + j0, x + i * d + d, pad.begin() + i * kLanes);
      }
      t = Tile<T>{pad.data(), kLanes};
    }
    if (kMedian) {
      median_tile<T>(t, n, *job.net, *job.want, buf, out + j0, lanes, pf);
    } else {
      trimmed_tile<T>(t, n, job.f, *job.net, *job.want, buf, out + j0, lanes, pf);
    }
  }
}

// run_tiles compiled twice: with AVX2 (chosen at run time where the CPU has it) and for the
// baseline ISA. Everything below it is inlined, so the lane loops are vectorised for each ISA.
// (The OpenMP region stays outside: GCC outlines it before inlining, with the default target.)
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_ROBUST_AVX2 1
template <class T, bool kMedian>
__attribute__((target("avx2"))) void run_tiles_avx2(const Job& job, int64_t lo, int64_t hi,
                                                    int32_t* buf) {
  run_tiles<T, kMedian>(job, lo, hi, buf);
}
#else
#define FEDKERN_ROBUST_AVX2 0
#endif

template <class T, bool kMedian>
void run_tiles_base(const Job& job, int64_t lo, int64_t hi, int32_t* buf) {
  run_tiles<T, kMedian>(job, lo, hi, buf);
}

template <class T, bool kMedian>
void run(const Job& job) {
  using Fn = void (*)(const Job&, int64_t, int64_t, int32_t*);
  Fn fn = run_tiles_base<T, kMedian>;
#if FEDKERN_ROBUST_AVX2
  if (detail::use_avx2()) {
    fn = run_tiles_avx2<T, kMedian>;
  }
#endif
  const int64_t n = job.n, tiles = (job.d + kLanes - 1) / kLanes;
  // Work per tile in comparators of kLanes lanes: the network's plus ~2 per row for the keys and
  // the finish (nth_element: ~n log2(n)^2 / 4); at least kMinWork per thread (~50 us).
  int64_t per_tile = static_cast<int64_t>(job.net->size() / 2) + 2 * n;
  if (n > kMaxNetwork) {
    int64_t lg = 1;
    while ((int64_t{1} << lg) < n) ++lg;
    per_tile = n * lg * lg / 4;
  }
  const int nb = detail::num_blocks(tiles, std::max<int64_t>(1, kMinWork / per_tile));
  // Network: the keys being sorted, then (trimmed mean) the keys in row order; else one column.
  const size_t buf_len =
      static_cast<size_t>(n <= kMaxNetwork ? (!kMedian && n <= kKeepKeys ? 2 : 1) * n * kLanes : n);
  // Groups of tiles handed out dynamically (several per thread), so that a thread slowed down by
  // another process on its core does not hold the others up; a tile's result never depends on
  // which thread takes it.
  const int64_t ngroups = nb == 1 ? 1 : std::min<int64_t>(tiles, int64_t{8} * nb);
#pragma omp parallel num_threads(nb)
  {
    std::vector<int32_t> buf(buf_len);
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < ngroups; ++g) {
      int64_t lo, hi;
      detail::block_range(tiles, static_cast<int>(ngroups), static_cast<int>(g), &lo, &hi);
      fn(job, lo, hi, buf.data());
    }
  }
}

}  // namespace

void coordinate_median(const void* x, DType dtype, int64_t n, int64_t d, void* out) {
  std::vector<int64_t> want{(n - 1) / 2};
  if (n % 2 == 0) want.push_back(n / 2);
  const std::vector<int32_t> net =
      n <= kMaxNetwork ? make_network(n, want) : std::vector<int32_t>{};
  const Job job{x, out, n, d, 0, &net, &want};
  dispatch_dtype(dtype, [&](auto tag) { run<decltype(tag), true>(job); });
}

void trimmed_mean(const void* x, DType dtype, int64_t n, int64_t d, int64_t f, void* out) {
  std::vector<int64_t> want{f};
  if (n - f - 1 != f) want.push_back(n - f - 1);
  const std::vector<int32_t> net =
      n <= kMaxNetwork ? make_network(n, want) : std::vector<int32_t>{};
  const Job job{x, out, n, d, f, &net, &want};
  dispatch_dtype(dtype, [&](auto tag) { run<decltype(tag), false>(job); });
}

}  // namespace fedkern
