// fedkern/randk.h -- rand-k index sets from a keyed permutation, and the compressors built on them.
//
// The index set for (n, k, keys[8]) is {perm(i) : 0 <= i < k} in ascending order, where perm is a
// keyed permutation of [0, n): a balanced 8-round Feistel network on b = 2h bits, with
//   b = max(bit_length(n - 1), 2) rounded up to even,  h = b / 2,  mask = 2^h - 1,
//   mix32(x) = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16,
//   F(R, K) = mix32(R ^ K) & mask,  round r: (L, R) <- (R, L ^ F(R, keys[r])),
// made a permutation of [0, n) by cycle walking (re-apply while the value is >= n; 2^b < 4n, so
// fewer than four evaluations on average). keys are 8 uint32 round keys chosen by the caller
// (Philox of (seed, step) in fedkern.random), so a mask is reproducible from its seed on every
// backend. Work is O(k): Feistel per index (OpenMP) and an LSD radix sort of the k indices (or a
// bitmap of n bits when k is a sizeable fraction of n).
//
// Shared contract: pointers to contiguous 1-D arrays; x/grad/err/state have n elements of `dtype`
// (float32 = float, bfloat16 = uint16 bits); 1 <= k <= n (int64, any size); idx is an int64[k]
// output (ascending), val a dtype[k] output. fp32 arithmetic without FMA, "round" = one rounding to
// the dtype. scale and lr are fp32 numbers (scale = 1 for the biased compressor).
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

// One evaluation of the Feistel network (no cycle walking) for x in [0, 2^b).
uint64_t randk_feistel(uint64_t x, int h, const uint32_t keys[8]);

// perm(i) for i in [0, n): the Feistel network with cycle walking.
uint64_t randk_perm(uint64_t i, int64_t n, const uint32_t keys[8]);

// out[j] = perm(lo + j) for lo <= lo + j < hi <= n, in that order (not sorted): the permutation
// itself, evaluated on batches of values at once (the minibatches of fedkern/clients.h use it).
void randk_perm_range(int64_t n, const uint32_t keys[8], int64_t lo, int64_t hi, int64_t* out);

// idx = ascending {perm(i) : i < k}.
void randk_indices(int64_t n, int64_t k, const uint32_t keys[8], int64_t* idx);

// idx = randk indices; val_j = round(x[idx_j] * scale). x is not modified.
void randk_compress(const void* x, DType dtype, int64_t n, int64_t k, const uint32_t keys[8],
                    float scale, int64_t* idx, void* val);

// EF14 with rand-k, in place on `err`:
//   a_j = round(e_j + round32(lr * g_j)) for all j;  err <- a;  idx = randk indices;
//   c = round(a[idx] * scale);  err[idx] <- round(a[idx] - c);  val = c.
void ef14_randk(const void* grad, void* err, DType dtype, int64_t n, int64_t k,
                const uint32_t keys[8], float lr, float scale, int64_t* idx, void* val);

// EF21 with rand-k; O(k) work, only the selected coordinates of `state` are read or written:
//   d = round(g[idx] - s[idx]);  c = round(d * scale);  state[idx] <- round(s[idx] + c);  val = c.
void ef21_randk(const void* grad, void* state, DType dtype, int64_t n, int64_t k,
                const uint32_t keys[8], float scale, int64_t* idx, void* val);

}  // namespace fedkern
