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
#include <vector>

#include "bindings.h"
#include "fedkern/common.h"
#include "fedkern/microadam.h"
#include "fedkern/randk.h"
#include "fedkern/robust.h"
#include "fedkern/sparse.h"
#include "fedkern/topk.h"

namespace py = pybind11;
using fedkern::DType;

namespace {

using Keys = std::array<uint32_t, 8>;
using fedkern::py_bind::ptr;
using fedkern::py_bind::to_dtype;

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
      "microadam_step",
      [](std::vector<uintptr_t> p_ptrs, std::vector<uintptr_t> g_ptrs, std::vector<int> dtypes,
         std::vector<int64_t> numels, std::vector<uintptr_t> ef, std::vector<uintptr_t> ef_min,
         std::vector<uintptr_t> ef_scale, std::vector<uintptr_t> idx, std::vector<uintptr_t> val,
         std::vector<int64_t> rows, std::vector<double> c1, std::vector<double> c2, double decay,
         double eps, std::vector<double> w1, std::vector<double> w2, int64_t window,
         int64_t block_size, int64_t k, int64_t quant_bucket) {
        const size_t t = p_ptrs.size();
        for (size_t len :
             {g_ptrs.size(), dtypes.size(), numels.size(), ef.size(), ef_min.size(),
              ef_scale.size(), idx.size(), val.size(), rows.size(), c1.size(), c2.size()}) {
          if (len != t)
            throw std::invalid_argument("microadam_step: per-tensor list lengths differ");
        }
        if (window < 1 || w1.size() != static_cast<size_t>(window) || w2.size() != w1.size()) {
          throw std::invalid_argument("microadam_step: w1 and w2 must have m >= 1 entries");
        }
        std::vector<fedkern::MicroAdamTensor> ts(t);
        for (size_t i = 0; i < t; ++i) {
          fedkern::MicroAdamTensor& x = ts[i];
          x.p = ptr<void>(p_ptrs[i]);
          x.g = ptr<const void>(g_ptrs[i]);
          x.dtype = to_dtype(dtypes[i]);
          x.n = numels[i];
          x.ef = ptr<uint8_t>(ef[i]);
          x.ef_min = ptr<float>(ef_min[i]);
          x.ef_scale = ptr<float>(ef_scale[i]);
          x.idx = ptr<int16_t>(idx[i]);
          x.val = ptr<uint16_t>(val[i]);
          x.row = rows[i];
          x.c1 = static_cast<float>(c1[i]);
          x.c2 = static_cast<float>(c2[i]);
        }
        const std::vector<float> w1f(w1.begin(), w1.end()), w2f(w2.begin(), w2.end());
        fedkern::MicroAdamConfig cfg;
        cfg.decay = static_cast<float>(decay);
        cfg.eps = static_cast<float>(eps);
        cfg.w1 = w1f.data();
        cfg.w2 = w2f.data();
        cfg.m = window;
        cfg.D = block_size;
        cfg.K = k;
        cfg.Q = quant_bucket;
        fedkern::microadam_step(ts.data(), static_cast<int64_t>(t), cfg);
      },
      arg("p_ptrs"), arg("g_ptrs"), arg("dtypes"), arg("numels"), arg("ef"), arg("ef_min"),
      arg("ef_scale"), arg("idx"), arg("val"), arg("rows"), arg("c1"), arg("c2"), arg("decay"),
      arg("eps"), arg("w1"), arg("w2"), arg("m"), arg("block_size"), arg("k"), arg("quant_bucket"),
      nogil,
      "One MicroAdam step over T tensors (fedkern/microadam.h): a = g + dequant(ef); per block "
      "top-k of |a| into window row rows[i]; ef = quant4(residual); p = p*decay - "
      "c1*mom1/(sqrt(mom2)*c2 + eps) from the window.");

  m.def(
      "coordinate_median",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, uintptr_t out) {
        fedkern::coordinate_median(ptr<const void>(x), to_dtype(dtype), n, d, ptr<void>(out));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("d"), arg("out_ptr"), nogil,
      "out[j] = median of column j of x [n, d] (n odd: the middle value; n even: "
      "round((lo + hi) * 0.5f)); NaN ranks above +inf, ties by row.");

  m.def(
      "trimmed_mean",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t f, uintptr_t out) {
        fedkern::trimmed_mean(ptr<const void>(x), to_dtype(dtype), n, d, f, ptr<void>(out));
      },
      arg("x_ptr"), arg("dtype"), arg("n"), arg("d"), arg("f"), arg("out_ptr"), nogil,
      "out[j] = round(sum in row order of the values of ranks f..n-f-1 of column j / (n - 2f)).");

  fedkern::py_bind::bind_gram(m);
  fedkern::py_bind::bind_rowops(m);
  fedkern::py_bind::bind_diffclip(m);
  fedkern::py_bind::bind_clients(m);
  fedkern::py_bind::bind_random(m);
  fedkern::py_bind::bind_sketch(m);
  fedkern::py_bind::bind_lora(m);
  fedkern::py_bind::bind_manifolds(m);
  fedkern::py_bind::bind_quartic(m);
  fedkern::py_bind::bind_clipjump(m);
  fedkern::py_bind::bind_tamuna(m);

  m.def(
      "_force_baseline",
      [](bool force) {
        const bool was = fedkern::detail::force_baseline();
        fedkern::detail::force_baseline() = force;
        return was;
      },
      arg("force"),
      "Test hook (every family): run the kernels' baseline-ISA builds even on a CPU with AVX2; "
      "returns the old flag.");

  m.def(
      "_force_no_avx512",
      [](bool force) {
        const bool was = fedkern::detail::force_no_avx512();
        fedkern::detail::force_no_avx512() = force;
        return was;
      },
      arg("force"),
      "Test hook (kernels with an AVX-512 build: the Bernoulli sketches): run their AVX2 build "
      "even on a CPU with AVX-512; returns the old flag.");

  m.def(
      "_blocking",
      [](int64_t grain, int max_blocks) {
        fedkern::detail::blocking_override() = fedkern::detail::BlockingOverride{grain, max_blocks};
      },
      arg("grain"), arg("max_blocks"),
      "Test hook (every family): minimum work per block and block limit of the core's parallel "
      "loops; (0, 0) restores the tuned values.");

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
