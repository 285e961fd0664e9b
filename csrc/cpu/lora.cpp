// csrc/cpu/lora.cpp -- the fused RAC-LoRA merge W += scale * B A (fedkern/lora.h).
//
// The frozen factor is generated once into a buffer by gaussian_fill (random.cpp); then blocks of
// rows of W are handed to the threads, and each row is swept in column tiles of kTile floats: the
// tile's r-term sums are accumulated in k order in a stack buffer (the inner loop over columns
// vectorises; every column sees the same sequence of fp32 operations), then added to W.
#include "fedkern/lora.h"

#include <algorithm>
#include <vector>

#include "fedkern/random.h"

namespace fedkern {
namespace {

constexpr int64_t kTile = 512;
constexpr int64_t kMinWork = 1 << 16;  // multiply-adds per thread at least

}  // namespace

void lora_merge(float* W, int64_t m, int64_t n, int64_t r, const float* B, const float* A,
                const uint32_t key[4], float std, float scale) {
  std::vector<float> frozen;
  if (!B || !A) {
    frozen.resize(static_cast<size_t>(B ? r * n : m * r));
    gaussian_fill(frozen.data(), DType::kFloat32, static_cast<int64_t>(frozen.size()), key, std);
    if (!B) B = frozen.data();
    if (!A) A = frozen.data();
  }
  const int64_t per_row = std::max<int64_t>(n * r, 1);
  const int nb = detail::num_blocks(m, std::max<int64_t>(kMinWork / per_row, 1));
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    detail::block_range(m, nb, b, &lo, &hi);
    float acc[kTile];
    for (int64_t i = lo; i < hi; ++i) {
      float* wi = W + i * n;
      const float* bi = B + i * r;
      for (int64_t j0 = 0; j0 < n; j0 += kTile) {
        const int64_t len = std::min(kTile, n - j0);
        for (int64_t t = 0; t < len; ++t) acc[t] = 0.0f;
        for (int64_t k = 0; k < r; ++k) {
          const float bik = bi[k];
          const float* ak = A + k * n + j0;
          for (int64_t t = 0; t < len; ++t) {
            const float prod = bik * ak[t];
            acc[t] = acc[t] + prod;
          }
        }
        for (int64_t t = 0; t < len; ++t) {
          const float upd = scale * acc[t];
          wi[j0 + t] = wi[j0 + t] + upd;
        }
      }
    }
  }
}

}  // namespace fedkern
