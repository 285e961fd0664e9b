// CPU twin of the CUDA kernels: a minimal SIMT emulator under which csrc/cuda/topk.cu and
// microadam.cu compile, unmodified, as host C++ (emu.cpp builds them into a shared library;
// tests/test_cuda_emu.py and test_cuda_emu_microadam.py drive them through the real launchers
// fedkern/cuda/topk.py and microadam.py). This header stands in for what NVRTC
// provides: the thread / block indices, the function qualifiers, __shared__ (a static: one copy
// per block, as blocks run one at a time), barriers, warp shuffles, atomics and bit casts.
//
// Every CUDA thread of a block is a fiber on one OS thread. Fibers switch only at __syncthreads /
// __syncthreads_or / warp shuffles (up, xor), and between two barriers the runnable fibers run in a
// random order (a fresh permutation per barrier phase, from the launch's seed), so a missing
// barrier or a read of another thread's shared memory before it is written shows up as a wrong
// result for some seeds. Reported as errors: a barrier that not every thread of the block reaches,
// a shuffle that not all 32 lanes of a warp join, threads meeting at __syncthreads and
// __syncthreads_or at once. The blocks of a grid run one after another in a random order, so "the
// last block to finish" is a random block.
//
// What it cannot check: real inter-block concurrency (blocks never overlap, so a block never sees
// another block's partial writes, and atomics are trivially atomic); races between barriers at a
// finer grain than one thread's run from barrier to barrier (a thread's stores are never
// interleaved with another thread's loads within a phase); memory ordering (__threadfence and
// volatile are no-ops here: every store is seen at once by everyone); reads of uninitialised
// shared memory (it keeps the previous block's contents; the test poisons the launcher's global
// buffers instead); the PTX arithmetic (add.rn / sub.rn / mul.rn are plain host float operations,
// which round the same way, but FTZ or FMA contraction on the GPU is not seen); and anything about
// the device compile (NVRTC, register and shared memory limits, performance). Misaligned vector
// accesses are caught (emu.cpp is built with the alignment sanitizer), not reported as errors.
#pragma once
#include <cstdint>
#include <cstring>

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
extern EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {
void block_barrier();
int block_barrier_or(int p);
uint64_t warp_shfl_up(uint64_t v, unsigned d);
uint64_t warp_shfl_xor(uint64_t v, unsigned lane_mask);
[[noreturn]] void fail(const char* what);
}  // namespace emu

inline void __syncthreads() { emu::block_barrier(); }
inline int __syncthreads_or(int p) { return emu::block_barrier_or(p); }
inline void __threadfence() {}

template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d) {
  static_assert(sizeof(T) <= 8, "shuffle width");
  if (mask != 0xffffffffu) emu::fail("partial shuffle mask");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t r = emu::warp_shfl_up(bits, d);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle width");
  if (mask != 0xffffffffu) emu::fail("partial shuffle mask");
  if (lane_mask < 0 || lane_mask > 31) emu::fail("shuffle xor mask out of range");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t r = emu::warp_shfl_xor(bits, (unsigned)lane_mask);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// Fibers never switch inside these, so plain read-modify-writes are atomic.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned o = *p;
  *p = o + v;
  return o;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p;
  *p = o + v;
  return o;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
