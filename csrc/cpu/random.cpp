// csrc/cpu/random.cpp -- Gaussian and Bernoulli fills from Philox4x32 words (fedkern/random.h).
//
// The output is cut into contiguous blocks of whole groups (4 entries = one Philox call) handed
// to the threads; every entry is a pure function of its index, so the thread count never changes
// a bit. The per-entry math is the inline code of random.h (shared with the sketch and lora
// kernels).
#include "fedkern/random.h"

#include <algorithm>

namespace fedkern {
namespace {

constexpr int64_t kMinGroups = 1 << 14;  // Philox calls per thread at least (~0.2 ms of work)

template <class Fn>
void parallel_groups(int64_t n, Fn&& fn) {
  const int64_t groups = (n + 3) / 4;
  const int nb = detail::num_blocks(groups, kMinGroups);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    detail::block_range(groups, nb, b, &lo, &hi);
    fn(lo, hi);
  }
}

}  // namespace

void gaussian_fill(void* out, DType dtype, int64_t n, const uint32_t key[4], float std) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    S* o = static_cast<S*>(out);
    parallel_groups(n, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        const rng::Words w = rng::group_words(static_cast<uint64_t>(g), key);
        float z[4];
        rng::box_muller(w.v[0], w.v[1], &z[0], &z[1]);
        rng::box_muller(w.v[2], w.v[3], &z[2], &z[3]);
        const int64_t base = g * 4;
        const int cnt = static_cast<int>(std::min<int64_t>(4, n - base));
        for (int l = 0; l < cnt; ++l) T::store(o, base + l, std * z[l]);
      }
    });
  });
}

void bernoulli_fill(uint8_t* out, int64_t n, const uint32_t key[4], float p_scalar,
                    const float* p) {
  const float t_scalar = rng::keep_threshold(p_scalar);
  parallel_groups(n, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      const rng::Words w = rng::group_words(static_cast<uint64_t>(g), key);
      const int64_t base = g * 4;
      const int cnt = static_cast<int>(std::min<int64_t>(4, n - base));
      for (int l = 0; l < cnt; ++l) {
        const float t = p ? rng::keep_threshold(p[base + l]) : t_scalar;
        out[base + l] = static_cast<float>(w.v[l] >> 8) < t ? 1 : 0;
      }
    }
  });
}

}  // namespace fedkern
