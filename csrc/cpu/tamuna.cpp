// csrc/cpu/tamuna.cpp -- TAMUNA's fused server step (fedkern/tamuna.h).
//
// Coordinate r's holders are the slots b(r) .. b(r) + s - 1 (mod c), b(r) = s r mod c, and b is
// periodic in r with period P = c / gcd(s, c) (s P is a multiple of c): the coordinates r0 + k,
// r0 + k + P, r0 + k + 2P, ... share their s holder rows. The coordinates are cut into tiles of
// kTile, split among the threads statically, and each tile takes one of two walks:
//   P <= kTile / 16 (e.g. c = 100, s = 4: P = 25; s = c: P = 1): per residue k, each holder row
//     is walked at the constant stride P (one load stream per row, which the hardware prefetchers
//     follow) into a per-tile buffer of sums, then the H update walks the same streams while X's
//     held entries are still in cache;
//   otherwise (few coordinates per residue in a tile): coordinate by coordinate, its s holders
//     gathered, averaged and updated at once.
// Either way the sums of a coordinate run in slot order j = 0, 1, ..., s - 1 (in the first walk
// the j loop is outside the stride walk), so the bits depend neither on the walk nor on the
// tiling or the thread count. The row offsets perm[t] * p are tabulated for the slots
// t = 0 .. c + s - 2 (slot t mod c): a coordinate's holders are s consecutive entries, with no
// wrap-around test, and b advances by s per coordinate (one conditional subtraction, s <= c).
#include "fedkern/tamuna.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "fedkern/common.h"

namespace fedkern {
namespace {

constexpr int64_t kMinWork = 1 << 13;  // held entries per thread at least (~20 us)
constexpr int64_t kTile = 1024;        // coordinates per tile

// The tile [r0, r1) residue by residue: xbar and (H non-null) the held entries of H.
// off: c + s - 1 row offsets; acc: (r1 - r0) floats of scratch.
void by_residue(const float* X, float* H, const int64_t* off, int64_t c, int64_t s, int64_t P,
                float coef, float* xbar, int64_t r0, int64_t r1, float* acc) {
  const float fs = static_cast<float>(s);
  const int64_t len = r1 - r0, groups = std::min(P, len);
  int64_t b = s * r0 % c;  // s * r0 < c * p (the size of X): no int64 overflow
  for (int64_t k = 0; k < groups; ++k) {
    const int64_t start = r0 + k, n = (len - k + P - 1) / P;
    const int64_t* o = off + b;
    const float* x = X + o[0] + start;
    for (int64_t i = 0; i < n; ++i) acc[i] = x[i * P];
    for (int64_t j = 1; j < s; ++j) {
      x = X + o[j] + start;
      for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + x[i * P];
    }
    float* xb = xbar + start;
    for (int64_t i = 0; i < n; ++i) {
      acc[i] = acc[i] / fs;
      xb[i * P] = acc[i];
    }
    if (H != nullptr) {
      for (int64_t j = 0; j < s; ++j) {
        x = X + o[j] + start;
        float* h = H + o[j] + start;
        for (int64_t i = 0; i < n; ++i) {
          const float step = coef * (acc[i] - x[i * P]);
          h[i * P] = h[i * P] + step;
        }
      }
    }
    b += s;  // the next residue's first slot
    if (b >= c) b -= c;
  }
}

// The tile [r0, r1) coordinate by coordinate (the same results as by_residue).
void by_coordinate(const float* X, float* H, const int64_t* off, int64_t c, int64_t s, float coef,
                   float* xbar, int64_t r0, int64_t r1) {
  const float fs = static_cast<float>(s);
  int64_t b = s * r0 % c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* o = off + b;
    float acc = X[o[0] + r];
    for (int64_t j = 1; j < s; ++j) acc = acc + X[o[j] + r];
    const float m = acc / fs;
    xbar[r] = m;
    if (H != nullptr) {
      for (int64_t j = 0; j < s; ++j) {
        const float step = coef * (m - X[o[j] + r]);  // X[o[j] + r]: just loaded, in L1
        H[o[j] + r] = H[o[j] + r] + step;
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
  const int64_t P = c / std::gcd(s, c);
  const bool residues = P <= kTile / 16;
  const int64_t tiles = (p + kTile - 1) / kTile;
  const int nb = static_cast<int>(
      std::min<int64_t>(detail::num_blocks(p, std::max<int64_t>(1, kMinWork / s)), tiles));
#pragma omp parallel num_threads(nb)
  {
    std::vector<float> acc(static_cast<size_t>(residues ? kTile : 0));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * kTile, r1 = std::min(p, r0 + kTile);
      if (residues) {
        by_residue(X, H, off.data(), c, s, P, coef, xbar, r0, r1, acc.data());
      } else {
        by_coordinate(X, H, off.data(), c, s, coef, xbar, r0, r1);
      }
    }
  }
}

}  // namespace fedkern
