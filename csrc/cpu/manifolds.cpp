// csrc/cpu/manifolds.cpp -- fused sphere and Stiefel steps (fedkern/manifolds.h).
//
// Sphere: one row = three passes over x, u (and v), all in L1 for the sizes of interest (a row of
// 1000 floats is 4 KB): the projection coefficient <x, u> (exp: then ||g||), then ||y||, <x, y> and
// <v, y> with y recomputed on the fly, then the stores of x+ and the transported v. Rows are split
// into contiguous blocks, one per thread.
// Stiefel: one matrix at a time per thread, copied to column-major scratch so that every dot
// product over n is contiguous; the p x p products, the update, two classical Gram-Schmidt passes
// per column and the projection transport follow, then the results are transposed back.
//
// The hot functions are compiled for AVX2 (chosen at run time) and for the baseline ISA; both use
// only lane-wise IEEE operations in the fixed order of the header, so they give the same bits.
#include "fedkern/manifolds.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fedkern/common.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FEDKERN_MANIFOLDS_AVX2 1
#define FEDKERN_MANIFOLDS_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define FEDKERN_MANIFOLDS_AVX2 0
#endif

namespace fedkern {
namespace {

constexpr int64_t kMinWork = 1 << 15;  // elements per thread at least

template <class T>
FEDKERN_INLINE T tree8(const T* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// sum_k a_k * b_k in 8 lanes (header order).
template <class T>
FEDKERN_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) acc[l] = acc[l] + a[k + l] * b[k + l];
  }
  for (int l = 0; k + l < n; ++l) acc[l] = acc[l] + a[k + l] * b[k + l];
  return tree8(acc);
}

// ---- sphere ----------------------------------------------------------------------------------

template <class T>
FEDKERN_INLINE void sphere_row(T* __restrict x, const T* __restrict u, T* __restrict v, int64_t n,
                               T eta, bool use_exp, SphereTransport tr) {
  const T a = dot(x, u, n);
  // y = cx * x - cg * g, g = u - a x
  T cx = T(1), cg = eta;
  if (use_exp) {
    T acc[8] = {};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
      for (int l = 0; l < 8; ++l) {
        const T g = u[k + l] - a * x[k + l];
        acc[l] = acc[l] + g * g;
      }
    }
    for (int l = 0; k + l < n; ++l) {
      const T g = u[k + l] - a * x[k + l];
      acc[l] = acc[l] + g * g;
    }
    const T gn = std::sqrt(tree8(acc)), t = eta * gn;
    if (t > T(0)) {
      cx = std::cos(t);
      cg = std::sin(t) / gn;
    } else {
      cg = T(0);
    }
  }
  T yy[8] = {}, xy[8] = {}, vy[8] = {};
  {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
      for (int l = 0; l < 8; ++l) {
        const T y = cx * x[k + l] - cg * (u[k + l] - a * x[k + l]);
        yy[l] = yy[l] + y * y;
        xy[l] = xy[l] + x[k + l] * y;
      }
      if (v) {
        for (int l = 0; l < 8; ++l) {
          const T y = cx * x[k + l] - cg * (u[k + l] - a * x[k + l]);
          vy[l] = vy[l] + v[k + l] * y;
        }
      }
    }
    for (int l = 0; k + l < n; ++l) {
      const T y = cx * x[k + l] - cg * (u[k + l] - a * x[k + l]);
      yy[l] = yy[l] + y * y;
      xy[l] = xy[l] + x[k + l] * y;
      if (v) vy[l] = vy[l] + v[k + l] * y;
    }
  }
  const T ny = std::sqrt(tree8(yy));
  const T vx = tree8(vy) / ny;  // <v, x+>
  if (v && tr == SphereTransport::kParallel) {
    const T coef = vx / (T(1) + tree8(xy) / ny);
    for (int64_t k = 0; k < n; ++k) {
      const T xn = (cx * x[k] - cg * (u[k] - a * x[k])) / ny;
      v[k] = v[k] - coef * (x[k] + xn);
      x[k] = xn;
    }
  } else if (v) {
    for (int64_t k = 0; k < n; ++k) {
      const T xn = (cx * x[k] - cg * (u[k] - a * x[k])) / ny;
      v[k] = v[k] - vx * xn;
      x[k] = xn;
    }
  } else {
    for (int64_t k = 0; k < n; ++k) x[k] = (cx * x[k] - cg * (u[k] - a * x[k])) / ny;
  }
}

template <class T>
using SphereFn = void (*)(T*, const T*, T*, int64_t, int64_t, int64_t, T, bool, SphereTransport);

template <class T>
FEDKERN_INLINE void sphere_rows(T* X, const T* U, T* V, int64_t lo, int64_t hi, int64_t n, T eta,
                                bool use_exp, SphereTransport tr) {
  for (int64_t r = lo; r < hi; ++r) {
    sphere_row(X + r * n, U + r * n, V ? V + r * n : nullptr, n, eta, use_exp, tr);
  }
}

template <class T>
void sphere_base(T* X, const T* U, T* V, int64_t lo, int64_t hi, int64_t n, T eta, bool e,
                 SphereTransport tr) {
  sphere_rows(X, U, V, lo, hi, n, eta, e, tr);
}
#if FEDKERN_MANIFOLDS_AVX2
template <class T>
FEDKERN_MANIFOLDS_TARGET_AVX2 void sphere_avx2(T* X, const T* U, T* V, int64_t lo, int64_t hi,
                                               int64_t n, T eta, bool e, SphereTransport tr) {
  sphere_rows(X, U, V, lo, hi, n, eta, e, tr);
}
#endif

template <class T>
void sphere_step(T* X, const T* U, T* V, int64_t b, int64_t n, T eta, bool use_exp,
                 SphereTransport tr) {
  if (b <= 0 || n <= 0) return;
  SphereFn<T> fn = sphere_base<T>;
#if FEDKERN_MANIFOLDS_AVX2
  if (detail::use_avx2()) fn = sphere_avx2<T>;
#endif
  const int nb = static_cast<int>(std::min<int64_t>(detail::num_blocks(b * n, kMinWork), b));
#pragma omp parallel for num_threads(nb) schedule(static, 1)
  for (int blk = 0; blk < nb; ++blk) {
    int64_t lo, hi;
    detail::block_range(b, nb, blk, &lo, &hi);
    fn(X, U, V, lo, hi, n, eta, use_exp, tr);
  }
}

// ---- Stiefel ---------------------------------------------------------------------------------

template <class T>
struct StiefelScratch {
  std::vector<T> xs, ys, vs, s;  // column-major [p][n] copies; p x p products
  std::vector<T> r;              // Gram-Schmidt coefficients
};

// out[j][k] = in[k][j] (row-major [n][p] to column-major)
template <class T>
FEDKERN_INLINE void to_cols(const T* in, T* out, int64_t n, int64_t p) {
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t j = 0; j < p; ++j) out[j * n + k] = in[k * p + j];
  }
}

template <class T>
FEDKERN_INLINE void from_cols(const T* in, T* out, int64_t n, int64_t p) {
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t j = 0; j < p; ++j) out[k * p + j] = in[j * n + k];
  }
}

// s = sym(A^T B) for column-major A, B [p][n]: s[i * p + j] = (<a_i, b_j> + <a_j, b_i>) * 0.5.
template <class T>
FEDKERN_INLINE void sym_products(const T* A, const T* B, T* s, int64_t n, int64_t p) {
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t j = 0; j < p; ++j) s[i * p + j] = dot(A + i * n, B + j * n, n);
  }
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t j = i; j < p; ++j) {
      const T m = (s[i * p + j] + s[j * p + i]) * T(0.5);
      s[i * p + j] = m;
      s[j * p + i] = m;
    }
  }
}

// c_j[k] = c_j[k] - sum_i (q_i[k] * s[i][j]) (i increasing), column-major.
template <class T>
FEDKERN_INLINE void sub_products(const T* Q, const T* s, T* C, int64_t n, int64_t p, T scale,
                                 const T* base, bool affine) {
  for (int64_t j = 0; j < p; ++j) {
    T* c = C + j * n;
    const T* bj = base ? base + j * n : nullptr;
    for (int64_t k = 0; k < n; ++k) {
      T t = T(0);
      for (int64_t i = 0; i < p; ++i) t = t + Q[i * n + k] * s[i * p + j];
      // affine: c = base - scale * (c - t) (the step); else c = c - t (the transport)
      c[k] = affine ? bj[k] - scale * (c[k] - t) : c[k] - t;
    }
  }
}

template <class T>
FEDKERN_INLINE void stiefel_mat(T* X, const T* U, T* V, int64_t n, int64_t p, T eta,
                                StiefelScratch<T>& sc) {
  T* xs = sc.xs.data();
  T* ys = sc.ys.data();
  T* s = sc.s.data();
  T* r = sc.r.data();
  to_cols(X, xs, n, p);
  to_cols(U, ys, n, p);
  sym_products(xs, ys, s, n, p);
  sub_products(xs, s, ys, n, p, eta, xs, true);  // ys = Y = X - eta (U - X sym(X^T U))
  // Q of Y by classical Gram-Schmidt, twice per column, into xs
  for (int64_t j = 0; j < p; ++j) {
    T* y = ys + j * n;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t i = 0; i < j; ++i) r[i] = dot(xs + i * n, y, n);
      for (int64_t k = 0; k < n; ++k) {
        T t = T(0);
        for (int64_t i = 0; i < j; ++i) t = t + r[i] * xs[i * n + k];
        y[k] = y[k] - t;
      }
    }
    const T nrm = std::sqrt(dot(y, y, n));
    T* q = xs + j * n;
    for (int64_t k = 0; k < n; ++k) q[k] = y[k] / nrm;
  }
  if (V) {
    T* vs = sc.vs.data();
    to_cols(V, vs, n, p);
    sym_products(xs, vs, s, n, p);
    sub_products(xs, s, vs, n, p, T(0), static_cast<const T*>(nullptr), false);
    from_cols(vs, V, n, p);
  }
  from_cols(xs, X, n, p);
}

template <class T>
using StiefelFn = void (*)(T*, const T*, T*, int64_t, int64_t, T, StiefelScratch<T>&);

template <class T>
void stiefel_base(T* X, const T* U, T* V, int64_t n, int64_t p, T eta, StiefelScratch<T>& sc) {
  stiefel_mat(X, U, V, n, p, eta, sc);
}
#if FEDKERN_MANIFOLDS_AVX2
template <class T>
FEDKERN_MANIFOLDS_TARGET_AVX2 void stiefel_avx2(T* X, const T* U, T* V, int64_t n, int64_t p, T eta,
                                                StiefelScratch<T>& sc) {
  stiefel_mat(X, U, V, n, p, eta, sc);
}
#endif

template <class T>
void stiefel_step(T* X, const T* U, T* V, int64_t b, int64_t n, int64_t p, T eta) {
  if (b <= 0 || n <= 0 || p <= 0) return;
  StiefelFn<T> fn = stiefel_base<T>;
#if FEDKERN_MANIFOLDS_AVX2
  if (detail::use_avx2()) fn = stiefel_avx2<T>;
#endif
  const int64_t m = n * p;
  const int nb = static_cast<int>(std::min<int64_t>(detail::num_blocks(b * m * p, kMinWork), b));
#pragma omp parallel num_threads(nb)
  {
    StiefelScratch<T> sc;
    sc.xs.resize(static_cast<size_t>(m));
    sc.ys.resize(static_cast<size_t>(m));
    sc.vs.resize(static_cast<size_t>(V ? m : 0));
    sc.s.resize(static_cast<size_t>(p * p));
    sc.r.resize(static_cast<size_t>(p));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < b; ++i) {
      fn(X + i * m, U + i * m, V ? V + i * m : nullptr, n, p, eta, sc);
    }
  }
}

}  // namespace

void sphere_step_f32(float* X, const float* U, float* V, int64_t b, int64_t n, float eta,
                     bool use_exp, SphereTransport transport) {
  sphere_step<float>(X, U, V, b, n, eta, use_exp, transport);
}
void sphere_step_f64(double* X, const double* U, double* V, int64_t b, int64_t n, double eta,
                     bool use_exp, SphereTransport transport) {
  sphere_step<double>(X, U, V, b, n, eta, use_exp, transport);
}
void stiefel_step_f32(float* X, const float* U, float* V, int64_t b, int64_t n, int64_t p,
                      float eta) {
  stiefel_step<float>(X, U, V, b, n, p, eta);
}
void stiefel_step_f64(double* X, const double* U, double* V, int64_t b, int64_t n, int64_t p,
                      double eta) {
  stiefel_step<double>(X, U, V, b, n, p, eta);
}

}  // namespace fedkern
