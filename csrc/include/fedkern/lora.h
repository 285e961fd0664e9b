// fedkern/lora.h -- the fused RAC-LoRA merge: W += scale * B A with the frozen factor generated.
//
// W [m, n], B [m, r], A [r, n], all float32 row-major. Exactly one of B, A may be null: that factor
// is the frozen one, generated in place of a stored tensor: its entry e (row-major in its own
// shape) is round32(std * z_e), z the Gaussian draw with key words key[4] (fedkern/random.h) --
// the same values as std * fedkern.random.gaussian(shape, seed, step). Per element:
//   acc = +0;  for k = 0 .. r-1 in order:  acc = acc + round32(B[i, k] * A[k, j])
//   W[i, j] = W[i, j] + round32(scale * acc)
// fp32 without FMA, in place on W, one pass over W (no [m, n] temporary); the generated factor is
// materialised once (m r or r n floats). Rows of W are split over the threads: the result does not
// depend on their number.
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

void lora_merge(float* W, int64_t m, int64_t n, int64_t r, const float* B, const float* A,
                const uint32_t key[4], float std, float scale);

}  // namespace fedkern
