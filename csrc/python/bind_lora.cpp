// csrc/python/bind_lora.cpp -- bindings of the lora family (fedkern/lora.h): the fused merge
// W += scale * B A with B or A (pointer 0) generated from four Philox key words.
#include <pybind11/stl.h>

#include <array>

#include "bindings.h"
#include "fedkern/lora.h"

namespace fedkern::py_bind {

void bind_lora(py::module_& m) {
  using py::arg;
  m.def(
      "lora_merge",
      [](uintptr_t w, int64_t rows, int64_t cols, int64_t r, uintptr_t b, uintptr_t a,
         std::array<uint32_t, 4> key, float std, float scale) {
        lora_merge(ptr<float>(w), rows, cols, r, ptr<const float>(b), ptr<const float>(a),
                   key.data(), std, scale);
      },
      arg("w_ptr"), arg("m"), arg("n"), arg("r"), arg("b_ptr"), arg("a_ptr"), arg("key"),
      arg("std"), arg("scale"), nogil(),
      "In place on W (float32 [m, n]): W += scale * B A, B [m, r] / A [r, n] float32, the null "
      "one generated as round(std * z) from the Gaussian draw with key words key (4 uint32).");
}

}  // namespace fedkern::py_bind
