// fedkern/quartic.h -- batched local steps on the quartic f_i(x) = (1/m_i) sum_j ||x - x_j||^4
// (CPU, OpenMP): K local steps of GD, SGD or random reshuffling for a cohort of clients in one
// call.
//
// Data, packed one client after another: points float32 [N, d] row-major, offsets int64 [n + 1]
// (client i owns rows offsets[i] .. offsets[i+1] - 1, m_i of them, m_i may be 0).
//
//   quartic_local_steps (in place on X [c, d]; row r belongs to client i = clients[r]):
//     for t in 0..K-1:
//       batches: gd: all m_i points in order; sgd: perm(0 .. min(b, m_i) - 1);
//                rr: perm(0 .. m_i - 1) cut into consecutive batches of b (the last may be short);
//                perm(j) = randk_perm(j, m_i, keys[r, t]) (uint32(keys[r, t, 0..7]), randk.h).
//                m_i = 0: one batch whose gradient part is 0 (every mode).
//       per batch B: D_j = x - x_j (fp32);  s_j = ||D_j||^2 (fp32, order below)
//                    gsum_k = sum over j in B, in batch order, from +0.0, of s_j * D_jk  (fp32)
//                    g = (4.0f / float(|B|)) * gsum  (|B| = 0: g = 0)
//                    u = g - H[r] (H given) else g
//                    clip > 0: nrm = sqrt(sum_k double(u_k)^2); nrm > clip: u = float(clip/nrm) * u
//                    x = x - gamma * u
//
// Numerics: fp32 without FMA (-ffp-contract=off) except the clip norm (fp64). s_j: lane l (0..7)
// sums D_jk^2 over k = l (mod 8) in increasing k from +0.0, the lanes added as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); the clip norm uses the same lane tree in
// fp64. Rows are independent and handed to the threads dynamically: results never depend on the
// thread count.
//
// Contract (the Python op layer validates, the kernels do not): X, H: c * d contiguous floats (H
// may be null); clients[r] in [0, n); offsets non-decreasing; K >= 0; b >= 1 (sgd / rr); keys:
// c * K * 8 int64 holding uint32 values (sgd / rr, else may be null); d >= 1. c = 0 or K = 0 does
// nothing. Extra memory per thread: 3 d floats and max m_i indices.
#pragma once

#include <cstdint>

namespace fedkern {

// K local steps on the quartic for every cohort row, in place on X [c, d]. mode: 0 gd, 1 sgd, 2 rr.
void quartic_local_steps(float* X, int64_t c, int64_t d, const int64_t* clients,
                         const float* points, const int64_t* offsets, int64_t K, float gamma,
                         const float* H, int mode, int64_t b, const int64_t* keys, double clip);

}  // namespace fedkern
