// csrc/python/bindings.h -- helpers shared by the binding files of fedkern._C.
//
// module.cpp defines the module and the original families' functions; every other family has a
// csrc/python/bind_<family>.cpp that defines one `void bind_<family>(py::module_&)`, declared
// here and called from module.cpp. Conventions (all files): raw data pointers as uintptr_t
// (tensor.data_ptr()), int64 sizes, the dtype tag (0 = float32, 1 = bfloat16), the GIL released
// while a kernel runs. Inputs are validated by fedkern/ops before they get here.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fedkern/common.h"

namespace fedkern::py_bind {

namespace py = pybind11;

inline DType to_dtype(int tag) {
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

// Pass as the extra argument of m.def: the kernel runs without the GIL.
inline auto nogil() { return py::call_guard<py::gil_scoped_release>(); }

void bind_gram(py::module_& m);      // bind_gram.cpp: Gram matrix
void bind_rowops(py::module_& m);    // bind_rowops.cpp: gather-mean, Weiszfeld, centered clip, ...
void bind_diffclip(py::module_& m);  // bind_diffclip.cpp: difference -> compress -> clip
void bind_clients(py::module_& m);   // bind_clients.cpp: batched local steps, server updates
void bind_quartic(py::module_& m);   // bind_quartic.cpp: batched local steps on the quartic
void bind_clipjump(py::module_& m);  // bind_clipjump.cpp: the fused clipped server jump

// bind_manifolds.cpp: the fused sphere / Stiefel steps
void bind_manifolds(py::module_& m);
void bind_random(py::module_& m);  // bind_random.cpp: Gaussian / Bernoulli fills (Philox)
void bind_sketch(py::module_& m);  // bind_sketch.cpp: MAST sketch apply / gradient step
void bind_lora(py::module_& m);    // bind_lora.cpp: fused RAC-LoRA merge
void bind_tamuna(py::module_& m);  // bind_tamuna.cpp: TAMUNA's fused server step

}  // namespace fedkern::py_bind
