// csrc/python/bind_sketch.cpp -- bindings of the sketch family (fedkern/sketch.h): MAST's
// w = v + S (x - v) and x -= gamma S^T g over `rows` node sketches. Pointers as uintptr_t (0 = null
// for v and p); strides in elements (0 = shared row).
#include "bindings.h"
#include "fedkern/sketch.h"

namespace fedkern::py_bind {

void bind_sketch(py::module_& m) {
  using py::arg;
  m.def(
      "sketch_perm_apply",
      [](uintptr_t x, int64_t xs, uintptr_t v, int64_t vs, uintptr_t out, int dtype, int64_t rows,
         int64_t d, uintptr_t keys, uintptr_t range, uintptr_t scale) {
        sketch_perm_apply(ptr<const void>(x), xs, ptr<const void>(v), vs, ptr<void>(out),
                          to_dtype(dtype), rows, d, ptr<const int64_t>(keys),
                          ptr<const int64_t>(range), ptr<const float>(scale));
      },
      arg("x_ptr"), arg("x_stride"), arg("v_ptr"), arg("v_stride"), arg("out_ptr"), arg("dtype"),
      arg("rows"), arg("d"), arg("keys_ptr"), arg("range_ptr"), arg("scale_ptr"), nogil(),
      "out [rows, d] = v + S_r (x - v), S_r keeping perm_r(lo_r .. hi_r - 1) scaled by scale[r] "
      "(keys int64 [rows, 8], range int64 [rows, 2], scale float32 [rows]).");
  m.def(
      "sketch_perm_grad_step",
      [](uintptr_t x, int64_t xs, uintptr_t g, int dtype, int64_t rows, int64_t d, uintptr_t keys,
         uintptr_t range, uintptr_t scale, float gamma) {
        sketch_perm_grad_step(ptr<void>(x), xs, ptr<const void>(g), to_dtype(dtype), rows, d,
                              ptr<const int64_t>(keys), ptr<const int64_t>(range),
                              ptr<const float>(scale), gamma);
      },
      arg("x_ptr"), arg("x_stride"), arg("g_ptr"), arg("dtype"), arg("rows"), arg("d"),
      arg("keys_ptr"), arg("range_ptr"), arg("scale_ptr"), arg("gamma"), nogil(),
      "In place: x_r -= gamma S_r g_r (x_stride 0: one x, the rows applied in order).");
  m.def(
      "sketch_bern_apply",
      [](uintptr_t x, int64_t xs, uintptr_t v, int64_t vs, uintptr_t out, int dtype, int64_t rows,
         int64_t d, uintptr_t keys, float p_scalar, uintptr_t p) {
        sketch_bern_apply(ptr<const void>(x), xs, ptr<const void>(v), vs, ptr<void>(out),
                          to_dtype(dtype), rows, d, ptr<const int64_t>(keys), p_scalar,
                          ptr<const float>(p));
      },
      arg("x_ptr"), arg("x_stride"), arg("v_ptr"), arg("v_stride"), arg("out_ptr"), arg("dtype"),
      arg("rows"), arg("d"), arg("keys_ptr"), arg("p_scalar"), arg("p_ptr"), nogil(),
      "out [rows, d] = v + S_r (x - v), S_r Bernoulli(p) with draw key words keys int64 [rows, 4] "
      "(p_ptr: float32 [d] per-coordinate probabilities, or 0 for p_scalar).");
  m.def(
      "sketch_bern_grad_step",
      [](uintptr_t x, int64_t xs, uintptr_t g, int dtype, int64_t rows, int64_t d, uintptr_t keys,
         float p_scalar, uintptr_t p, float gamma) {
        sketch_bern_grad_step(ptr<void>(x), xs, ptr<const void>(g), to_dtype(dtype), rows, d,
                              ptr<const int64_t>(keys), p_scalar, ptr<const float>(p), gamma);
      },
      arg("x_ptr"), arg("x_stride"), arg("g_ptr"), arg("dtype"), arg("rows"), arg("d"),
      arg("keys_ptr"), arg("p_scalar"), arg("p_ptr"), arg("gamma"), nogil(),
      "In place: x_r -= gamma S_r g_r, S_r Bernoulli(p) (x_stride 0: one x, rows in order).");
}

}  // namespace fedkern::py_bind
