// fedkern top-k selection kernels (SPEC.md ops 1-3), compiled at first use by NVRTC through CuPy
// (fedkern/cuda/topk.py launches them). No CUDA headers (NVRTC needs no CUDA toolkit); the shared
// integer types, bf16 and IEEE fp32 helpers come from fk_common.cuh.
//
// Math. key(v) = bits(fp32 v) & 0x7fffffff, and 0x7f800001 for every NaN: the key orders |v|,
// -0 == +0 and all NaNs tie above +inf. select(key, k) = the k positions with the largest key,
// ties to the lower index, in ascending index order.
//   topk_compress(x, k):      idx = select(key(x)), values = x[idx] (bit copy)
//   ef14_topk_(g, e, k, lr):  a = round(e + lr*g) -> e for all j, idx = select(key(a)),
//                             values = a[idx], e[idx] = 0
//   ef21_topk_(g, s, k):      d = round(g - s) (never stored), idx = select(key(d)),
//                             values = d[idx], s[idx] = round(s[idx] + d[idx])
// round() is the identity for fp32 and round-to-nearest-even for bf16. fp32 add/sub/mul are
// explicit add.rn/sub.rn/mul.rn PTX: never contracted into an FMA, never flushed to zero (CuPy
// compiles every module with -ftz=true, which flushes denormals in plain float code and in the
// __fadd_rn family).
//
// Radix select on the 31-bit key: top digit key >> 19 (12 bits = 8 exponent + 4 mantissa bits),
// then the 19 low bits as a coarse digit (key >> 8) & 2047 and a fine digit key & 255. The input
// is cut into `tiles` contiguous chunks, one block each. Kernels in launch order (all are enqueued
// on every call and skip themselves from ctrl[kMode]: the host never waits for the device):
//   1 pass1        Full read (EF14: also writes a). Per tile a 4096-bin shared histogram of
//                  key >> 19, stored as the tile's row and added to a global histogram. The last
//                  block finds the bucket b1 of the k-th largest key, the rank k1 of that key in
//                  b1 and M = #{key >> 19 >= b1}. Mode CAND if M <= cap, else FULL.
//   2 tile_reduce  CAND. Per tile #{digit > b1} and #{digit == b1} from its row; the last block
//                  turns them into exclusive prefixes over the tiles.
//   3 compact      CAND, full read. Writes the M candidates (index, key) in ascending index order
//                  and a 19-bit histogram of the low bits of the keys in b1; the last block finds
//                  the threshold key T (the k-th largest) and r = k - #{key > T}, the ties kept.
//   4 refine       FULL, full read. The same 19-bit histogram without candidates (slow path: more
//                  than cap keys share the top 12 bits of the k-th key, e.g. mostly zeros).
//   5 count        Candidates (CAND) or input (FULL): per tile #{key > T} and #{key == T}; the
//                  last block scans them.
//   6 write        Same range. The element j with G(j) greater keys and E(j) ties before it goes
//                  to output slot G(j) + min(E(j), r) iff key > T, or key == T and E(j) < r: ties
//                  in index order, output ascending. The epilogue (values, error / state update)
//                  is fused here.
// Fast path: 2 full reads + O(M) work, M ~ k + one 1/16-octave bucket; slow path: 4 full reads.
// Only integer counting and integer atomics: the result is deterministic.

#include "fk_common.cuh"

namespace fktopk {

using namespace fkcuda;  // integer types, bf16, add_rn / sub_rn / mul_rn, to_f32, bf16_bits

constexpr int kBlock = 256;  // threads per block in every kernel
constexpr int kWarps = kBlock / 32;
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread per round
constexpr int kL1Shift = 19;
constexpr int kL1Bins = 1 << (31 - kL1Shift);  // 4096; the largest key 0x7f800001 has digit 4080
constexpr int kCoarseShift = 8;
constexpr int kCoarseBins = 1 << (kL1Shift - kCoarseShift);  // 2048
constexpr int kSubBins = 1 << kCoarseShift;                  // 256 fine bins per coarse bin
constexpr u32 kLowMask = (1u << kL1Shift) - 1;  // 19 bits: index into the fine histogram

constexpr int kOpTopk = 0, kOpEF14 = 1, kOpEF21 = 2;

// Words of the control block (u64, zeroed by the host before pass 1).
enum : int {
  kMode = 0,
  kB1 = 1,
  kK1 = 2,
  kM = 3,
  kThr = 4,
  kTies = 5,
  kTickPass1 = 8,
  kTickReduce = 9,
  kTickCompact = 10,
  kTickRefine = 11,
  kTickCount = 12
};
constexpr u64 kModeCand = 1, kModeFull = 2;

__device__ __forceinline__ i64 min64(i64 a, i64 b) { return a < b ? a : b; }

// ---- dtype conversions (the IEEE fp32 arithmetic is fk_common.cuh's) ---------------------------

template <typename T>
__device__ __forceinline__ T round_to(float f);

template <>
__device__ __forceinline__ float round_to<float>(float f) {
  return f;
}

// fp32 -> bf16, round to nearest even on the bits (NaN -> 0x7fc0, as torch's CPU conversion).
template <>
__device__ __forceinline__ bf16 round_to<bf16>(float f) {
  bf16 r;
  r.bits = bf16_bits(f);
  return r;
}

__device__ __forceinline__ u32 key_bits(u32 b) {
  const u32 u = b & 0x7fffffffu;
  return u > 0x7f800000u ? 0x7f800001u : u;
}
__device__ __forceinline__ u32 key_of(float v) { return key_bits(__float_as_uint(v)); }
__device__ __forceinline__ u32 key_of(bf16 v) { return key_bits((u32)v.bits << 16); }

// ---- 16-byte vector loads / stores (V elements; V == 1 is the unaligned fallback) ---------------

struct alignas(16) Pack16 {
  u32 w[4];
};

__device__ __forceinline__ void unpack(const Pack16& p, float (&o)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) o[j] = __uint_as_float(p.w[j]);
}
__device__ __forceinline__ void unpack(const Pack16& p, bf16 (&o)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    o[2 * j].bits = (u16)(p.w[j] & 0xffffu);
    o[2 * j + 1].bits = (u16)(p.w[j] >> 16);
  }
}
__device__ __forceinline__ void pack(const float (&o)[4], Pack16& p) {
#pragma unroll
  for (int j = 0; j < 4; ++j) p.w[j] = __float_as_uint(o[j]);
}
__device__ __forceinline__ void pack(const bf16 (&o)[8], Pack16& p) {
#pragma unroll
  for (int j = 0; j < 4; ++j) p.w[j] = (u32)o[2 * j].bits | ((u32)o[2 * j + 1].bits << 16);
}

// Loads elements [v*V, v*V + V) of p; positions >= end read as zero.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, i64 v, i64 end, T (&out)[V]) {
  const i64 i0 = v * V;
  if constexpr (V > 1) {
    if (i0 + V <= end) {
      unpack(*reinterpret_cast<const Pack16*>(p + i0), out);
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = (i0 + e < end) ? p[i0 + e] : T{};
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, i64 v, i64 end, const T (&in)[V]) {
  const i64 i0 = v * V;
  if constexpr (V > 1) {
    if (i0 + V <= end) {
      Pack16 pk;
      pack(in, pk);
      *reinterpret_cast<Pack16*>(p + i0) = pk;
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e)
    if (i0 + e < end) p[i0 + e] = in[e];
}

// ---- key sources -----------------------------------------------------------------------------

// Keys of the input, V consecutive elements at a time. p0/p1 = (x, -) for topk, (grad, error) for
// EF14, (grad, state) for EF21. FIRST (pass 1 only): EF14 computes a = round(e + lr*g) and stores
// it into error; later passes read a back from error.
template <int OP, typename T, int V, bool FIRST>
struct FullSrc {
  static constexpr int kVec = V;
  T* p0;
  T* p1;
  float lr;

  __device__ __forceinline__ i64 index(i64 i) const { return i; }

  __device__ __forceinline__ void load(i64 v, i64 end, u32 (&key)[V]) const {
    T a[V];
    if constexpr (OP == kOpTopk) {
      load_vec<T, V>(p0, v, end, a);
    } else if constexpr (OP == kOpEF14) {
      load_vec<T, V>(p1, v, end, a);
      if constexpr (FIRST) {
        T g[V];
        load_vec<T, V>(p0, v, end, g);
#pragma unroll
        for (int e = 0; e < V; ++e)
          a[e] = round_to<T>(add_rn(to_f32(a[e]), mul_rn(lr, to_f32(g[e]))));
        store_vec<T, V>(p1, v, end, a);
      }
    } else {
      T s[V];
      load_vec<T, V>(p0, v, end, a);
      load_vec<T, V>(p1, v, end, s);
#pragma unroll
      for (int e = 0; e < V; ++e) a[e] = round_to<T>(sub_rn(to_f32(a[e]), to_f32(s[e])));
    }
#pragma unroll
    for (int e = 0; e < V; ++e) key[e] = key_of(a[e]);
  }
};

// The candidate buffer written by `compact`: keys and input positions, ascending by position.
struct CandSrc {
  static constexpr int kVec = 4;
  const u32* keys;
  const i64* idx;

  __device__ __forceinline__ i64 index(i64 i) const { return idx[i]; }

  __device__ __forceinline__ void load(i64 v, i64 end, u32 (&key)[4]) const {
    const i64 i0 = v * 4;
    if (i0 + 4 <= end) {
      const Pack16 p = *reinterpret_cast<const Pack16*>(keys + i0);
#pragma unroll
      for (int e = 0; e < 4; ++e) key[e] = p.w[e];
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) key[e] = (i0 + e < end) ? keys[i0 + e] : 0u;
    }
  }
};

// Tile b of a range of length len, cut into gridDim.x chunks whose size is a multiple of V (so
// every tile but the last starts and ends on a vector boundary).
__device__ __forceinline__ void tile_of(i64 len, int V, i64* t0, i64* t1) {
  i64 chunk = (len + gridDim.x - 1) / gridDim.x;
  chunk = (chunk + V - 1) / V * V;
  *t0 = min64(len, (i64)blockIdx.x * chunk);
  *t1 = min64(len, *t0 + chunk);
}

// ---- block-wide primitives -------------------------------------------------------------------

// Inclusive scan of v over the threads of the block; *total = sum over the block.
__device__ u64 block_incl_scan(u64 v, u64* total) {
  __shared__ u64 warp_sums[kWarps];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  for (int d = 1; d < 32; d <<= 1) {
    const u64 t = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += t;
  }
  if (lane == 31) warp_sums[w] = v;
  __syncthreads();
  u64 pre = 0, tot = 0;
  for (int i = 0; i < kWarps; ++i) {
    const u64 s = warp_sums[i];
    pre += i < w ? s : 0;
    tot += s;
  }
  __syncthreads();
  *total = tot;
  return v + pre;
}

// kUnroll independent exclusive scans over the threads of the block (one smem round trip).
__device__ void block_scan_batch(const u32 (&v)[kUnroll], u32 (&excl)[kUnroll],
                                 u32 (&tot)[kUnroll]) {
  __shared__ u32 warp_sums[kUnroll][kWarps];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  u32 inc[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) inc[u] = v[u];
  for (int d = 1; d < 32; d <<= 1) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const u32 t = __shfl_up_sync(0xffffffffu, inc[u], d);
      if (lane >= d) inc[u] += t;
    }
  }
  if (lane == 31)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) warp_sums[u][w] = inc[u];
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    u32 pre = 0, t = 0;
    for (int i = 0; i < kWarps; ++i) {
      const u32 s = warp_sums[u][i];
      pre += i < w ? s : 0u;
      t += s;
    }
    excl[u] = pre + inc[u] - v[u];
    tot[u] = t;
  }
  __syncthreads();
}

// Given a histogram h[NBINS] and a rank 1 <= k <= sum(h), finds the bucket b with
// S(b + 1) < k <= S(b), S(b) = sum_{d >= b} h[d], and above = S(b + 1). h was written by other
// blocks of this kernel (volatile: read from L2). Thread t owns P = NBINS / kBlock bins, thread 0
// the highest.
template <int NBINS>
__device__ void block_select(const volatile u64* h, u64 k, u32* bucket, u64* above) {
  static_assert(NBINS % kBlock == 0, "bins must split evenly over the block");
  constexpr int P = NBINS / kBlock;
  __shared__ u32 s_bucket;
  __shared__ u64 s_above;
  const int hi = NBINS - (int)threadIdx.x * P;
  if (threadIdx.x == 0) {
    s_bucket = 0;
    s_above = 0;
  }
  u64 s = 0;
  for (int i = 1; i <= P; ++i) s += h[hi - i];
  u64 total;
  const u64 incl = block_incl_scan(s, &total);
  const u64 excl = incl - s;
  if (excl < k && k <= incl) {  // exactly one thread: the bucket lies in its bins
    u64 acc = excl;
    for (int i = 1; i <= P; ++i) {
      const u64 c = h[hi - i];
      if (acc + c >= k) {
        s_bucket = (u32)(hi - i);
        s_above = acc;
        break;
      }
      acc += c;
    }
  }
  __syncthreads();
  *bucket = s_bucket;
  *above = s_above;
}

// True in every thread of the block that finishes last; the global writes (and atomics) of all
// other blocks are then visible to it.
__device__ bool last_block(u64* ticket) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(ticket, 1ull) == (u64)gridDim.x - 1;
  __syncthreads();
  const bool last = s_last != 0;
  if (last) __threadfence();
  return last;
}

// In place: tc[2t], tc[2t+1] (t < tiles) become exclusive prefix sums over the tiles.
__device__ void scan_tile_pairs(u64* tc, i64 tiles) {
  volatile u64* v = tc;
  u64 carry_g = 0, carry_e = 0;
  for (i64 base = 0; base < tiles; base += kBlock) {
    const i64 t = base + threadIdx.x;
    const u64 g = t < tiles ? v[2 * t] : 0, e = t < tiles ? v[2 * t + 1] : 0;
    u64 tot_g, tot_e;
    const u64 ig = block_incl_scan(g, &tot_g);
    const u64 ie = block_incl_scan(e, &tot_e);
    if (t < tiles) {
      v[2 * t] = carry_g + ig - g;
      v[2 * t + 1] = carry_e + ie - e;
    }
    carry_g += tot_g;
    carry_e += tot_e;
  }
}

// ---- histogram helpers (a run of equal bins costs one atomic: cheap on zero-heavy inputs) ----

struct RunHist {  // shared-memory histogram of u32 counts
  u32* sh;
  u32 bin = 0xffffffffu;
  u32 cnt = 0;
  __device__ __forceinline__ void flush() {
    if (cnt) atomicAdd(&sh[bin], cnt);
    cnt = 0;
  }
  __device__ __forceinline__ void add(u32 b) {
    if (b != bin) {
      flush();
      bin = b;
    }
    ++cnt;
  }
};

struct LowHist {  // the 19 low key bits: global fine histogram + shared coarse histogram
  u64* fine;
  u32* coarse;
  u32 bin = 0xffffffffu;
  u32 cnt = 0;
  __device__ __forceinline__ void flush() {
    if (cnt) {
      atomicAdd(&fine[bin], (u64)cnt);
      atomicAdd(&coarse[bin >> kCoarseShift], cnt);
    }
    cnt = 0;
  }
  __device__ __forceinline__ void add(u32 b) {
    if (b != bin) {
      flush();
      bin = b;
    }
    ++cnt;
  }
};

// Adds a block's shared coarse histogram into the global one.
__device__ void merge_coarse(const u32* sh, u64* coarse) {
  __syncthreads();
  for (int b = threadIdx.x; b < kCoarseBins; b += kBlock)
    if (sh[b]) atomicAdd(&coarse[b], (u64)sh[b]);
}

// Last block of compact / refine: exact threshold T and number of ties r from the 19-bit histogram.
__device__ void finish_threshold(u64* ctrl, const u64* coarse, const u64* fine) {
  const u64 b1 = ctrl[kB1], k1 = ctrl[kK1];
  u32 cb, fb;
  u64 above_c, above_f;
  block_select<kCoarseBins>(coarse, k1, &cb, &above_c);
  const u64 k2 = k1 - above_c;
  block_select<kSubBins>(fine + (i64)cb * kSubBins, k2, &fb, &above_f);
  if (threadIdx.x == 0) {
    ctrl[kThr] = (b1 << kL1Shift) | ((u64)cb << kCoarseShift) | fb;
    ctrl[kTies] = k2 - above_f;
  }
}

// ---- walkers over one tile -------------------------------------------------------------------

// Calls fn(i, key) for every position i in [t0, t1), in no particular order. t0 % V == 0.
template <class Src, class Fn>
__device__ __forceinline__ void unordered_walk(const Src& src, i64 t0, i64 t1, Fn& fn) {
  constexpr int V = Src::kVec;
  if (t0 >= t1) return;  // an empty tile may start off a vector boundary
  const i64 v1 = (t1 + V - 1) / V;
  for (i64 vb = t0 / V + threadIdx.x; vb < v1; vb += (i64)kBlock * kUnroll) {
    u32 key[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (vb + u * kBlock < v1) src.load(vb + u * kBlock, t1, key[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const i64 v = vb + u * kBlock;
      if (v >= v1) break;
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (v * V + e < t1) fn(v * V + e, key[u][e]);
    }
  }
}

// Ordered compaction of [t0, t1) (t0 % V == 0, block-uniform). With d = key >> shift, an element is
// "greater" if d > P and a "tie" if d == P. G, E = numbers of greater / tie elements before t0.
// Every greater element and every tie whose tie rank E(j) < r is passed to sink(src.index(j), key,
// slot, tie) with slot = G(j) + min(E(j), r). A round is kUnroll sub-rounds of kBlock vectors;
// thread order inside a sub-round is index order, so one batched block scan per round gives
// every slot.
template <class Src, class Sink>
__device__ void ordered_walk(const Src& src, i64 t0, i64 t1, u32 P, int shift, u64 r, u64 G, u64 E,
                             Sink& sink) {
  constexpr int V = Src::kVec;
  if (t0 >= t1) return;  // block-uniform; an empty tile may start off a vector boundary
  const i64 v1 = (t1 + V - 1) / V;
  for (i64 vb = t0 / V; vb < v1; vb += (i64)kBlock * kUnroll) {
    u32 key[kUnroll][V];
    u32 cnt[kUnroll];  // greater count in the low 16 bits, tie count in the high 16 bits
    u32 any = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const i64 v = vb + u * kBlock + threadIdx.x;
      cnt[u] = 0;
      if (v < v1) {
        src.load(v, t1, key[u]);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const u32 d = key[u][e] >> shift;
          if (v * V + e < t1) cnt[u] += d > P ? 1u : (d == P ? 0x10000u : 0u);
        }
      }
      any |= cnt[u];
    }
    if (!__syncthreads_or(any != 0)) continue;  // nothing kept in this round (block-uniform)
    u32 excl[kUnroll], tot[kUnroll];
    block_scan_batch(cnt, excl, tot);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (cnt[u]) {
        const i64 v = vb + u * kBlock + threadIdx.x;
        u64 g = G + (excl[u] & 0xffffu), e = E + (excl[u] >> 16);
#pragma unroll
        for (int el = 0; el < V; ++el) {
          const u32 k = key[u][el], d = k >> shift;
          if (v * V + el >= t1 || d < P) continue;
          if (d > P) {
            sink(src.index(v * V + el), k, g + (e < r ? e : r), false);
            ++g;
          } else {
            if (e < r) sink(src.index(v * V + el), k, g + e, true);
            ++e;
          }
        }
      }
      G += tot[u] & 0xffffu;
      E += tot[u] >> 16;
    }
  }
}

// Candidate writer of `compact`; ties (keys in bucket b1) also feed the 19-bit histogram.
struct CandSink {
  i64* idx;
  u32* keys;
  LowHist low;
  __device__ __forceinline__ void operator()(i64 j, u32 key, u64 slot, bool tie) {
    idx[slot] = j;
    keys[slot] = key;
    if (tie) low.add(key & kLowMask);
  }
};

// Output writer of `write` with the op's epilogue.
template <int OP, typename T>
struct OutSink {
  T* p0;
  T* p1;
  T* values;
  i64* indices;
  __device__ __forceinline__ void operator()(i64 j, u32, u64 slot, bool) const {
    indices[slot] = j;
    if constexpr (OP == kOpTopk) {
      values[slot] = p0[j];
    } else if constexpr (OP == kOpEF14) {
      values[slot] = p1[j];
      p1[j] = T{};
    } else {
      const float s = to_f32(p1[j]);
      const T d = round_to<T>(sub_rn(to_f32(p0[j]), s));
      values[slot] = d;
      p1[j] = round_to<T>(add_rn(s, to_f32(d)));
    }
  }
};

// ---- kernels (bodies; the extern "C" entry points are instantiated at the end) -----------------

template <int OP, typename T, int V>
__device__ void pass1(T* p0, T* p1, float lr, i64 n, i64 chunk, u64 k, u64 cap, u64* ctrl,
                      u64* hist1, u32* rows) {
  __shared__ u32 sh[kL1Bins];
  for (int b = threadIdx.x; b < kL1Bins; b += kBlock) sh[b] = 0;
  __syncthreads();
  const i64 t0 = min64(n, (i64)blockIdx.x * chunk), t1 = min64(n, t0 + chunk);
  RunHist hist{sh};
  const FullSrc<OP, T, V, true> src{p0, p1, lr};
  auto fn = [&](i64, u32 key) { hist.add(key >> kL1Shift); };
  unordered_walk(src, t0, t1, fn);
  hist.flush();
  __syncthreads();
  u32* row = rows + (i64)blockIdx.x * kL1Bins;
  for (int b = threadIdx.x; b < kL1Bins; b += kBlock) {
    const u32 c = sh[b];
    row[b] = c;
    if (c) atomicAdd(&hist1[b], (u64)c);
  }
  if (!last_block(&ctrl[kTickPass1])) return;
  u32 b1;
  u64 above;
  block_select<kL1Bins>(hist1, k, &b1, &above);
  if (threadIdx.x == 0) {
    const u64 m = above + ((volatile u64*)hist1)[b1];
    ctrl[kB1] = b1;
    ctrl[kK1] = k - above;
    ctrl[kM] = m;
    ctrl[kMode] = m <= cap ? kModeCand : kModeFull;
  }
}

__device__ void tile_reduce(const u32* rows, u64* ctrl, u64* tcnt) {
  if (ctrl[kMode] != kModeCand) return;
  const int b1 = (int)ctrl[kB1];
  const u32* row = rows + (i64)blockIdx.x * kL1Bins;
  u64 g = 0;
  for (int b = b1 + 1 + threadIdx.x; b < kL1Bins; b += kBlock) g += row[b];
  u64 total;
  block_incl_scan(g, &total);
  if (threadIdx.x == 0) {
    tcnt[2 * blockIdx.x] = total;
    tcnt[2 * blockIdx.x + 1] = row[b1];
  }
  if (last_block(&ctrl[kTickReduce])) scan_tile_pairs(tcnt, gridDim.x);
}

template <int OP, typename T, int V>
__device__ void compact(T* p0, T* p1, i64 n, i64 chunk, u64* ctrl, const u64* tcnt, i64* cand_idx,
                        u32* cand_key, u64* coarse, u64* fine) {
  if (ctrl[kMode] != kModeCand) return;
  __shared__ u32 sh[kCoarseBins];
  for (int b = threadIdx.x; b < kCoarseBins; b += kBlock) sh[b] = 0;
  __syncthreads();
  const i64 t0 = min64(n, (i64)blockIdx.x * chunk), t1 = min64(n, t0 + chunk);
  CandSink sink{cand_idx, cand_key, LowHist{fine, sh}};
  const FullSrc<OP, T, V, false> src{p0, p1, 0.0f};
  ordered_walk(src, t0, t1, (u32)ctrl[kB1], kL1Shift, ~0ull, tcnt[2 * blockIdx.x],
               tcnt[2 * blockIdx.x + 1], sink);
  sink.low.flush();
  merge_coarse(sh, coarse);
  if (last_block(&ctrl[kTickCompact])) finish_threshold(ctrl, coarse, fine);
}

template <int OP, typename T, int V>
__device__ void refine(T* p0, T* p1, i64 n, i64 chunk, u64* ctrl, u64* coarse, u64* fine) {
  if (ctrl[kMode] != kModeFull) return;
  __shared__ u32 sh[kCoarseBins];
  for (int b = threadIdx.x; b < kCoarseBins; b += kBlock) sh[b] = 0;
  __syncthreads();
  const i64 t0 = min64(n, (i64)blockIdx.x * chunk), t1 = min64(n, t0 + chunk);
  const u32 b1 = (u32)ctrl[kB1];
  LowHist low{fine, sh};
  const FullSrc<OP, T, V, false> src{p0, p1, 0.0f};
  auto fn = [&](i64, u32 key) {
    if ((key >> kL1Shift) == b1) low.add(key & kLowMask);
  };
  unordered_walk(src, t0, t1, fn);
  low.flush();
  merge_coarse(sh, coarse);
  if (last_block(&ctrl[kTickRefine])) finish_threshold(ctrl, coarse, fine);
}

template <int OP, typename T, int V>
__device__ void count(T* p0, T* p1, i64 n, u64* ctrl, const i64* cand_idx, const u32* cand_key,
                      u64* tcnt) {
  const u32 thr = (u32)ctrl[kThr];
  u64 g = 0, e = 0;
  auto fn = [&](i64, u32 key) {
    g += key > thr;
    e += key == thr;
  };
  i64 t0, t1;
  if (ctrl[kMode] == kModeCand) {
    const CandSrc src{cand_key, cand_idx};
    tile_of((i64)ctrl[kM], CandSrc::kVec, &t0, &t1);
    unordered_walk(src, t0, t1, fn);
  } else {
    const FullSrc<OP, T, V, false> src{p0, p1, 0.0f};
    tile_of(n, V, &t0, &t1);
    unordered_walk(src, t0, t1, fn);
  }
  u64 tot_g, tot_e;
  block_incl_scan(g, &tot_g);
  block_incl_scan(e, &tot_e);
  if (threadIdx.x == 0) {
    tcnt[2 * blockIdx.x] = tot_g;
    tcnt[2 * blockIdx.x + 1] = tot_e;
  }
  if (last_block(&ctrl[kTickCount])) scan_tile_pairs(tcnt, gridDim.x);
}

template <int OP, typename T, int V>
__device__ void write(T* p0, T* p1, i64 n, const u64* ctrl, const i64* cand_idx,
                      const u32* cand_key, const u64* tcnt, T* values, i64* indices) {
  const u32 thr = (u32)ctrl[kThr];
  const u64 ties = ctrl[kTies], G = tcnt[2 * blockIdx.x], E = tcnt[2 * blockIdx.x + 1];
  OutSink<OP, T> sink{p0, p1, values, indices};
  i64 t0, t1;
  if (ctrl[kMode] == kModeCand) {
    const CandSrc src{cand_key, cand_idx};
    tile_of((i64)ctrl[kM], CandSrc::kVec, &t0, &t1);
    ordered_walk(src, t0, t1, thr, 0, ties, G, E, sink);
  } else {
    const FullSrc<OP, T, V, false> src{p0, p1, 0.0f};
    tile_of(n, V, &t0, &t1);
    ordered_walk(src, t0, t1, thr, 0, ties, G, E, sink);
  }
}

}  // namespace fktopk

// ---- extern "C" entry points: fk_topk_<stage>_<op>_<f32|bf16>_v<V> ------------------------------
// All take 256-thread blocks. pass1 / compact / refine use grid = tiles with the host's chunk (a
// multiple of V); count / write cut their range (input or candidates) over the grid themselves.

extern "C" __global__ void __launch_bounds__(fktopk::kBlock)
    fk_topk_tile_reduce(const unsigned* rows, unsigned long long* ctrl, unsigned long long* tcnt) {
  fktopk::tile_reduce(rows, ctrl, tcnt);
}

#define FK_TOPK_KERNELS(NAME, OP, DT, T, V)                                                     \
  extern "C" __global__ void __launch_bounds__(fktopk::kBlock, 4)                               \
      fk_topk_pass1_##NAME##_##DT##_v##V(T* p0, T* p1, float lr, long long n, long long chunk,  \
                                         unsigned long long k, unsigned long long cap,          \
                                         unsigned long long* ctrl, unsigned long long* hist1,   \
                                         unsigned* rows) {                                      \
    fktopk::pass1<OP, T, V>(p0, p1, lr, n, chunk, k, cap, ctrl, hist1, rows);                   \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(fktopk::kBlock, 4)                               \
      fk_topk_compact_##NAME##_##DT##_v##V(                                                     \
          T* p0, T* p1, long long n, long long chunk, unsigned long long* ctrl,                 \
          const unsigned long long* tcnt, long long* cand_idx, unsigned* cand_key,              \
          unsigned long long* coarse, unsigned long long* fine) {                               \
    fktopk::compact<OP, T, V>(p0, p1, n, chunk, ctrl, tcnt, cand_idx, cand_key, coarse, fine);  \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(fktopk::kBlock, 4)                               \
      fk_topk_refine_##NAME##_##DT##_v##V(T* p0, T* p1, long long n, long long chunk,           \
                                          unsigned long long* ctrl, unsigned long long* coarse, \
                                          unsigned long long* fine) {                           \
    fktopk::refine<OP, T, V>(p0, p1, n, chunk, ctrl, coarse, fine);                             \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(fktopk::kBlock, 4)                               \
      fk_topk_count_##NAME##_##DT##_v##V(T* p0, T* p1, long long n, unsigned long long* ctrl,   \
                                         const long long* cand_idx, const unsigned* cand_key,   \
                                         unsigned long long* tcnt) {                            \
    fktopk::count<OP, T, V>(p0, p1, n, ctrl, cand_idx, cand_key, tcnt);                         \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(fktopk::kBlock, 4)                               \
      fk_topk_write_##NAME##_##DT##_v##V(                                                       \
          T* p0, T* p1, long long n, const unsigned long long* ctrl, const long long* cand_idx, \
          const unsigned* cand_key, const unsigned long long* tcnt, T* values,                  \
          long long* indices) {                                                                 \
    fktopk::write<OP, T, V>(p0, p1, n, ctrl, cand_idx, cand_key, tcnt, values, indices);        \
  }

// The loader builds one variant per module (-DFK_TOPK_OP=<0|1|2> -DFK_TOPK_BF16=<0|1>
// -DFK_TOPK_VEC=<V>), which keeps NVRTC time to a few seconds; without these defines (nvcc check)
// every variant is built.
#ifdef FK_TOPK_OP
#define FK_TOPK_WANT(op, bf, v) (FK_TOPK_OP == (op) && FK_TOPK_BF16 == (bf) && FK_TOPK_VEC == (v))
#else
#define FK_TOPK_WANT(op, bf, v) 1
#endif
#if FK_TOPK_WANT(0, 0, 4)
FK_TOPK_KERNELS(topk, fktopk::kOpTopk, f32, float, 4)
#endif
#if FK_TOPK_WANT(0, 0, 1)
FK_TOPK_KERNELS(topk, fktopk::kOpTopk, f32, float, 1)
#endif
#if FK_TOPK_WANT(0, 1, 8)
FK_TOPK_KERNELS(topk, fktopk::kOpTopk, bf16, fktopk::bf16, 8)
#endif
#if FK_TOPK_WANT(0, 1, 1)
FK_TOPK_KERNELS(topk, fktopk::kOpTopk, bf16, fktopk::bf16, 1)
#endif
#if FK_TOPK_WANT(1, 0, 4)
FK_TOPK_KERNELS(ef14, fktopk::kOpEF14, f32, float, 4)
#endif
#if FK_TOPK_WANT(1, 0, 1)
FK_TOPK_KERNELS(ef14, fktopk::kOpEF14, f32, float, 1)
#endif
#if FK_TOPK_WANT(1, 1, 8)
FK_TOPK_KERNELS(ef14, fktopk::kOpEF14, bf16, fktopk::bf16, 8)
#endif
#if FK_TOPK_WANT(1, 1, 1)
FK_TOPK_KERNELS(ef14, fktopk::kOpEF14, bf16, fktopk::bf16, 1)
#endif
#if FK_TOPK_WANT(2, 0, 4)
FK_TOPK_KERNELS(ef21, fktopk::kOpEF21, f32, float, 4)
#endif
#if FK_TOPK_WANT(2, 0, 1)
FK_TOPK_KERNELS(ef21, fktopk::kOpEF21, f32, float, 1)
#endif
#if FK_TOPK_WANT(2, 1, 8)
FK_TOPK_KERNELS(ef21, fktopk::kOpEF21, bf16, fktopk::bf16, 8)
#endif
#if FK_TOPK_WANT(2, 1, 1)
FK_TOPK_KERNELS(ef21, fktopk::kOpEF21, bf16, fktopk::bf16, 1)
#endif
