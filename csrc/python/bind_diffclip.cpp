// csrc/python/bind_diffclip.cpp -- bindings of the diffclip family (fedkern/diffclip.h):
// per-row difference G_new - G_old, then top-k / rand-k / dense, then norm clipping.
#include <pybind11/stl.h>

#include "bindings.h"
#include "fedkern/diffclip.h"

namespace fedkern::py_bind {

void bind_diffclip(py::module_& m) {
  using py::arg;

  m.def(
      "diff_topk_clip",
      [](uintptr_t g_new, uintptr_t g_old, int dtype, int64_t n, int64_t d, int64_t k,
         uintptr_t max_norm, uintptr_t idx, uintptr_t val, uintptr_t norms) {
        fedkern::diff_topk_clip(ptr<const void>(g_new), ptr<const void>(g_old), to_dtype(dtype), n,
                                d, k, ptr<const double>(max_norm), ptr<int64_t>(idx),
                                ptr<void>(val), ptr<double>(norms));
      },
      arg("gnew_ptr"), arg("gold_ptr"), arg("dtype"), arg("n"), arg("d"), arg("k"),
      arg("max_norm_ptr"), arg("idx_ptr"), arg("val_ptr"), arg("norms_ptr"), nogil(),
      "Per row i of [n, d]: (val[i], idx[i]) = top-k of round(g_new[i] - g_old[i]) (ties to the "
      "lower index, indices ascending), clipped to norm max_norm[i]; norms[i] = fp64 norm before "
      "clipping. idx/val: [n, k].");

  m.def(
      "diff_randk_clip",
      [](uintptr_t g_new, uintptr_t g_old, int dtype, int64_t n, int64_t d, int64_t k,
         uintptr_t keys, double scale, uintptr_t max_norm, uintptr_t idx, uintptr_t val,
         uintptr_t norms) {
        fedkern::diff_randk_clip(ptr<const void>(g_new), ptr<const void>(g_old), to_dtype(dtype), n,
                                 d, k, ptr<const int64_t>(keys), static_cast<float>(scale),
                                 ptr<const double>(max_norm), ptr<int64_t>(idx), ptr<void>(val),
                                 ptr<double>(norms));
      },
      arg("gnew_ptr"), arg("gold_ptr"), arg("dtype"), arg("n"), arg("d"), arg("k"), arg("keys_ptr"),
      arg("scale"), arg("max_norm_ptr"), arg("idx_ptr"), arg("val_ptr"), arg("norms_ptr"), nogil(),
      "Per row i: idx[i] = rand-k indices of keys[i] (int64 [n, 8], uint32 values); val[i] = "
      "round(scale * round(g_new[i, idx] - g_old[i, idx])), clipped to norm max_norm[i]; norms[i] "
      "= fp64 norm before clipping.");

  m.def(
      "diff_clip",
      [](uintptr_t g_new, uintptr_t g_old, int dtype, int64_t n, int64_t d, uintptr_t max_norm,
         uintptr_t out, uintptr_t norms) {
        fedkern::diff_clip(ptr<const void>(g_new), ptr<const void>(g_old), to_dtype(dtype), n, d,
                           ptr<const double>(max_norm), ptr<void>(out), ptr<double>(norms));
      },
      arg("gnew_ptr"), arg("gold_ptr"), arg("dtype"), arg("n"), arg("d"), arg("max_norm_ptr"),
      arg("out_ptr"), arg("norms_ptr"), nogil(),
      "out[i] = round(g_new[i] - g_old[i]) clipped to norm max_norm[i] ([n, d]); norms[i] = fp64 "
      "norm before clipping.");
}

}  // namespace fedkern::py_bind
