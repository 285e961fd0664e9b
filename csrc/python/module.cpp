// csrc/python/module.cpp -- pybind11 bindings of the torch-free C++ core: module fedkern._C.
//
// The Python op layer (fedkern/ops) validates every tensor and passes raw data pointers
// (tensor.data_ptr(), Python ints), int64 sizes and the dtype tag (0 = float32, 1 = bfloat16);
// the kernels themselves never validate. Every kernel releases the GIL while it runs. lr, scale
// and alpha arrive as Python floats and are rounded to fp32 once, here: the kernels' arithmetic is
// fp32 ("fp32(lr) * fp32(g)").
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fedkern/common.h"
#include "fedkern/randk.h"
#include "fedkern/sparse.h"
#include "fedkern/topk.h"

namespace py = pybind11;
using fedkern::DType;

namespace {

using Keys = std::array<uint32_t, 8>;

DType to_dtype(int tag) {
  if (tag != 0 && tag != 1) {
    throw std::invalid_argument("dtype tag must be 0 (float32) or 1 (bfloat16), got " +
                                std::to_string(tag));
  }
  return static_cast<DType>(tag);
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fedkern C++ CPU core (torch-free). Functions take data pointers (tensor.data_ptr()), "
      "int64 sizes and a dtype tag (0 = float32, 1 = bfloat16); inputs must be validated by "
      "fedkern.ops. idx_ptr: int64[k] output (ascending), val_ptr: dtype[k] output.";
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "topk_compress",
      [](uintptr_t x, int dtype, int64_t n, int64_t k, uintptr_t idx, uintptr_t val) {
        fedkern::topk_compress(ptr<const void>(x), to_dtype(dtype), n, k, ptr<int64_t>(idx),
                               ptr<void>(val));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("k"), arg("idx_ptr"), arg("val_ptr"), nogil,
      "idx = top-k of key(x) (ties to the lower index, ascending); val = x[idx].");

  m.def(
      "ef14_topk",
      [](uintptr_t grad, uintptr_t err, int dtype, int64_t n, int64_t k, double lr, uintptr_t idx,
         uintptr_t val) {
        fedkern::ef14_topk(ptr<const void>(grad), ptr<void>(err), to_dtype(dtype), n, k,
                           static_cast<float>(lr), ptr<int64_t>(idx), ptr<void>(val));
      },
      arg("grad_ptr"), arg("err_ptr"), arg("dtype"), arg("n"), arg("k"), arg("lr"), arg("idx_ptr"),
      arg("val_ptr"), nogil,
      "a = round(e + lr*g); err <- a; idx = top-k of key(a); val = a[idx]; err[idx] <- 0.");

  m.def(
      "ef21_topk",
      [](uintptr_t grad, uintptr_t st, int dtype, int64_t n, int64_t k, uintptr_t idx,
         uintptr_t val) {
        fedkern::ef21_topk(ptr<const void>(grad), ptr<void>(st), to_dtype(dtype), n, k,
                           ptr<int64_t>(idx), ptr<void>(val));
      },
      arg("grad_ptr"), arg("st_ptr"), arg("dtype"), arg("n"), arg("k"), arg("idx_ptr"),
      arg("val_ptr"), nogil,
      "d = round(g - s); idx = top-k of key(d); val = d[idx]; s[idx] <- round(s[idx] + d[idx]).");

  m.def(
      "randk_indices",
      [](int64_t n, int64_t k, const Keys& keys, uintptr_t idx) {
        fedkern::randk_indices(n, k, keys.data(), ptr<int64_t>(idx));
      },
      arg("n"), arg("k"), arg("keys"), arg("idx_ptr"), nogil,
      "idx = ascending {perm(i) : i < k} of the keyed Feistel permutation of [0, n).");

  m.def(
      "randk_compress",
      [](uintptr_t x, int dtype, int64_t n, int64_t k, const Keys& keys, double scale,
         uintptr_t idx, uintptr_t val) {
        fedkern::randk_compress(ptr<const void>(x), to_dtype(dtype), n, k, keys.data(),
                                static_cast<float>(scale), ptr<int64_t>(idx), ptr<void>(val));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("k"), arg("keys"), arg("scale"), arg("idx_ptr"),
      arg("val_ptr"), nogil, "idx = rand-k indices; val = round(x[idx] * scale).");

  m.def(
      "ef14_randk",
      [](uintptr_t grad, uintptr_t err, int dtype, int64_t n, int64_t k, const Keys& keys,
         double lr, double scale, uintptr_t idx, uintptr_t val) {
        fedkern::ef14_randk(ptr<const void>(grad), ptr<void>(err), to_dtype(dtype), n, k,
                            keys.data(), static_cast<float>(lr), static_cast<float>(scale),
                            ptr<int64_t>(idx), ptr<void>(val));
      },
      arg("grad_ptr"), arg("err_ptr"), arg("dtype"), arg("n"), arg("k"), arg("keys"), arg("lr"),
      arg("scale"), arg("idx_ptr"), arg("val_ptr"), nogil,
      "a = round(e + lr*g); err <- a; c = round(a[idx]*scale); err[idx] <- round(a[idx] - c); "
      "val = c.");

  m.def(
      "ef21_randk",
      [](uintptr_t grad, uintptr_t st, int dtype, int64_t n, int64_t k, const Keys& keys,
         double scale, uintptr_t idx, uintptr_t val) {
        fedkern::ef21_randk(ptr<const void>(grad), ptr<void>(st), to_dtype(dtype), n, k,
                            keys.data(), static_cast<float>(scale), ptr<int64_t>(idx),
                            ptr<void>(val));
      },
      arg("grad_ptr"), arg("st_ptr"), arg("dtype"), arg("n"), arg("k"), arg("keys"), arg("scale"),
      arg("idx_ptr"), arg("val_ptr"), nogil,
      "d = round(g[idx] - s[idx]); c = round(d*scale); s[idx] <- round(s[idx] + c); val = c.");

  m.def(
      "sparse_add_batched",
      [](uintptr_t dense, int dtype, int64_t n_dense, uintptr_t val, uintptr_t idx, int64_t rows,
         int64_t k, double alpha) {
        fedkern::sparse_add_batched(ptr<void>(dense), to_dtype(dtype), n_dense,
                                    ptr<const void>(val), ptr<const int64_t>(idx), rows, k,
                                    static_cast<float>(alpha));
      },
      arg("dense_ptr"), arg("dtype"), arg("n_dense"), arg("val_ptr"), arg("idx_ptr"), arg("m"),
      arg("k"), arg("alpha"), nogil,
      "dense[j] = round(fp32(dense[j]) + sum over messages i (in order) of alpha*v[i, j]).");

  m.def(
      "build_info",
      []() {
        py::dict d;
        d["compiler"] = compiler_name();
#ifdef _OPENMP
        d["openmp"] = true;
#else
        d["openmp"] = false;
#endif
        d["max_threads"] = fedkern::detail::max_threads();
        return d;
      },
      "dict(compiler=str, openmp=bool, max_threads=int) of this build.");
}
