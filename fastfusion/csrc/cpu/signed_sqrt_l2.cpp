// Signed square root + L2 normalisation over the last dimension: one task per row, the row
// staying in L1/L2 across its passes.
#include "common.h"
#include "signed_sqrt_l2.h"

#include <torch/library.h>

namespace fastfusion {
namespace {

at::Tensor signed_sqrt_l2(const at::Tensor& z_in, double eps) {
  const auto type = compute_type(z_in, "signed_sqrt_l2");
  const auto z = prepared(z_in, type);
  const int64_t d = z.dim() == 0 ? 1 : z.size(-1);
  const int64_t rows = d == 0 ? 0 : z.numel() / d;
  auto out = empty_output(z.sizes(), z.options());
  AT_DISPATCH_FLOATING_TYPES(type, "signed_sqrt_l2", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_rows(rows, 4 * d, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) signed_sqrt_l2_row(zp + r * d, op + r * d, d, eps);
    });
  });
  return out.to(z_in.scalar_type());
}

at::Tensor signed_sqrt_l2_backward(const at::Tensor& grad_in, const at::Tensor& z_in, double eps) {
  const auto type = compute_type(z_in, "signed_sqrt_l2_backward");
  const auto z = prepared(z_in, type);
  const auto grad = prepared(grad_in, type);
  const int64_t d = z.dim() == 0 ? 1 : z.size(-1);
  const int64_t rows = d == 0 ? 0 : z.numel() / d;
  auto dz = empty_output(z.sizes(), z.options());
  AT_DISPATCH_FLOATING_TYPES(type, "signed_sqrt_l2_backward", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* dp = dz.mutable_data_ptr<scalar_t>();
    parallel_rows(rows, 6 * d, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) signed_sqrt_l2_backward_row(gp + r * d, zp + r * d, dp + r * d, d, eps);
    });
  });
  return dz.to(grad_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfusion_cpu, m) {
  m.def("signed_sqrt_l2(Tensor z, float eps) -> Tensor");
  m.def("signed_sqrt_l2_backward(Tensor grad, Tensor z, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastfusion_cpu, CPU, m) {
  m.impl("signed_sqrt_l2", &signed_sqrt_l2);
  m.impl("signed_sqrt_l2_backward", &signed_sqrt_l2_backward);
}

}  // namespace fastfusion
