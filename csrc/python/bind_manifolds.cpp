// csrc/python/bind_manifolds.cpp -- bindings of the manifolds family (fedkern/manifolds.h): the
// fused sphere and Stiefel steps. Pointers as uintptr_t (v_ptr 0 = no vector to transport); f64
// selects the float64 kernels (else float32); eta arrives as a Python float and is rounded to the
// kernel's dtype here.
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "fedkern/manifolds.h"

namespace fedkern::py_bind {

void bind_manifolds(py::module_& m) {
  using py::arg;
  m.def(
      "sphere_step",
      [](uintptr_t x, uintptr_t u, uintptr_t v, int64_t b, int64_t n, double eta, bool use_exp,
         int transport, bool f64) {
        if (transport != 0 && transport != 1) {
          throw std::invalid_argument("transport must be 0 (projection) or 1 (parallel), got " +
                                      std::to_string(transport));
        }
        const auto tr = static_cast<SphereTransport>(transport);
        if (f64) {
          sphere_step_f64(ptr<double>(x), ptr<const double>(u), ptr<double>(v), b, n, eta, use_exp,
                          tr);
        } else {
          sphere_step_f32(ptr<float>(x), ptr<const float>(u), ptr<float>(v), b, n,
                          static_cast<float>(eta), use_exp, tr);
        }
      },
      arg("x_ptr"), arg("u_ptr"), arg("v_ptr"), arg("b"), arg("n"), arg("eta"), arg("use_exp"),
      arg("transport"), arg("f64"), nogil(),
      "In place on X and V ([b, n]): x+ = R_x(-eta P_x(u)) (retraction, or exp with use_exp), "
      "renormalized; V (tangent at x) transported to x+ (0 projection, 1 parallel). U [b, n] "
      "read only; float64 if f64 else float32.");
  m.def(
      "stiefel_step",
      [](uintptr_t x, uintptr_t u, uintptr_t v, int64_t b, int64_t n, int64_t p, double eta,
         bool f64) {
        if (p < 1 || p > n) {
          throw std::invalid_argument("need 1 <= p <= n, got n = " + std::to_string(n) +
                                      ", p = " + std::to_string(p));
        }
        if (f64) {
          stiefel_step_f64(ptr<double>(x), ptr<const double>(u), ptr<double>(v), b, n, p, eta);
        } else {
          stiefel_step_f32(ptr<float>(x), ptr<const float>(u), ptr<float>(v), b, n, p,
                           static_cast<float>(eta));
        }
      },
      arg("x_ptr"), arg("u_ptr"), arg("v_ptr"), arg("b"), arg("n"), arg("p"), arg("eta"),
      arg("f64"), nogil(),
      "In place on X and V ([b, n, p]): X+ = qf(X - eta P_X(U)) (Gram-Schmidt twice, diag(R) > "
      "0); V transported to X+ by projection. U read only; float64 if f64 else float32.");
}

}  // namespace fedkern::py_bind
