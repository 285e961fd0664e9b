// fedkern/common.h -- element types, rounding and the selection key shared by the C++ core.
//
// The core is torch-free: kernels take raw pointers, int64 sizes and a dtype tag. All arithmetic is
// fp32 without fused multiply-add (the core is compiled with -ffp-contract=off); "round(v)" rounds
// an fp32 value to the tensor dtype once, on store:
//   float32:  round(v) = v
//   bfloat16: round(v) = the upper 16 bits of v rounded to nearest, ties to even; every NaN becomes
//             the quiet NaN 0x7fc0 (what torch's c10::BFloat16 produces).
// Selection key of a value v (uint32): u = bits(fp32(v)) & 0x7fffffff, every NaN mapped to
// 0x7f800001. Larger key = larger |v|; -0 == +0; inf sorts below every NaN; all NaNs tie.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

// Force inlining of small helpers in the hot loops (the multiversioned AVX2 / baseline bodies).
#if defined(__GNUC__)
#define FEDKERN_INLINE inline __attribute__((always_inline))
#else
#define FEDKERN_INLINE inline
#endif

namespace fedkern {

// Element type tag passed from Python (an int): 0 = float32, 1 = bfloat16 (stored as uint16 bits).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bf16 -> fp32 is exact: the bf16 bits are the upper half of the fp32 bits.
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16, round to nearest even. Adding 0x7fff plus the lowest kept bit carries into the kept
// half exactly when the dropped half is above 0x8000, or equal to it with an odd kept half; finite
// values that round past the largest bf16 become inf, as IEEE rounding requires.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Selection key (see the file comment). Every NaN has u >= 0x7f800001 and every non-NaN has
// u <= 0x7f800000, so a min() performs the NaN mapping without a branch.
inline uint32_t select_key(float v) {
  const uint32_t u = f32_bits(v) & 0x7fffffffu;
  return u < 0x7f800001u ? u : 0x7f800001u;
}

// Element traits: the kernels are templates over these, instantiated for both dtypes.
//   storage: how one element is stored; load: exact widening to fp32; store: round(v) then write.
struct F32 {
  using storage = float;
  static float load(const storage* p, int64_t i) { return p[i]; }
  static storage round(float v) { return v; }
  static void store(storage* p, int64_t i, float v) { p[i] = v; }
};

struct BF16 {
  using storage = uint16_t;
  static float load(const storage* p, int64_t i) { return bf16_to_f32(p[i]); }
  static storage round(float v) { return f32_to_bf16(v); }
  static void store(storage* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};

// Calls f(F32{}) or f(BF16{}) for a dtype tag; the kernels are written once as generic lambdas.
template <class Fn>
inline void dispatch_dtype(DType dtype, Fn&& fn) {
  if (dtype == DType::kBFloat16) {
    fn(BF16{});
  } else {
    fn(F32{});
  }
}

namespace detail {

// Test hook (tests/cpp, fedkern._C._force_baseline): when true, every kernel that is compiled
// both for AVX2 and for the baseline ISA runs its baseline build even on a CPU with AVX2, so that
// the two builds can be compared bit for bit.
inline bool& force_baseline() {
  static bool force = false;
  return force;
}

// Test hook (tests, fedkern._C._force_no_avx512): when true, a kernel that also has an AVX-512
// build runs its AVX2 build instead, so that an AVX-512 CPU can compare the two bit for bit.
inline bool& force_no_avx512() {
  static bool force = false;
  return force;
}

// Whether a kernel may run its AVX-512 (F) build: the CPU and OS support it and neither test hook
// (force_baseline, force_no_avx512) is on.
inline bool use_avx512() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return !force_baseline() && !force_no_avx512() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// Whether a kernel may run its AVX2 build (x86 GCC/Clang only): the CPU has AVX2, and FMA too when
// `fma` is true, and the test hook force_baseline() is off.
inline bool use_avx2(bool fma = false) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return !force_baseline() && __builtin_cpu_supports("avx2") &&
         (!fma || __builtin_cpu_supports("fma"));
#else
  (void)fma;
  return false;
#endif
}

// Internal invariants checked in debug builds (FEDKERN_DEBUG_CHECKS, defined by CMake for Debug
// and sanitizer builds): a violated one prints where and what, then aborts, so an off-by-one in
// a kernel is a clear failure there instead of a read or write past a buffer. Release builds
// compile the checks away (Python validates every input before a kernel runs).
[[noreturn]] inline void dcheck_failed(const char* file, int line, const char* cond,
                                       const char* what) {
  std::fprintf(stderr, "fedkern: internal check failed at %s:%d: %s (%s)\n", file, line, cond,
               what);
  std::fflush(stderr);
  std::abort();
}

// Threads OpenMP would use for a parallel region (1 without OpenMP).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Test hook (tests/cpp): when grain > 0 it replaces every kernel's minimum work per block and
// max_blocks replaces the thread count as the block limit, so that small inputs run the
// multi-block code paths. Zero (the default) means the tuned values.
struct BlockingOverride {
  int64_t grain = 0;
  int max_blocks = 0;
};
inline BlockingOverride& blocking_override() {
  static BlockingOverride o;
  return o;
}

// Number of contiguous blocks to split `n` items into: one per thread, but none smaller than
// `min_per_block` items (waking a thread costs microseconds, and far more when the cores are
// oversubscribed). Kernels iterate over blocks with an OpenMP for-loop, so every block is
// processed whatever team size the runtime grants, and results never depend on the number of
// threads or blocks.
inline int num_blocks(int64_t n, int64_t min_per_block) {
  const BlockingOverride& o = blocking_override();
  if (o.grain > 0) min_per_block = o.grain;
  const int64_t by_size = n / (min_per_block > 0 ? min_per_block : 1);
  const int64_t t = o.max_blocks > 0 ? o.max_blocks : max_threads();
  const int64_t nb = by_size < t ? by_size : t;
  return nb < 1 ? 1 : static_cast<int>(nb);
}

// Half-open range [*lo, *hi) of block b when n items are split into nb near-equal blocks
// (no n * b product, so no overflow for any int64 n).
inline void block_range(int64_t n, int nb, int b, int64_t* lo, int64_t* hi) {
  const int64_t base = n / nb, rem = n % nb;
  *lo = b * base + (b < rem ? b : rem);
  *hi = *lo + base + (b < rem ? 1 : 0);
}

// Runs fn(lo, hi) over the num_blocks(n, min_per_block) contiguous blocks of [0, n), in parallel.
template <class Fn>
void parallel_blocks(int64_t n, int64_t min_per_block, Fn&& fn) {
  const int nb = num_blocks(n, min_per_block);
#pragma omp parallel for schedule(static, 1) num_threads(nb)
  for (int b = 0; b < nb; ++b) {
    int64_t lo, hi;
    block_range(n, nb, b, &lo, &hi);
    fn(lo, hi);
  }
}

}  // namespace detail
}  // namespace fedkern

#ifdef FEDKERN_DEBUG_CHECKS
#define FEDKERN_DCHECK(cond, what) \
  ((cond) ? static_cast<void>(0)   \
          : ::fedkern::detail::dcheck_failed(__FILE__, __LINE__, #cond, what))
#else
#define FEDKERN_DCHECK(cond, what) static_cast<void>(0)
#endif
