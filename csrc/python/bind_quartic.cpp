// csrc/python/bind_quartic.cpp -- bindings of the quartic family (fedkern/quartic.h): batched local
// steps on f_i(x) = mean ||x - x_j||^4. Pointers as uintptr_t (0 = null: H, keys); gamma is an
// fp32 number, clip stays fp64.
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "fedkern/quartic.h"

namespace fedkern::py_bind {

void bind_quartic(py::module_& m) {
  using py::arg;
  m.def(
      "quartic_local_steps",
      [](uintptr_t x, uintptr_t clients, int64_t c, int64_t d, uintptr_t points, uintptr_t offsets,
         int64_t K, float gamma, uintptr_t h, int mode, int64_t b, uintptr_t keys, double clip) {
        if (mode < 0 || mode > 2) {
          throw std::invalid_argument("mode must be 0, 1 or 2, got " + std::to_string(mode));
        }
        if (d < 1 || c < 0 || K < 0 || b < 1) {
          throw std::invalid_argument("need d >= 1, c >= 0, K >= 0 and b >= 1");
        }
        quartic_local_steps(ptr<float>(x), c, d, ptr<const int64_t>(clients),
                            ptr<const float>(points), ptr<const int64_t>(offsets), K, gamma,
                            ptr<const float>(h), mode, b, ptr<const int64_t>(keys), clip);
      },
      arg("x_ptr"), arg("clients_ptr"), arg("c"), arg("d"), arg("points_ptr"), arg("offsets_ptr"),
      arg("K"), arg("gamma"), arg("h_ptr"), arg("mode"), arg("b"), arg("keys_ptr"), arg("clip"),
      nogil(),
      "In place on X (float32 [c, d]): K local steps on the quartic per cohort row r of client "
      "clients[r] (int64 [c]) on its rows offsets[i]..offsets[i+1]-1 (int64 [n+1]) of points "
      "(float32 [N, d]). mode 0 gd / 1 sgd / 2 rr (batch b, keys int64 [c, K, 8]); H float32 "
      "[c, d] or 0; clip (fp64, 0 = off).");
}

}  // namespace fedkern::py_bind
