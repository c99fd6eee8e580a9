// Low-rank multimodal fusion (LMF); the math is in fastfusion/ops/low_rank_fusion.py.
//
// The projections x~_m W_m[r] for all ranks are one GEMM per modality, x~_m = [1, x_m]
// against the factor rearranged to (n_m + 1, rank * h); they are the residuals. The
// rank-wise products, the weighted rank sum and the bias are one pass per row; so are, in
// the backward, the products over the other modalities. The factor gradient is again one
// GEMM with x~_m, its constant row summing the projection gradients over the batch.
// The GEMMs go through tiled_mm (gemm.h: the same bits for any thread count).
#include "common.h"
#include "gemm.h"

#include <torch/library.h>

namespace fastfusion {
namespace {

// factors[m] (r, n_m + 1, h) -> (n_m + 1, r * h); small, so copied.
at::Tensor rank_major(const at::Tensor& factor) {
  return factor.permute({1, 0, 2}).reshape({factor.size(1), factor.size(0) * factor.size(2)}).contiguous();
}

// x~ = [1, x] (B, n + 1); small next to the projections, so copied.
at::Tensor with_one(const at::Tensor& x) {
  return at::cat({at::ones({x.size(0), 1}, x.options()), x}, 1);
}

// x~_m W_m for every modality, from x~_m = with_one(x_m): (B, r * h) each.
std::vector<at::Tensor> projections(const std::vector<at::Tensor>& xs_one, const std::vector<at::Tensor>& flat) {
  std::vector<at::Tensor> proj;
  for (size_t m = 0; m < xs_one.size(); ++m) proj.push_back(tiled_mm(xs_one[m], flat[m]));
  return proj;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> low_rank_fusion(at::TensorList xs_in, at::TensorList factors_in,
                                                                 const at::Tensor& weights_in, const at::Tensor& bias_in,
                                                                 bool save_residuals) {
  const auto type = compute_type(xs_in[0], "low_rank_fusion");
  const auto xs = prepared(xs_in, type);
  const auto weights = prepared(weights_in, type);
  const auto bias = prepared(bias_in, type);
  std::vector<at::Tensor> flat;
  for (const auto& f : factors_in) flat.push_back(rank_major(f.to(type)));
  const int64_t B = xs[0].size(0), R = weights.numel(), H = bias.numel(), M = xs.size();
  std::vector<at::Tensor> xs_one;
  for (const auto& x : xs) xs_one.push_back(with_one(x));
  const auto proj = projections(xs_one, flat);
  auto out = at::empty({B, H}, options_of(type));
  AT_DISPATCH_FLOATING_TYPES(type, "low_rank_fusion", [&] {
    using T = scalar_t;
    const T* w = weights.template const_data_ptr<T>();
    const T* bp = bias.template const_data_ptr<T>();
    T* op = out.template mutable_data_ptr<T>();
    parallel_rows(B, M * R * H, [&](int64_t b0, int64_t b1) {
      std::vector<T> fused(H);
      for (int64_t b = b0; b < b1; ++b) {
        std::copy(bp, bp + H, op + b * H);
        for (int64_t r = 0; r < R; ++r) {
          const T* p0 = proj[0].template const_data_ptr<T>() + (b * R + r) * H;
          std::copy(p0, p0 + H, fused.data());
          for (int64_t m = 1; m < M; ++m) {
            const T* pm = proj[m].template const_data_ptr<T>() + (b * R + r) * H;
            for (int64_t j = 0; j < H; ++j) fused[j] *= pm[j];
          }
          for (int64_t j = 0; j < H; ++j) op[b * H + j] += w[r] * fused[j];
        }
      }
    });
  });
  return {out.to(xs_in[0].scalar_type()), save_residuals ? proj : std::vector<at::Tensor>()};
}

std::vector<at::Tensor> low_rank_fusion_backward(const at::Tensor& grad_in, at::TensorList residuals,
                                                 at::TensorList xs_in, at::TensorList factors_in,
                                                 const at::Tensor& weights_in, const at::Tensor& bias_in) {
  const auto type = compute_type(xs_in[0], "low_rank_fusion_backward");
  const auto xs = prepared(xs_in, type);
  const auto grad = prepared(grad_in, type);
  const auto weights = prepared(weights_in, type);
  std::vector<at::Tensor> flat;
  for (const auto& f : factors_in) flat.push_back(rank_major(f.to(type)));
  const int64_t B = xs[0].size(0), R = weights.numel(), H = grad.size(1), M = xs.size();
  std::vector<at::Tensor> xs_one;
  for (const auto& x : xs) xs_one.push_back(with_one(x));
  std::vector<at::Tensor> proj;
  if (residuals.empty()) {
    proj = projections(xs_one, flat);
  } else {
    check_residuals(residuals, std::vector<Residual>(M, {type, {B, R * H}}), "low_rank_fusion_backward");
    proj.assign(residuals.begin(), residuals.end());
  }
  // grad_proj[m] (B, r * h) = w_r g prod_{k != m} proj_k; per_row (B, r) = <g, prod_m proj_m>.
  std::vector<at::Tensor> grad_proj;
  for (int64_t m = 0; m < M; ++m) grad_proj.push_back(at::empty({B, R * H}, options_of(type)));
  auto per_row = at::empty({B, R}, options_of(at::kDouble));
  auto grad_weights = at::empty({R}, options_of(type));
  auto grad_bias = at::empty({H}, options_of(type));
  AT_DISPATCH_FLOATING_TYPES(type, "low_rank_fusion_backward", [&] {
    using T = scalar_t;
    const T* w = weights.template const_data_ptr<T>();
    const T* gp = grad.template const_data_ptr<T>();
    double* prp = per_row.mutable_data_ptr<double>();
    parallel_rows(B, 2 * M * R * H, [&](int64_t b0, int64_t b1) {
      // Products of the modalities before m (prefix) and after m (suffix), per hidden unit.
      std::vector<T> prefix(M * H), suffix(H), all(H);
      for (int64_t b = b0; b < b1; ++b) {
        const T* g = gp + b * H;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t off = (b * R + r) * H;
          std::fill(prefix.begin(), prefix.begin() + H, T(1));
          for (int64_t m = 1; m < M; ++m) {
            const T* pm = proj[m - 1].template const_data_ptr<T>() + off;
            for (int64_t j = 0; j < H; ++j) prefix[m * H + j] = prefix[(m - 1) * H + j] * pm[j];
          }
          std::fill(suffix.begin(), suffix.end(), w[r]);
          for (int64_t m = M - 1; m >= 0; --m) {
            const T* pm = proj[m].template const_data_ptr<T>() + off;
            T* gpm = grad_proj[m].template mutable_data_ptr<T>() + off;
            for (int64_t j = 0; j < H; ++j) {
              gpm[j] = g[j] * prefix[m * H + j] * suffix[j];
              suffix[j] *= pm[j];
            }
          }
          const T* last = proj[M - 1].template const_data_ptr<T>() + off;
          for (int64_t j = 0; j < H; ++j) all[j] = prefix[(M - 1) * H + j] * last[j];
          prp[b * R + r] = dot(g, all.data(), H);
        }
      }
    });
    column_sums(prp, B, R, grad_weights.template mutable_data_ptr<T>());
    column_sums(gp, B, H, grad_bias.template mutable_data_ptr<T>());
  });
  std::vector<at::Tensor> grad_xs, grad_factors;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t n = xs[m].size(1);
    grad_xs.push_back(tiled_mm(grad_proj[m], flat[m].narrow(0, 1, n).t()).to(xs_in[m].scalar_type()));
    const auto grad_flat = tiled_mm(xs_one[m].t(), grad_proj[m]);  // (n + 1, R * H)
    grad_factors.push_back(
        grad_flat.view({n + 1, R, H}).permute({1, 0, 2}).contiguous().to(factors_in[m].scalar_type()));
  }
  std::vector<at::Tensor> grads = grad_xs;
  grads.insert(grads.end(), grad_factors.begin(), grad_factors.end());
  grads.push_back(grad_weights.to(weights_in.scalar_type()));
  grads.push_back(grad_bias.to(bias_in.scalar_type()));
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfusion_cpu, m) {
  m.def(
      "low_rank_fusion(Tensor[] xs, Tensor[] factors, Tensor weights, Tensor bias, bool save_residuals) "
      "-> (Tensor, Tensor[])");
  m.def(
      "low_rank_fusion_backward(Tensor grad, Tensor[] residuals, Tensor[] xs, Tensor[] factors, Tensor weights, Tensor bias) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastfusion_cpu, CPU, m) {
  m.impl("low_rank_fusion", &low_rank_fusion);
  m.impl("low_rank_fusion_backward", &low_rank_fusion_backward);
}

}  // namespace fastfusion
