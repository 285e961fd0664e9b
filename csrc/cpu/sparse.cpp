// csrc/cpu/sparse.cpp -- deterministic batched sparse accumulation into a dense vector (OpenMP).
//
// dense_j <- round(fp32(dense_j) + alpha*v_{i1,j} + alpha*v_{i2,j} + ...), the sum taken left to
// right over the messages i1 < i2 < ... that hold j, each product and each sum rounded to fp32.
// The dense range is cut into chunks of C coordinates (C sized so a chunk of accumulators stays
// in cache); each thread owns a contiguous run of chunks and keeps one cursor per message row,
// placed by binary search at its first coordinate and then advanced monotonically (rows are
// ascending). For one chunk the thread walks the rows in message order, so every coordinate sees
// its terms in message order whatever the thread count, and no two threads touch one coordinate.
// float32 accumulates in place in dense; bfloat16 accumulates in an fp32 chunk buffer (touched
// coordinates are loaded on first touch, tracked by a stamp) and rounds once on store.
// Memory safety does not depend on the indices being valid: every write stays inside its chunk.
#include "fedkern/sparse.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fedkern {

void sparse_add_batched(void* dense, DType dtype, int64_t n_dense, const void* values,
                        const int64_t* indices, int64_t m, int64_t k, float alpha) {
  // 2^14 coordinates (64 KiB of fp32 accumulators) keep a chunk in L2 while all m rows visit it;
  // past 2^26 coordinates chunks grow (up to 2^20) to keep their number, and so the O(m) cursor
  // checks per chunk, near 4096.
  const int64_t grain = detail::blocking_override().grain;
  const int64_t chunk = grain > 0
                            ? grain
                            : std::min<int64_t>(std::max<int64_t>(n_dense / 4096, int64_t{1} << 14),
                                                int64_t{1} << 20);
  const int64_t nchunks = (n_dense + chunk - 1) / chunk;
  // At least 2^17 terms (~0.3 ms) per thread: waking threads must cost less than the work.
  const int nb =
      static_cast<int>(std::min<int64_t>(nchunks, detail::num_blocks(m * k, int64_t{1} << 17)));

  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    constexpr bool kInPlace = std::is_same<T, F32>::value;
    S* d = static_cast<S*>(dense);
    const S* v = static_cast<const S*>(values);
    // Per-block scratch, allocated here so nothing inside the parallel region can throw.
    std::vector<int64_t> cursors(static_cast<size_t>(nb) * m);
    const size_t scratch = kInPlace ? 0 : static_cast<size_t>(nb) * chunk;
    std::vector<float> acc(scratch);
    std::vector<uint32_t> stamp(scratch, 0);
    std::vector<uint32_t> touched(scratch);

#pragma omp parallel for schedule(static, 1) num_threads(nb)
    for (int b = 0; b < nb; ++b) {
      int64_t c0, c1;
      detail::block_range(nchunks, nb, b, &c0, &c1);
      int64_t* cur = &cursors[static_cast<size_t>(b) * m];
      const int64_t start = c0 * chunk;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t* row = indices + i * k;
        cur[i] = std::lower_bound(row, row + k, start) - row;
      }
      float* buf = kInPlace ? nullptr : &acc[static_cast<size_t>(b) * chunk];
      uint32_t* st = kInPlace ? nullptr : &stamp[static_cast<size_t>(b) * chunk];
      uint32_t* list = kInPlace ? nullptr : &touched[static_cast<size_t>(b) * chunk];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * chunk, hi = std::min(lo + chunk, n_dense);
        const uint32_t mark = static_cast<uint32_t>(c + 1);  // unique per chunk, stamps start at 0
        int64_t ntouched = 0;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t* row = indices + i * k;
          const S* vrow = v + i * k;
          int64_t p = cur[i];
          for (; p < k && row[p] < hi; ++p) {
            const int64_t j = row[p];
            // Valid rows (ascending, in range) never take this branch. With check_indices=False
            // the caller vouches for the rows; an index below the chunk (negative, or out of
            // order) is dropped here and one >= n_dense stops the walk above, so no write ever
            // leaves [lo, hi) whatever the indices hold.
            if (j < lo) continue;
            const float term = alpha * T::load(vrow, p);
            if constexpr (kInPlace) {
              d[j] = d[j] + term;
            } else {
              const int64_t q = j - lo;
              if (st[q] != mark) {
                st[q] = mark;
                buf[q] = T::load(d, j);
                list[ntouched++] = static_cast<uint32_t>(q);
              }
              buf[q] = buf[q] + term;
            }
          }
          cur[i] = p;
        }
        if constexpr (!kInPlace) {
          for (int64_t t = 0; t < ntouched; ++t) T::store(d, lo + list[t], buf[list[t]]);
        }
      }
    }
  });
}

}  // namespace fedkern
