// csrc/python/bind_random.cpp -- bindings of the random family (fedkern/random.h): Gaussian and
// Bernoulli fills from four Philox key words (a list of ints in [0, 2^32)). Pointers as uintptr_t.
#include <pybind11/stl.h>

#include <array>

#include "bindings.h"
#include "fedkern/random.h"

namespace fedkern::py_bind {

void bind_random(py::module_& m) {
  using py::arg;
  m.def(
      "gaussian_fill",
      [](uintptr_t out, int dtype, int64_t n, std::array<uint32_t, 4> key, float std) {
        gaussian_fill(ptr<void>(out), to_dtype(dtype), n, key.data(), std);
      },
      arg("out_ptr"), arg("dtype"), arg("n"), arg("key"), arg("std"), nogil(),
      "out[i] = round(std * z_i) for i < n: Box-Muller on the Philox words of key (4 uint32).");
  m.def(
      "bernoulli_fill",
      [](uintptr_t out, int64_t n, std::array<uint32_t, 4> key, float p_scalar, uintptr_t p) {
        bernoulli_fill(ptr<uint8_t>(out), n, key.data(), p_scalar, ptr<const float>(p));
      },
      arg("out_ptr"), arg("n"), arg("key"), arg("p_scalar"), arg("p_ptr"), nogil(),
      "out[i] (bytes) = (word_i >> 8) < ceil(p 2^24), p = p_ptr[i] (float32) or p_scalar (p_ptr "
      "0).");
}

}  // namespace fedkern::py_bind
