// csrc/cpu/tamuna.cpp -- TAMUNA's fused server step (fedkern/tamuna.h).
//
// The coordinates are cut into contiguous blocks, one or more per thread (each coordinate's
// result depends on its own holders only, so neither the blocking nor the thread count changes a
// bit). Before the parallel loop the row offsets perm[t] * p are tabulated for the slots
// t = 0 .. c + s - 2 (slot t mod c), so that the holders of a coordinate are the s consecutive
// entries starting at its first slot b = (s * r) mod c, with no wrap-around test; from one
// coordinate to the next b advances by s (mod c, one conditional subtraction since s <= c), so
// there is no division in the loop. Per coordinate the s held values are gathered once into a
// small buffer, summed in slot order, and reused for the H update (X is read s * p times in all).
#include "fedkern/tamuna.h"

#include <algorithm>
#include <vector>

#include "fedkern/common.h"

namespace fedkern {
namespace {

constexpr int64_t kMinWork = 1 << 13;  // held entries per block at least (~20 us)
constexpr int64_t kStackHolders = 64;  // s up to this: the gathered values live on the stack

// Coordinates [r0, r1): xbar and (H non-null) the held entries of H. off: c + s - 1 row offsets.
void aggregate_block(const float* X, float* H, const int64_t* off, int64_t c, int64_t s, float coef,
                     float* xbar, int64_t r0, int64_t r1, float* held) {
  const float fs = static_cast<float>(s);
  int64_t b = s * r0 % c;  // s * r0 < c * p (the size of X): no int64 overflow
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* o = off + b;
    float acc = X[o[0] + r];
    held[0] = acc;
    for (int64_t j = 1; j < s; ++j) {
      const float v = X[o[j] + r];
      held[j] = v;
      acc = acc + v;
    }
    const float m = acc / fs;
    xbar[r] = m;
    if (H != nullptr) {
      for (int64_t j = 0; j < s; ++j) {
        float* h = H + o[j] + r;
        const float diff = m - held[j];
        const float step = coef * diff;
        *h = *h + step;
      }
    }
    b += s;
    if (b >= c) b -= c;
  }
}

}  // namespace

void tamuna_aggregate(const float* X, float* H, const int64_t* perm, int64_t c, int64_t p,
                      int64_t s, float coef, float* xbar) {
  if (c <= 0 || p <= 0 || s <= 0) return;
  FEDKERN_DCHECK(s <= c, "s <= c");
  std::vector<int64_t> off(static_cast<size_t>(c + s - 1));
  for (int64_t t = 0; t < c + s - 1; ++t) {
    const int64_t row = perm[t < c ? t : t - c];
    FEDKERN_DCHECK(row >= 0 && row < c, "perm holds rows 0..c-1");
    off[static_cast<size_t>(t)] = row * p;
  }
  const int nb = detail::num_blocks(p, std::max<int64_t>(1, kMinWork / s));
#pragma omp parallel num_threads(nb)
  {
    std::vector<float> heap(static_cast<size_t>(s > kStackHolders ? s : 0));
    float stack[kStackHolders];
    float* held = s > kStackHolders ? heap.data() : stack;
#pragma omp for schedule(static)
    for (int blk = 0; blk < nb; ++blk) {
      int64_t lo, hi;
      detail::block_range(p, nb, blk, &lo, &hi);
      aggregate_block(X, H, off.data(), c, s, coef, xbar, lo, hi, held);
    }
  }
}

}  // namespace fedkern
