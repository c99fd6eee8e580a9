// Tensor fusion (TFN); the math is in fastfusion/ops/tensor_fusion.py.
//
// Its FLOPs are GEMMs, which go to ATen's BLAS through tiled_mm (gemm.h: the same bits for
// any thread count, float32 sums accurate over long reductions). What is written here is
// everything around them: the structure that lets TFN avoid the outer product.
//
// With the modalities split into a leading group A (0..k-1) and a trailing group U
// (k..M-1), vec(x~_0 (x) ... (x) x~_{M-1}) = vec(a (x) u) with a, u the groups' own outer
// products, and W (h, P) is W (h * P_A, P_B) in memory. So
//
//   Y           = u @ W.view(h * P_A, P_B)^T                 (B, h * P_A), the residual
//   out[b, j]   = bias[j] + sum_pa a[b, pa] Y[b, j * P_A + pa]
//   G           = g (x) a                                     (B, h * P_A)
//   dW          = G^T @ u,   du = G @ W.view(h * P_A, P_B)    (two GEMMs)
//   da[b, pa]   = sum_j g[b, j] Y[b, j * P_A + pa]
//
// i.e. one GEMM forward and two backward (three without the residual), each as many FLOPs
// as one of the reference's, with buffers of B * (2 h * P_A + P_B) values instead of the
// reference's B * P_A * P_B outer product (6x fewer at the CPU reference shape). The split k
// is the op's argument: fastfusion/ops/tensor_fusion.py chooses it (residual_split), and the
// residual's shape, which its fake kernel states, follows from it. k = 0 (group A empty,
// a = [1], P_A = 1) is the reference's own computation: Y = z W^T with z the whole outer
// product, dW = g^T z, dz = g W, every reduction as long as the reference's; it is the
// cheaper one when z is small against h, as in the models' heads (n = (32, 32), h = 128).
#include "common.h"
#include "gemm.h"

#include <torch/library.h>

namespace fastfusion {
namespace {

struct Modalities {
  std::vector<int64_t> sizes;  // n_m + 1
  int64_t split;               // k: modalities [0, k) form group A
  int64_t PA, PB;

  Modalities(const std::vector<at::Tensor>& xs, int64_t split_at, const char* op) : split(split_at) {
    for (const auto& x : xs) sizes.push_back(x.size(1) + 1);
    TORCH_CHECK(split >= 0 && split < static_cast<int64_t>(sizes.size()), "fastfusion cpp backend: ", op,
                ": split must be in [0, ", sizes.size(), ") for ", sizes.size(), " modalities, got ", split);
    PA = product(0, split);
    PB = product(split, sizes.size());
  }

  int64_t product(int64_t begin, int64_t end) const {
    int64_t p = 1;
    for (int64_t m = begin; m < end; ++m) p *= sizes[m];
    return p;
  }
};

// vec(x~_begin (x) ... (x) x~_{end-1}) of one row, x~ = [1; x], built in place back to front.
template <typename T>
void outer_row(const std::vector<const T*>& rows, const std::vector<int64_t>& sizes, int64_t begin, int64_t end,
               T* out) {
  out[0] = T(1);
  int64_t len = 1;
  for (int64_t m = begin; m < end; ++m) {
    const int64_t s = sizes[m];
    const T* x = rows[m];
    for (int64_t i = len - 1; i >= 0; --i) {
      const T v = out[i];
      T* o = out + i * s;
      for (int64_t j = s - 1; j >= 1; --j) o[j] = v * x[j - 1];
      o[0] = v;
    }
    len *= s;
  }
}

// The gradient of <D, vec(x~_begin (x) ... (x) x~_{end-1})> w.r.t. each x_m of the group
// (the constant's slot dropped). `scratch` holds 2 * (group size) values.
template <typename T>
void outer_adjoint_row(const T* D, const std::vector<const T*>& rows, const std::vector<int64_t>& sizes,
                       int64_t begin, int64_t end, const std::vector<T*>& grads, T* scratch) {
  for (int64_t m = begin; m < end; ++m) {
    int64_t L = 1, R = 1;
    for (int64_t k = begin; k < m; ++k) L *= sizes[k];
    for (int64_t k = m + 1; k < end; ++k) R *= sizes[k];
    T* left = scratch;
    T* right = scratch + L;
    outer_row(rows, sizes, begin, m, left);
    outer_row(rows, sizes, m + 1, end, right);
    const int64_t s = sizes[m];
    T* dx = grads[m];
    if (R == 1) {
      // The group's last modality: D's rows of s against left, in the order of the general case
      // below (right is [1]), but along i, which vectorises: as many dot calls of length 1 as P
      // cost more than the backward's GEMMs at the models' sizes.
      std::vector<double> acc(s, 0.0);
      for (int64_t l = 0; l < L; ++l) {
        const double w = left[l];
        const T* d = D + l * s;
        for (int64_t i = 1; i < s; ++i) acc[i] += w * double(d[i]);
      }
      for (int64_t i = 1; i < s; ++i) dx[i - 1] = static_cast<T>(acc[i]);
      continue;
    }
    for (int64_t i = 1; i < s; ++i) {
      double acc = 0;
      for (int64_t l = 0; l < L; ++l) acc += double(left[l]) * dot(D + (l * s + i) * R, right, R);
      dx[i - 1] = static_cast<T>(acc);
    }
  }
}

// Rows of batch chunk [b0, b1) for one modality group: (rows, P_group).
template <typename T>
at::Tensor group_outer(const std::vector<at::Tensor>& xs, const Modalities& mods, int64_t begin, int64_t end,
                       int64_t b0, int64_t b1, int64_t width) {
  auto out = at::empty({b1 - b0, width}, xs[0].options());
  T* op = out.template mutable_data_ptr<T>();
  parallel_rows(b1 - b0, width, [&](int64_t r0, int64_t r1) {
    std::vector<const T*> rows(xs.size());
    for (int64_t r = r0; r < r1; ++r) {
      for (size_t m = 0; m < xs.size(); ++m)
        rows[m] = xs[m].template const_data_ptr<T>() + (b0 + r) * (mods.sizes[m] - 1);
      outer_row(rows, mods.sizes, begin, end, op + r * width);
    }
  });
  return out;
}

// Batch rows per pass: bounds the buffers for large batches (GEMMs stay large).
int64_t batch_chunk(int64_t per_row) {
  constexpr int64_t kValues = int64_t(1) << 22;
  return std::max<int64_t>(64, kValues / std::max<int64_t>(per_row, 1));
}

std::tuple<at::Tensor, std::vector<at::Tensor>> tensor_fusion(at::TensorList xs_in, const at::Tensor& weight_in,
                                                               const std::optional<at::Tensor>& bias_in,
                                                               int64_t split, bool save_residuals) {
  const auto type = compute_type(xs_in[0], "tensor_fusion");
  const auto xs = prepared(xs_in, type);
  const auto weight = prepared(weight_in, type);
  const int64_t B = xs[0].size(0), H = weight.size(0);
  const Modalities mods(xs, split, "tensor_fusion");
  const int64_t M = xs.size(), PA = mods.PA, PB = mods.PB, k = mods.split;
  const auto w2 = weight.view({H * PA, PB});
  const auto bias = bias_in ? prepared(*bias_in, type) : at::zeros({H}, options_of(type));
  auto out = at::empty({B, H}, options_of(type));
  const at::Tensor saved_y = save_residuals ? empty_output({B, H * PA}, options_of(type)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(type, "tensor_fusion", [&] {
    using T = scalar_t;
    const int64_t chunk = batch_chunk(H * PA + PB);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t b1 = std::min(B, b0 + chunk);
      const auto a = group_outer<T>(xs, mods, 0, k, b0, b1, PA);
      const auto u = group_outer<T>(xs, mods, k, M, b0, b1, PB);
      auto Y = save_residuals ? saved_y.narrow(0, b0, b1 - b0) : at::empty({b1 - b0, H * PA}, options_of(type));
      tiled_mm_out(Y, u, w2.t());
      const T* ap = a.template const_data_ptr<T>();
      const T* yp = Y.template const_data_ptr<T>();
      const T* bp = bias.template const_data_ptr<T>();
      T* op = out.template mutable_data_ptr<T>();
      parallel_rows(b1 - b0, H * PA, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < H; ++j)
            op[(b0 + r) * H + j] = static_cast<T>(bp[j] + dot(ap + r * PA, yp + (r * H + j) * PA, PA));
      });
    }
  });
  std::vector<at::Tensor> residuals;
  if (save_residuals) residuals.push_back(saved_y);
  return {out.to(xs_in[0].scalar_type()), residuals};
}

std::vector<at::Tensor> tensor_fusion_backward(const at::Tensor& grad_in, at::TensorList residuals,
                                               at::TensorList xs_in, const at::Tensor& weight_in,
                                               const std::optional<at::Tensor>&, int64_t split) {
  const auto type = compute_type(xs_in[0], "tensor_fusion_backward");
  const auto xs = prepared(xs_in, type);
  const auto weight = prepared(weight_in, type);
  const auto grad = prepared(grad_in, type);
  const int64_t B = xs[0].size(0), H = weight.size(0);
  const Modalities mods(xs, split, "tensor_fusion_backward");
  const int64_t M = xs.size(), PA = mods.PA, PB = mods.PB, k = mods.split;
  const bool saved = !residuals.empty();
  if (saved) check_residuals(residuals, {{type, {B, H * PA}}}, "tensor_fusion_backward");
  const auto w2 = weight.view({H * PA, PB});
  std::vector<at::Tensor> grads;
  for (const auto& x : xs) grads.push_back(at::empty_like(x));
  auto grad_weight = empty_output(weight.sizes(), weight.options());
  auto grad_w2 = grad_weight.view({H * PA, PB});
  auto grad_bias = at::empty({H}, options_of(type));
  AT_DISPATCH_FLOATING_TYPES(type, "tensor_fusion_backward", [&] {
    using T = scalar_t;
    const T* gp = grad.template const_data_ptr<T>();
    column_sums(gp, B, H, grad_bias.template mutable_data_ptr<T>());
    const int64_t chunk = batch_chunk(2 * H * PA + 2 * PB);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t b1 = std::min(B, b0 + chunk), rows = b1 - b0;
      const auto a = group_outer<T>(xs, mods, 0, k, b0, b1, PA);
      const auto u = group_outer<T>(xs, mods, k, M, b0, b1, PB);
      const T* ap = a.template const_data_ptr<T>();

      auto gy = empty_output({rows, H * PA}, options_of(type));  // g (x) a
      T* gyp = gy.template mutable_data_ptr<T>();
      parallel_rows(rows, H * PA, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < H; ++j) {
            const T gj = gp[(b0 + r) * H + j];
            for (int64_t pa = 0; pa < PA; ++pa) gyp[(r * H + j) * PA + pa] = gj * ap[r * PA + pa];
          }
      });
      tiled_mm_out(grad_w2, gy.t(), u, /*accumulate=*/b0 > 0);
      // Reduces over h * P_A terms where the reference reduces over h: summed in double blocks.
      const auto du = tiled_mm(gy, w2, Sum::kDoubleBlocks);  // (rows, PB)
      // da, the leading group's gradient, needs Y; with k = 0 that group is empty.
      const auto Y = k == 0 ? at::Tensor() : saved ? residuals[0].narrow(0, b0, rows) : tiled_mm(u, w2.t());
      const T* yp = k == 0 ? nullptr : Y.template const_data_ptr<T>();
      const T* dup = du.template const_data_ptr<T>();

      parallel_rows(rows, H * PA + M * (PA + PB), [&](int64_t r0, int64_t r1) {
        std::vector<const T*> xrows(M);
        std::vector<T*> grows(M);
        std::vector<T> scratch(2 * std::max(PA, PB)), da(PA);
        std::vector<double> acc(PA);
        for (int64_t r = r0; r < r1; ++r) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; yp != nullptr && j < H; ++j) {
            const double gj = gp[(b0 + r) * H + j];
            const T* yrow = yp + (r * H + j) * PA;
            for (int64_t pa = 0; pa < PA; ++pa) acc[pa] += gj * double(yrow[pa]);
          }
          for (int64_t pa = 0; pa < PA; ++pa) da[pa] = static_cast<T>(acc[pa]);
          for (int64_t m = 0; m < M; ++m) {
            const int64_t n = mods.sizes[m] - 1;
            xrows[m] = xs[m].template const_data_ptr<T>() + (b0 + r) * n;
            grows[m] = grads[m].template mutable_data_ptr<T>() + (b0 + r) * n;
          }
          outer_adjoint_row(da.data(), xrows, mods.sizes, 0, k, grows, scratch.data());
          outer_adjoint_row(dup + r * PB, xrows, mods.sizes, k, M, grows, scratch.data());
        }
      });
    }
  });
  for (size_t m = 0; m < grads.size(); ++m) grads[m] = grads[m].to(xs_in[m].scalar_type());
  grads.push_back(grad_weight.to(weight_in.scalar_type()));
  grads.push_back(grad_bias.to(weight_in.scalar_type()));
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfusion_cpu, m) {
  m.def("tensor_fusion(Tensor[] xs, Tensor weight, Tensor? bias, int split, bool save_residuals) -> (Tensor, Tensor[])");
  m.def(
      "tensor_fusion_backward(Tensor grad, Tensor[] residuals, Tensor[] xs, Tensor weight, Tensor? bias, int split) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastfusion_cpu, CPU, m) {
  m.impl("tensor_fusion", &tensor_fusion);
  m.impl("tensor_fusion_backward", &tensor_fusion_backward);
}

}  // namespace fastfusion
