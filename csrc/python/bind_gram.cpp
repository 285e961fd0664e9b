// csrc/python/bind_gram.cpp -- bindings of the gram family (fedkern/gram.h): the fp64 Gram
// matrix.
#include "bindings.h"
#include "fedkern/gram.h"

namespace fedkern::py_bind {

void bind_gram(py::module_& m) {
  using py::arg;

  m.def(
      "gram",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, uintptr_t g) {
        fedkern::gram(ptr<const void>(x), to_dtype(dtype), n, d, ptr<double>(g));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("d"), arg("g_ptr"), nogil(),
      "g[i, j] = sum_k double(x[i, k]) * double(x[j, k]) for x [n, d]; g: [n, n] float64, "
      "symmetric bit for bit. fp64 sums: sequential in k within fixed column chunks (a function "
      "of n, d only), chunk partials added in order.");
}

}  // namespace fedkern::py_bind
