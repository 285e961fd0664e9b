// fedkern MicroAdam fused step (fedkern/reference/microadam.py is the spec), compiled at first use
// by NVRTC through CuPy (fedkern/cuda/microadam.py launches it). No CUDA headers; the shared
// integer types, bf16 and IEEE fp32 helpers come from fk_common.cuh.
//
// Math, per tensor (n elements, blocks of D, K kept per block, buckets of Q, a window of m rows):
//   1. a    = float(g) + (ef_min[q] + code * ef_scale[q])            code: the 4-bit error feedback
//   2. key  = bits(|a|) (NaN above inf); the K_b = min(K, block length) largest keys of the block,
//             ties to the lower index, go to window row `row`: ascending local indices (int16), a
//             rounded to bf16 (RNE), then -1 / 0 in unused slots
//   3. r    = a with the selected entries set to 0; per bucket lo = min r, hi = max r,
//             scale = (hi - lo) / 15, code = clamp(floor((r - lo) / scale + 0.5), 0, 15), 0 when
//             scale is not > 0 (buckets past the tensor's end: lo = scale = 0, codes 0)
//   4. mom1 = sum_age w1[age] * v, mom2 = sum_age w2[age] * (v * v) over the window entries (i, v),
//             age 0 (the row just written) first
//   5. p    = round(p * decay - (c1 * mom1) / (sqrt(mom2) * c2 + eps))
// fp32 add/sub/mul/div/sqrt are explicit add.rn/sub.rn/mul.rn/div.rn/sqrt.rn PTX: never contracted
// into an FMA, never flushed to zero (CuPy compiles with -ftz=true, see fedkern/cuda/runtime.py).
//
// Algorithm. One launch per parameter dtype covers every tensor of the call: one CUDA block per
// MicroAdam block (grid = sum of ceil(n_i / D)), the owning tensor from a block -> tensor map and
// its pointers, n, first block, window row, c1 and c2 from an int64 table (w1, w2 at its end).
// Block b of a tensor owns window columns b*K .. b*K+K-1 and nothing else, so it writes its new
// row and reads its m rows back with no other block involved: one kernel, no grid-wide sync.
// Thread t holds the contiguous run [t*E, t*E + E) of the block in registers (E = D / threads,
// 16-byte vector loads when the pointers allow):
//   select   radix select of the K_b-th largest key T on 8, 8, 8 and 7 bits: a 256-bin shared
//            histogram of the next digit among the keys that match T's digits so far (integer
//            shared atomics, a run of equal bins in a thread costs one), warp 0 scans it for T's
//            digit. It stops early once every remaining candidate is needed (K_b = length: no
//            pass at all). With the prefix P found at bit `shift`, need = r: an element is taken
//            iff key >> shift > P, or == P and fewer than r such ties come before it. One block
//            scan of packed (greater, tie) counts in index order gives every slot,
//            G(j) + min(E(j), r): the row comes out ascending with no sort.
//   quantize bucket min/max in the thread (Q < E: Q a template argument, so no local arrays), or
//            by warp xor-shuffles over Q / E threads (and a shared step when a bucket spans
//            warps); scale and codes by div.rn; the codes packed two per byte by their thread.
//   moments  shared fp32 mom1/mom2 over a chunk of the block (the whole block for D <= 4096, else
//            4096-element chunks, each re-reading the block's m*K window entries: 32 KiB static
//            shared memory for every D): zeroed, then per age, newest first, each window entry
//            adds into its slot, a barrier between ages. A row's indices are distinct, so every
//            sum is formed in the reference's order (its index_add_ per age): bit-exact.
//   update   streams p over the chunk; the division and sqrt are skipped where both moments are
//            +0 (outside the window), which gives p * decay - 0 exactly as the full formula does.
//   A dense p pass is kept even for decay == 1: with m*K/D ~ 10% of positions in the window, most
//   32-byte sectors of a bf16 p are touched anyway, so a sparse update would save little traffic.
//
// Memory traffic per parameter (P = bytes of the dtype): g read P, p read + written 2P, ef read
// + written 1, ef_min/ef_scale 16/Q, the window m*K*4/D read (the block's rows, L2-resident for
// the row just written) + K*4/D written. bf16 with D = 4096, K = 41, Q = 256, m = 10: ~7.5 bytes
// (fused AdamW on bf16 moves 14); fp32: ~13.5.
//
// Untimed (no GPU when written). What to profile first: pass 1 of the selection, whose digit is
// the exponent of |a| -- for smooth data most of a warp's 32 atomics land on a few bins and
// serialise; if that dominates, lane-private copies of the histogram (in the moments' shared
// memory, unused at that point) or warp aggregation (__match_any_sync) remove the conflicts.
//
// Resources (nvcc -arch=sm_90 --resource-usage, CUDA 13.0): __launch_bounds__ asks for 1024
// resident threads per SM, i.e. <= 64 registers: D = 64..256 use 60-64 registers and no local
// memory; D = 512..16384 64 registers with 8-16 bytes of spills; D = 4096: 256 threads, 64
// registers, 33.9 KB static shared memory -> 4 resident blocks per SM (6 by shared memory).
// D = 32768 (1024 threads of 32 elements) spills ~0.5-0.7 KB per thread to L1-cached local memory.
//
// Deterministic: integer atomics only (histograms), min/max are order-independent (NaN wins),
// every float sum has a fixed order. Results equal the reference bit for bit, except NaN payloads
// (the GPU's add.rn returns the canonical NaN, the CPU keeps the operand's payload: keys of NaNs
// with different payloads may rank differently).

#include "fk_common.cuh"

namespace fkma {

// integer types, bf16, add_rn / sub_rn / mul_rn / div_rn / sqrt_rn / floor_rn, to_f32, bf16_bits
using namespace fkcuda;

// Columns of the per-tensor table (int64; floats as their float32 bits).
enum : int { kP = 0, kG, kEF, kMin, kScale, kIdx, kVal, kN, kFirst, kRow, kC1, kC2, kCols };

constexpr float kLevels = 15.0f;
constexpr int kBins = 256;
constexpr int kChunk = 4096;  // moments in shared memory: 2 * 4096 * 4 bytes = 32 KiB

// Threads per block and the run E = D / threads each holds: 16 elements (32 for D = 32768).
template <int D>
struct Cfg {
  static constexpr int kThreads = D / 16 < 32 ? 32 : (D / 16 > 1024 ? 1024 : D / 16);
  static constexpr int kE = D / kThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kCh = D < kChunk ? D : kChunk;
  static constexpr int kEu = kCh / kThreads;  // elements per thread in the update
  // resident blocks asked of ptxas: 1024 threads per SM, i.e. at most 64 registers per thread
  static constexpr int kMinBlocks = kThreads < 1024 ? 1024 / kThreads : 1;
  static_assert(kE >= 2 && kE % 2 == 0 && kEu >= 2, "runs of at least one ef byte");
};

// ---- float bits (the IEEE arithmetic is fk_common.cuh's) ---------------------------------------

__device__ __forceinline__ float f32_of(u32 bits) { return __uint_as_float(bits); }

// Float tests on the bits: under CuPy's -ftz=true a float compare (setp.ftz) sees subnormals as
// zero, which would change bucket minima and the scale > 0 test on tiny residuals.
__device__ __forceinline__ bool is_nan(float v) {
  return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}
// The order of non-NaN floats as int (-0 just below +0; the residuals are never -0).
__device__ __forceinline__ int ordered(float v) {
  const int i = (int)__float_as_uint(v);
  return i ^ ((i >> 31) & 0x7fffffff);
}
// min / max that return NaN if either operand is NaN (torch's amin / amax).
__device__ __forceinline__ float min_nan(float a, float b) {
  return (is_nan(b) || (!is_nan(a) && ordered(b) < ordered(a))) ? b : a;
}
__device__ __forceinline__ float max_nan(float a, float b) {
  return (is_nan(b) || (!is_nan(a) && ordered(b) > ordered(a))) ? b : a;
}
// scale > 0 (false for NaN), subnormals included.
__device__ __forceinline__ bool positive(float v) { return __float_as_uint(v) - 1u < 0x7f800000u; }

// ---- runs of E consecutive elements: vector loads / stores when aligned ---------------------

struct alignas(16) Pack16 {
  u32 w[4];
};

// Loads NB bytes (a power of two) at p into words w[NB / 4] (NB >= 4).
template <int NB>
__device__ __forceinline__ void load_words(const void* p, u32 (&w)[NB / 4]) {
  if constexpr (NB >= 16) {
#pragma unroll
    for (int v = 0; v < NB / 16; ++v) {
      const Pack16 pk = reinterpret_cast<const Pack16*>(p)[v];
#pragma unroll
      for (int j = 0; j < 4; ++j) w[4 * v + j] = pk.w[j];
    }
  } else if constexpr (NB == 8) {
    const u64 x = *reinterpret_cast<const u64*>(p);
    w[0] = (u32)x;
    w[1] = (u32)(x >> 32);
  } else {
    w[0] = *reinterpret_cast<const u32*>(p);
  }
}

template <int NB>
__device__ __forceinline__ void store_words(void* p, const u32 (&w)[NB / 4]) {
  if constexpr (NB >= 16) {
#pragma unroll
    for (int v = 0; v < NB / 16; ++v) {
      Pack16 pk;
#pragma unroll
      for (int j = 0; j < 4; ++j) pk.w[j] = w[4 * v + j];
      reinterpret_cast<Pack16*>(p)[v] = pk;
    }
  } else if constexpr (NB == 8) {
    *reinterpret_cast<u64*>(p) = (u64)w[0] | ((u64)w[1] << 32);
  } else {
    *reinterpret_cast<u32*>(p) = w[0];
  }
}

// out[e] = float(p[e]) for e < cnt, 0 past it; vec: p is aligned to the run's byte size.
template <typename T, int E>
__device__ __forceinline__ void load_run(const T* p, int cnt, bool vec, float (&out)[E]) {
  constexpr int NB = E * (int)sizeof(T);
  if (vec && cnt >= E) {
    u32 w[NB / 4];
    load_words<NB>(p, w);
#pragma unroll
    for (int j = 0; j < NB / 4; ++j) {
      if constexpr (sizeof(T) == 4) {
        out[j] = f32_of(w[j]);
      } else {
        out[2 * j] = f32_of(w[j] << 16);
        out[2 * j + 1] = f32_of(w[j] & 0xffff0000u);
      }
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = e < cnt ? to_f32(p[e]) : 0.0f;
}

__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(bf16* p, float v) { p->bits = bf16_bits(v); }

// p[e] = round(in[e]) for e < cnt.
template <typename T, int E>
__device__ __forceinline__ void store_run(T* p, int cnt, bool vec, const float (&in)[E]) {
  constexpr int NB = E * (int)sizeof(T);
  if (vec && cnt >= E) {
    u32 w[NB / 4];
#pragma unroll
    for (int j = 0; j < NB / 4; ++j) {
      if constexpr (sizeof(T) == 4) {
        w[j] = __float_as_uint(in[j]);
      } else {
        w[j] = (u32)bf16_bits(in[2 * j]) | ((u32)bf16_bits(in[2 * j + 1]) << 16);
      }
    }
    store_words<NB>(p, w);
    return;
  }
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (e < cnt) put(p + e, in[e]);
}

// NB bytes of error feedback (always inside the state tensor).
template <int NB>
__device__ __forceinline__ void load_bytes(const u8* p, bool vec, u8 (&out)[NB]) {
  if constexpr (NB >= 4) {
    if (vec) {
      u32 w[NB / 4];
      load_words<NB>(p, w);
#pragma unroll
      for (int j = 0; j < NB; ++j) out[j] = (u8)(w[j / 4] >> (8 * (j % 4)));
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < NB; ++j) out[j] = p[j];
}

template <int NB>
__device__ __forceinline__ void store_bytes(u8* p, bool vec, const u8 (&in)[NB]) {
  if constexpr (NB >= 4) {
    if (vec) {
      u32 w[NB / 4];
#pragma unroll
      for (int j = 0; j < NB / 4; ++j)
        w[j] = (u32)in[4 * j] | ((u32)in[4 * j + 1] << 8) | ((u32)in[4 * j + 2] << 16) |
               ((u32)in[4 * j + 3] << 24);
      store_words<NB>(p, w);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < NB; ++j) p[j] = in[j];
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<u64>(p) & 15u) == 0;
}

// The 4-bit code of residual x in a bucket (lo, scale), scale > 0: clamp(floor((x - lo) / scale
// + 0.5), 0, 15), NaN -> 0.
__device__ __forceinline__ u32 quant_code(float x, float lo, float scale) {
  float c = floor_rn(add_rn(div_rn(sub_rn(x, lo), scale), 0.5f));
  // c is NaN, +-inf or a whole number (no subnormal: the ftz compares below are exact)
  c = c != c ? 0.0f : (c < 0.0f ? 0.0f : (c > kLevels ? kLevels : c));
  return (u32)c;
}

// Buckets of QS < E elements, E / QS of them in the thread's run [j0, j0 + E) of the block.
template <int QS, int E>
__device__ __forceinline__ void quant_in_thread(const float (&r)[E], int cnt, int j0, int L,
                                                i64 start, float* ef_min, float* ef_scale,
                                                u8 (&codes)[E / 2]) {
#pragma unroll
  for (int s0 = 0; s0 < E; s0 += QS) {
    float mn = __uint_as_float(0x7f800000u), mx = -mn;
#pragma unroll
    for (int e = s0; e < s0 + QS; ++e) {
      if (e < cnt) {
        mn = min_nan(mn, r[e]);
        mx = max_nan(mx, r[e]);
      }
    }
    const bool live = j0 + s0 < L;  // else a bucket past the tensor's end
    const float lo = live ? mn : 0.0f;
    const float scale = live ? div_rn(sub_rn(mx, lo), kLevels) : 0.0f;
    ef_min[(start + j0 + s0) / QS] = lo;
    ef_scale[(start + j0 + s0) / QS] = scale;
    if (positive(scale)) {
#pragma unroll
      for (int e = s0; e < s0 + QS; ++e)
        if (e < cnt) codes[e / 2] |= (u8)(quant_code(r[e], lo, scale) << (4 * (e & 1)));
    }
  }
}

// ---- block-wide exclusive scan of u32 over the threads (index order = thread order) ----------

template <int NW>
__device__ __forceinline__ u32 block_excl_scan(u32 v, u32* warp_sums) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  u32 inc = v;
  for (int d = 1; d < 32; d <<= 1) {
    const u32 t = __shfl_up_sync(0xffffffffu, inc, d);
    if (lane >= d) inc += t;
  }
  if (lane == 31) warp_sums[w] = inc;
  __syncthreads();
  u32 pre = 0;
  for (int i = 0; i < w; ++i) pre += warp_sums[i];
  __syncthreads();  // warp_sums may be reused
  return pre + inc - v;
}

// ---- the step --------------------------------------------------------------------------------

template <typename T, int D>
__device__ void step(const i64* tab, const int* owner, i64 w_off, i64 k, i64 m, i64 q, float decay,
                     float eps) {
  using C = Cfg<D>;
  constexpr int NT = C::kThreads, E = C::kE, NW = C::kWarps, CH = C::kCh, EU = C::kEu;
  __shared__ float s_m1[CH];
  __shared__ float s_m2[CH];
  __shared__ u32 s_hist[kBins];
  __shared__ u32 s_warp[NW];
  __shared__ float s_lo[NW];
  __shared__ float s_hi[NW];
  __shared__ u32 s_pick[3];  // digit, count above it, count in it

  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  const i64* row = tab + (i64)owner[blockIdx.x] * kCols;
  T* p = reinterpret_cast<T*>(row[kP]);
  const T* g = reinterpret_cast<const T*>(row[kG]);
  u8* ef = reinterpret_cast<u8*>(row[kEF]);
  float* ef_min = reinterpret_cast<float*>(row[kMin]);
  float* ef_scale = reinterpret_cast<float*>(row[kScale]);
  short* idx = reinterpret_cast<short*>(row[kIdx]);
  u16* val = reinterpret_cast<u16*>(row[kVal]);
  const i64 n = row[kN];
  const i64 b = (i64)blockIdx.x - row[kFirst];
  const i64 wrow = row[kRow];
  const float c1 = f32_of((u32)row[kC1]), c2 = f32_of((u32)row[kC2]);
  const i64 start = b * D;
  const int L = (int)(n - start < D ? n - start : D);  // elements of this block in the tensor
  const int kb = (int)(k < L ? k : L);
  const i64 ncols = (n + D - 1) / D * k;
  const int Q = (int)q;
  const bool vec = aligned16(p) && aligned16(g);
  const bool vec_ef = aligned16(ef);
  const int j0 = tid * E;  // the thread's run
  const int cnt = L - j0;  // how many of its elements are in the tensor (may be <= 0)

  // 1. a = g + dequantized error feedback
  float a[E];
  load_run<T, E>(g + start + j0, cnt, vec, a);
  {
    u8 eb[E / 2];
    load_bytes<E / 2>(ef + start / 2 + j0 / 2, vec_ef, eb);
    const float* mn = ef_min + start / Q;
    const float* sc = ef_scale + start / Q;
    float lo = 0.0f, scale = 0.0f;
    if (Q >= E) {
      lo = mn[j0 / Q];
      scale = sc[j0 / Q];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (Q < E) {
        lo = mn[(j0 + e) / Q];
        scale = sc[(j0 + e) / Q];
      }
      const float code = (float)((eb[e / 2] >> (4 * (e & 1))) & 15);
      a[e] = e < cnt ? add_rn(a[e], add_rn(lo, mul_rn(code, scale))) : 0.0f;
    }
  }

  // 2. the kb largest keys: the prefix P of the threshold at bit `shift`, and `need` of its ties
  u32 P = 0, need = (u32)kb, total = (u32)L;
  int shift = 31;  // every key < 2^31: key >> 31 == 0 == P for all
  for (int level = 0; level < 4 && total != need; ++level) {
    const int ns = level < 3 ? 23 - 8 * level : 0;
    const u32 dmask = level < 3 ? 255u : 127u;
    for (int i = tid; i < kBins; i += NT) s_hist[i] = 0;
    __syncthreads();
    u32 bin = 0xffffffffu, run = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const u32 key = __float_as_uint(a[e]) & 0x7fffffffu;
      if (e < cnt && (key >> shift) == P) {
        const u32 d = (key >> ns) & dmask;
        if (d != bin) {
          if (run) atomicAdd(&s_hist[bin], run);
          bin = d;
          run = 0;
        }
        ++run;
      }
    }
    if (run) atomicAdd(&s_hist[bin], run);
    __syncthreads();
    if (wid == 0) {  // lane l owns bins 255 - 8l .. 248 - 8l, highest first
      const int hi = kBins - 8 * lane;
      u32 s = 0;
      for (int i = 1; i <= 8; ++i) s += s_hist[hi - i];
      u32 inc = s;
      for (int d = 1; d < 32; d <<= 1) {
        const u32 t = __shfl_up_sync(0xffffffffu, inc, d);
        if (lane >= d) inc += t;
      }
      const u32 exc = inc - s;
      if (exc < need && need <= inc) {  // exactly one lane
        u32 acc = exc;
        for (int i = 1; i <= 8; ++i) {
          const u32 c = s_hist[hi - i];
          if (acc + c >= need) {
            s_pick[0] = (u32)(hi - i);
            s_pick[1] = acc;
            s_pick[2] = c;
            break;
          }
          acc += c;
        }
      }
    }
    __syncthreads();
    P = (P << (shift - ns)) | s_pick[0];
    need -= s_pick[1];
    total = s_pick[2];
    shift = ns;
  }

  // the slots: greater elements and the first `need` ties, in index order
  u32 gt = 0, eq = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const u32 hk = (__float_as_uint(a[e]) & 0x7fffffffu) >> shift;
    if (e < cnt) {
      gt += hk > P;
      eq += hk == P;
    }
  }
  const u32 before = block_excl_scan<NW>(gt | (eq << 16), s_warp);
  u32 G = before & 0xffffu, Eq = before >> 16;
  const i64 col0 = wrow * ncols + b * k;
  u32 selm = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const u32 hk = (__float_as_uint(a[e]) & 0x7fffffffu) >> shift;
    if (e < cnt && (hk > P || (hk == P && Eq < need))) {
      const i64 slot = col0 + G + (Eq < need ? Eq : need);
      idx[slot] = (short)(j0 + e);
      val[slot] = bf16_bits(a[e]);
      selm |= 1u << e;
    }
    if (e < cnt) {
      G += hk > P;
      Eq += hk == P;
    }
  }
  for (int j = kb + tid; j < k; j += NT) {  // unused slots (a block shorter than k)
    idx[col0 + j] = -1;
    val[col0 + j] = 0;
  }

  // 3. residual, per-bucket 4-bit quantization
  float r[E];
#pragma unroll
  for (int e = 0; e < E; ++e) r[e] = (selm >> e) & 1u ? 0.0f : a[e];
  u8 codes[E / 2];
#pragma unroll
  for (int e = 0; e < E / 2; ++e) codes[e] = 0;
  if (Q < E) {  // E / Q whole buckets in this thread (Q as a template argument: no arrays)
    if constexpr (E > 2)
      if (Q == 2) quant_in_thread<2>(r, cnt, j0, L, start, ef_min, ef_scale, codes);
    if constexpr (E > 4)
      if (Q == 4) quant_in_thread<4>(r, cnt, j0, L, start, ef_min, ef_scale, codes);
    if constexpr (E > 8)
      if (Q == 8) quant_in_thread<8>(r, cnt, j0, L, start, ef_min, ef_scale, codes);
    if constexpr (E > 16)
      if (Q == 16) quant_in_thread<16>(r, cnt, j0, L, start, ef_min, ef_scale, codes);
  } else {  // a bucket spans GT = Q / E >= 1 threads
    const int GT = Q / E;
    float mn = __uint_as_float(0x7f800000u), mx = -mn;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (e < cnt) {
        mn = min_nan(mn, r[e]);
        mx = max_nan(mx, r[e]);
      }
    }
    for (int o = 1; o < (GT < 32 ? GT : 32); o <<= 1) {
      mn = min_nan(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = max_nan(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    if (GT > 32) {
      if (lane == 0) {
        s_lo[wid] = mn;
        s_hi[wid] = mx;
      }
      __syncthreads();
      const int gw = GT / 32, w0 = wid / gw * gw;
      mn = s_lo[w0];
      mx = s_hi[w0];
      for (int i = 1; i < gw; ++i) {
        mn = min_nan(mn, s_lo[w0 + i]);
        mx = max_nan(mx, s_hi[w0 + i]);
      }
    }
    const int bstart = j0 / Q * Q;  // the bucket's first local index
    float lo = 0.0f, scale = 0.0f;
    if (bstart < L) {
      lo = mn;
      scale = div_rn(sub_rn(mx, lo), kLevels);
    }
    if (j0 == bstart) {
      const i64 qi = (start + bstart) / Q;
      ef_min[qi] = lo;
      ef_scale[qi] = scale;
    }
    if (positive(scale)) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (e < cnt) codes[e / 2] |= (u8)(quant_code(r[e], lo, scale) << (4 * (e & 1)));
      }
    }
  }
  store_bytes<E / 2>(ef + start / 2 + j0 / 2, vec_ef, codes);
  __syncthreads();  // the new window row is visible to the whole block

  // 4.-5. moments of the chunk [c0, c0 + CH) in shared memory, then the update of its p
  for (int c0 = 0; c0 < L; c0 += CH) {
    const int u0 = tid * EU;  // this thread's slots (zeroed and read by it alone)
#pragma unroll
    for (int e = 0; e < EU; ++e) {
      s_m1[u0 + e] = 0.0f;
      s_m2[u0 + e] = 0.0f;
    }
    __syncthreads();
    for (i64 age = 0; age < m; ++age) {
      const i64 rr = ((wrow - age) % m + m) % m;
      const short* ir = idx + rr * ncols + b * k;
      const u16* vr = val + rr * ncols + b * k;
      const float w1 = f32_of((u32)tab[w_off + age]), w2 = f32_of((u32)tab[w_off + m + age]);
      for (i64 j = tid; j < k; j += NT) {
        const int i = ir[j];
        if (i >= c0 && i < c0 + CH && i < L) {
          const float v = f32_of((u32)vr[j] << 16);
          s_m1[i - c0] = add_rn(s_m1[i - c0], mul_rn(w1, v));
          s_m2[i - c0] = add_rn(s_m2[i - c0], mul_rn(w2, mul_rn(v, v)));
        }
      }
      __syncthreads();
    }
    const int ucnt = L - (c0 + u0);
    if (ucnt > 0) {
      float pv[EU];
      T* pp = p + start + c0 + u0;
      load_run<T, EU>(pp, ucnt, vec, pv);
#pragma unroll
      for (int e = 0; e < EU; ++e) {
        const float m1 = s_m1[u0 + e], m2 = s_m2[u0 + e];
        float u = 0.0f;  // (c1 * 0) / (sqrt(0) * c2 + eps) == +0 exactly
        if ((__float_as_uint(m1) | __float_as_uint(m2)) != 0)
          u = div_rn(mul_rn(c1, m1), add_rn(mul_rn(sqrt_rn(m2), c2), eps));
        pv[e] = sub_rn(mul_rn(pv[e], decay), u);
      }
      store_run<T, EU>(pp, ucnt, vec, pv);
    }
  }
}

}  // namespace fkma

// ---- extern "C" entry points: fk_microadam_step_<f32|bf16>_d<D> ------------------------------
// grid = the blocks of all tensors of one dtype, block = fkma::Cfg<D>::kThreads threads.
// tab: int64 [tensors * kCols + 2 * m] (w1 then w2 at w_off); owner: int32 [grid].

#define FK_MA_KERNEL(DT, T, D)                                                                   \
  extern "C" __global__ void __launch_bounds__(fkma::Cfg<D>::kThreads, fkma::Cfg<D>::kMinBlocks) \
      fk_microadam_step_##DT##_d##D(const long long* tab, const int* owner, long long w_off,     \
                                    long long k, long long m, long long q, float decay,          \
                                    float eps) {                                                 \
    fkma::step<T, D>(tab, owner, w_off, k, m, q, decay, eps);                                    \
  }

// The loader builds one variant per module (-DFK_MA_BF16=<0|1> -DFK_MA_D=<D>); without these
// defines every variant is built (nvcc check), unless the includer names its own FK_MA_WANT.
#if defined(FK_MA_D)
#define FK_MA_WANT(bf, d) (FK_MA_BF16 == (bf) && FK_MA_D == (d))
#elif !defined(FK_MA_WANT)
#define FK_MA_WANT(bf, d) 1
#endif
#if FK_MA_WANT(0, 64)
FK_MA_KERNEL(f32, float, 64)
#endif
#if FK_MA_WANT(1, 64)
FK_MA_KERNEL(bf16, fkma::bf16, 64)
#endif
#if FK_MA_WANT(0, 128)
FK_MA_KERNEL(f32, float, 128)
#endif
#if FK_MA_WANT(1, 128)
FK_MA_KERNEL(bf16, fkma::bf16, 128)
#endif
#if FK_MA_WANT(0, 256)
FK_MA_KERNEL(f32, float, 256)
#endif
#if FK_MA_WANT(1, 256)
FK_MA_KERNEL(bf16, fkma::bf16, 256)
#endif
#if FK_MA_WANT(0, 512)
FK_MA_KERNEL(f32, float, 512)
#endif
#if FK_MA_WANT(1, 512)
FK_MA_KERNEL(bf16, fkma::bf16, 512)
#endif
#if FK_MA_WANT(0, 1024)
FK_MA_KERNEL(f32, float, 1024)
#endif
#if FK_MA_WANT(1, 1024)
FK_MA_KERNEL(bf16, fkma::bf16, 1024)
#endif
#if FK_MA_WANT(0, 2048)
FK_MA_KERNEL(f32, float, 2048)
#endif
#if FK_MA_WANT(1, 2048)
FK_MA_KERNEL(bf16, fkma::bf16, 2048)
#endif
#if FK_MA_WANT(0, 4096)
FK_MA_KERNEL(f32, float, 4096)
#endif
#if FK_MA_WANT(1, 4096)
FK_MA_KERNEL(bf16, fkma::bf16, 4096)
#endif
#if FK_MA_WANT(0, 8192)
FK_MA_KERNEL(f32, float, 8192)
#endif
#if FK_MA_WANT(1, 8192)
FK_MA_KERNEL(bf16, fkma::bf16, 8192)
#endif
#if FK_MA_WANT(0, 16384)
FK_MA_KERNEL(f32, float, 16384)
#endif
#if FK_MA_WANT(1, 16384)
FK_MA_KERNEL(bf16, fkma::bf16, 16384)
#endif
#if FK_MA_WANT(0, 32768)
FK_MA_KERNEL(f32, float, 32768)
#endif
#if FK_MA_WANT(1, 32768)
FK_MA_KERNEL(bf16, fkma::bf16, 32768)
#endif
