// csrc/cpu/clients.cpp -- batched local training, per-row gradients, Scaffnew sync, weighted sum
// (fedkern/clients.h).
//
// local_steps: the cohort rows are handed out to the threads dynamically (one row = one client's
// K steps; rows are independent, so the thread count never changes a result). Per row, x is kept
// as C zero-padded blocks of dp = ceil(d / 8) * 8 floats, and the client's samples are packed once
// into a thread-local buffer of zero-padded rows (20 KB for 50 x 101), which stays in L1/L2 over
// the K steps; a client larger than the buffer (kCacheFloats) is packed panel by panel for every
// batch instead (the same sums in the same order, so the same bits). With the padding, every
// vector loop runs over whole 8-float chunks. Within a batch the samples go eight at a time:
//   1. the eight dot products share each load of x (one 8-lane accumulator per sample), and the
//      eight lane trees are taken at once by a transposing reduction (vhaddps-style shuffles);
//   2. the eight gradient coefficients are computed lane-wise (exp, sigmoid / softmax in vectors);
//   3. the eight scaled rows are added to the gradient sum in batch order in one sweep over the
//      columns (per column the same sequence of fp32 adds as one sample at a time).
// x does not change within a batch, so this is exactly "z with the current x, then one update per
// batch". The multinomial kind does 1 and 3 per class (row c of W against the block).
// sgd / rr: the permutation of a step is evaluated for all its indices at once
// (randk_perm_range of randk.h, batched over values).
//
// client_grads: the same row kernels for one gradient per row (no update): the batch's sample
// rows are packed panel by panel (only the batch, not the client), summed as above and divided
// exactly as the local step does, so a local step equals x - gamma * G bit for bit.
//
// scaffnew_sync / weighted_sum: the columns are cut into tiles of T columns (c * T elements sized
// to stay in L2); per tile, the column sums run over the rows in row order (each row segment read
// contiguously), then the updates of the tile follow while it is still in cache. Tiles are handed
// out to the threads dynamically; every column is summed in row order whatever the tiling.
//
// Vector code: GCC/Clang vector extensions (8 x fp32) and loops the compilers vectorise; the hot
// functions are compiled for AVX2 (chosen at run time) and for the baseline ISA. Only lane-wise
// IEEE add/sub/mul/div/sqrt, compares, conversions and integer bit operations (exp is computed
// here, not by libm): identical bits in both builds.
#include "fedkern/clients.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "fedkern/randk.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_CLIENTS_AVX2 1
#define FEDKERN_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define FEDKERN_CLIENTS_AVX2 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The 8-float vector values below live in always-inlined internal functions; the note that an
// AVX vector argument would change the ABI of the (baseline) functions is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fedkern {
namespace {

constexpr int kLanes = 8;              // fp32 lanes (one AVX2 register); samples per block
constexpr int64_t kMinWork = 1 << 17;  // multiply-adds per thread at least
constexpr int64_t kCacheFloats = int64_t{1} << 19;  // padded sample rows kept per thread (2 MiB)
constexpr int64_t kSlabBytes = 512 * 1024;          // sync / weighted sum: c * T elements
constexpr int64_t kMinTile = 64, kMaxTile = 4096;

// ---- 8-lane fp32 vectors --------------------------------------------------------------------
// GCC/Clang vector extensions: one ymm register in the AVX2 build, two xmm in the baseline one
// (the compilers' own SLP vectorisation of lane arrays is poor here). Elsewhere (or with
// -DFEDKERN_CLIENTS_NO_VECTOR_EXT) a plain struct with the same lane-wise semantics.
// Every operation is lane-wise IEEE fp32 (or an integer bit operation): the same bits in both.
#if defined(__GNUC__) && !defined(FEDKERN_CLIENTS_NO_VECTOR_EXT)
typedef float V8 __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));
FEDKERN_INLINE V8 ld8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FEDKERN_INLINE void st8(float* p, const V8& v) { std::memcpy(p, &v, sizeof v); }
FEDKERN_INLINE V8 splat(float s) { return V8{s, s, s, s, s, s, s, s}; }
FEDKERN_INLINE float lane(const V8& v, int q) { return v[q]; }
FEDKERN_INLINE V8 select(const V8i& m, const V8& a,
                         const V8& b) {  // m lanes all-ones / zero: a / b
  return reinterpret_cast<V8>((m & reinterpret_cast<V8i>(a)) | (~m & reinterpret_cast<V8i>(b)));
}
FEDKERN_INLINE V8 abs8(const V8& v) {
  return reinterpret_cast<V8>(reinterpret_cast<V8i>(v) & 0x7fffffff);
}
#if defined(__clang__)
#define FEDKERN_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FEDKERN_SHUF(a, b, ...) __builtin_shuffle(a, b, V8i{__VA_ARGS__})
#endif
// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (vhaddps).
FEDKERN_INLINE V8 hadd(const V8& a, const V8& b) {
  return FEDKERN_SHUF(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         FEDKERN_SHUF(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// Lane q of the result = lane tree of a[q] (((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))).
FEDKERN_INLINE V8 tree8(const V8* a) {
  const V8 p = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
  const V8 q = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return FEDKERN_SHUF(p, q, 0, 1, 2, 3, 8, 9, 10, 11) +
         FEDKERN_SHUF(p, q, 4, 5, 6, 7, 12, 13, 14, 15);
}
#else
struct V8 {
  float v[8];
  float& operator[](int q) { return v[q]; }
  float operator[](int q) const { return v[q]; }
};
struct V8i {
  int32_t v[8];
};
#define FEDKERN_V8_OP(op)                                  \
  inline V8 operator op(V8 a, V8 b) {                      \
    for (int q = 0; q < 8; ++q) a.v[q] = a.v[q] op b.v[q]; \
    return a;                                              \
  }
FEDKERN_V8_OP(+)
FEDKERN_V8_OP(-)
FEDKERN_V8_OP(*)
FEDKERN_V8_OP(/)
#undef FEDKERN_V8_OP
inline V8i operator<(V8 a, V8 b) {
  V8i m;
  for (int q = 0; q < 8; ++q) m.v[q] = a.v[q] < b.v[q] ? -1 : 0;
  return m;
}
inline V8i operator>=(V8 a, V8 b) {
  V8i m;
  for (int q = 0; q < 8; ++q) m.v[q] = a.v[q] >= b.v[q] ? -1 : 0;
  return m;
}
inline V8i operator==(V8 a, V8 b) {
  V8i m;
  for (int q = 0; q < 8; ++q) m.v[q] = a.v[q] == b.v[q] ? -1 : 0;
  return m;
}
inline V8 ld8(const float* p) {
  V8 v;
  std::memcpy(v.v, p, sizeof v.v);
  return v;
}
inline void st8(float* p, V8 v) { std::memcpy(p, v.v, sizeof v.v); }
inline V8 splat(float s) { return V8{{s, s, s, s, s, s, s, s}}; }
inline float lane(V8 v, int q) { return v.v[q]; }
inline V8 select(V8i m, V8 a, V8 b) {
  for (int q = 0; q < 8; ++q) a.v[q] = m.v[q] ? a.v[q] : b.v[q];
  return a;
}
inline V8 abs8(V8 v) {
  for (int q = 0; q < 8; ++q) v.v[q] = std::fabs(v.v[q]);
  return v;
}
inline V8 tree8(const V8* a) {
  V8 r;
  for (int q = 0; q < 8; ++q) {
    const float* l = a[q].v;
    r.v[q] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
  return r;
}
#endif

// exp(x) for x <= 0 (and NaN), lane-wise, fp32 (Cephes expf): n = round(x log2 e) by the 1.5 * 2^23
// trick, r = x - n ln2 (ln2 in two parts), e^r by a degree-7 polynomial, times 2^n built in the
// exponent bits; x < -87.3 gives 0 (the exact value is below 2^-126). About 1 ulp.
FEDKERN_INLINE V8 exp_nonpos(const V8& x) {
  const V8 lo = splat(-87.3f), magic = splat(12582912.0f);
  const V8i under = x < lo;
  const V8 xc = select(under, lo, x);
  const V8 t = xc * splat(1.44269504088896341f) + magic;
  const V8 n = t - magic;
  V8 r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  V8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const V8 e = (p * (r * r) + r) + splat(1.0f);
#if defined(__GNUC__) && !defined(FEDKERN_CLIENTS_NO_VECTOR_EXT)
  const V8i ni = reinterpret_cast<V8i>(t) - reinterpret_cast<V8i>(magic);
  const V8 scale = reinterpret_cast<V8>((ni + 127) << 23);
#else
  V8 scale;
  for (int q = 0; q < 8; ++q) {
    int32_t tb, mb;
    std::memcpy(&tb, &t.v[q], 4);
    std::memcpy(&mb, &magic.v[q], 4);
    const int32_t s = (tb - mb + 127) * (1 << 23);
    std::memcpy(&scale.v[q], &s, 4);
  }
#endif
  return select(under, splat(0.0f), e * scale);
}

// ---- minibatch permutations ------------------------------------------------------------------
// ---- the local steps ----------------------------------------------------------------------

struct Job {
  float* X;
  int64_t d, dp, p, C, K, b, cache_rows;
  const int64_t* clients;
  const float* A;
  const float* y;
  const int64_t* offsets;
  ModelKind kind;
  LocalMode mode;
  float gamma, l2, mu;
  double clip;
  const float* H;
  const int64_t* keys;
  const float* anchor;
};

// The N (<= 8) rows r[q] (dp floats, zero-padded) against x: lane q = a_q . x (lane tree).
template <int N>
FEDKERN_INLINE V8 dot_block(const float* const* r, const float* __restrict x, int64_t dp) {
  V8 acc[kLanes];
  for (int q = 0; q < kLanes; ++q) acc[q] = splat(0.0f);
  for (int64_t k = 0; k < dp; k += kLanes) {
    const V8 xv = ld8(x + k);
    for (int q = 0; q < N; ++q) acc[q] = acc[q] + ld8(r[q] + k) * xv;
  }
  return tree8(acc);
}

// acc[k] += coef_0 * r[0][k]; ...; acc[k] += coef_{N-1} * r[N-1][k] (in that order), k < dp.
template <int N>
FEDKERN_INLINE void axpy_block(float* __restrict acc, const float* const* r, const V8& coef,
                               int64_t dp) {
  V8 cf[N];
  for (int q = 0; q < N; ++q) cf[q] = splat(lane(coef, q));
  for (int64_t k = 0; k < dp; k += kLanes) {
    V8 s = ld8(acc + k);
    for (int q = 0; q < N; ++q) s = s + cf[q] * ld8(r[q] + k);
    st8(acc + k, s);
  }
}

// Adds the gradients of the N samples rows[0..N) of `base` (stride dp; labels yb) to acc [C*dp].
// zc: 8 * C floats of scratch (multinomial: lane q of vector c is sample q's z_c, then e^(z_c -
// max)).
template <int N>
FEDKERN_INLINE void block_grad(const Job& j, const float* base, const float* yb,
                               const int64_t* rows, const float* xs, float* acc, float* zc) {
  const float* r[N];
  V8 yv = splat(0.0f);
  for (int q = 0; q < N; ++q) {
    r[q] = base + rows[q] * j.dp;
    yv[q] = yb[rows[q]];
  }
  if (j.kind != ModelKind::kMultinomial) {
    const V8 z = dot_block<N>(r, xs, j.dp);
    V8 coef;
    if (j.kind == ModelKind::kLogistic) {
      // coef = -s sigmoid(-s z), s = 2y - 1; sigmoid(t) = 1/(1+e) (t >= 0) or e/(1+e), e = e^-|t|.
      const V8 s = splat(2.0f) * yv - splat(1.0f);
      const V8 t = splat(0.0f) - s * z;
      const V8 e = exp_nonpos(splat(0.0f) - abs8(t));
      const V8 one = splat(1.0f);
      const V8 sig = select(t >= splat(0.0f), one / (one + e), e / (one + e));
      coef = (splat(0.0f) - s) * sig;
    } else {
      coef = z - yv;
    }
    axpy_block<N>(acc, r, coef, j.dp);
    return;
  }
  const int64_t C = j.C;
  for (int64_t c = 0; c < C; ++c) st8(zc + c * kLanes, dot_block<N>(r, xs + c * j.dp, j.dp));
  V8 mx = ld8(zc);
  for (int64_t c = 1; c < C; ++c) {
    const V8 z = ld8(zc + c * kLanes);
    mx = select(mx < z, z, mx);
  }
  V8 S = splat(0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const V8 e = exp_nonpos(ld8(zc + c * kLanes) - mx);
    st8(zc + c * kLanes, e);
    S = S + e;
  }
  for (int64_t c = 0; c < C; ++c) {
    const V8 hit = select(yv == splat(static_cast<float>(c)), splat(1.0f), splat(0.0f));
    axpy_block<N>(acc + c * j.dp, r, ld8(zc + c * kLanes) / S - hit, j.dp);
  }
}

// Adds the gradients of samples rows[0..n) of `base` to acc, eight at a time, in order.
FEDKERN_INLINE void add_grads(const Job& j, const float* base, const float* yb, const int64_t* rows,
                              int64_t n, const float* xs, float* acc, float* zc) {
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes) block_grad<8>(j, base, yb, rows + s, xs, acc, zc);
  switch (n - s) {
    case 7:
      block_grad<7>(j, base, yb, rows + s, xs, acc, zc);
      break;
    case 6:
      block_grad<6>(j, base, yb, rows + s, xs, acc, zc);
      break;
    case 5:
      block_grad<5>(j, base, yb, rows + s, xs, acc, zc);
      break;
    case 4:
      block_grad<4>(j, base, yb, rows + s, xs, acc, zc);
      break;
    case 3:
      block_grad<3>(j, base, yb, rows + s, xs, acc, zc);
      break;
    case 2:
      block_grad<2>(j, base, yb, rows + s, xs, acc, zc);
      break;
    case 1:
      block_grad<1>(j, base, yb, rows + s, xs, acc, zc);
      break;
    default:
      break;
  }
}

// One step from the batch gradient sum acc (bs samples; bs = 0: no gradient part) on the padded x
// (class c at xs + c * dp); acc is overwritten with u. H and the anchor are unpadded [C * d].
FEDKERN_INLINE void apply_step(const Job& j, float* __restrict xs, float* __restrict acc,
                               int64_t bs, const float* __restrict h, const float* __restrict anc) {
  const int64_t d = j.d, dp = j.dp;
  const float l2 = j.l2, mu = j.mu, gamma = j.gamma, fb = static_cast<float>(bs);
  double sq[kLanes] = {};
  for (int64_t c = 0; c < j.C; ++c) {
    float* __restrict x = xs + c * dp;
    float* __restrict u = acc + c * dp;
    if (bs > 0) {
      for (int64_t k = 0; k < d; ++k) u[k] = u[k] / fb + l2 * x[k];
    } else {
      for (int64_t k = 0; k < d; ++k) u[k] = 0.0f + l2 * x[k];
    }
    if (mu != 0.0f) {
      const float* __restrict a = anc + c * d;
      for (int64_t k = 0; k < d; ++k) u[k] = u[k] + mu * (x[k] - a[k]);
    }
    if (h != nullptr) {
      const float* __restrict hc = h + c * d;
      for (int64_t k = 0; k < d; ++k) u[k] = u[k] - hc[k];
    }
    if (j.clip > 0.0) {
      // Lanes k % 8 within each class block, the classes in order into the same lanes.
      int64_t k = 0;
      for (; k + kLanes <= d; k += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double v = u[k + l];
          sq[l] = sq[l] + v * v;
        }
      }
      for (int l = 0; k + l < d; ++l) {
        const double v = u[k + l];
        sq[l] = sq[l] + v * v;
      }
    }
  }
  float scale = 1.0f;
  bool scaled = false;
  if (j.clip > 0.0) {
    const double nrm =
        std::sqrt(((sq[0] + sq[1]) + (sq[2] + sq[3])) + ((sq[4] + sq[5]) + (sq[6] + sq[7])));
    if (nrm > j.clip) {
      scale = static_cast<float>(j.clip / nrm);
      scaled = true;
    }
  }
  for (int64_t c = 0; c < j.C; ++c) {
    float* __restrict x = xs + c * dp;
    const float* __restrict u = acc + c * dp;
    if (scaled) {
      for (int64_t k = 0; k < d; ++k) x[k] = x[k] - gamma * (scale * u[k]);
    } else {
      for (int64_t k = 0; k < d; ++k) x[k] = x[k] - gamma * u[k];
    }
  }
}

struct Scratch {
  std::vector<float> xs, acc;  // C * dp: the padded x and the gradient sum
  std::vector<float> buf, yb;  // padded sample rows (cache_rows * dp) and their labels
  std::vector<int64_t> perm, iota;
  std::vector<float> zc;  // 8 * C
};

// Copies the rows src[s] (s < n; absolute rows of A) to buf, zero-padded to dp, and their labels.
FEDKERN_INLINE void pack_rows(const Job& j, const int64_t* src, int64_t first, int64_t n,
                              float* buf, float* yb) {
  for (int64_t s = 0; s < n; ++s) {
    const int64_t row = src ? src[s] : first + s;
    std::memcpy(buf + s * j.dp, j.A + row * j.d, static_cast<size_t>(j.d) * sizeof(float));
    for (int64_t k = j.d; k < j.dp; ++k) buf[s * j.dp + k] = 0.0f;
    yb[s] = j.y[row];
  }
}

// The K steps of cohort row r.
FEDKERN_INLINE void row_impl(const Job& j, int64_t r, Scratch& sc) {
  const int64_t i = j.clients[r];
  const int64_t off = j.offsets[i], m = j.offsets[i + 1] - off;
  const int64_t d = j.d, dp = j.dp;
  float* x = j.X + r * j.p;
  const float* h = j.H ? j.H + r * j.p : nullptr;
  const float* anc = j.anchor ? j.anchor + r * j.p : nullptr;
  float* xs = sc.xs.data();
  float* acc = sc.acc.data();
  float* buf = sc.buf.data();
  float* yb = sc.yb.data();
  int64_t* perm = sc.perm.data();
  const int64_t* iota = sc.iota.data();
  float* zc = sc.zc.data();
  for (int64_t c = 0; c < j.C; ++c) {
    std::memcpy(xs + c * dp, x + c * d, static_cast<size_t>(d) * sizeof(float));
    for (int64_t k = d; k < dp; ++k) xs[c * dp + k] = 0.0f;
  }
  // A client that fits is packed once and stays in cache over its K steps; a larger one is
  // packed panel by panel (cache_rows rows) for every batch.
  const bool cached = m <= j.cache_rows;
  if (cached) pack_rows(j, nullptr, off, m, buf, yb);
  for (int64_t t = 0; t < j.K; ++t) {
    const int64_t* order = nullptr;  // local sample indices in batch order; null: 0, 1, ..
    int64_t cnt = m, bsz = m;
    if (m > 0 && j.mode != LocalMode::kGD) {
      uint32_t keys[8];
      const int64_t* kp = j.keys + (r * j.K + t) * 8;
      for (int q = 0; q < 8; ++q) keys[q] = static_cast<uint32_t>(kp[q]);
      cnt = j.mode == LocalMode::kSGD ? std::min(j.b, m) : m;
      bsz = j.b;
      randk_perm_range(m, keys, 0, cnt, perm);
      order = perm;
    }
    if (m == 0) {
      apply_step(j, xs, acc, 0, h, anc);
      continue;
    }
    for (int64_t s0 = 0; s0 < cnt; s0 += bsz) {
      const int64_t bs = std::min(bsz, cnt - s0);
      std::fill(acc, acc + j.C * dp, 0.0f);
      if (cached) {
        add_grads(j, buf, yb, order ? order + s0 : iota + s0, bs, xs, acc, zc);
      } else {
        for (int64_t p0 = 0; p0 < bs; p0 += j.cache_rows) {
          const int64_t n = std::min(j.cache_rows, bs - p0);
          if (order) {
            int64_t* rows = perm + s0 + p0;  // to absolute rows (this batch only), then pack
            for (int64_t s = 0; s < n; ++s) rows[s] += off;
            pack_rows(j, rows, 0, n, buf, yb);
            for (int64_t s = 0; s < n; ++s) rows[s] -= off;
          } else {
            pack_rows(j, nullptr, off + s0 + p0, n, buf, yb);
          }
          add_grads(j, buf, yb, iota, n, xs, acc, zc);
        }
      }
      apply_step(j, xs, acc, bs, h, anc);
    }
  }
  for (int64_t c = 0; c < j.C; ++c) {
    std::memcpy(x + c * d, xs + c * dp, static_cast<size_t>(d) * sizeof(float));
  }
}

// One gradient of cohort row r into G (client_grads): the batch packed panel by panel (at most
// cache_rows rows at a time), the gradient sum and u = sum / |B| + l2 x exactly as in apply_step.
FEDKERN_INLINE void grad_row_impl(const Job& j, const int64_t* samples, int64_t s, float* G,
                                  int64_t r, Scratch& sc) {
  const int64_t i = j.clients[r];
  const int64_t off = j.offsets[i], m = j.offsets[i + 1] - off;
  const int64_t d = j.d, dp = j.dp;
  const float* x = j.X + r * j.p;
  float* xs = sc.xs.data();
  float* acc = sc.acc.data();
  int64_t* perm = sc.perm.data();
  for (int64_t c = 0; c < j.C; ++c) {
    std::memcpy(xs + c * dp, x + c * d, static_cast<size_t>(d) * sizeof(float));
    for (int64_t k = d; k < dp; ++k) xs[c * dp + k] = 0.0f;
  }
  int64_t cnt = 0;
  const int64_t* order = nullptr;  // local sample indices of the batch; null: 0, 1, .., m - 1
  if (j.mode == LocalMode::kSGD) {
    if (m > 0) {
      uint32_t keys[8];
      for (int q = 0; q < 8; ++q) keys[q] = static_cast<uint32_t>(j.keys[r * 8 + q]);
      cnt = std::min(j.b, m);
      randk_perm_range(m, keys, 0, cnt, perm);
    }
    order = perm;
  } else if (samples != nullptr) {
    for (int64_t q = 0; q < s; ++q) {
      const int64_t v = samples[r * s + q];
      if (v >= 0) perm[cnt++] = v;
    }
    order = perm;
  } else {
    cnt = m;
  }
  std::fill(acc, acc + j.C * dp, 0.0f);
  for (int64_t p0 = 0; p0 < cnt; p0 += j.cache_rows) {
    const int64_t n = std::min(j.cache_rows, cnt - p0);
    if (order) {
      int64_t* rows = perm + p0;  // to absolute rows (this panel only), then pack
      for (int64_t q = 0; q < n; ++q) rows[q] += off;
      pack_rows(j, rows, 0, n, sc.buf.data(), sc.yb.data());
    } else {
      pack_rows(j, nullptr, off + p0, n, sc.buf.data(), sc.yb.data());
    }
    add_grads(j, sc.buf.data(), sc.yb.data(), sc.iota.data(), n, xs, acc, sc.zc.data());
  }
  const float l2 = j.l2, fb = static_cast<float>(cnt);
  float* g = G + r * j.p;
  for (int64_t c = 0; c < j.C; ++c) {
    const float* __restrict xc = xs + c * dp;
    const float* __restrict u = acc + c * dp;
    float* __restrict gc = g + c * d;
    if (cnt > 0) {
      for (int64_t k = 0; k < d; ++k) gc[k] = u[k] / fb + l2 * xc[k];
    } else {
      for (int64_t k = 0; k < d; ++k) gc[k] = 0.0f + l2 * xc[k];
    }
  }
}

using GradFn = void (*)(const Job&, const int64_t*, int64_t, float*, int64_t, Scratch&);
void grad_base(const Job& j, const int64_t* samples, int64_t s, float* G, int64_t r, Scratch& sc) {
  grad_row_impl(j, samples, s, G, r, sc);
}
#if FEDKERN_CLIENTS_AVX2
FEDKERN_TARGET_AVX2 void grad_avx2(const Job& j, const int64_t* samples, int64_t s, float* G,
                                   int64_t r, Scratch& sc) {
  grad_row_impl(j, samples, s, G, r, sc);
}
#endif

using RowFn = void (*)(const Job&, int64_t, Scratch&);
void row_base(const Job& j, int64_t r, Scratch& sc) { row_impl(j, r, sc); }
#if FEDKERN_CLIENTS_AVX2
FEDKERN_TARGET_AVX2 void row_avx2(const Job& j, int64_t r, Scratch& sc) { row_impl(j, r, sc); }
#endif

// ---- scaffnew_sync / weighted_sum -------------------------------------------------------------

int64_t tile_cols(int64_t c, int64_t bytes_per_elem) {
  int64_t t = kMaxTile;
  while (t > kMinTile && c * t * bytes_per_elem > kSlabBytes) t /= 2;
  return t;
}

FEDKERN_INLINE void sync_impl(float* X, float* H, int64_t c, int64_t p, float coef, float* xbar,
                              int64_t k0, int64_t len, float* __restrict acc) {
  for (int64_t k = 0; k < len; ++k) acc[k] = 0.0f;
  for (int64_t r = 0; r < c; ++r) {
    const float* __restrict row = X + r * p + k0;
    for (int64_t k = 0; k < len; ++k) acc[k] = acc[k] + row[k];
  }
  const float fc = static_cast<float>(c);
  for (int64_t k = 0; k < len; ++k) {
    acc[k] = acc[k] / fc;
    xbar[k0 + k] = acc[k];
  }
  for (int64_t r = 0; r < c; ++r) {
    float* __restrict xr = X + r * p + k0;
    float* __restrict hr = H + r * p + k0;
    for (int64_t k = 0; k < len; ++k) {
      hr[k] = hr[k] + coef * (acc[k] - xr[k]);
      xr[k] = acc[k];
    }
  }
}

FEDKERN_INLINE void wsum_impl(const float* X, const double* w, int64_t c, int64_t p, float* out,
                              int64_t k0, int64_t len, double* __restrict acc) {
  for (int64_t k = 0; k < len; ++k) acc[k] = 0.0;
  for (int64_t r = 0; r < c; ++r) {
    const float* __restrict row = X + r * p + k0;
    const double wr = w[r];
    for (int64_t k = 0; k < len; ++k) acc[k] = acc[k] + wr * static_cast<double>(row[k]);
  }
  for (int64_t k = 0; k < len; ++k) out[k0 + k] = static_cast<float>(acc[k]);
}

using SyncFn = void (*)(float*, float*, int64_t, int64_t, float, float*, int64_t, int64_t, float*);
using WsumFn = void (*)(const float*, const double*, int64_t, int64_t, float*, int64_t, int64_t,
                        double*);
void sync_base(float* X, float* H, int64_t c, int64_t p, float coef, float* xbar, int64_t k0,
               int64_t len, float* acc) {
  sync_impl(X, H, c, p, coef, xbar, k0, len, acc);
}
void wsum_base(const float* X, const double* w, int64_t c, int64_t p, float* out, int64_t k0,
               int64_t len, double* acc) {
  wsum_impl(X, w, c, p, out, k0, len, acc);
}
#if FEDKERN_CLIENTS_AVX2
FEDKERN_TARGET_AVX2 void sync_avx2(float* X, float* H, int64_t c, int64_t p, float coef,
                                   float* xbar, int64_t k0, int64_t len, float* acc) {
  sync_impl(X, H, c, p, coef, xbar, k0, len, acc);
}
FEDKERN_TARGET_AVX2 void wsum_avx2(const float* X, const double* w, int64_t c, int64_t p,
                                   float* out, int64_t k0, int64_t len, double* acc) {
  wsum_impl(X, w, c, p, out, k0, len, acc);
}
#endif

// Runs fn(k0, len, scratch) over the column tiles of [0, p), tiles handed out dynamically.
template <class Acc, class Fn>
void over_tiles(int64_t c, int64_t p, Fn&& fn) {
  const int64_t tile = tile_cols(c, 2 * static_cast<int64_t>(sizeof(float))),
                ntiles = (p + tile - 1) / tile;
  const int nb = detail::num_blocks(ntiles, std::max<int64_t>(1, kMinWork / (c * tile)));
#pragma omp parallel num_threads(nb)
  {
    std::vector<Acc> acc(static_cast<size_t>(tile));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t k0 = t * tile;
      fn(k0, std::min(tile, p - k0), acc.data());
    }
  }
}

}  // namespace

void local_steps(float* X, int64_t c, int64_t d, const int64_t* clients, const float* A,
                 const float* y, const int64_t* offsets, ModelKind kind, int64_t C, int64_t K,
                 float gamma, float l2, const float* H, LocalMode mode, int64_t b,
                 const int64_t* keys, double clip, float mu, const float* anchor) {
  if (c <= 0 || K <= 0 || d <= 0) return;
  if (kind != ModelKind::kMultinomial) C = 1;
  const int64_t dp = (d + kLanes - 1) / kLanes * kLanes;
  // Work estimate (multiply-adds) for the thread count; the largest client for the scratch.
  int64_t work = 0, m_max = 0;
  for (int64_t r = 0; r < c; ++r) {
    const int64_t m = offsets[clients[r] + 1] - offsets[clients[r]];
    m_max = std::max(m_max, m);
    work += (2 * m + 1) * C * dp * K;
  }
  const int64_t cache_floats =
      detail::clients_cache_floats() > 0 ? detail::clients_cache_floats() : kCacheFloats;
  const int64_t cache_rows = std::max<int64_t>(kLanes, cache_floats / dp);
  Job j{X,       d,    dp,   C * d, C,  K,  b,    cache_rows, clients, A,     y,
        offsets, kind, mode, gamma, l2, mu, clip, H,          keys,    anchor};
  RowFn fn = row_base;
#if FEDKERN_CLIENTS_AVX2
  if (detail::use_avx2()) fn = row_avx2;
#endif
  const int nb = static_cast<int>(std::min<int64_t>(detail::num_blocks(work, kMinWork), c));
#pragma omp parallel num_threads(nb)
  {
    Scratch sc;
    const int64_t rows = std::max<int64_t>(std::min(m_max, cache_rows), 1);
    sc.xs.resize(static_cast<size_t>(C * dp));
    sc.acc.resize(static_cast<size_t>(C * dp));
    sc.buf.resize(static_cast<size_t>(rows * dp));
    sc.yb.resize(static_cast<size_t>(rows));
    sc.perm.resize(static_cast<size_t>(std::max<int64_t>(m_max, 1)));
    sc.iota.resize(static_cast<size_t>(std::max<int64_t>(m_max, 1)));
    for (size_t s = 0; s < sc.iota.size(); ++s) sc.iota[s] = static_cast<int64_t>(s);
    sc.zc.resize(static_cast<size_t>(kLanes * C));
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < c; ++r) fn(j, r, sc);
  }
}

void client_grads(const float* X, int64_t c, int64_t d, const int64_t* clients, const float* A,
                  const float* y, const int64_t* offsets, ModelKind kind, int64_t C, float l2,
                  GradMode mode, int64_t b, const int64_t* keys, const int64_t* samples, int64_t s,
                  float* G) {
  if (c <= 0 || d <= 0) return;
  if (kind != ModelKind::kMultinomial) C = 1;
  const int64_t dp = (d + kLanes - 1) / kLanes * kLanes;
  int64_t work = 0, m_max = 0;
  for (int64_t r = 0; r < c; ++r) {
    const int64_t m = offsets[clients[r] + 1] - offsets[clients[r]];
    const int64_t cnt = mode == GradMode::kFull ? m : mode == GradMode::kSGD ? std::min(b, m) : s;
    m_max = std::max(m_max, m);
    work += (2 * cnt + 1) * C * dp;
  }
  const int64_t idx_len = std::max<int64_t>({m_max, s, 1});
  const int64_t cache_floats =
      detail::clients_cache_floats() > 0 ? detail::clients_cache_floats() : kCacheFloats;
  const int64_t cache_rows = std::max<int64_t>(kLanes, cache_floats / dp);
  const LocalMode lm = mode == GradMode::kSGD ? LocalMode::kSGD : LocalMode::kGD;
  Job j{const_cast<float*>(X),
        d,
        dp,
        C * d,
        C,
        1,
        b,
        cache_rows,
        clients,
        A,
        y,
        offsets,
        kind,
        lm,
        0.0f,
        l2,
        0.0f,
        0.0,
        nullptr,
        keys,
        nullptr};
  const int64_t* smp = mode == GradMode::kSamples ? samples : nullptr;
  GradFn fn = grad_base;
#if FEDKERN_CLIENTS_AVX2
  if (detail::use_avx2()) fn = grad_avx2;
#endif
  const int nb = static_cast<int>(std::min<int64_t>(detail::num_blocks(work, kMinWork), c));
#pragma omp parallel num_threads(nb)
  {
    Scratch sc;
    const int64_t rows = std::max<int64_t>(std::min(idx_len, cache_rows), 1);
    sc.xs.resize(static_cast<size_t>(C * dp));
    sc.acc.resize(static_cast<size_t>(C * dp));
    sc.buf.resize(static_cast<size_t>(rows * dp));
    sc.yb.resize(static_cast<size_t>(rows));
    sc.perm.resize(static_cast<size_t>(idx_len));
    sc.iota.resize(static_cast<size_t>(rows));
    for (size_t q = 0; q < sc.iota.size(); ++q) sc.iota[q] = static_cast<int64_t>(q);
    sc.zc.resize(static_cast<size_t>(kLanes * C));
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < c; ++r) fn(j, smp, s, G, r, sc);
  }
}

void scaffnew_sync(float* X, float* H, int64_t c, int64_t p, float coef, float* xbar_out) {
  if (c <= 0 || p <= 0) return;
  SyncFn fn = sync_base;
#if FEDKERN_CLIENTS_AVX2
  if (detail::use_avx2()) fn = sync_avx2;
#endif
  over_tiles<float>(c, p, [&](int64_t k0, int64_t len, float* acc) {
    fn(X, H, c, p, coef, xbar_out, k0, len, acc);
  });
}

void weighted_sum(const float* X, const double* w, int64_t c, int64_t p, float* out) {
  if (p <= 0) return;
  if (c <= 0) {
    for (int64_t k = 0; k < p; ++k) out[k] = 0.0f;
    return;
  }
  WsumFn fn = wsum_base;
#if FEDKERN_CLIENTS_AVX2
  if (detail::use_avx2()) fn = wsum_avx2;
#endif
  over_tiles<double>(
      c, p, [&](int64_t k0, int64_t len, double* acc) { fn(X, w, c, p, out, k0, len, acc); });
}

}  // namespace fedkern
