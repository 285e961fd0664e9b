// csrc/cpu/microadam.cpp -- MicroAdam's fused step (see fedkern/microadam.h for the math), OpenMP.
//
// One block of D elements at a time, in a thread's scratch (kept between calls):
//   unpack   the 4-bit codes into bytes, then a = g + (ef_min + code * ef_scale) and its key, in
//            vectorisable loops;
//   select   a min-heap of K_b (key, -index) pairs packed into uint64 (larger = better): the first
//            K_b elements fill it, later ones enter only when their key beats the heap's worst
//            key (an equal key has a higher index, so it loses). Keys are tested 16 at a time
//            against that threshold, so almost all of the block is one vectorised compare;
//   window   the selected indices sorted ascending, written with their bf16 values to the row;
//   quantize a becomes the residual (selected entries +0); per bucket, min and max are taken on
//            order-preserving int32 images of the floats (vectorisable, unlike float min/max
//            without -ffast-math) with a separate NaN flag, then the codes: trunc(clamp(x, 0,
//            15.5)) equals clamp(floor(x), 0, 15) for every x (NaN -> 0) and needs no floorf;
//   update   mom1/mom2 accumulated in age order into D-sized scratch at the window positions only
//            (touched list + mark bytes, cleared afterwards), then p at those positions, plus a
//            dense p * decay pass when decay != 1 (the new values at window positions are
//            computed from the original p first and stored after the dense pass).
// Blocks of all tensors form one index range cut into one contiguous chunk per thread; every
// block's outputs are disjoint and depend on its inputs only, so results are thread-independent.
#include "fedkern/microadam.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <functional>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

namespace fedkern {
namespace {

// Fewer elements than this per thread: use fewer threads (waking one costs microseconds).
constexpr int64_t kMinElemsPerThread = int64_t{1} << 16;

struct Scratch {
  std::vector<float> a;              // D: a, then the residual r, then the original p
  std::vector<float> mom1, mom2;     // D, all zero between blocks
  std::vector<uint8_t> mark;         // D, all zero between blocks
  std::vector<int32_t> gmax, gwork;  // D: per-group maximum keys
  std::vector<uint64_t> cand, work;  // D: candidates (key, -index)
  std::vector<int32_t> sel;          // D
  std::vector<int32_t> touched;      // m*K: window positions of the block, each once
  std::vector<float> tm1, tm2, upd;  // m*K: their moments, then the update

  void ensure(int64_t D, int64_t K, int64_t m) {
    if (static_cast<int64_t>(a.size()) < D) {
      a.resize(D);
      mom1.resize(D, 0.0f);  // growing keeps the old (zero) entries and zeroes the new ones
      mom2.resize(D, 0.0f);
      mark.resize(D, 0);
      gmax.resize(D);
      gwork.resize(D);
      cand.resize(D);
      work.resize(D);
      sel.resize(D);
    }
    if (static_cast<int64_t>(touched.size()) < m * K) {
      touched.resize(m * K);
      tm1.resize(m * K);
      tm2.resize(m * K);
      upd.resize(m * K);
    }
  }
};

inline int32_t key_of(float v) { return static_cast<int32_t>(f32_bits(v) & 0x7fffffffu); }

inline uint64_t packed(int32_t key, int64_t j) {
  return (static_cast<uint64_t>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}

// 4-bit code of residual x: clamp(floor((x - lo) / scale + 0.5), 0, 15), NaN -> 0, for scale > 0.
// trunc(min(max(y, 0), 15.5)) equals it (the max maps NaN to 0) and vectorises without floorf.
inline int32_t quant_code(float x, float lo, float scale) {
  float y = (x - lo) / scale + 0.5f;
  y = y > 0.0f ? y : 0.0f;
  y = y < 15.5f ? y : 15.5f;
  return static_cast<int32_t>(y);
}

#ifdef __SSE2__
// quant_code of 4 residuals (maxps returns its second operand for NaN: NaN -> 0).
inline __m128i quant_code4(__m128 x, __m128 lo, __m128 scale) {
  __m128 y = _mm_add_ps(_mm_div_ps(_mm_sub_ps(x, lo), scale), _mm_set1_ps(0.5f));
  y = _mm_min_ps(_mm_max_ps(y, _mm_setzero_ps()), _mm_set1_ps(15.5f));
  return _mm_cvttps_epi32(y);
}

// out[0..16) = the packed codes of r[0..32): byte i = code(r[2i]) | code(r[2i + 1]) << 4.
inline void quant32(const float* r, float lo, float scale, uint8_t* out) {
  const __m128 vlo = _mm_set1_ps(lo), vsc = _mm_set1_ps(scale);
  __m128i q[4];
  for (int h = 0; h < 4; ++h) {
    const __m128 x0 = _mm_loadu_ps(r + 8 * h), x1 = _mm_loadu_ps(r + 8 * h + 4);
    const __m128i ev = quant_code4(_mm_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)), vlo, vsc);
    const __m128i od = quant_code4(_mm_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)), vlo, vsc);
    q[h] = _mm_or_si128(ev, _mm_slli_epi32(od, 4));
  }
  const __m128i w = _mm_packus_epi16(_mm_packs_epi32(q[0], q[1]), _mm_packs_epi32(q[2], q[3]));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), w);
}
#endif

// sel[0..Kb) = ascending indices of the Kb largest keys of a[0..L) (ties to the lower index),
// Kb < L. The block is cut into groups of S elements, S a power of two giving at least 2*Kb
// groups when L allows: the Kb-th largest exact group maximum T is the key of Kb distinct
// elements, so only elements with key >= T, all in groups whose maximum is >= T, can be selected.
// These candidates (about 1.4*Kb for random data; every element when all keys tie) are gathered in
// index order as packed (key, -index), whose order is the exact rank; the Kb-th largest packed
// value C then separates the selection, emitted in index order, i.e. ascending.
void select_block(const float* a, int64_t L, int64_t Kb, Scratch& s, int32_t* sel) {
  int64_t S = 1;
  while (S * 2 * 2 * Kb <= L) S *= 2;
  const int64_t G = (L + S - 1) / S;
  int32_t* gmax = s.gmax.data();
  for (int64_t gi = 0; gi < G; ++gi) {  // exact maximum key: as float max |a|, unless NaN
    const int64_t lo = gi * S, hi = std::min(L, lo + S);
    float mx = 0.0f;
    int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
    for (int64_t j = lo; j < hi; ++j) {
      const float v = std::fabs(a[j]);
      mx = v > mx ? v : mx;
      nan |= v != v;
    }
    int32_t k = key_of(mx);
    if (nan) {  // NaN keys differ by payload
      for (int64_t j = lo; j < hi; ++j) k = std::max(k, key_of(a[j]));
    }
    gmax[gi] = k;
  }
  int32_t* gwork = s.gwork.data();
  std::copy(gmax, gmax + G, gwork);
  std::nth_element(gwork, gwork + (Kb - 1), gwork + G, std::greater<int32_t>());
  const int32_t thr = gwork[Kb - 1];

  uint64_t* cand = s.cand.data();
  int64_t nc = 0;
  for (int64_t gi = 0; gi < G; ++gi) {
    if (gmax[gi] < thr) continue;
    const int64_t lo = gi * S, hi = std::min(L, lo + S);
    int64_t j = lo;
    for (; j + 16 <= hi; j += 16) {  // candidates are rare: test 16 keys at once (vectorised)
      int any = 0;
      for (int64_t u = j; u < j + 16; ++u) any |= key_of(a[u]) >= thr;
      if (!any) continue;
      for (int64_t u = j; u < j + 16; ++u) {
        if (key_of(a[u]) >= thr) cand[nc++] = packed(key_of(a[u]), u);
      }
    }
    for (; j < hi; ++j) {
      if (key_of(a[j]) >= thr) cand[nc++] = packed(key_of(a[j]), j);
    }
  }
  uint64_t* work = s.work.data();
  std::copy(cand, cand + nc, work);
  std::nth_element(work, work + (Kb - 1), work + nc, std::greater<uint64_t>());
  const uint64_t cut = work[Kb - 1];
  int64_t o = 0;
  for (int64_t j = 0; j < nc; ++j) {
    if (cand[j] >= cut) sel[o++] = static_cast<int32_t>(0xffffffffu - (cand[j] & 0xffffffffu));
  }
}

// upd[j] = (c1 * m1[j]) / (sqrt(m2[j]) * c2 + eps) for j < n (IEEE sqrt and division).
void adam_update(const float* m1, const float* m2, int64_t n, float c1, float c2, float eps,
                 float* upd) {
  int64_t j = 0;
#ifdef __SSE2__
  const __m128 vc1 = _mm_set1_ps(c1), vc2 = _mm_set1_ps(c2), veps = _mm_set1_ps(eps);
  for (; j + 4 <= n; j += 4) {
    const __m128 num = _mm_mul_ps(vc1, _mm_loadu_ps(m1 + j));
    const __m128 den = _mm_add_ps(_mm_mul_ps(_mm_sqrt_ps(_mm_loadu_ps(m2 + j)), vc2), veps);
    _mm_storeu_ps(upd + j, _mm_div_ps(num, den));
  }
#endif
  for (; j < n; ++j) upd[j] = (c1 * m1[j]) / (std::sqrt(m2[j]) * c2 + eps);
}

// Steps 1-5 for block b of tensor t.
template <class T>
void step_block(const MicroAdamTensor& t, int64_t b, const MicroAdamConfig& cfg, Scratch& s) {
  using St = typename T::storage;
  const int64_t D = cfg.D, K = cfg.K, Q = cfg.Q, m = cfg.m;
  const int64_t base = b * D;
  const int64_t L = std::min(D, t.n - base);
  const int64_t Kb = std::min(K, L);
  const int64_t nbK = (t.n + D - 1) / D * K;
  const St* g = static_cast<const St*>(t.g) + base;
  St* p = static_cast<St*>(t.p) + base;
  uint8_t* ef = t.ef + base / 2;
  float* ef_min = t.ef_min + base / Q;
  float* ef_scale = t.ef_scale + base / Q;
  float* a = s.a.data();

  // 1. a = g + dequant(ef), two elements (one byte of codes) at a time.
  const bool sparse_p = cfg.decay == 1.0f;
  const int64_t rest = t.n - base;  // elements of the tensor from this block on
  for (int64_t qs = 0; qs < L; qs += Q) {
    const int64_t cnt = std::min(Q, L - qs);
    // Software prefetch: hardware streams stop at 4 KiB pages, i.e. every few hundred elements.
    // The next block's gradient (same tensor), and p of this block when only a few positions of
    // it will be read (decay == 1) or of the next block for the dense pass.
    for (int64_t j = 0; j < cnt; j += 64 / sizeof(St)) {
      if (qs + j + D < rest) __builtin_prefetch(g + qs + j + D, 0, 2);
      if (sparse_p) {
        __builtin_prefetch(p + qs + j, 1, 2);
      } else if (qs + j + D < rest) {
        __builtin_prefetch(p + qs + j + D, 1, 2);
      }
    }
    const float lo = ef_min[qs / Q], sc = ef_scale[qs / Q];
    const St* gq = g + qs;
    const uint8_t* eq = ef + qs / 2;
    float* aq = a + qs;
    const int64_t pairs = cnt / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      const int32_t byte = eq[i];
      const float e0 = lo + static_cast<float>(byte & 15) * sc;
      const float e1 = lo + static_cast<float>(byte >> 4) * sc;
      aq[2 * i] = T::load(gq, 2 * i) + e0;
      aq[2 * i + 1] = T::load(gq, 2 * i + 1) + e1;
    }
    if (cnt & 1) {
      const float e0 = lo + static_cast<float>(eq[pairs] & 15) * sc;
      aq[cnt - 1] = T::load(gq, cnt - 1) + e0;
    }
  }

  // 2. top-K_b of |a| by key, ties to the lower index; window row `row`; the residual.
  int32_t* sel = s.sel.data();
  if (Kb == L) {
    for (int64_t j = 0; j < L; ++j) sel[j] = static_cast<int32_t>(j);
  } else {
    select_block(a, L, Kb, s, sel);
  }
  int16_t* irow = t.idx + t.row * nbK + b * K;
  uint16_t* vrow = t.val + t.row * nbK + b * K;
  for (int64_t j = 0; j < Kb; ++j) {
    irow[j] = static_cast<int16_t>(sel[j]);
    vrow[j] = f32_to_bf16(a[sel[j]]);
    a[sel[j]] = 0.0f;
  }
  for (int64_t j = Kb; j < K; ++j) {
    irow[j] = -1;
    vrow[j] = 0;
  }

  // 3. per-bucket 4-bit quantization of the residual.
  for (int64_t qs = 0; qs < D; qs += Q) {
    const int64_t cnt = std::max<int64_t>(0, std::min(Q, L - qs));
    const float* rq = a + qs;
    float lo = 0.0f, scale = 0.0f;
    if (cnt > 0) {
      // a is never -0 (g + e with e != -0), so min/max need no signed-zero rule; NaN apart.
      float mn = rq[0], mx = rq[0];
      int nan = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : nan)
      for (int64_t j = 0; j < cnt; ++j) {
        const float x = rq[j];
        mn = x < mn ? x : mn;
        mx = x > mx ? x : mx;
        nan |= x != x;
      }
      float hi = mx;
      lo = mn;
      if (nan) lo = hi = bits_f32(0x7fc00000u);
      scale = (hi - lo) / 15.0f;
    }
    ef_min[qs / Q] = lo;
    ef_scale[qs / Q] = scale;
    uint8_t* eq = ef + qs / 2;
    if (!(scale > 0.0f)) {
      std::fill(eq, eq + Q / 2, uint8_t{0});
    } else if (cnt == Q) {
      int64_t i = 0;
#ifdef __SSE2__
      for (; 2 * i + 32 <= Q; i += 16) quant32(rq + 2 * i, lo, scale, eq + i);
#endif
      for (; i < Q / 2; ++i) {
        const int32_t c0 = quant_code(rq[2 * i], lo, scale);
        const int32_t c1 = quant_code(rq[2 * i + 1], lo, scale);
        eq[i] = static_cast<uint8_t>(c0 | (c1 << 4));
      }
    } else {  // the tensor ends inside this bucket: code 0 past its end
      for (int64_t i = 0; i < Q / 2; ++i) {
        const int32_t c0 = 2 * i < cnt ? quant_code(rq[2 * i], lo, scale) : 0;
        const int32_t c1 = 2 * i + 1 < cnt ? quant_code(rq[2 * i + 1], lo, scale) : 0;
        eq[i] = static_cast<uint8_t>(c0 | (c1 << 4));
      }
    }
  }

  // 4. moments from the window, newest row first, at the window positions only.
  float* mom1 = s.mom1.data();
  float* mom2 = s.mom2.data();
  uint8_t* mark = s.mark.data();
  int32_t* touched = s.touched.data();
  int64_t nt = 0;
  for (int64_t age = 0; age < m; ++age) {
    const int64_t r = (t.row - age + m) % m;
    const int16_t* ir = t.idx + r * nbK + b * K;
    const uint16_t* vr = t.val + r * nbK + b * K;
    const float w1 = cfg.w1[age], w2 = cfg.w2[age];
    for (int64_t j = 0; j < K; ++j) {
      const int32_t i = ir[j];
      if (i < 0 || i >= L) continue;
      const float v = bf16_to_f32(vr[j]);
      touched[nt] = i;
      nt += mark[i] ^ 1;
      mark[i] = 1;
      mom1[i] = mom1[i] + w1 * v;
      mom2[i] = mom2[i] + w2 * (v * v);
    }
  }

  // 5. p = p * decay - (c1 * mom1) / (sqrt(mom2) * c2 + eps).
  float* tm1 = s.tm1.data();
  float* tm2 = s.tm2.data();
  float* upd = s.upd.data();
  for (int64_t j = 0; j < nt; ++j) {
    const int32_t i = touched[j];
    tm1[j] = mom1[i];
    tm2[j] = mom2[i];
    mom1[i] = mom2[i] = 0.0f;
    mark[i] = 0;
  }
  adam_update(tm1, tm2, nt, t.c1, t.c2, cfg.eps, upd);
  const float decay = cfg.decay;
  if (decay != 1.0f) {  // dense pass, keeping the original p (in a, free now) for the window
    for (int64_t j = 0; j < L; ++j) {
      const float v = T::load(p, j);
      a[j] = v;
      T::store(p, j, v * decay);
    }
    for (int64_t j = 0; j < nt; ++j) T::store(p, touched[j], a[touched[j]] * decay - upd[j]);
  } else {  // p * 1 == p: only window positions change
    for (int64_t j = 0; j < nt; ++j) T::store(p, touched[j], T::load(p, touched[j]) - upd[j]);
  }
}

}  // namespace

void microadam_step(const MicroAdamTensor* tensors, int64_t count, const MicroAdamConfig& cfg) {
  if (count <= 0) return;
  const int64_t D = cfg.D;
  std::vector<int64_t> first(count + 1, 0);  // first global block of each tensor
  for (int64_t i = 0; i < count; ++i) first[i + 1] = first[i] + (tensors[i].n + D - 1) / D;
  const int64_t total = first[count];
  const int nc = detail::num_blocks(total, std::max<int64_t>(1, kMinElemsPerThread / D));
#pragma omp parallel for schedule(static, 1) num_threads(nc)
  for (int c = 0; c < nc; ++c) {
    static thread_local Scratch scratch;
    scratch.ensure(D, cfg.K, cfg.m);
    int64_t lo, hi;
    detail::block_range(total, nc, c, &lo, &hi);
    int64_t ti = std::upper_bound(first.begin(), first.end(), lo) - first.begin() - 1;
    for (int64_t gb = lo; gb < hi; ++gb) {
      while (gb >= first[ti + 1]) ++ti;
      const MicroAdamTensor& t = tensors[ti];
      const int64_t b = gb - first[ti];
      dispatch_dtype(t.dtype, [&](auto tag) { step_block<decltype(tag)>(t, b, cfg, scratch); });
    }
  }
}

}  // namespace fedkern
