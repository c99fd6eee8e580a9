// Signed square root + L2 normalisation of one row and its vector-Jacobian product, for the
// signed_sqrt_l2 kernels and the epilogues of compact_bilinear and factorized_bilinear.
#pragma once

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastfusion {

// Signed square root and L2 normalisation of one row (the math is in
// fastfusion/ops/signed_sqrt_l2.py); `out` may alias `z`.
//
// The norm is taken of s / max|s| and scaled back, as the reference's _row_norm does: |s| goes
// up to sqrt(max of the dtype), so in float64 the plain sum of squares overflows (to a norm of
// inf, and an output of zeros) for rows near the dtype's maximum. The maximum is found in the
// pass that writes s, and the sums multiply by 1 / max|s| rather than divide. A row holding
// +-inf has max|s| = inf and inf / inf = NaN in the sum, so the whole row comes out NaN, as
// in the reference; so does a row holding a NaN, which reaches the sum whether or not the
// maximum sees it.
template <typename T>
inline T signed_roots(const T* z, T* s, int64_t d, T e) {
  T top = T(0);
  // A max reduction vectorises only when the compiler may reorder it, which it may not for
  // floats unless told: without the pragma the loop, square roots included, runs scalar
  // (2.5-3x slower). No order changes a maximum of numbers; a NaN it drops is handled above.
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < d; ++i) {
    const T v = z[i];
    const T root = std::sqrt(std::abs(v) + e);
    s[i] = v == T(0) ? T(0) : std::copysign(root, v);
    top = std::max(top, std::abs(s[i]));
  }
  return top;
}

// sum_i (s_i * unit)^2 in double, with unit = 1 / max|s| (1 for a zero row).
template <typename T>
inline double unit_squares(const T* s, int64_t d, double unit) {
  Lanes acc;
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int l = 0; l < 8; ++l) {
      const double u = double(s[i + l]) * unit;
      acc.v[l] += u * u;
    }
  for (; i < d; ++i) {
    const double u = double(s[i]) * unit;
    acc.v[i & 7] += u * u;
  }
  return acc.total();
}

template <typename T>
inline double unit_scale(T top) {
  return top > T(0) ? 1.0 / double(top) : 1.0;
}

template <typename T>
inline void signed_sqrt_l2_row(const T* z, T* out, int64_t d, double eps) {
  const T top = signed_roots(z, out, d, static_cast<T>(eps));
  const double norm = std::sqrt(unit_squares(out, d, unit_scale(top))) * double(top);
  // Written out rather than std::max so that a NaN norm stays NaN.
  const T scale = static_cast<T>(1.0 / (norm < eps ? eps : norm));
  for (int64_t i = 0; i < d; ++i) out[i] *= scale;
}

// Vector-Jacobian product of signed_sqrt_l2_row at `z`; `dz` must not alias `g` or `z`.
template <typename T>
inline void signed_sqrt_l2_backward_row(const T* g, const T* z, T* dz, int64_t d, double eps) {
  // dz holds the signed roots s until the last pass overwrites it.
  const T top = signed_roots(z, dz, d, static_cast<T>(eps));
  const double unit = unit_scale(top);
  // With u = s / max|s|: ||s|| = ||u|| max|s| and <g, s / ||s||> = <g, u> / ||u||. (<g, s>
  // itself overflows only for a cotangent beyond max / max|s|, 1e154 in float64. Two passes
  // are faster than one that sums both: measured.)
  const double unit_norm = std::sqrt(unit_squares(dz, d, unit));
  const double norm = unit_norm * double(top);
  // Above eps: (g - out <g, out>) / norm with out = s / norm, i.e. the coefficient of s is
  // <g, out> / norm (never norm^2, which overflows where norm does not). Below it the
  // denominator is the constant eps and only the direct term g / eps remains. (Tested as
  // `norm < eps` so that a NaN norm takes the first branch: NaN in, NaN gradients out.)
  const bool clamped = norm < eps;
  const T direct = static_cast<T>(clamped ? 1.0 / eps : 1.0 / norm);
  const T radial = static_cast<T>(clamped ? 0.0 : dot(g, dz, d) * unit / unit_norm / norm);
  for (int64_t i = 0; i < d; ++i) {
    const T s = dz[i];
    const T grad_s = direct * (g[i] - s * radial);
    // ds/dz = 1 / (2 |s|) away from 0 and sign(z)^2 = 0 at z == 0, so the gradient stays
    // finite; times 0 rather than 0 itself, so that a NaN row is NaN there too, as in the
    // reference. (The division by 0 there is computed and discarded: the loop stays
    // branch-free.)
    const T grad = grad_s / (T(2) * std::abs(s));
    dz[i] = z[i] == T(0) ? grad_s * T(0) : grad;
  }
}

}  // namespace fastfusion
