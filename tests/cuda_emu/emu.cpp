// CPU twin of the CUDA kernels (see emu.h): the emulator runtime, csrc/cuda/topk.cu and
// microadam.cu compiled as host C++ against emu.h, and a registry of their kernels behind a C API
// for ctypes (tests/test_cuda_emu*.py). Linux (ucontext). Built by the tests as
//   g++ -std=c++17 -O2 -fPIC -shared -ffp-contract=off -Wall -Werror -Wno-unknown-pragmas
//       -fsanitize=alignment -fsanitize-undefined-trap-on-error -I<repo>/csrc/cuda emu.cpp
//       -o libemu.so
// (no FK_TOPK_* defines: every variant of topk.cu is built; of microadam.cu the D values below).
// -ffp-contract=off keeps a*b+c two roundings, as the kernels' explicit mul.rn / add.rn PTX does
// on the GPU. The alignment sanitizer traps (SIGILL, a Python traceback from faulthandler) on a
// vector load or store through a misaligned pointer, which the GPU would fault on and x86 allows.
//
// Scheduling: the threads of a block are ucontext fibers. A barrier phase runs the runnable fibers
// in a random permutation, each until it blocks (barrier, shuffle) or returns; a fiber hands over
// directly to the next one of the phase. When none is left, the scheduler releases the warps whose
// 32 lanes all wait at a shuffle, or else the barrier when every thread waits at it, or else
// reports a deadlock. Fibers are reused from block to block (remade after a failed launch).
#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

#include "topk.cu"  // found through -I<repo>/csrc/cuda

// microadam.cu: the block sizes the tests use (each D is its own template instance; all 20
// variants would double the build time).
#define FK_MA_WANT(bf, d) ((d) == 64 || (d) == 256 || (d) == 4096 || (d) == 32768)
#include "microadam.cu"

namespace emu {
namespace {

enum State { kRun, kWaitBlock, kWaitBlockOr, kWaitWarp, kDone };

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;  // holds pointers into itself: a Fiber never moves (see `fibers`)
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  bool live = false;  // ctx is a usable context inside trampoline()
  State state = kDone;
  uint64_t xval = 0;  // shuffle: value in, result out
  unsigned xd = 0;    // shuffle: delta (up) or lane mask (xor)
  bool xxor = false;  // shuffle: xor, else up
};

std::vector<std::unique_ptr<Fiber>> fibers;
ucontext_t sched_ctx;
std::vector<int> phase;  // this phase's run order
size_t phase_pos = 0;    // next entry of `phase` to run
int cur = -1;            // the running fiber, -1 in the scheduler
std::function<void()> body;
std::mt19937_64 rng;
int or_acc = 0, or_res = 0;
std::string error;
bool failed = false;

struct Abort {};

// Leaves the running fiber (which has set its state) for the next one of the phase, else for the
// scheduler. Returns when something resumes it, having set cur and threadIdx.x for it.
void switch_out() {
  Fiber& me = *fibers[cur];
  if (!failed && phase_pos < phase.size()) {
    const int next = phase[phase_pos++];
    cur = next;
    threadIdx.x = (unsigned)next;
    swapcontext(&me.ctx, &fibers[next]->ctx);
  } else {
    cur = -1;
    swapcontext(&me.ctx, &sched_ctx);
  }
}

void trampoline() {
  for (;;) {  // one block per iteration
    body();
    fibers[cur]->state = kDone;
    switch_out();
  }
}

void kill_fibers() {
  for (auto& f : fibers) f->live = false;
}

void run_block(unsigned nthreads) {
  while (fibers.size() < nthreads) fibers.push_back(std::make_unique<Fiber>());
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = *fibers[t];
    if (!f.live) {
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, trampoline, 0);
      f.live = true;
    }
    f.state = kRun;
  }
  or_acc = 0;
  for (;;) {
    phase.clear();
    for (unsigned t = 0; t < nthreads; ++t)
      if (fibers[t]->state == kRun) phase.push_back((int)t);
    if (!phase.empty()) {
      std::shuffle(phase.begin(), phase.end(), rng);
      phase_pos = 1;
      cur = phase[0];
      threadIdx.x = (unsigned)cur;
      swapcontext(&sched_ctx, &fibers[cur]->ctx);
      if (failed) throw Abort{};
      continue;
    }
    unsigned done = 0, wblock = 0, wor = 0, wwarp = 0;
    for (unsigned t = 0; t < nthreads; ++t) {
      const State s = fibers[t]->state;
      done += s == kDone;
      wblock += s == kWaitBlock;
      wor += s == kWaitBlockOr;
      wwarp += s == kWaitWarp;
    }
    if (done == nthreads) return;
    bool released = false;
    for (unsigned w = 0; w * 32 < nthreads; ++w) {  // warps whose 32 lanes wait at a shuffle
      const std::unique_ptr<Fiber>* lanes = &fibers[w * 32];
      bool all = true;
      for (unsigned l = 0; l < 32; ++l) all &= lanes[l]->state == kWaitWarp;
      if (!all) continue;
      uint64_t in[32];
      for (unsigned l = 0; l < 32; ++l) in[l] = lanes[l]->xval;
      for (unsigned l = 0; l < 32; ++l) {
        Fiber& f = *lanes[l];
        if (f.xxor)
          f.xval = in[l ^ f.xd];
        else
          f.xval = l >= f.xd ? in[l - f.xd] : in[l];
        f.state = kRun;
      }
      released = true;
    }
    if (released) continue;
    if (wblock == nthreads || wor == nthreads) {
      or_res = or_acc;  // read by the __syncthreads_or waiters as they resume, before any can
      or_acc = 0;       // reach the next barrier
      for (unsigned t = 0; t < nthreads; ++t) fibers[t]->state = kRun;
      continue;
    }
    char msg[200];
    if (wblock + wor == nthreads)
      snprintf(msg, sizeof msg,
               "mixed barriers: %u threads at __syncthreads, %u at __syncthreads_or", wblock, wor);
    else
      snprintf(msg, sizeof msg,
               "deadlock: %u threads returned, %u at __syncthreads(_or), %u at shuffles of %u",
               done, wblock + wor, wwarp, nthreads);
    error = msg;
    throw Abort{};
  }
}

}  // namespace

void fail(const char* what) {
  error = what;
  failed = true;
  if (cur >= 0) switch_out();  // to the scheduler, which throws; this fiber is never resumed
  throw Abort{};
}

void block_barrier() {
  fibers[cur]->state = kWaitBlock;
  switch_out();
}

int block_barrier_or(int p) {
  or_acc |= p != 0;
  fibers[cur]->state = kWaitBlockOr;
  switch_out();
  return or_res;
}

uint64_t warp_shfl_up(uint64_t v, unsigned d) {
  Fiber& f = *fibers[cur];
  f.xval = v;
  f.xd = d;
  f.xxor = false;
  f.state = kWaitWarp;
  switch_out();
  return f.xval;
}

uint64_t warp_shfl_xor(uint64_t v, unsigned lane_mask) {
  Fiber& f = *fibers[cur];
  f.xval = v;
  f.xd = lane_mask;
  f.xxor = true;
  f.state = kWaitWarp;
  switch_out();
  return f.xval;
}

}  // namespace emu

// ---- kernel registry ---------------------------------------------------------------------------

namespace {

using Invoker = std::function<void(const uint64_t*)>;

// A kernel parameter from its raw 64-bit argument: a pointer, an integer, or the bits of a float.
template <class T>
T from_raw(uint64_t r) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(static_cast<uintptr_t>(r));
  } else if constexpr (std::is_same_v<T, float>) {
    const uint32_t u = (uint32_t)r;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return static_cast<T>(r);
  }
}

template <class... A, size_t... I>
void call(void (*f)(A...), const uint64_t* raw, std::index_sequence<I...>) {
  f(from_raw<A>(raw[I])...);
}

template <class T>
char type_code() {
  static_assert(std::is_same_v<T, float> || sizeof(T) == 8, "kernel params: float or 8 bytes");
  return std::is_same_v<T, float> ? 'f' : 'q';
}

struct Kernel {
  std::string types;  // one code per parameter: 'f' float, 'q' 8-byte integer or pointer
  Invoker invoke;
};

template <class... A>
Kernel make(void (*f)(A...)) {
  return {std::string{type_code<A>()...},
          [f](const uint64_t* raw) { call(f, raw, std::index_sequence_for<A...>{}); }};
}

const std::map<std::string, Kernel>& registry() {
  static const std::map<std::string, Kernel> r = [] {
    std::map<std::string, Kernel> m;
#define EMU_REG(fn) m[#fn] = make(&fn)
#define EMU_REG_ALL(OP, DT, V)                 \
  EMU_REG(fk_topk_pass1_##OP##_##DT##_v##V);   \
  EMU_REG(fk_topk_compact_##OP##_##DT##_v##V); \
  EMU_REG(fk_topk_refine_##OP##_##DT##_v##V);  \
  EMU_REG(fk_topk_count_##OP##_##DT##_v##V);   \
  EMU_REG(fk_topk_write_##OP##_##DT##_v##V)
    EMU_REG(fk_topk_tile_reduce);
    EMU_REG_ALL(topk, f32, 4);
    EMU_REG_ALL(topk, f32, 1);
    EMU_REG_ALL(topk, bf16, 8);
    EMU_REG_ALL(topk, bf16, 1);
    EMU_REG_ALL(ef14, f32, 4);
    EMU_REG_ALL(ef14, f32, 1);
    EMU_REG_ALL(ef14, bf16, 8);
    EMU_REG_ALL(ef14, bf16, 1);
    EMU_REG_ALL(ef21, f32, 4);
    EMU_REG_ALL(ef21, f32, 1);
    EMU_REG_ALL(ef21, bf16, 8);
    EMU_REG_ALL(ef21, bf16, 1);
#define EMU_REG_MA(D)                  \
  EMU_REG(fk_microadam_step_f32_d##D); \
  EMU_REG(fk_microadam_step_bf16_d##D)
    EMU_REG_MA(64);
    EMU_REG_MA(256);
    EMU_REG_MA(4096);
    EMU_REG_MA(32768);
#undef EMU_REG_MA
#undef EMU_REG_ALL
#undef EMU_REG
    return m;
  }();
  return r;
}

}  // namespace

extern "C" {

const char* emu_error() { return emu::error.c_str(); }

// Runs kernel `name` on a 1-D grid of 1-D blocks, the blocks one at a time in a random order;
// `args` are the raw parameters, `types` their codes (checked against the kernel's), `seed` drives
// the block order and the thread interleaving. Returns 0, or -1 (unknown kernel, wrong parameter
// types, bad block size) / -2 (failure while running: deadlock, mixed barriers, partial shuffle
// mask), with emu_error() saying why.
int emu_launch(const char* name, unsigned grid, unsigned block, const uint64_t* args,
               const char* types, unsigned long long seed) {
  emu::error.clear();
  const auto& r = registry();
  const auto it = r.find(name);
  if (it == r.end()) {
    emu::error = std::string("unknown kernel ") + name;
    return -1;
  }
  if (it->second.types != types) {
    emu::error =
        std::string("parameter types ") + types + " != " + it->second.types + " of " + name;
    return -1;
  }
  if (block == 0 || block % 32 != 0) {
    emu::error = "block size must be a positive multiple of 32";
    return -1;
  }
  const std::vector<uint64_t> a(args, args + it->second.types.size());
  const Invoker& inv = it->second.invoke;
  emu::body = [&] { inv(a.data()); };
  emu::rng.seed(seed);
  emu::failed = false;
  gridDim.x = grid;
  blockDim.x = block;
  std::vector<unsigned> order(grid);
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin(), order.end(), emu::rng);
  try {
    for (const unsigned b : order) {
      blockIdx.x = b;
      emu::run_block(block);
    }
  } catch (emu::Abort&) {
    emu::kill_fibers();
    emu::body = nullptr;
    return -2;
  }
  emu::body = nullptr;
  return 0;
}

}  // extern "C"
