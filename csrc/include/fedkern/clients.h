// fedkern/clients.h -- batched per-client local training (CPU, OpenMP): K local steps of GD, SGD or
// random reshuffling for a cohort of clients in one call, plus the two server-side reductions
// that follow it (Scaffnew's consensus step with its control-variate update, a weighted sum).
//
// Problem data, packed one client after another: A float32 [N, d] row-major, y float32 [N],
// offsets int64 [n + 1] (client i owns rows offsets[i] .. offsets[i+1] - 1, m_i of them, m_i may
// be 0). Model kinds: 0 = logistic (p = d; y in {0, 1}), 1 = multinomial (C classes, p = C * d,
// x = W [C, d] row-major; y = class index stored as a float), 2 = least squares (p = d). Per
// sample (a, y), with z = a.x (multinomial: z_c = a.w_c):
//   logistic:      s = 2y - 1; grad = -s * sigmoid(-s z) * a
//   multinomial:   P = softmax(z) (max subtracted first); grad_c = (P_c - [c == y]) * a
//   least squares: grad = (z - y) * a
// f_i(x) = mean over client i's samples of the loss + (l2 / 2) ||x||^2.
//
//   local_steps (in place on X [c, p]; row r belongs to client i = clients[r]; rows independent):
//     for t in 0..K-1:
//       batches: gd: all m_i samples in order; sgd: perm(0 .. min(b, m_i) - 1);
//                rr: perm(0 .. m_i - 1) cut into consecutive batches of b (the last may be short);
//                perm(j) = randk_perm(j, m_i, keys[r, t]) (uint32(keys[r, t, 0..7]), randk.h).
//                m_i = 0: one batch whose gradient part is 0 (every mode).
//       per batch B: g = (sum over j in B of grad(x; a_j, y_j)) / |B|     (fp32)
//                    g = g + l2 * x;  mu != 0: g = g + mu * (x - anchor[r])
//                    u = g - H[r] (H given) else g
//                    clip > 0: nrm = sqrt(sum_k double(u_k)^2); nrm > clip: u = float(clip/nrm) * u
//                    x = x - gamma * u
//   client_grads (G [c, p] out; X not modified): one gradient per cohort row r at x = X[r],
//       batch B: gd: all m_i samples in order; sgd: perm(0 .. min(b, m_i) - 1) with perm keyed by
//                keys[r, 0..7] (local_steps' sgd batch of one step); samples: the entries
//                samples[r, q] >= 0 (local indices < m_i) in order q = 0 .. s - 1 (-1: padding;
//                repeats count twice)
//       G[r] = (sum over j in B of grad(x; a_j, y_j)) / |B| + l2 * x    (|B| = 0: 0 + l2 * x)
//     with local_steps' summation orders, so that one local step x - gamma * u (no H, mu, clip)
//     equals x - gamma * G[r] bit for bit.
//   scaffnew_sync (in place on X, H [c, p]):
//     xbar_k = (sum over rows r in row order of X[r, k]) / float(c)          (fp32)
//     H[r, k] = H[r, k] + coef * (xbar_k - X[r, k]);  X[r, k] = xbar_k;  xbar_out = xbar
//   weighted_sum: out[k] = float(sum over rows r in row order of w[r] * double(X[r, k]))  (fp64)
//
// Numerics: fp32 without FMA (-ffp-contract=off) except the clip norm (fp64) and weighted_sum.
// Summation orders (fixed; never dependent on the thread count or the ISA):
//   z = a.x: the columns in chunks of 8, the last one zero-padded; lane l (0..7) sums the products
//     a_k * x_k of the columns k = l (mod 8) in increasing k from +0.0; the lanes are added as
//     ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
//   batch sum: per coordinate from +0.0, the per-sample gradients fp32(coef_j * a_jk) added in
//     batch order; then one IEEE division by float(|B|). coef_j: logistic -s * sigmoid(-s z),
//     multinomial P_c - [c == y], least squares z - y.
//   exp: the kernel's own fp32 exp for arguments <= 0 (Cephes expf: n = round(x log2 e), two-part
//     ln 2 reduction, degree-7 polynomial, 2^n in the exponent bits; about 1 ulp; x < -87.3
//     gives 0). sigmoid(t) = 1 / (1 + e) for t >= 0, e / (1 + e) otherwise, e = exp(-|t|).
//   softmax: m = max_c z_c (m = z_0, then m = m < z_c ? z_c : m in class order); e_c = exp(z_c -
//   m); S = sum of e_c in class
//     order from +0.0; P_c = e_c / S.
//   clip norm: fp64; lane l (0..7) sums double(u_k)^2 over the columns k = l (mod 8) of each class
//     block (d columns, classes in order into the same lanes; one block unless multinomial), the
//     lanes added as the same tree, then sqrt.
//   scaffnew_sync / weighted_sum: each column in row order (the column tiling does not matter).
//
// Contract (the Python op layer validates, the kernels do not): X, H, anchor: c * p contiguous
// floats (H / anchor may be null: no control variates / mu must be 0); clients[r] in [0, n);
// offsets non-decreasing; K >= 0; b >= 1 (sgd / rr); keys: c * K * 8 int64 holding uint32 values
// (sgd / rr, else may be null); multinomial labels in [0, C); d >= 1. c = 0 or K = 0 does
// nothing.
// Extra memory: per thread 2 C * dp floats (padded x, gradient sum), min(max m_i, 2^19 / dp) padded
// rows (2 MiB at most unless d > 2^16) and O(max m_i) indices.
#pragma once

#include <cstdint>

#include "fedkern/common.h"

namespace fedkern {

enum class ModelKind : int { kLogistic = 0, kMultinomial = 1, kLeastSquares = 2 };
enum class LocalMode : int { kGD = 0, kSGD = 1, kRR = 2 };
enum class GradMode : int { kFull = 0, kSGD = 1, kSamples = 3 };

// K local steps for every cohort row, in place on X [c, p] (p = C * d for multinomial, else d).
void local_steps(float* X, int64_t c, int64_t d, const int64_t* clients, const float* A,
                 const float* y, const int64_t* offsets, ModelKind kind, int64_t C, int64_t K,
                 float gamma, float l2, const float* H, LocalMode mode, int64_t b,
                 const int64_t* keys, double clip, float mu, const float* anchor);

// One gradient per cohort row into G [c, p] (X [c, p] read only). keys: c * 8 int64 holding
// uint32 values (sgd; else may be null); samples: c * s int64 local indices or -1 (samples mode).
void client_grads(const float* X, int64_t c, int64_t d, const int64_t* clients, const float* A,
                  const float* y, const int64_t* offsets, ModelKind kind, int64_t C, float l2,
                  GradMode mode, int64_t b, const int64_t* keys, const int64_t* samples, int64_t s,
                  float* G);

// Scaffnew consensus step in place on X and H [c, p]; xbar_out: p floats (the mean). c >= 1.
void scaffnew_sync(float* X, float* H, int64_t c, int64_t p, float coef, float* xbar_out);

// out[k] = float(sum_r w[r] * double(X[r, k])) (fp64, row order); out: p floats.
void weighted_sum(const float* X, const double* w, int64_t c, int64_t p, float* out);

namespace detail {
// Test hook: when > 0, replaces the number of floats of padded sample rows a thread keeps in
// cache (clients larger than that are packed panel by panel for every batch).
inline int64_t& clients_cache_floats() {
  static int64_t floats = 0;
  return floats;
}
}  // namespace detail

}  // namespace fedkern
