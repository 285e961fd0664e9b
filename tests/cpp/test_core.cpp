// tests/cpp/test_core.cpp -- the C++ core against brute force (run by ctest: fedkern_core_tests).
//
// top-k: sort (key desc, index asc), keep k, sort ascending; values and buffer updates recomputed
// elementwise with the spec's formulas. rand-k: an independent transcription of the Feistel
// permutation, cycle walking and a std::sort. sparse add: per-coordinate accumulation in message
// order. Inputs are random with ties, zeros, -0, inf and NaN, sizes from 1 up to beyond the
// candidate cap (so the refining radix levels run), and every check is repeated with 1, 2 and 3
// OpenMP threads: results must be identical bit for bit. MicroAdam: every step of a list of fp32
// and bf16 tensors (partial last blocks, K >= block length, ties, inf and NaN) against a dense
// transcription of the reference (selection by a full stable sort), state and parameters compared
// bit for bit after each of several steps, on 1..3 threads. Robust aggregation (median, trimmed
// mean): a stable sort of every column (NaN last, -0 == +0, ties by row), the spec's sums in row
// order, on 1 and 2 threads, in the AVX2 and the baseline-ISA builds.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "fedkern/common.h"
#include "fedkern/microadam.h"
#include "fedkern/randk.h"
#include "fedkern/robust.h"
#include "fedkern/sparse.h"
#include "fedkern/topk.h"

using namespace fedkern;

static int g_failures = 0;
static std::string g_context;

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      if (++g_failures <= 20)                                                             \
        std::fprintf(stderr, "%s:%d: CHECK(%s) failed [%s]\n", __FILE__, __LINE__, #cond, \
                     g_context.c_str());                                                  \
    }                                                                                     \
  } while (0)

static void set_threads(int t) {
#ifdef _OPENMP
  omp_set_num_threads(t);
#else
  (void)t;
#endif
}

// ---- element helpers --------------------------------------------------------------------------

static std::mt19937_64 rng(12345);

// Random float with many special values and ties: a small pool of repeated values, +-0, inf, NaN.
static float random_value(int mode) {
  std::uniform_real_distribution<float> uni(-3.f, 3.f);
  const uint64_t r = rng() % 100;
  if (mode == 1) return static_cast<float>(static_cast<int>(rng() % 5) - 2);  // heavy ties
  if (r < 3) return 0.0f;
  if (r < 6) return -0.0f;
  if (r < 8) return std::numeric_limits<float>::infinity();
  if (r < 9) return -std::numeric_limits<float>::infinity();
  if (r < 11) return std::numeric_limits<float>::quiet_NaN();
  if (r < 12) return bits_f32(0xffc00001u);  // negative NaN with a payload
  if (r < 20) return 1.5f;
  if (r < 25) return -1.5f;
  return uni(rng);
}

template <class T>
static std::vector<typename T::storage> make_input(int64_t n, int mode) {
  std::vector<typename T::storage> v(n);
  for (int64_t i = 0; i < n; ++i) {
    if (mode == 2) {  // identical top 24 key bits: only the last radix level separates them
      v[i] = T::round(bits_f32(0x3f800000u + static_cast<uint32_t>(rng() % 128)));
    } else if (mode == 3) {
      v[i] = T::round(2.0f);  // all equal
    } else if (mode == 4) {
      v[i] = T::round(std::numeric_limits<float>::quiet_NaN());
    } else {
      v[i] = T::round(random_value(mode));
    }
  }
  return v;
}

// Bit-identical, except that two fp32 NaNs always match: which NaN payload an fp32 operation on
// two NaNs returns depends on the operand order the compiler picks, and no backend promises it.
// (bf16 stores are canonical: every NaN is 0x7fc0, compared bit for bit.)
template <class S>
static bool same_bits(const std::vector<S>& a, const std::vector<S>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(S)) == 0) continue;
    if (!std::is_same<S, float>::value) return false;
    float x, y;
    std::memcpy(&x, &a[i], sizeof x);
    std::memcpy(&y, &b[i], sizeof y);
    if (!(std::isnan(x) && std::isnan(y))) return false;
  }
  return true;
}

// ---- brute force ------------------------------------------------------------------------------

static std::vector<int64_t> brute_topk(const std::vector<uint32_t>& key, int64_t k) {
  std::vector<int64_t> order(key.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return key[a] > key[b]; });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

static uint32_t brute_key(float v) {
  const uint32_t u = f32_bits(v) & 0x7fffffffu;
  return std::isnan(v) ? 0x7f800001u : u;
}

template <class T>
static void check_topk_family(int64_t n, int64_t k, int mode) {
  using S = typename T::storage;
  const DType dt = std::is_same<T, F32>::value ? DType::kFloat32 : DType::kBFloat16;
  g_context = "topk n=" + std::to_string(n) + " k=" + std::to_string(k) +
              " mode=" + std::to_string(mode) + (dt == DType::kBFloat16 ? " bf16" : " f32");
  const auto x = make_input<T>(n, mode);
  const auto g = make_input<T>(n, mode == 1 ? 1 : 0);
  const float lr = 0.375f;

  // topk_compress
  std::vector<uint32_t> key(n);
  for (int64_t i = 0; i < n; ++i) key[i] = brute_key(T::load(x.data(), i));
  const auto want = brute_topk(key, k);
  std::vector<S> want_val(k);
  for (int64_t j = 0; j < k; ++j) want_val[j] = x[want[j]];

  // ef14: a = round(e + lr*g); e <- a; e[idx] <- 0
  std::vector<S> a(n);
  for (int64_t i = 0; i < n; ++i) {
    const float p = lr * T::load(g.data(), i);
    a[i] = T::round(T::load(x.data(), i) + p);
    key[i] = brute_key(T::load(a.data(), i));
  }
  const auto want14 = brute_topk(key, k);
  std::vector<S> want14_val(k), want14_err = a;
  for (int64_t j = 0; j < k; ++j) {
    want14_val[j] = a[want14[j]];
    want14_err[want14[j]] = T::round(0.0f);
  }

  // ef21: d = round(g - s); s[idx] <- round(s + d)
  std::vector<S> d(n);
  for (int64_t i = 0; i < n; ++i) {
    d[i] = T::round(T::load(g.data(), i) - T::load(x.data(), i));
    key[i] = brute_key(T::load(d.data(), i));
  }
  const auto want21 = brute_topk(key, k);
  std::vector<S> want21_val(k), want21_st = x;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = want21[j];
    want21_val[j] = d[i];
    want21_st[i] = T::round(T::load(x.data(), i) + T::load(d.data(), i));
  }

  for (int threads = 1; threads <= 3; ++threads) {
    set_threads(threads);
    std::vector<int64_t> idx(k, -1);
    std::vector<S> val(k);
    topk_compress(x.data(), dt, n, k, idx.data(), val.data());
    CHECK(idx == want);
    CHECK(same_bits(val, want_val));

    std::vector<S> err = x;
    std::fill(idx.begin(), idx.end(), -1);
    ef14_topk(g.data(), err.data(), dt, n, k, lr, idx.data(), val.data());
    CHECK(idx == want14);
    CHECK(same_bits(val, want14_val));
    CHECK(same_bits(err, want14_err));

    std::vector<S> st = x;
    std::fill(idx.begin(), idx.end(), -1);
    ef21_topk(g.data(), st.data(), dt, n, k, idx.data(), val.data());
    CHECK(idx == want21);
    CHECK(same_bits(val, want21_val));
    CHECK(same_bits(st, want21_st));
  }
}

// Independent transcription of the spec's keyed permutation.
static uint32_t spec_mix32(uint32_t x) {
  x ^= x >> 16;
  x = static_cast<uint32_t>(x * uint64_t{0x7feb352d});
  x ^= x >> 15;
  x = static_cast<uint32_t>(x * uint64_t{0x846ca68b});
  x ^= x >> 16;
  return x;
}

static uint64_t spec_perm(uint64_t i, uint64_t n, const uint32_t* keys) {
  int b = 0;
  for (uint64_t v = n - 1; v; v >>= 1) ++b;
  if (b < 2) b = 2;
  if (b % 2) ++b;
  const int h = b / 2;
  const uint32_t mask = h == 32 ? 0xffffffffu : static_cast<uint32_t>((uint64_t{1} << h) - 1);
  auto f = [&](uint64_t x) {
    uint32_t l = static_cast<uint32_t>(x >> h), r = static_cast<uint32_t>(x & mask);
    for (int t = 0; t < 8; ++t) {
      const uint32_t nl = r, nr = l ^ (spec_mix32(r ^ keys[t]) & mask);
      l = nl;
      r = nr;
    }
    return (static_cast<uint64_t>(l) << h) | r;
  };
  uint64_t x = f(i);
  while (x >= n) x = f(x);
  return x;
}

template <class T>
static void check_randk_family(int64_t n, int64_t k) {
  using S = typename T::storage;
  const DType dt = std::is_same<T, F32>::value ? DType::kFloat32 : DType::kBFloat16;
  g_context = "randk n=" + std::to_string(n) + " k=" + std::to_string(k) +
              (dt == DType::kBFloat16 ? " bf16" : " f32");
  uint32_t keys[8];
  for (auto& kk : keys) kk = static_cast<uint32_t>(rng());
  std::vector<int64_t> want(k);
  for (int64_t i = 0; i < k; ++i) want[i] = static_cast<int64_t>(spec_perm(i, n, keys));
  for (int64_t i = 0; i < std::min<int64_t>(k, 100); ++i) {
    CHECK(randk_perm(i, n, keys) == static_cast<uint64_t>(want[i]));
  }
  std::sort(want.begin(), want.end());
  CHECK(std::adjacent_find(want.begin(), want.end()) == want.end());  // a permutation: distinct
  CHECK(want.front() >= 0 && want.back() < n);

  const auto x = make_input<T>(n, 0);
  const auto g = make_input<T>(n, 0);
  const float scale = static_cast<float>(n) / static_cast<float>(k), lr = 0.625f;
  std::vector<S> want_val(k), want14_val(k), want21_val(k);
  std::vector<S> want_err(n), want_st = x;
  for (int64_t i = 0; i < n; ++i)
    want_err[i] = T::round(T::load(x.data(), i) + lr * T::load(g.data(), i));
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = want[j];
    want_val[j] = T::round(T::load(x.data(), i) * scale);
    const float a = T::load(want_err.data(), i);
    const S c = T::round(a * scale);
    want14_val[j] = c;
    want_err[i] = T::round(a - T::load(&c, 0));
    const float si = T::load(x.data(), i);
    const S dd = T::round(T::load(g.data(), i) - si);
    const S c21 = T::round(T::load(&dd, 0) * scale);
    want21_val[j] = c21;
    want_st[i] = T::round(si + T::load(&c21, 0));
  }

  for (int threads = 1; threads <= 3; ++threads) {
    set_threads(threads);
    std::vector<int64_t> idx(k, -1);
    randk_indices(n, k, keys, idx.data());
    CHECK(idx == want);
    std::vector<S> val(k);
    randk_compress(x.data(), dt, n, k, keys, scale, idx.data(), val.data());
    CHECK(idx == want);
    CHECK(same_bits(val, want_val));
    std::vector<S> err = x;
    ef14_randk(g.data(), err.data(), dt, n, k, keys, lr, scale, idx.data(), val.data());
    CHECK(idx == want);
    CHECK(same_bits(val, want14_val));
    CHECK(same_bits(err, want_err));
    std::vector<S> st = x;
    ef21_randk(g.data(), st.data(), dt, n, k, keys, scale, idx.data(), val.data());
    CHECK(idx == want);
    CHECK(same_bits(val, want21_val));
    CHECK(same_bits(st, want_st));
  }
}

template <class T>
static void check_sparse(int64_t n, int64_t m, int64_t k) {
  using S = typename T::storage;
  const DType dt = std::is_same<T, F32>::value ? DType::kFloat32 : DType::kBFloat16;
  g_context = "sparse n=" + std::to_string(n) + " m=" + std::to_string(m) +
              " k=" + std::to_string(k) + (dt == DType::kBFloat16 ? " bf16" : " f32");
  const auto dense0 = make_input<T>(n, 0);
  const auto vals = make_input<T>(m * k, 0);
  std::vector<int64_t> idx(m * k);
  std::vector<int64_t> all(n);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t i = 0; i < m; ++i) {  // k distinct ascending indices per row
    std::shuffle(all.begin(), all.end(), rng);
    std::sort(all.begin(), all.begin() + k);
    std::copy(all.begin(), all.begin() + k, idx.begin() + i * k);
  }
  const float alpha = -0.75f;
  std::vector<float> acc(n);
  std::vector<char> hit(n, 0);
  for (int64_t j = 0; j < n; ++j) acc[j] = T::load(dense0.data(), j);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const int64_t j = idx[i * k + p];
      const float term = alpha * T::load(vals.data(), i * k + p);
      acc[j] = acc[j] + term;
      hit[j] = 1;
    }
  }
  std::vector<S> want = dense0;
  for (int64_t j = 0; j < n; ++j)
    if (hit[j]) want[j] = T::round(acc[j]);
  for (int threads = 1; threads <= 3; ++threads) {
    set_threads(threads);
    std::vector<S> dense = dense0;
    sparse_add_batched(dense.data(), dt, n, vals.data(), idx.data(), m, k, alpha);
    CHECK(same_bits(dense, want));
  }
}

static void check_bf16_rounding() {
  g_context = "bf16 rounding";
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  CHECK(f32_to_bf16(bits_f32(0x3f808000u)) == 0x3f80);  // tie, even kept
  CHECK(f32_to_bf16(bits_f32(0x3f818000u)) == 0x3f82);  // tie, odd rounds up
  CHECK(f32_to_bf16(bits_f32(0x3f808001u)) == 0x3f81);
  CHECK(f32_to_bf16(bits_f32(0x7f7fffffu)) == 0x7f80);  // overflows to inf
  CHECK(f32_to_bf16(bits_f32(0xff800000u)) == 0xff80);
  CHECK(f32_to_bf16(bits_f32(0x80000000u)) == 0x8000);
  CHECK(f32_to_bf16(bits_f32(0x7fc00000u)) == 0x7fc0);
  CHECK(f32_to_bf16(bits_f32(0xffc00001u)) == 0x7fc0);
  CHECK(f32_to_bf16(bits_f32(0x7f800001u)) == 0x7fc0);  // signalling NaN
  // Random values against round-to-nearest-even computed in double.
  for (int t = 0; t < 1000000; ++t) {
    const uint32_t u = static_cast<uint32_t>(rng());
    const float f = bits_f32(u);
    if (std::isnan(f) || std::isinf(f)) continue;
    const uint32_t lo = u & 0xffff0000u;
    const double dl = bits_f32(lo), dh = (u & 0x7fffffffu) >= 0x7f7f0000u
                                             ? std::copysign(std::ldexp(1.0, 128), f)
                                             : static_cast<double>(bits_f32(lo + 0x10000u));
    const double dist_lo = std::fabs(static_cast<double>(f) - dl);
    const double dist_hi = std::fabs(static_cast<double>(f) - dh);
    uint16_t want = static_cast<uint16_t>(lo >> 16);
    if (dist_hi < dist_lo || (dist_hi == dist_lo && (want & 1))) ++want;
    CHECK(f32_to_bf16(f) == want);
  }
}

// ---- MicroAdam ----------------------------------------------------------------------------------

struct MaTensor {
  DType dtype;
  int64_t n;
  std::vector<float> pf, gf;        // float32 storage (dtype kFloat32)
  std::vector<uint16_t> ph, gh;     // bf16 storage (dtype kBFloat16)
  std::vector<uint8_t> ef;          // [nb*D/2]
  std::vector<float> emin, escale;  // [nb*D/Q]
  std::vector<int16_t> idx;         // [m, nb*K]
  std::vector<uint16_t> val;        // [m, nb*K]
  float c1, c2;

  float p(int64_t i) const { return dtype == DType::kFloat32 ? pf[i] : bf16_to_f32(ph[i]); }
  float g(int64_t i) const { return dtype == DType::kFloat32 ? gf[i] : bf16_to_f32(gh[i]); }
  void set_p(int64_t i, float v) {
    if (dtype == DType::kFloat32) {
      pf[i] = v;
    } else {
      ph[i] = f32_to_bf16(v);
    }
  }
  bool same(const MaTensor& o) const {
    return same_bits(pf, o.pf) && ph == o.ph && ef == o.ef && same_bits(emin, o.emin) &&
           same_bits(escale, o.escale) && idx == o.idx && val == o.val;
  }
};

// One step on one tensor, transcribed from fedkern/reference/microadam.py.
static void brute_microadam(MaTensor& t, int64_t row, float decay, float eps,
                            const std::vector<float>& w1, const std::vector<float>& w2, int64_t D,
                            int64_t K, int64_t Q) {
  const int64_t m = static_cast<int64_t>(w1.size()), n = t.n, nb = (n + D - 1) / D;
  const int64_t total = nb * D, cols = nb * K;
  std::vector<float> a(total, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const int code = (t.ef[j / 2] >> (4 * (j % 2))) & 15;
    const float e = t.emin[j / Q] + static_cast<float>(code) * t.escale[j / Q];
    a[j] = t.g(j) + e;
  }
  std::vector<float> r = a;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t L = std::min(D, n - b * D), Kb = std::min(K, L);
    std::vector<int64_t> order(L);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int64_t i) { return f32_bits(a[b * D + i]) & 0x7fffffffu; };
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t x, int64_t y) { return key(x) > key(y); });
    order.resize(Kb);
    std::sort(order.begin(), order.end());
    for (int64_t s = 0; s < K; ++s) {
      const bool used = s < Kb;
      t.idx[row * cols + b * K + s] = used ? static_cast<int16_t>(order[s]) : int16_t{-1};
      t.val[row * cols + b * K + s] = used ? f32_to_bf16(a[b * D + order[s]]) : uint16_t{0};
      if (used) r[b * D + order[s]] = 0.0f;
    }
  }
  for (int64_t q = 0; q < total / Q; ++q) {
    float lo = 0.0f, hi = 0.0f;
    bool any = false, nan = false;
    for (int64_t j = q * Q; j < std::min((q + 1) * Q, n); ++j) {
      if (std::isnan(r[j])) nan = true;
      lo = any ? std::min(lo, r[j]) : r[j];
      hi = any ? std::max(hi, r[j]) : r[j];
      any = true;
    }
    if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
    const float scale = (hi - lo) / 15.0f;
    t.emin[q] = lo;
    t.escale[q] = scale;
    for (int64_t j = q * Q; j < (q + 1) * Q; ++j) {
      int code = 0;
      if (j < n && scale > 0.0f) {
        const float c = std::floor((r[j] - lo) / scale + 0.5f);
        code = std::isnan(c) ? 0 : static_cast<int>(std::min(std::max(c, 0.0f), 15.0f));
      }
      if (j % 2 == 0) {
        t.ef[j / 2] = static_cast<uint8_t>(code);
      } else {
        t.ef[j / 2] = static_cast<uint8_t>(t.ef[j / 2] | (code << 4));
      }
    }
  }
  std::vector<float> mom1(total, 0.0f), mom2(total, 0.0f);
  for (int64_t age = 0; age < m; ++age) {
    const int64_t rr = ((row - age) % m + m) % m;
    for (int64_t c = 0; c < cols; ++c) {
      const int16_t i = t.idx[rr * cols + c];
      if (i < 0) continue;
      const int64_t pos = (c / K) * D + i;
      const float v = bf16_to_f32(t.val[rr * cols + c]);
      mom1[pos] = mom1[pos] + w1[age] * v;
      mom2[pos] = mom2[pos] + w2[age] * (v * v);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const float step = (t.c1 * mom1[j]) / (std::sqrt(mom2[j]) * t.c2 + eps);
    t.set_p(j, t.p(j) * decay - step);
  }
}

static MaTensor make_ma_tensor(DType dt, int64_t n, int64_t D, int64_t K, int64_t Q, int64_t m) {
  MaTensor t;
  t.dtype = dt;
  t.n = n;
  const int64_t nb = (n + D - 1) / D;
  std::normal_distribution<float> nd;
  if (dt == DType::kFloat32) {
    t.pf.resize(n);
    t.gf.resize(n);
    for (auto& x : t.pf) x = nd(rng);
  } else {
    t.ph.resize(n);
    t.gh.resize(n);
    for (auto& x : t.ph) x = f32_to_bf16(nd(rng));
  }
  t.ef.assign(nb * D / 2, 0);
  t.emin.assign(nb * D / Q, 0.0f);
  t.escale.assign(nb * D / Q, 0.0f);
  t.idx.assign(m * nb * K, -1);
  t.val.assign(m * nb * K, 0);
  t.c1 = 1e-3f * static_cast<float>(1 + rng() % 4);
  t.c2 = 1.0f + 0.25f * static_cast<float>(rng() % 4);
  return t;
}

// New gradients: mode 0 normal, 1 heavy ties (small integers), 2 all equal, 3 with inf and NaN.
static void fill_grad(MaTensor& t, int mode) {
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < t.n; ++i) {
    float v = nd(rng);
    if (mode == 1) v = static_cast<float>(static_cast<int>(rng() % 7) - 3) * 0.5f;
    if (mode == 2) v = 0.75f;
    if (mode == 3 && rng() % 50 == 0) {
      v = rng() % 2 ? std::numeric_limits<float>::quiet_NaN()
                    : -std::numeric_limits<float>::infinity();
    }
    if (t.dtype == DType::kFloat32) {
      t.gf[i] = v;
    } else {
      t.gh[i] = f32_to_bf16(v);
    }
  }
}

static void check_microadam(int64_t D, int64_t K, int64_t Q, int64_t m, float decay, int mode) {
  g_context = "microadam D=" + std::to_string(D) + " K=" + std::to_string(K) +
              " Q=" + std::to_string(Q) + " m=" + std::to_string(m) +
              " decay=" + std::to_string(decay) + " mode=" + std::to_string(mode);
  const int64_t sizes[] = {1, 7, D - 1, D, 2 * D + 5, 2 * D + K / 2 + 1, 5 * D + 3};
  std::vector<MaTensor> want;
  int which = 0;
  for (int64_t n : sizes) {
    want.push_back(make_ma_tensor(which++ % 2 ? DType::kBFloat16 : DType::kFloat32, n, D, K, Q, m));
  }
  std::vector<std::vector<MaTensor>> got(3, want);  // one copy per thread count
  const float eps = 1e-8f;
  std::vector<float> w1(m), w2(m);
  for (int64_t a = 0; a < m; ++a) {
    w1[a] = 0.1f * std::pow(0.9f, static_cast<float>(a));
    w2[a] = 0.001f * std::pow(0.999f, static_cast<float>(a));
  }
  for (int step = 0; step < 4; ++step) {
    const int64_t row = step % m;
    for (auto& t : want) fill_grad(t, step == 3 ? mode : 0);
    for (int th = 0; th < 3; ++th) {
      for (size_t i = 0; i < want.size(); ++i) {
        got[th][i].gf = want[i].gf;
        got[th][i].gh = want[i].gh;
      }
    }
    for (auto& t : want) brute_microadam(t, row, decay, eps, w1, w2, D, K, Q);
    const MicroAdamConfig cfg{decay, eps, w1.data(), w2.data(), m, D, K, Q};
    for (int th = 0; th < 3; ++th) {
      set_threads(th + 1);
      std::vector<MicroAdamTensor> ts;
      for (auto& t : got[th]) {
        void* p = t.dtype == DType::kFloat32 ? static_cast<void*>(t.pf.data())
                                             : static_cast<void*>(t.ph.data());
        const void* g = t.dtype == DType::kFloat32 ? static_cast<const void*>(t.gf.data())
                                                   : static_cast<const void*>(t.gh.data());
        ts.push_back(MicroAdamTensor{p, g, t.dtype, t.n, t.ef.data(), t.emin.data(),
                                     t.escale.data(), t.idx.data(), t.val.data(), row, t.c1, t.c2});
      }
      microadam_step(ts.data(), static_cast<int64_t>(ts.size()), cfg);
      for (size_t i = 0; i < want.size(); ++i) CHECK(got[th][i].same(want[i]));
    }
  }
}

static void run_microadam() {
  for (int64_t D : {int64_t{64}, int64_t{256}}) {
    for (int64_t K : {int64_t{1}, int64_t{5}, int64_t{41}, D}) {
      if (K > D) continue;
      for (int64_t Q : {int64_t{2}, int64_t{16}, D}) {
        for (int64_t m : {int64_t{1}, int64_t{3}}) {
          for (float decay : {1.0f, 0.99f}) {
            for (int mode = 0; mode <= 3; ++mode) check_microadam(D, K, Q, m, decay, mode);
          }
        }
      }
    }
  }
  check_microadam(4096, 41, 256, 10, 0.99999f, 1);
}

// ---- robust aggregation ----------------------------------------------------------------------

// The spec's order: by value, NaN above everything, -0 == +0; std::stable_sort keeps row order.
static bool robust_less(float a, float b) {
  if (std::isnan(a)) return false;
  if (std::isnan(b)) return true;
  return a < b;
}

template <class T>
static void check_robust(int64_t n, int64_t d, int mode) {
  using S = typename T::storage;
  const DType dt = std::is_same<T, F32>::value ? DType::kFloat32 : DType::kBFloat16;
  g_context = "robust n=" + std::to_string(n) + " d=" + std::to_string(d) +
              " mode=" + std::to_string(mode) + (dt == DType::kBFloat16 ? " bf16" : " f32");
  std::vector<S> x;
  if (mode == 5) {  // signed zeros with a few NaNs: the rank's row decides the sign
    x.resize(n * d);
    for (auto& v : x) {
      const uint64_t r = rng() % 16;
      v = T::round(r == 0 ? std::numeric_limits<float>::quiet_NaN() : (r < 8 ? 0.0f : -0.0f));
    }
  } else {
    x = make_input<T>(n * d, mode);
  }
  // rank -> row per column, by a stable sort.
  std::vector<int64_t> order(n * d);
  for (int64_t j = 0; j < d; ++j) {
    std::vector<int64_t> o(n);
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int64_t a, int64_t b) {
      return robust_less(T::load(x.data(), a * d + j), T::load(x.data(), b * d + j));
    });
    for (int64_t r = 0; r < n; ++r) order[r * d + j] = o[r];
  }
  std::vector<S> want_med(d);
  for (int64_t j = 0; j < d; ++j) {
    if (n % 2) {
      want_med[j] = x[order[(n - 1) / 2 * d + j] * d + j];
    } else {
      const float lo = T::load(x.data(), order[(n / 2 - 1) * d + j] * d + j);
      const float hi = T::load(x.data(), order[n / 2 * d + j] * d + j);
      want_med[j] = T::round((lo + hi) * 0.5f);
    }
  }
  std::vector<int64_t> fs{0, 1, n / 2 - 1, (n - 1) / 2};
  std::vector<std::vector<S>> want_trim;
  for (int64_t f : fs) {
    std::vector<S> w(d);
    if (f >= 0 && 2 * f < n) {
      for (int64_t j = 0; j < d; ++j) {
        std::vector<char> in(n, 0);
        for (int64_t r = f; r <= n - f - 1; ++r) in[order[r * d + j]] = 1;
        float s = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          if (in[i]) s = s + T::load(x.data(), i * d + j);
        }
        w[j] = T::round(s / static_cast<float>(n - 2 * f));
      }
    }
    want_trim.push_back(w);
  }
  for (int threads = 1; threads <= 2; ++threads) {
    for (bool baseline : {false, true}) {
      set_threads(threads);
      detail::force_baseline() = baseline;
      std::vector<S> out(d);
      coordinate_median(x.data(), dt, n, d, out.data());
      CHECK(same_bits(out, want_med));
      for (size_t q = 0; q < fs.size(); ++q) {
        const int64_t f = fs[q];
        if (f < 0 || 2 * f >= n) continue;
        std::fill(out.begin(), out.end(), S{});
        trimmed_mean(x.data(), dt, n, d, f, out.data());
        CHECK(same_bits(out, want_trim[q]));
      }
    }
  }
  detail::force_baseline() = false;
}

static void run_robust() {
  for (int64_t n :
       {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{16}, int64_t{17}, int64_t{64}, int64_t{255}}) {
    for (int64_t d : {int64_t{1}, int64_t{7}, int64_t{100}, int64_t{1000}}) {
      for (int mode = 0; mode <= 5; ++mode) {
        check_robust<F32>(n, d, mode);
        check_robust<BF16>(n, d, mode);
      }
    }
  }
  // Beyond the sorting network: nth_element per column.
  for (int64_t n : {int64_t{1025}, int64_t{1300}}) {
    for (int mode : {0, 1, 5}) {
      check_robust<F32>(n, 37, mode);
      check_robust<BF16>(n, 37, mode);
    }
  }
}

static void run_all(bool big) {
  const int64_t sizes[] = {1, 2, 7, 64, 1000, 4097, 100003};
  for (int64_t n : sizes) {
    for (int mode = 0; mode <= 4; ++mode) {
      for (int64_t k : {int64_t{1}, n / 3 + 1, n - 1, n}) {
        if (k < 1 || k > n) continue;
        check_topk_family<F32>(n, k, mode);
        check_topk_family<BF16>(n, k, mode);
      }
    }
  }
  // Beyond the candidate cap (2^18): crowded bins take the refining radix levels.
  for (int mode = 1; mode <= 4; ++mode) {
    for (int64_t k : {int64_t{1}, int64_t{777}, int64_t{300000}}) {
      if (!big && k != 777) continue;
      check_topk_family<F32>(400000, k, mode);
      check_topk_family<BF16>(400000, k, mode);
    }
  }
  for (int64_t n : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{5}, int64_t{17}, int64_t{1000},
                    int64_t{65536}, int64_t{100003}, int64_t{3000000}}) {
    if (!big && n > 100003) continue;
    for (int64_t k : {int64_t{1}, n / 100 + 1, n / 7 + 1, n}) {
      if (k > n) continue;
      check_randk_family<F32>(n, k);
      check_randk_family<BF16>(n, k);
    }
  }
  // Big n: the Feistel network on 2h = 34 bits, sparse case (radix sort on 3 digits).
  {
    g_context = "randk n=2^33+5";
    uint32_t keys[8] = {1, 2, 3, 4, 5, 6, 7, 0xffffffffu};
    const int64_t n = (int64_t{1} << 33) + 5, k = 20000;
    std::vector<int64_t> want(k), idx(k);
    for (int64_t i = 0; i < k; ++i) want[i] = static_cast<int64_t>(spec_perm(i, n, keys));
    std::sort(want.begin(), want.end());
    for (int threads = 1; threads <= 3; ++threads) {
      set_threads(threads);
      randk_indices(n, k, keys, idx.data());
      CHECK(idx == want);
    }
  }
  for (int64_t m : {int64_t{1}, int64_t{3}, int64_t{16}}) {
    for (int64_t n : {int64_t{1}, int64_t{10}, int64_t{5000}, int64_t{300000}}) {
      for (int64_t k : {int64_t{1}, n / 2 + 1, n}) {
        if (k > n) continue;
        check_sparse<F32>(n, m, k);
        check_sparse<BF16>(n, m, k);
      }
    }
  }
}

int main() {
  check_bf16_rounding();
  run_microadam();
  run_robust();
  run_all(true);  // tuned blocking: small inputs run serially, large ones on every thread
  // Tiny blocks (7 items, up to 5 per call) on 1..3 threads: the multi-block paths (per-block
  // histograms and offsets, candidate placement, tie hand-out, radix scatter, sparse chunks and
  // cursors) on inputs small enough to check against brute force.
  detail::blocking_override() = detail::BlockingOverride{7, 5};
  run_all(false);
  run_microadam();
  run_robust();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("fedkern_core_tests: all checks passed\n");
  return 0;
}
