// Tensor fusion (TFN), low-rank fusion (LMF) and factorized bilinear pooling (MFB); the math
// is in fastfusion/ops/{tensor_fusion,low_rank_fusion,factorized_bilinear}.py.
//
// Their FLOPs are GEMMs, which go to ATen's BLAS through tiled_mm (gemm.h: the same bits for
// any thread count, float32 sums accurate over long reductions).
// What is written here is everything around them: the structure that lets TFN avoid the
// outer product, and the elementwise epilogues fused into one pass per row.
#include "common.h"
#include "gemm.h"

#include <torch/library.h>

namespace fastfusion {
namespace {

at::TensorOptions options_of(at::ScalarType type) {
  return at::TensorOptions().dtype(type);
}

// ---------------------------------------------------------------------------------------------
// TFN. With the modalities split into a leading group A (0..k-1) and a trailing group U
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
// reference's B * P_A * P_B outer product (6x fewer at the CPU reference shape). The split
// is the one minimising h * P_A + P_B (fastfusion/ops/tensor_fusion.py states the same rule
// for the residual's shape).

struct Modalities {
  std::vector<int64_t> sizes;  // n_m + 1
  int64_t split;               // k: modalities [0, k) form group A
  int64_t PA, PB;

  Modalities(const std::vector<at::Tensor>& xs, int64_t hidden) {
    for (const auto& x : xs) sizes.push_back(x.size(1) + 1);
    // The split minimising the per-sample buffers h * P_A + P_B.
    int64_t best = -1;
    for (int64_t k = 1; k < static_cast<int64_t>(sizes.size()); ++k) {
      const int64_t pa = product(0, k), pb = product(k, sizes.size());
      if (best < 0 || hidden * pa + pb < best) {
        best = hidden * pa + pb;
        split = k;
        PA = pa;
        PB = pb;
      }
    }
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
                                                               bool save_residuals) {
  const auto type = compute_type(xs_in[0], "tensor_fusion");
  const auto xs = prepared(xs_in, type);
  const auto weight = prepared(weight_in, type);
  const int64_t B = xs[0].size(0), H = weight.size(0);
  const Modalities mods(xs, H);
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
                                               const std::optional<at::Tensor>&) {
  const auto type = compute_type(xs_in[0], "tensor_fusion_backward");
  const auto xs = prepared(xs_in, type);
  const auto weight = prepared(weight_in, type);
  const auto grad = prepared(grad_in, type);
  const int64_t B = xs[0].size(0), H = weight.size(0);
  const Modalities mods(xs, H);
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
      const auto Y = saved ? residuals[0].narrow(0, b0, rows) : tiled_mm(u, w2.t());
      const T* yp = Y.template const_data_ptr<T>();
      const T* dup = du.template const_data_ptr<T>();

      parallel_rows(rows, H * PA + M * (PA + PB), [&](int64_t r0, int64_t r1) {
        std::vector<const T*> xrows(M);
        std::vector<T*> grows(M);
        std::vector<T> scratch(2 * std::max(PA, PB)), da(PA);
        std::vector<double> acc(PA);
        for (int64_t r = r0; r < r1; ++r) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j < H; ++j) {
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

// ---------------------------------------------------------------------------------------------
// LMF. The projections x~_m W_m[r] for all ranks are one GEMM per modality, x~_m = [1, x_m]
// against the factor rearranged to (n_m + 1, rank * h); they are the residuals. The
// rank-wise products, the weighted rank sum and the bias are one pass per row; so are, in
// the backward, the products over the other modalities. The factor gradient is again one
// GEMM with x~_m, its constant row summing the projection gradients over the batch.

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

// ---------------------------------------------------------------------------------------------
// MFB. The two projections are GEMMs (with their biases); the product, dropout mask, group
// sum over k and the signed sqrt + L2 are one pass per row. The projections are the
// residuals: the backward turns them into their gradients in the same per-row pass (into new
// buffers, as autograd still holds them) and ends with the four weight/input GEMMs.

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  auto out = tiled_mm(x, weight.t());
  return bias.defined() ? out.add_(bias) : out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> factorized_bilinear(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& wx_in, const std::optional<at::Tensor>& bx_in,
    const at::Tensor& wy_in, const std::optional<at::Tensor>& by_in, int64_t factor,
    const std::optional<at::Tensor>& mask_in, bool normalize, double eps, bool save_residuals) {
  const auto type = compute_type(x_in, "factorized_bilinear");
  const auto x = prepared(x_in, type), y = prepared(y_in, type);
  const auto wx = prepared(wx_in, type), wy = prepared(wy_in, type);
  const auto px = project(x, wx, bx_in ? prepared(*bx_in, type) : at::Tensor());
  const auto py = project(y, wy, by_in ? prepared(*by_in, type) : at::Tensor());
  const auto mask = mask_in ? prepared(*mask_in, type) : at::Tensor();
  const int64_t B = x.size(0), E = wx.size(0), O = E / factor;
  auto out = at::empty({B, O}, options_of(type));
  AT_DISPATCH_FLOATING_TYPES(type, "factorized_bilinear", [&] {
    using T = scalar_t;
    const T* pxp = px.template const_data_ptr<T>();
    const T* pyp = py.template const_data_ptr<T>();
    const T* mp = mask.defined() ? mask.template const_data_ptr<T>() : nullptr;
    T* op = out.template mutable_data_ptr<T>();
    parallel_rows(B, 3 * E, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const T* a = pxp + b * E;
        const T* c = pyp + b * E;
        T* z = op + b * O;
        for (int64_t j = 0; j < O; ++j) {
          T s = 0;
          for (int64_t i = j * factor; i < (j + 1) * factor; ++i) s += mp ? a[i] * c[i] * mp[b * E + i] : a[i] * c[i];
          z[j] = s;
        }
        if (normalize) signed_sqrt_l2_row(z, z, O, eps);
      }
    });
  });
  std::vector<at::Tensor> residuals;
  if (save_residuals) residuals = {px, py};
  return {out.to(x_in.scalar_type()), residuals};
}

std::vector<at::Tensor> factorized_bilinear_backward(const at::Tensor& grad_in, at::TensorList residuals,
                                                     const at::Tensor& x_in, const at::Tensor& y_in,
                                                     const at::Tensor& wx_in, const std::optional<at::Tensor>& bx_in,
                                                     const at::Tensor& wy_in, const std::optional<at::Tensor>& by_in,
                                                     int64_t factor, const std::optional<at::Tensor>& mask_in,
                                                     bool normalize, double eps) {
  const auto type = compute_type(x_in, "factorized_bilinear_backward");
  const auto x = prepared(x_in, type), y = prepared(y_in, type);
  const auto wx = prepared(wx_in, type), wy = prepared(wy_in, type);
  const auto grad = prepared(grad_in, type);
  const int64_t B = x.size(0), E = wx.size(0), O = E / factor;
  const bool saved = !residuals.empty();
  if (saved) check_residuals(residuals, {{type, {B, E}}, {type, {B, E}}}, "factorized_bilinear_backward");
  // Recomputed projections are scratch, so their gradients overwrite them.
  const auto px = saved ? residuals[0] : project(x, wx, bx_in ? prepared(*bx_in, type) : at::Tensor());
  const auto py = saved ? residuals[1] : project(y, wy, by_in ? prepared(*by_in, type) : at::Tensor());
  auto grad_px = saved ? at::empty_like(px) : px, grad_py = saved ? at::empty_like(py) : py;
  const auto mask = mask_in ? prepared(*mask_in, type) : at::Tensor();
  auto gbx = at::empty({E}, options_of(type)), gby = at::empty({E}, options_of(type));
  AT_DISPATCH_FLOATING_TYPES(type, "factorized_bilinear_backward", [&] {
    using T = scalar_t;
    const T* a = px.template const_data_ptr<T>();
    const T* c = py.template const_data_ptr<T>();
    T* ga = grad_px.template mutable_data_ptr<T>();
    T* gc = grad_py.template mutable_data_ptr<T>();
    const T* gp = grad.template const_data_ptr<T>();
    const T* mp = mask.defined() ? mask.template const_data_ptr<T>() : nullptr;
    parallel_rows(B, 4 * E, [&](int64_t b0, int64_t b1) {
      std::vector<T> z(normalize ? O : 0), gz(normalize ? O : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const T* ar = a + b * E;
        const T* cr = c + b * E;
        const T* mr = mp ? mp + b * E : nullptr;
        const T* g = gp + b * O;
        if (normalize) {
          for (int64_t j = 0; j < O; ++j) {
            T s = 0;
            for (int64_t i = j * factor; i < (j + 1) * factor; ++i) s += mr ? ar[i] * cr[i] * mr[i] : ar[i] * cr[i];
            z[j] = s;
          }
          signed_sqrt_l2_backward_row(g, z.data(), gz.data(), O, eps);
          g = gz.data();
        }
        // d px = ge * py, d py = ge * px; both read before either is written, as they may
        // alias the projections.
        T* gar = ga + b * E;
        T* gcr = gc + b * E;
        for (int64_t j = 0; j < O; ++j)
          for (int64_t i = j * factor; i < (j + 1) * factor; ++i) {
            const T ge = mr ? g[j] * mr[i] : g[j];
            const T pa = ar[i], pc = cr[i];
            gar[i] = ge * pc;
            gcr[i] = ge * pa;
          }
      }
    });
    column_sums(ga, B, E, gbx.template mutable_data_ptr<T>());
    column_sums(gc, B, E, gby.template mutable_data_ptr<T>());
  });
  const auto dt = x_in.scalar_type();
  return {tiled_mm(grad_px, wx).to(dt),          tiled_mm(grad_py, wy).to(dt),
          tiled_mm(grad_px.t(), x).to(wx_in.scalar_type()), gbx.to(wx_in.scalar_type()),
          tiled_mm(grad_py.t(), y).to(wy_in.scalar_type()), gby.to(wy_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfusion_cpu, CPU, m) {
  m.impl("tensor_fusion", &tensor_fusion);
  m.impl("tensor_fusion_backward", &tensor_fusion_backward);
  m.impl("low_rank_fusion", &low_rank_fusion);
  m.impl("low_rank_fusion_backward", &low_rank_fusion_backward);
  m.impl("factorized_bilinear", &factorized_bilinear);
  m.impl("factorized_bilinear_backward", &factorized_bilinear_backward);
}

}  // namespace fastfusion
