// Helpers shared by the CUDA C++ kernels of csrc/cuda (topk.cu, microadam.cu): integer types, bf16
// as its bits, and fp32 arithmetic that is IEEE, never contracted into an FMA and never flushed to
// zero. CuPy compiles every NVRTC module with -ftz=true, which flushes denormals in plain float
// code and in the __fadd_rn family, so the arithmetic is explicit add.rn / sub.rn / mul.rn /
// div.rn / sqrt.rn PTX. Off the GPU (the CPU SIMT emulator of tests/cuda_emu) the same functions
// are host float operations, which round the same way.
//
// Included with #include "fk_common.cuh": nvcc and the emulator's g++ find it beside the including
// file; for NVRTC, fedkern.cuda.runtime.source() pastes it in place of that line.
#ifndef FEDKERN_FK_COMMON_CUH
#define FEDKERN_FK_COMMON_CUH

namespace fkcuda {

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned short u16;
typedef unsigned char u8;

struct bf16 {
  u16 bits;
};

__device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}

__device__ __forceinline__ float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}

__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a * b;
#endif
}

__device__ __forceinline__ float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

__device__ __forceinline__ float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
#else
  return __builtin_sqrtf(a);
#endif
}

__device__ __forceinline__ float floor_rn(float a) {  // exact: cvt.rmi without .ftz
#ifdef __CUDA_ARCH__
  float r;
  asm("cvt.rmi.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
#else
  return __builtin_floorf(a);
#endif
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float((u32)v.bits << 16); }

// fp32 -> bf16 bits, round to nearest even (every NaN -> 0x7fc0, as torch's conversion).
__device__ __forceinline__ u16 bf16_bits(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}

}  // namespace fkcuda

#endif  // FEDKERN_FK_COMMON_CUH
