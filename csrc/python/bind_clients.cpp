// csrc/python/bind_clients.cpp -- bindings of the clients family (fedkern/clients.h): batched
// per-client local steps, per-row gradients, Scaffnew's consensus step, the fp64 weighted sum.
// Pointers as uintptr_t (0 = null: H, keys, anchor, samples); gamma, l2, mu, coef are fp32
// numbers, clip stays fp64.
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "fedkern/clients.h"

namespace fedkern::py_bind {

void bind_clients(py::module_& m) {
  using py::arg;
  m.def(
      "local_steps",
      [](uintptr_t x, uintptr_t clients, int64_t c, int64_t p, uintptr_t a, uintptr_t y,
         uintptr_t offsets, int64_t n, int64_t d, int kind, int64_t C, int64_t K, float gamma,
         float l2, uintptr_t h, int mode, int64_t b, uintptr_t keys, double clip, float mu,
         uintptr_t anchor) {
        (void)n;  // the number of clients: part of the contract (clients[r] < n), not needed here
        if (kind < 0 || kind > 2) {
          throw std::invalid_argument("kind must be 0, 1 or 2, got " + std::to_string(kind));
        }
        if (mode < 0 || mode > 2) {
          throw std::invalid_argument("mode must be 0, 1 or 2, got " + std::to_string(mode));
        }
        const int64_t want = kind == 1 ? C * d : d;
        if (p != want) {
          throw std::invalid_argument("p must be " + std::string(kind == 1 ? "C * d" : "d") +
                                      " = " + std::to_string(want) + ", got " + std::to_string(p));
        }
        local_steps(ptr<float>(x), c, d, ptr<const int64_t>(clients), ptr<const float>(a),
                    ptr<const float>(y), ptr<const int64_t>(offsets), static_cast<ModelKind>(kind),
                    C, K, gamma, l2, ptr<const float>(h), static_cast<LocalMode>(mode), b,
                    ptr<const int64_t>(keys), clip, mu, ptr<const float>(anchor));
      },
      arg("x_ptr"), arg("clients_ptr"), arg("c"), arg("p"), arg("a_ptr"), arg("y_ptr"),
      arg("offsets_ptr"), arg("n"), arg("d"), arg("kind"), arg("C"), arg("K"), arg("gamma"),
      arg("l2"), arg("h_ptr"), arg("mode"), arg("b"), arg("keys_ptr"), arg("clip"), arg("mu"),
      arg("anchor_ptr"), nogil(),
      "In place on X (float32 [c, p], p = C*d for kind 1 else d): K local steps per cohort row r "
      "of client clients[r] (int64 [c], < n) on its rows offsets[i]..offsets[i+1]-1 (int64 "
      "[n+1]) of A (float32 [N, d]) and y (float32 [N]). kind 0 logistic / 1 multinomial / 2 "
      "least squares; mode 0 gd / 1 sgd / 2 rr (batch b, keys int64 [c, K, 8]); H, anchor "
      "float32 [c, p] or 0; clip (fp64, 0 = off), mu (FedProx, 0 = off).");
  m.def(
      "client_grads",
      [](uintptr_t x, uintptr_t clients, int64_t c, int64_t p, uintptr_t a, uintptr_t y,
         uintptr_t offsets, int64_t d, int kind, int64_t C, float l2, int mode, int64_t b,
         uintptr_t keys, uintptr_t samples, int64_t s, uintptr_t g) {
        if (kind < 0 || kind > 2) {
          throw std::invalid_argument("kind must be 0, 1 or 2, got " + std::to_string(kind));
        }
        if (mode != 0 && mode != 1 && mode != 3) {
          throw std::invalid_argument("mode must be 0, 1 or 3, got " + std::to_string(mode));
        }
        const int64_t want = kind == 1 ? C * d : d;
        if (p != want) {
          throw std::invalid_argument("p must be " + std::string(kind == 1 ? "C * d" : "d") +
                                      " = " + std::to_string(want) + ", got " + std::to_string(p));
        }
        client_grads(ptr<const float>(x), c, d, ptr<const int64_t>(clients), ptr<const float>(a),
                     ptr<const float>(y), ptr<const int64_t>(offsets), static_cast<ModelKind>(kind),
                     C, l2, static_cast<GradMode>(mode), b, ptr<const int64_t>(keys),
                     ptr<const int64_t>(samples), s, ptr<float>(g));
      },
      arg("x_ptr"), arg("clients_ptr"), arg("c"), arg("p"), arg("a_ptr"), arg("y_ptr"),
      arg("offsets_ptr"), arg("d"), arg("kind"), arg("C"), arg("l2"), arg("mode"), arg("b"),
      arg("keys_ptr"), arg("samples_ptr"), arg("s"), arg("g_ptr"), nogil(),
      "G (float32 [c, p] output) = one gradient per cohort row r of client clients[r] at X[r] "
      "(float32 [c, p], read only) on a batch of its rows of A / y: mode 0 all samples, 1 the "
      "sgd batch of min(b, m_i) keyed by keys (int64 [c, 8]), 3 the entries >= 0 of samples "
      "(int64 [c, s]); plus l2 * X[r].");
  m.def(
      "scaffnew_sync",
      [](uintptr_t x, uintptr_t h, int64_t c, int64_t p, float coef, uintptr_t xbar) {
        scaffnew_sync(ptr<float>(x), ptr<float>(h), c, p, coef, ptr<float>(xbar));
      },
      arg("x_ptr"), arg("h_ptr"), arg("c"), arg("p"), arg("coef"), arg("xbar_ptr"), nogil(),
      "In place on X, H (float32 [c, p]): xbar = column means (fp32, row order); H += coef * "
      "(xbar - X); X = xbar. xbar_ptr: float32 [p] output.");
  m.def(
      "weighted_sum",
      [](uintptr_t x, uintptr_t w, int64_t c, int64_t p, uintptr_t out) {
        weighted_sum(ptr<const float>(x), ptr<const double>(w), c, p, ptr<float>(out));
      },
      arg("x_ptr"), arg("w_ptr"), arg("c"), arg("p"), arg("out_ptr"), nogil(),
      "out (float32 [p]) = float(sum_r w[r] * double(X[r])) (X float32 [c, p], w float64 [c]; "
      "fp64, row order).");
  m.def(
      "_clients_cache_floats",
      [](int64_t floats) {
        const int64_t was = detail::clients_cache_floats();
        detail::clients_cache_floats() = floats;
        return was;
      },
      arg("floats"),
      "Test hook: floats of padded sample rows kept per thread by local_steps (0 = the tuned "
      "value; small values force the panel-by-panel path); returns the old value.");
}

}  // namespace fedkern::py_bind
