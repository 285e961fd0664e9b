// csrc/cpu/topk.cpp -- top-k selection by radix histograms, and the EF14 / EF21 updates (OpenMP).
//
// Selecting the k largest 31-bit keys (ties toward the lower index, output ascending) in about
// two passes over the data, with no full-size temporary:
//   pass 1   per-block histograms of the top 12 key bits (EF14: the same pass computes
//            a = round(e + lr*g) and stores it into err). Merging them and scanning from the top
//            bin gives the bin B holding the k-th largest key: "above" keys lie in higher bins and
//            are all selected, need = k - above more come from bin B.
//   pass 2   gather candidates (index, key) with key >= start of B, block by block in index order
//            into one array at precomputed per-block offsets (so it is ascending). The exact
//            threshold T is the need-th largest key of bin B (nth_element over that bin only);
//            emit key > T plus the first (k - #{key > T}) keys equal to T in index order.
// If bin B is crowded (many equal or near-equal keys) the candidate list would be large, so the
// bin is refined instead: another histogram pass over the next 12 key bits restricted to B, then
// the last 7 bits. After the third level B is a single key value T, and the output is emitted
// straight from the data using the per-block counts of keys > T and == T.
// Blocks are contiguous index ranges processed by an OpenMP for-loop; every result is a function
// of the input alone (the per-block counts only place each block's output), so nothing depends on
// the number of threads.
#include "fedkern/topk.h"

#include <algorithm>
#include <functional>
#include <vector>

namespace fedkern {
namespace {

constexpr int64_t kTile = 1024;  // keys computed per tile (vectorisable), then scanned
// Fewer elements than this per thread: stay serial (a pass over 2^19 elements takes ~0.3 ms, so
// waking a thread and the closing barrier, costly when the cores are oversubscribed, stay small).
constexpr int64_t kMinBlock = 1 << 19;
constexpr int kBins = 4096;
constexpr int kSpare = kBins;  // histogram slot for keys outside the bin being refined

// Radix levels of the 31-bit key: bits 30..19, 18..7 and 6..0.
struct Level {
  int shift, bits;
};
constexpr Level kLevels[3] = {{19, 12}, {7, 12}, {0, 7}};

// Calls fn(t, cnt, keys) for consecutive tiles [t, t + cnt) of [lo, hi), in ascending order, with
// keys[j] the key of element t + j. `first` selects the source's first pass (which for EF14 also
// writes the error buffer, and so runs exactly once per element).
template <class Src, class Fn>
void scan_tiles(Src& src, int64_t lo, int64_t hi, bool first, Fn&& fn) {
  alignas(64) uint32_t buf[kTile];
  for (int64_t t = lo; t < hi; t += kTile) {
    const int64_t cnt = std::min(kTile, hi - t);
    if (first) {
      src.first_keys(t, cnt, buf);
    } else {
      src.keys(t, cnt, buf);
    }
    fn(t, cnt, static_cast<const uint32_t*>(buf));
  }
}

// One block's histogram: two interleaved uint32 copies of kBins + 1 slots (runs of equal keys do
// not serialise on one counter), flushed into the block's int64 bins before a uint32 overflows.
class BlockHist {
 public:
  static constexpr int kSlots = kBins + 1;
  BlockHist(uint32_t* sub, int64_t* out) : sub_(sub), out_(out) {
    std::fill(sub_, sub_ + 2 * kSlots, 0u);
    std::fill(out_, out_ + kBins, int64_t{0});
  }
  ~BlockHist() { flush(); }
  // Counts slot bin_of(key) for the cnt keys of one tile.
  template <class BinOf>
  void add_tile(int64_t cnt, const uint32_t* keys, BinOf&& bin_of) {
    int64_t j = 0;
    for (; j + 1 < cnt; j += 2) {
      ++sub_[bin_of(keys[j])];
      ++sub_[kSlots + bin_of(keys[j + 1])];
    }
    if (j < cnt) ++sub_[bin_of(keys[j])];
    if ((pending_ += cnt) >= (int64_t{1} << 31)) flush();
  }
  void flush() {
    for (int b = 0; b < kBins; ++b) {
      out_[b] += static_cast<int64_t>(sub_[b]) + sub_[kSlots + b];
      sub_[b] = sub_[kSlots + b] = 0;
    }
    pending_ = 0;
  }

 private:
  uint32_t* sub_;
  int64_t* out_;
  int64_t pending_ = 0;
};

// Output placement: block b writes its gt[b] keys > T and take[b] keys == T at off[b], where
// take[] hands the `ties` equal keys to the lowest indices first.
void place_blocks(const std::vector<int64_t>& gt, const std::vector<int64_t>& eq, int64_t ties,
                  std::vector<int64_t>* off, std::vector<int64_t>* take) {
  const size_t nb = gt.size();
  off->assign(nb, 0);
  take->assign(nb, 0);
  int64_t pos = 0;
  for (size_t b = 0; b < nb; ++b) {
    const int64_t t = std::min(std::max<int64_t>(ties, 0), eq[b]);
    ties -= t;
    (*take)[b] = t;
    (*off)[b] = pos;
    pos += gt[b] + t;
  }
}

// Appends to out (at *o) the indices t + j of keys > thr, and of keys == thr while *take > 0.
inline void emit_tile(int64_t t, int64_t cnt, const uint32_t* keys, uint32_t thr, int64_t* take,
                      int64_t* out, int64_t* o) {
  int64_t pos = *o, left = *take;
  for (int64_t j = 0; j < cnt; ++j) {
    const uint32_t key = keys[j];
    if (key > thr || (key == thr && left > 0)) {
      left -= key == thr;
      out[pos++] = t + j;
    }
  }
  *o = pos;
  *take = left;
}

// Selection among the candidate list (ascending indices with their keys): the threshold lies in
// bin [lo_key, lo_key + width), which holds in_bin candidates of which `need` are taken; every
// candidate above the bin is taken.
void select_from_candidates(const int64_t* cidx, const uint32_t* ckey, int64_t total,
                            uint32_t lo_key, uint32_t width, int64_t in_bin, int64_t need,
                            int64_t k, int64_t* idx) {
  std::vector<uint32_t> bin;
  bin.reserve(in_bin);
  for (int64_t i = 0; i < total; ++i) {
    if (ckey[i] - lo_key < width) bin.push_back(ckey[i]);
  }
  FEDKERN_DCHECK(static_cast<int64_t>(bin.size()) == in_bin, "candidates of the threshold bin");
  FEDKERN_DCHECK(need >= 1 && need <= static_cast<int64_t>(bin.size()),
                 "top-k threshold rank outside its bin");
  std::nth_element(bin.begin(), bin.begin() + (need - 1), bin.end(), std::greater<uint32_t>());
  const uint32_t thr = bin[need - 1];
  std::vector<uint32_t>().swap(bin);

  const int nb = detail::num_blocks(total, kMinBlock);
  std::vector<int64_t> gt(nb), eq(nb), off, take;
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi, g = 0, e = 0;
    detail::block_range(total, nb, b, &lo, &hi);
    for (int64_t i = lo; i < hi; ++i) {
      g += ckey[i] > thr;
      e += ckey[i] == thr;
    }
    gt[b] = g;
    eq[b] = e;
  }
  int64_t above = 0;
  for (int b = 0; b < nb; ++b) above += gt[b];
  FEDKERN_DCHECK(above < k, "top-k: more keys above the threshold than k");
  place_blocks(gt, eq, k - above, &off, &take);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi, o = 0, t = take[b];
    detail::block_range(total, nb, b, &lo, &hi);
    int64_t* out = idx + off[b];
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t key = ckey[i];
      if (key > thr || (key == thr && t > 0)) {
        t -= key == thr;
        FEDKERN_DCHECK(off[b] + o < k, "top-k emits past its k outputs");
        out[o++] = cidx[i];
      }
    }
    FEDKERN_DCHECK(o == gt[b] + take[b], "top-k block emitted a wrong count");
  }
}

// idx[0..k) = ascending indices of the k largest keys of `src` (see the file comment).
template <class Src>
void topk_select(Src& src, int64_t n, int64_t k, int64_t* idx) {
  const int nb = detail::num_blocks(n, kMinBlock);
  if (k >= n) {  // everything is selected; the first pass still runs for its side effects
#pragma omp parallel for schedule(static, 1) num_threads(nb)
    for (int b = 0; b < nb; ++b) {
      int64_t lo, hi;
      detail::block_range(n, nb, b, &lo, &hi);
      scan_tiles(src, lo, hi, true, [&](int64_t t, int64_t cnt, const uint32_t*) {
        for (int64_t j = 0; j < cnt; ++j) idx[t + j] = t + j;
      });
    }
    return;
  }

  // A bin with more keys than this is refined by another histogram pass instead of gathered.
  const int64_t cap = std::max<int64_t>(2 * k, int64_t{1} << 18);
  std::vector<int64_t> hist(static_cast<size_t>(nb) * kBins);
  std::vector<uint32_t> sub(static_cast<size_t>(nb) * 2 * BlockHist::kSlots);
  std::vector<int64_t> gt(nb, 0), eq(nb, 0);  // per block: keys above the bin / inside it
  int64_t need = k;                           // keys still to take from the current bin
  uint32_t lo_key = 0;                        // current bin = [lo_key, lo_key + width)
  uint32_t width = 0x80000000u;

  for (int level = 0; level < 3; ++level) {
    const int shift = kLevels[level].shift, nbins = 1 << kLevels[level].bits;
    const uint32_t bin_lo = lo_key, bin_width = width, bmask = static_cast<uint32_t>(nbins - 1);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
    for (int b = 0; b < nb; ++b) {
      BlockHist h(&sub[static_cast<size_t>(b) * 2 * BlockHist::kSlots],
                  &hist[static_cast<size_t>(b) * kBins]);
      int64_t lo, hi;
      detail::block_range(n, nb, b, &lo, &hi);
      if (level == 0) {  // keys are < 2^31, so key >> 19 < kBins
        scan_tiles(src, lo, hi, true, [&](int64_t, int64_t cnt, const uint32_t* keys) {
          h.add_tile(cnt, keys, [](uint32_t key) { return key >> kLevels[0].shift; });
        });
      } else {
        scan_tiles(src, lo, hi, false, [&](int64_t, int64_t cnt, const uint32_t* keys) {
          h.add_tile(cnt, keys, [&](uint32_t key) {
            return key - bin_lo < bin_width ? (key >> shift) & bmask : uint32_t{kSpare};
          });
        });
      }
    }
    // Merge, then walk down from the top bin until it holds the need-th largest key.
    int bin = nbins - 1;
    int64_t above = 0, in_bin = 0;
    for (;; --bin) {
      in_bin = 0;
      for (int b = 0; b < nb; ++b) in_bin += hist[static_cast<size_t>(b) * kBins + bin];
      if (above + in_bin >= need || bin == 0) break;  // bin == 0 only guards the impossible
      above += in_bin;
    }
    need -= above;
    FEDKERN_DCHECK(need >= 1 && need <= in_bin, "top-k: the k-th key is not in the chosen bin");
    for (int b = 0; b < nb; ++b) {
      const int64_t* h = &hist[static_cast<size_t>(b) * kBins];
      for (int j = bin + 1; j < nbins; ++j) gt[b] += h[j];
      eq[b] = h[bin];
    }
    lo_key += static_cast<uint32_t>(bin) << shift;
    width = uint32_t{1} << shift;

    if (level == 2) {  // the bin is one key value T: emit straight from the data
      std::vector<int64_t> off, take;
      place_blocks(gt, eq, need, &off, &take);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
      for (int b = 0; b < nb; ++b) {
        int64_t lo, hi, o = 0, t = take[b];
        detail::block_range(n, nb, b, &lo, &hi);
        int64_t* out = idx + off[b];
        scan_tiles(src, lo, hi, false, [&](int64_t t0, int64_t cnt, const uint32_t* keys) {
          emit_tile(t0, cnt, keys, lo_key, &t, out, &o);
          FEDKERN_DCHECK(off[b] + o <= k, "top-k emits past its k outputs");
        });
        FEDKERN_DCHECK(o == gt[b] + take[b], "top-k block emitted a wrong count");
      }
      return;
    }
    if (in_bin <= cap) {  // gather (index, key) of every key >= lo_key, ascending by index
      std::vector<int64_t> off(nb);
      int64_t total = 0;
      for (int b = 0; b < nb; ++b) {
        off[b] = total;
        total += gt[b] + eq[b];
      }
      std::vector<int64_t> cidx(total);
      std::vector<uint32_t> ckey(total);
      const int32_t cut = static_cast<int32_t>(lo_key);  // keys < 2^31 compare as int32
#pragma omp parallel for schedule(static, 1) num_threads(nb)
      for (int b = 0; b < nb; ++b) {
        int64_t lo, hi;
        detail::block_range(n, nb, b, &lo, &hi);
        int64_t* oi = cidx.data() + off[b];
        uint32_t* ok = ckey.data() + off[b];
        scan_tiles(src, lo, hi, false, [&](int64_t t, int64_t cnt, const uint32_t* keys) {
          // Candidates are rare: test 16 keys at once (vectorised) before looking at each.
          for (int64_t g = 0; g < cnt; g += 16) {
            const int64_t ge = std::min<int64_t>(g + 16, cnt);
            int any = 0;
            for (int64_t j = g; j < ge; ++j) any |= static_cast<int32_t>(keys[j]) >= cut;
            if (!any) continue;
            for (int64_t j = g; j < ge; ++j) {
              if (static_cast<int32_t>(keys[j]) >= cut) {
                *oi++ = t + j;
                *ok++ = keys[j];
              }
            }
          }
        });
      }
      select_from_candidates(cidx.data(), ckey.data(), total, lo_key, width, in_bin, need, k, idx);
      return;
    }
  }
}

// Key sources. first_keys() is pass 1; keys() recomputes keys in later passes.
template <class T>
struct CompressSrc {
  using S = typename T::storage;
  const S* x;
  void keys(int64_t lo, int64_t cnt, uint32_t* out) const {
    const S* p = x + lo;
    for (int64_t j = 0; j < cnt; ++j) out[j] = select_key(T::load(p, j));
  }
  void first_keys(int64_t lo, int64_t cnt, uint32_t* out) const { keys(lo, cnt, out); }
};

template <class T>
struct Ef14Src {
  using S = typename T::storage;
  const S* g;
  S* e;
  float lr;
  // a = round(e + round32(lr * g)) is stored into e, and its key returned.
  void first_keys(int64_t lo, int64_t cnt, uint32_t* out) const {
    const S* gp = g + lo;
    S* ep = e + lo;
    for (int64_t j = 0; j < cnt; ++j) {
      const float p = lr * T::load(gp, j);
      const S a = T::round(T::load(ep, j) + p);
      ep[j] = a;
      out[j] = select_key(T::load(&a, 0));
    }
  }
  void keys(int64_t lo, int64_t cnt, uint32_t* out) const {
    const S* p = e + lo;
    for (int64_t j = 0; j < cnt; ++j) out[j] = select_key(T::load(p, j));
  }
};

template <class T>
struct Ef21Src {
  using S = typename T::storage;
  const S* g;
  const S* s;
  // key of d = round(g - s), recomputed in every pass instead of stored.
  void keys(int64_t lo, int64_t cnt, uint32_t* out) const {
    const S* gp = g + lo;
    const S* sp = s + lo;
    for (int64_t j = 0; j < cnt; ++j) {
      const S d = T::round(T::load(gp, j) - T::load(sp, j));
      out[j] = select_key(T::load(&d, 0));
    }
  }
  void first_keys(int64_t lo, int64_t cnt, uint32_t* out) const { keys(lo, cnt, out); }
};

// Runs fn(j) for j in [0, k) over threads (the per-coordinate finishing step after selection).
template <class Fn>
void for_selected(int64_t k, Fn&& fn) {
  const int nb = detail::num_blocks(k, int64_t{1} << 16);  // random accesses at the indices
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    detail::block_range(k, nb, b, &lo, &hi);
    for (int64_t j = lo; j < hi; ++j) fn(j);
  }
}

}  // namespace

void topk_compress(const void* x, DType dtype, int64_t n, int64_t k, int64_t* idx, void* val) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    CompressSrc<T> src{static_cast<const S*>(x)};
    topk_select(src, n, k, idx);
    S* v = static_cast<S*>(val);
    for_selected(k, [&](int64_t j) { v[j] = src.x[idx[j]]; });
  });
}

void ef14_topk(const void* grad, void* err, DType dtype, int64_t n, int64_t k, float lr,
               int64_t* idx, void* val) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    Ef14Src<T> src{static_cast<const S*>(grad), static_cast<S*>(err), lr};
    topk_select(src, n, k, idx);
    S* v = static_cast<S*>(val);
    const S zero = T::round(0.0f);
    for_selected(k, [&](int64_t j) {
      v[j] = src.e[idx[j]];
      src.e[idx[j]] = zero;
    });
  });
}

void ef21_topk(const void* grad, void* state, DType dtype, int64_t n, int64_t k, int64_t* idx,
               void* val) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    S* s = static_cast<S*>(state);
    Ef21Src<T> src{static_cast<const S*>(grad), s};
    topk_select(src, n, k, idx);
    S* v = static_cast<S*>(val);
    for_selected(k, [&](int64_t j) {
      const int64_t i = idx[j];
      const float si = T::load(s, i);
      const S d = T::round(T::load(src.g, i) - si);
      v[j] = d;
      T::store(s, i, si + T::load(&d, 0));
    });
  });
}

void diff_topk_compress(const void* a, const void* b, DType dtype, int64_t n, int64_t k,
                        int64_t* idx, void* val) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    Ef21Src<T> src{static_cast<const S*>(a), static_cast<const S*>(b)};
    topk_select(src, n, k, idx);
    S* v = static_cast<S*>(val);
    for_selected(k, [&](int64_t j) {
      const int64_t i = idx[j];
      v[j] = T::round(T::load(src.g, i) - T::load(src.s, i));
    });
  });
}

}  // namespace fedkern
