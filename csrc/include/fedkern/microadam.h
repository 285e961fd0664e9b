// fedkern/microadam.h -- MicroAdam's fused optimizer step over a list of tensors (CPU, OpenMP).
//
// Per tensor (n elements, flattened) with block size D, K entries per block, quantization bucket Q
// and a ring window of m rows; block b holds elements b*D .. min(n, b*D + D) - 1 (L_b of them,
// the last block may be partial) and K_b = min(K, L_b). All arithmetic is fp32 without FMA, each
// product and sum rounded on its own; bf16 loads are exact, stores round to nearest even.
//   1. code_j = nibble j of ef (even j in the low nibble); e_j = ef_min[q] + fp32(code_j) *
//      ef_scale[q] with q = j / Q;  a_j = fp32(g_j) + e_j.
//   2. key_j = bits(a_j) & 0x7fffffff (NaN above inf, NaN payloads ranked by their bits); the K_b
//      largest keys of the block, ties to the lower index, go to window row `row`, columns
//      b*K .. b*K + K - 1: block-local indices ascending (int16), then -1; val = bf16(a_j), then 0.
//   3. r = a with the selected entries set to +0. Per bucket over the elements < n (none: lo = hi =
//      0): lo = min r, hi = max r (NaN if any r is NaN), scale = (hi - lo) / 15; code =
//      clamp(floor((r - lo) / scale + 0.5), 0, 15) (NaN -> 0) if scale > 0, else 0; elements >= n
//      get code 0. ef, ef_min = lo, ef_scale = scale are overwritten.
//   4. for age a = 0 .. m-1 (row (row - a) mod m), each entry (i >= 0, v) of block b adds
//      w1[a] * v to mom1[b*D + i] and w2[a] * (v * v) to mom2[b*D + i] (in age order).
//   5. p_j = fp32(p_j) * decay - (c1 * mom1_j) / (sqrt(mom2_j) * c2 + eps), rounded to p's dtype;
//      mom1 = mom2 = 0 outside the window, so with decay == 1 only window positions are written.
// Blocks are independent: an OpenMP loop runs over all blocks of all tensors, each thread with its
// own scratch (a few D-sized arrays, kept between calls), so results never depend on the number of
// threads. Selection is a running top-K (min-heap on (key, -index)) behind a vectorised threshold
// test; the bucket pass computes min/max on order-preserving integer images of the floats.
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

// One parameter tensor and its MicroAdam state (all contiguous; nb = ceil(n / D)).
struct MicroAdamTensor {
  void* p;          // dtype[n], updated in place
  const void* g;    // dtype[n], read only
  DType dtype;      // of p and g
  int64_t n;        // >= 1
  uint8_t* ef;      // uint8[nb*D/2], 4-bit codes
  float* ef_min;    // float32[nb*D/Q]
  float* ef_scale;  // float32[nb*D/Q]
  int16_t* idx;     // int16[m, nb*K] row-major
  uint16_t* val;    // bfloat16 bits [m, nb*K] row-major
  int64_t row;      // window row written by this step, in [0, m)
  float c1, c2;     // lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)
};

struct MicroAdamConfig {
  float decay;  // 1 - lr * weight_decay
  float eps;
  const float* w1;  // float32[m]: weight of the window row of age a in mom1
  const float* w2;  // float32[m]: the same for mom2
  int64_t m;        // window rows, >= 1
  int64_t D;        // block size: power of two in [64, 32768]
  int64_t K;        // entries per block, in [1, D]
  int64_t Q;        // quantization bucket: power of two in [2, D]
};

// One MicroAdam step over `count` tensors (inputs validated by the caller).
void microadam_step(const MicroAdamTensor* tensors, int64_t count, const MicroAdamConfig& cfg);

}  // namespace fedkern
