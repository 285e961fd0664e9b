// csrc/python/bind_clipjump.cpp -- bindings of the clipjump family (fedkern/clipjump.h): the fused
// clipped server jump. Pointers as uintptr_t (0 = null: G); s, c0, c1 stay fp64.
#include <stdexcept>

#include "bindings.h"
#include "fedkern/clipjump.h"

namespace fedkern::py_bind {

void bind_clipjump(py::module_& m) {
  using py::arg;
  m.def(
      "clip_jump",
      [](uintptr_t y, int64_t c, int64_t p, uintptr_t x, uintptr_t w, double s, double c0,
         double c1, uintptr_t g, uintptr_t out, uintptr_t stats) {
        if (c < 1 || p < 1 || !(s > 0) || !(c0 > 0) || !(c1 >= 0)) {
          throw std::invalid_argument("clip_jump needs c, p >= 1, s > 0, c0 > 0 and c1 >= 0");
        }
        clip_jump(ptr<const float>(y), c, p, ptr<const float>(x), ptr<const double>(w), s, c0, c1,
                  ptr<const double>(g), ptr<float>(out), ptr<double>(stats));
      },
      arg("y_ptr"), arg("c"), arg("p"), arg("x_ptr"), arg("w_ptr"), arg("s"), arg("c0"), arg("c1"),
      arg("g_ptr"), arg("out_ptr"), arg("stats_ptr"), nogil(),
      "out (float32 [p]) = x - float(theta * s) * d with d = x - float(sum_r w[r] Y[r]) (fp64 "
      "row sums), theta = 1 / (c0 + c1 * (G or s * ||d||)); stats (float64 [2]) = {s ||d||, "
      "theta}. Y float32 [c, p], w float64 [c], G null or one float64.");
}

}  // namespace fedkern::py_bind
