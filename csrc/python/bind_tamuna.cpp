// csrc/python/bind_tamuna.cpp -- bindings of the tamuna family (fedkern/tamuna.h): TAMUNA's fused
// server step. Pointers as uintptr_t (0 = null: H); coef is an fp32 number.
#include <stdexcept>

#include "bindings.h"
#include "fedkern/tamuna.h"

namespace fedkern::py_bind {

void bind_tamuna(py::module_& m) {
  using py::arg;
  m.def(
      "tamuna_aggregate",
      [](uintptr_t x, uintptr_t h, uintptr_t perm, int64_t c, int64_t p, int64_t s, float coef,
         uintptr_t xbar) {
        if (c < 1 || p < 1 || s < 1 || s > c) {
          throw std::invalid_argument("tamuna_aggregate needs c, p >= 1 and 1 <= s <= c");
        }
        tamuna_aggregate(ptr<const float>(x), ptr<float>(h), ptr<const int64_t>(perm), c, p, s,
                         coef, ptr<float>(xbar));
      },
      arg("x_ptr"), arg("h_ptr"), arg("perm_ptr"), arg("c"), arg("p"), arg("s"), arg("coef"),
      arg("xbar_ptr"), nogil(),
      "xbar (float32 [p] output)[r] = (sum in slot order j = 0..s-1 of X[h_j, r]) / s with h_j = "
      "perm[(s*r + j) mod c] (X float32 [c, p], perm int64 [c], a permutation); H (float32 [c, "
      "p] or 0): H[h_j, r] += coef * (xbar[r] - X[h_j, r]). Reads and writes held entries only.");
}

}  // namespace fedkern::py_bind
