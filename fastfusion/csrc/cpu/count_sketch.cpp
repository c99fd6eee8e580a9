// Count sketch (the math is in fastfusion/ops/count_sketch.py).
//
// A row of the batch belongs to one thread, so the count sketch is a plain scatter into that
// row: no atomics, a fixed summation order (ascending input index), and for d >> n cheaper
// than the branchy bucket-by-bucket gather a GPU needs.
#include "common.h"
#include "count_sketch.h"

#include <torch/library.h>

namespace fastfusion {
namespace {

at::Tensor count_sketch(const at::Tensor& x_in, const at::Tensor& hash, const at::Tensor& sign, int64_t out_dim) {
  const auto type = compute_type(x_in, "count_sketch");
  const auto x = prepared(x_in, type);
  const int64_t n = x.size(-1);
  auto shape = x.sizes().vec();
  shape.back() = out_dim;
  auto out = empty_output(shape, x.options());
  const int64_t rows = out.numel() / std::max<int64_t>(out_dim, 1);
  AT_DISPATCH_FLOATING_TYPES(type, "count_sketch", [&] {
    const Hashing<scalar_t> hashing(hash, sign, n, out_dim);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_rows(rows, out_dim + 2 * n, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) hashing.sketch(xp + r * n, op + r * out_dim, out_dim);
    });
  });
  return out.to(x_in.scalar_type());
}

at::Tensor count_sketch_backward(const at::Tensor& grad_in, const at::Tensor& hash, const at::Tensor& sign) {
  const auto type = compute_type(grad_in, "count_sketch_backward");
  const auto grad = prepared(grad_in, type);
  const int64_t d = grad.size(-1);
  const int64_t n = hash.numel();
  auto shape = grad.sizes().vec();
  shape.back() = n;
  auto dx = empty_output(shape, grad.options());
  const int64_t rows = dx.numel() / std::max<int64_t>(n, 1);
  AT_DISPATCH_FLOATING_TYPES(type, "count_sketch_backward", [&] {
    const Hashing<scalar_t> hashing(hash, sign, n, d);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    parallel_rows(rows, 2 * n, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        // The gather touches most cache lines of a row in random order, which the hardware
        // prefetchers cannot follow: request the next row's lines in order meanwhile.
        if (r + 1 < r1)
          for (int64_t i = 0; i < d; i += 64 / sizeof(scalar_t)) __builtin_prefetch(gp + (r + 1) * d + i, 0, 3);
        hashing.gather(gp + r * d, dp + r * n);
      }
    });
  });
  return dx.to(grad_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfusion_cpu, m) {
  m.def("count_sketch(Tensor x, Tensor hash, Tensor sign, int out_dim) -> Tensor");
  m.def("count_sketch_backward(Tensor grad, Tensor hash, Tensor sign) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastfusion_cpu, CPU, m) {
  m.impl("count_sketch", &count_sketch);
  m.impl("count_sketch_backward", &count_sketch_backward);
}

}  // namespace fastfusion
