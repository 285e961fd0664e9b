// fedkern/manifolds.h -- fused Riemannian steps on batches of points (CPU, OpenMP): the tangent
// projection of a direction, the retraction (or the exponential map) and the transport of a
// vector to the new point, in one pass per row (sphere) or per matrix (Stiefel).
//
//   sphere_step (in place on X and V, [b, n] row-major; U [b, n] read only), per row x, u, v:
//     a = <x, u>;  g = u - a * x
//     retraction:  y = x - eta * g
//     exp:         gn = ||g||, t = eta * gn; t > 0: y = cos(t) * x - (sin(t) / gn) * g; else y = x
//     x+ = y / ||y||                                  (every step renormalizes: no drift)
//     V given (a tangent vector at x):
//       projection transport: v = v - (<v, y> / ||y||) * x+
//       parallel transport:   v = v - ((<v, y> / ||y||) / (1 + <x, y> / ||y||)) * (x + x+)
//   stiefel_step (in place on X and V, [b, n, p] row-major; U read only), per matrix:
//     S = sym(X^T U);  Y = X - eta * (U - X S);  X+ = the Q of Y by classical Gram-Schmidt with
//     reorthogonalization (two passes per column; diag(R) > 0);  V = V - X+ sym(X+^T V)
//     sym(A) = (A + A^T) * 0.5.
//
// Numerics: T = float or double (the input's dtype), every sum accumulated in T, no FMA. Dot
// products over n run in 8 lanes (lane l sums the products of the indices k = l mod 8 in
// increasing k from +0), the lanes added as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); the
// p x p products sum over k the same way; products with a p x p matrix (X S, the Gram-Schmidt
// sums sum_i r_i q_i) add their p terms in increasing i from +0 and are subtracted once.
// Rows (matrices) are independent and each is handled by one thread: results do not depend on
// the thread count. cos / sin are the C library's.
//
// Contract (validated by the Python op layer): contiguous buffers, b, n, p >= 1, p <= n, eta
// finite; X, U, V do not overlap; V may be null.
#pragma once

#include <cstdint>

namespace fedkern {

enum class SphereTransport : int { kProjection = 0, kParallel = 1 };

void sphere_step_f32(float* X, const float* U, float* V, int64_t b, int64_t n, float eta,
                     bool use_exp, SphereTransport transport);
void sphere_step_f64(double* X, const double* U, double* V, int64_t b, int64_t n, double eta,
                     bool use_exp, SphereTransport transport);

void stiefel_step_f32(float* X, const float* U, float* V, int64_t b, int64_t n, int64_t p,
                      float eta);
void stiefel_step_f64(double* X, const double* U, double* V, int64_t b, int64_t n, int64_t p,
                      double eta);

}  // namespace fedkern
