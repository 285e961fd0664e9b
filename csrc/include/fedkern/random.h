// fedkern/random.h -- counter-based Gaussian and Bernoulli draws (Philox4x32-10, Box-Muller).
//
// A draw is keyed by four uint32 words key = (w0, w1, w2, w3) (Philox of (seed, step) under the
// stream's tag, computed by the caller: fedkern.random.draw_key). Entry i of the flattened output
// is lane i & 3 of philox4x32((g_lo, g_hi, w2, w3), (w0, w1)), g = i >> 2.
//   gaussian: lanes (0, 1) and (2, 3) are Box-Muller pairs (a, b):
//     u = ((a >> 8) + 1) 2^-24,  R = sqrt(max(-2 log_f32(u), 0)),  angle = 2 pi (b >> 8) / 2^24,
//     even lane R cos, odd lane R sin, out = round(std * z) (std = 1: z).
//   bernoulli(p): keep iff (word >> 8) < T, T = ceil(p 2^24) (p an fp32 in (0, 1]).
// log_f32 and sincos_turns are fixed sequences of fp32 + and * (Cephes polynomials, exact fp32
// constants as hex literals), so with -ffp-contract=off the bits equal fedkern.reference.random
// and kernels/random.py. Inline here: the sketch and lora kernels generate entries in place.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fedkern/common.h"

namespace fedkern {
namespace rng {

struct Words {
  uint32_t v[4];
};

FEDKERN_INLINE Words philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(p1);
    c2 = n2;
    c3 = static_cast<uint32_t>(p0);
  }
  return Words{{c0, c1, c2, c3}};
}

// The four words of group g of a draw with key words key[4].
FEDKERN_INLINE Words group_words(uint64_t g, const uint32_t* key) {
  return philox4x32(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), key[2], key[3],
                    key[0], key[1]);
}

// fedkern's fp32 log for u in [2^-126, 1] (fedkern/reference/random.py).
FEDKERN_INLINE float log_f32(float u) {
  const uint32_t bits = f32_bits(u);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  const float m = bits_f32((bits & 0x007FFFFFu) | 0x3F000000u);
  float x;
  if (m < 0x1.6a09e6p-1f) {
    e = e - 1.0f;
    x = (m + m) - 1.0f;
  } else {
    x = m - 1.0f;
  }
  const float z = x * x;
  float y = 0x1.204376p-4f;
  y = y * x + -0x1.d7a370p-4f;
  y = y * x + 0x1.de4a34p-4f;
  y = y * x + -0x1.fcba9ep-4f;
  y = y * x + 0x1.23d37ep-3f;
  y = y * x + -0x1.555ca0p-3f;
  y = y * x + 0x1.999d58p-3f;
  y = y * x + -0x1.fffff8p-3f;
  y = y * x + 0x1.555554p-2f;
  y = y * x;
  y = y * z;
  y = y + e * -0x1.bd0106p-13f;
  y = y - z * 0.5f;
  const float r = x + y;
  return r + e * 0x1.63p-1f;
}

// (cos, sin) of 2 pi c / 2^24, c in [0, 2^24): exact octant reduction, then the polynomials.
FEDKERN_INLINE void sincos_turns(uint32_t c, float* cs, float* sn) {
  const int32_t j = static_cast<int32_t>(c >> 21);
  const int32_t j2 = (j + 1) & 14;
  const int32_t q = (j2 >> 1) & 3;
  const float t = static_cast<float>(static_cast<int32_t>(c) - (j2 << 21)) * 0x1.921fb6p-22f;
  const float z = t * t;
  float s = (z * -0x1.9943f2p-13f + 0x1.11073cp-7f) * z + -0x1.555546p-3f;
  s = s * z;
  s = s * t;
  s = s + t;
  float k = (z * 0x1.99eb9cp-16f + -0x1.6c0c34p-10f) * z + 0x1.55554ap-5f;
  k = k * z;
  k = k * z;
  k = k - z * 0.5f;
  k = k + 1.0f;
  switch (q) {
    case 0:
      *cs = k;
      *sn = s;
      break;
    case 1:
      *cs = -s;
      *sn = k;
      break;
    case 2:
      *cs = -k;
      *sn = -s;
      break;
    default:
      *cs = s;
      *sn = -k;
      break;
  }
}

// Box-Muller on one pair of words: (z_even, z_odd).
FEDKERN_INLINE void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u = static_cast<float>((a >> 8) + 1u) * 0x1p-24f;
  float t = log_f32(u) * -2.0f;
  t = t > 0.0f ? t : 0.0f;
  const float R = std::sqrt(t);
  float cs, sn;
  sincos_turns(b >> 8, &cs, &sn);
  *z0 = R * cs;
  *z1 = R * sn;
}

// Entry i of the Gaussian draw (recomputes its group: for kernels that need scattered entries).
FEDKERN_INLINE float gaussian_at(uint64_t i, const uint32_t* key) {
  const Words w = group_words(i >> 2, key);
  const int lane = static_cast<int>(i & 3);
  float z0, z1;
  box_muller(w.v[lane & 2], w.v[(lane & 2) + 1], &z0, &z1);
  return (lane & 1) ? z1 : z0;
}

// The keep threshold T = ceil(p 2^24) of a probability p (fp32, exact), and the kept entries'
// scale 2^24 / T (IEEE division): the inverse of the exact keep probability.
FEDKERN_INLINE float keep_threshold(float p) { return std::ceil(p * 16777216.0f); }
FEDKERN_INLINE float keep_scale(float threshold) { return 16777216.0f / threshold; }

}  // namespace rng

// out[i] = round(std * z_i), i < n (dtype float32 or bfloat16). OpenMP over groups of 4.
void gaussian_fill(void* out, DType dtype, int64_t n, const uint32_t key[4], float std);

// out[i] = keep_i (bytes 0/1), i < n: p_scalar's threshold when p is null, else p[i]'s (float32).
void bernoulli_fill(uint8_t* out, int64_t n, const uint32_t key[4], float p_scalar, const float* p);

}  // namespace fedkern
