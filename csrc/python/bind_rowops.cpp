// csrc/python/bind_rowops.cpp -- bindings of the rowops family (fedkern/rowops.h): gather-mean,
// geometric median (smoothed Weiszfeld), centered clipping, in-place row clipping. nu, tau stay
// fp64 (the spec's weights are fp64); the starting point z0 / v0 is a float32 [d] buffer.
#include "bindings.h"
#include "fedkern/rowops.h"

namespace fedkern::py_bind {

void bind_rowops(py::module_& m) {
  using py::arg;
  m.def(
      "gather_mean",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, uintptr_t idx, int64_t r, int64_t s,
         uintptr_t out) {
        fedkern::gather_mean(ptr<const void>(x), to_dtype(dtype), n, d, ptr<const int64_t>(idx), r,
                             s, ptr<void>(out));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("d"), arg("idx_ptr"), arg("r"), arg("s"),
      arg("out_ptr"), nogil(),
      "out[q] = round(fp32 sum, in t order from the first valid term, of x[idx[q, t]] over "
      "idx[q, t] >= 0, / count); idx: int64 [r, s] (-1 = trailing padding), out: [r, d].");
  m.def(
      "geometric_median",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, uintptr_t z0, int64_t iters, double nu,
         uintptr_t out) {
        geometric_median(ptr<const void>(x), to_dtype(dtype), n, d, ptr<const float>(z0), iters, nu,
                         ptr<void>(out));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("d"), arg("z0_ptr"), arg("iters"), arg("nu"),
      arg("out_ptr"), nogil(),
      "Smoothed Weiszfeld from z0 (float32 [d]): iters times w_i = 1/max(r_i, nu) (0 for rows with "
      "inf/NaN), z = sum_i (w_i/W) X[i] in fp64, row order; all rows bad: NaN. out = round(z).");
  m.def(
      "centered_clip",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, uintptr_t v0, int64_t iters, double tau,
         uintptr_t out) {
        centered_clip(ptr<const void>(x), to_dtype(dtype), n, d, ptr<const float>(v0), iters, tau,
                      ptr<void>(out));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("d"), arg("v0_ptr"), arg("iters"), arg("tau"),
      arg("out_ptr"), nogil(),
      "Centered clipping from v0 (float32 [d]): iters times s_i = min(1, tau/r_i) (0 for rows with "
      "inf/NaN), v += sum_i (s_i/n) (X[i] - v) in fp64, row order. out = round(v).");
  m.def(
      "clip_rows",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, uintptr_t max_norm, uintptr_t norms) {
        clip_rows(ptr<void>(x), to_dtype(dtype), n, d, ptr<const double>(max_norm),
                  ptr<double>(norms));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("d"), arg("max_norm_ptr"), arg("norms_ptr"),
      nogil(),
      "In place: rows of norm > max_norm[i] (float64 [n]) scaled by float(max_norm[i]/norm), rows "
      "with inf/NaN set to +0.0; norms_ptr (float64 [n]) <- pre-clip norms (inf for such rows).");
}

}  // namespace fedkern::py_bind
