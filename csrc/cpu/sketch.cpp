// csrc/cpu/sketch.cpp -- MAST sketch apply / gradient step (fedkern/sketch.h).
//
// perm kinds: the kept coordinates of row r are perm_r(lo_r .. hi_r - 1), evaluated in chunks of
// kChunk positions with randk.h's batched Feistel evaluation (randk_perm_range) into a stack
// buffer; the work items are (row, chunk) pairs handed to the threads statically. Within a row the
// kept coordinates are distinct, so chunks never write the same element; with one shared x the
// rows run one after the other (row order = the definition), each row's chunks in parallel.
// bernoulli: blocks of whole Philox groups (4 coordinates per call); with one shared x a block
// applies every row to its coordinates in row order. Either way the result is a pure function of
// the inputs, whatever the thread count.
#include "fedkern/sketch.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "fedkern/randk.h"
#include "fedkern/random.h"

namespace fedkern {
namespace {

constexpr int64_t kChunk = 2048;         // permutation positions per work item
constexpr int64_t kMinChunks = 8;        // work items per thread at least (~16k Feistel calls)
constexpr int64_t kMinStream = 1 << 18;  // elements of a dense pass per thread
constexpr int64_t kMinGroups = 1 << 13;  // Philox groups per thread

template <class Fn>
void parallel_blocks(int64_t n, int64_t min_per_block, Fn&& fn) {
  const int nb = detail::num_blocks(n, min_per_block);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    detail::block_range(n, nb, b, &lo, &hi);
    fn(lo, hi);
  }
}

struct RowKeys {
  uint32_t k[8];
};

RowKeys row_keys(const int64_t* keys, int64_t r, int count) {
  RowKeys out{};
  for (int t = 0; t < count; ++t) out.k[t] = static_cast<uint32_t>(keys[count * r + t]);
  return out;
}

// Calls fn(r, idx, cnt) for every chunk of kept coordinates of the rows in [r0, r1): idx holds cnt
// distinct coordinates. Chunks are spread over the threads.
template <class Fn>
void for_perm_chunks(int64_t r0, int64_t r1, int64_t d, const int64_t* keys, const int64_t* range,
                     Fn&& fn) {
  std::vector<int64_t> first(static_cast<size_t>(r1 - r0) + 1, 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t len = range[2 * r + 1] - range[2 * r];
    first[r - r0 + 1] = first[r - r0] + (len + kChunk - 1) / kChunk;
  }
  const int64_t items = first.back();
  parallel_blocks(items, kMinChunks, [&](int64_t lo, int64_t hi) {
    int64_t idx[kChunk];
    int64_t r = r0;
    for (int64_t it = lo; it < hi; ++it) {
      while (first[r - r0 + 1] <= it) ++r;
      const RowKeys rk = row_keys(keys, r, 8);
      const int64_t p0 = range[2 * r] + (it - first[r - r0]) * kChunk;
      const int64_t p1 = std::min(p0 + kChunk, range[2 * r + 1]);
      randk_perm_range(d, rk.k, p0, p1, idx);
      fn(r, idx, p1 - p0);
    }
  });
}

}  // namespace

void sketch_perm_apply(const void* x, int64_t x_stride, const void* v, int64_t v_stride, void* out,
                       DType dtype, int64_t rows, int64_t d, const int64_t* keys,
                       const int64_t* range, const float* scale) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* xp = static_cast<const S*>(x);
    const S* vp = static_cast<const S*>(v);
    S* op = static_cast<S*>(out);
    // Dense part: out = v (or +0) on every row.
    parallel_blocks(rows * d, kMinStream, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi;) {
        const int64_t r = e / d, j = e - r * d, len = std::min(d - j, hi - e);
        if (vp) {
          std::memcpy(op + e, vp + r * v_stride + j, static_cast<size_t>(len) * sizeof(S));
        } else {
          std::memset(op + e, 0, static_cast<size_t>(len) * sizeof(S));  // +0 in both dtypes
        }
        e += len;
      }
    });
    for_perm_chunks(0, rows, d, keys, range, [&](int64_t r, const int64_t* idx, int64_t cnt) {
      const float s = scale[r];
      const S* xr = xp + r * x_stride;
      const S* vr = vp ? vp + r * v_stride : nullptr;
      S* orow = op + r * d;
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t j = idx[t];
        if (vr) {
          const float vj = T::load(vr, j);
          const float dx = T::load(xr, j) - vj;
          const float sd = s * dx;
          T::store(orow, j, vj + sd);
        } else {
          T::store(orow, j, s * T::load(xr, j));
        }
      }
    });
  });
}

void sketch_perm_grad_step(void* x, int64_t x_stride, const void* g, DType dtype, int64_t rows,
                           int64_t d, const int64_t* keys, const int64_t* range, const float* scale,
                           float gamma) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    S* xp = static_cast<S*>(x);
    const S* gp = static_cast<const S*>(g);
    auto update = [&](int64_t r, const int64_t* idx, int64_t cnt) {
      const float c = gamma * scale[r];
      S* xr = xp + r * x_stride;
      const S* gr = gp + r * d;
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t j = idx[t];
        const float step = c * T::load(gr, j);
        T::store(xr, j, T::load(xr, j) - step);
      }
    };
    if (x_stride != 0 || rows == 1) {
      for_perm_chunks(0, rows, d, keys, range, update);
    } else {
      for (int64_t r = 0; r < rows; ++r) for_perm_chunks(r, r + 1, d, keys, range, update);
    }
  });
}

void sketch_bern_apply(const void* x, int64_t x_stride, const void* v, int64_t v_stride, void* out,
                       DType dtype, int64_t rows, int64_t d, const int64_t* keys, float p_scalar,
                       const float* p) {
  const float t_scalar = rng::keep_threshold(p_scalar);
  const float s_scalar = rng::keep_scale(t_scalar);
  const int64_t groups = (d + 3) / 4;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    const S* xp = static_cast<const S*>(x);
    const S* vp = static_cast<const S*>(v);
    S* op = static_cast<S*>(out);
    parallel_blocks(rows * groups, kMinGroups, [&](int64_t lo, int64_t hi) {
      int64_t r = -1;
      RowKeys rk{};
      for (int64_t it = lo; it < hi; ++it) {
        const int64_t rr = it / groups, grp = it - rr * groups;
        if (rr != r) {
          r = rr;
          rk = row_keys(keys, r, 4);
        }
        const rng::Words w = rng::group_words(static_cast<uint64_t>(grp), rk.k);
        const S* xr = xp + r * x_stride;
        const S* vr = vp ? vp + r * v_stride : nullptr;
        S* orow = op + r * d;
        const int64_t base = grp * 4;
        const int cnt = static_cast<int>(std::min<int64_t>(4, d - base));
        for (int l = 0; l < cnt; ++l) {
          const int64_t j = base + l;
          const float t = p ? rng::keep_threshold(p[j]) : t_scalar;
          const bool keep = static_cast<float>(w.v[l] >> 8) < t;
          if (!keep) {
            orow[j] = vr ? vr[j] : T::round(0.0f);
            continue;
          }
          const float s = p ? rng::keep_scale(t) : s_scalar;
          if (vr) {
            const float vj = T::load(vr, j);
            const float dx = T::load(xr, j) - vj;
            const float sd = s * dx;
            T::store(orow, j, vj + sd);
          } else {
            T::store(orow, j, s * T::load(xr, j));
          }
        }
      }
    });
  });
}

void sketch_bern_grad_step(void* x, int64_t x_stride, const void* g, DType dtype, int64_t rows,
                           int64_t d, const int64_t* keys, float p_scalar, const float* p,
                           float gamma) {
  const float t_scalar = rng::keep_threshold(p_scalar);
  const float c_scalar = gamma * rng::keep_scale(t_scalar);
  const int64_t groups = (d + 3) / 4;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    S* xp = static_cast<S*>(x);
    const S* gp = static_cast<const S*>(g);
    // One (row, group) of coordinates: the kept ones step.
    auto group = [&](int64_t r, const RowKeys& rk, int64_t grp) {
      const rng::Words w = rng::group_words(static_cast<uint64_t>(grp), rk.k);
      S* xr = xp + r * x_stride;
      const S* gr = gp + r * d;
      const int64_t base = grp * 4;
      const int cnt = static_cast<int>(std::min<int64_t>(4, d - base));
      for (int l = 0; l < cnt; ++l) {
        const int64_t j = base + l;
        const float t = p ? rng::keep_threshold(p[j]) : t_scalar;
        if (!(static_cast<float>(w.v[l] >> 8) < t)) continue;
        const float c = p ? gamma * rng::keep_scale(t) : c_scalar;
        const float step = c * T::load(gr, j);
        T::store(xr, j, T::load(xr, j) - step);
      }
    };
    if (x_stride != 0 || rows == 1) {
      parallel_blocks(rows * groups, kMinGroups, [&](int64_t lo, int64_t hi) {
        int64_t r = -1;
        RowKeys rk{};
        for (int64_t it = lo; it < hi; ++it) {
          const int64_t rr = it / groups;
          if (rr != r) {
            r = rr;
            rk = row_keys(keys, r, 4);
          }
          group(r, rk, it - r * groups);
        }
      });
    } else {  // shared x: every block applies the rows to its coordinates in row order
      std::vector<RowKeys> rks(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) rks[r] = row_keys(keys, r, 4);
      parallel_blocks(groups, kMinGroups, [&](int64_t lo, int64_t hi) {
        for (int64_t grp = lo; grp < hi; ++grp) {
          for (int64_t r = 0; r < rows; ++r) group(r, rks[r], grp);
        }
      });
    }
  });
}

}  // namespace fedkern
