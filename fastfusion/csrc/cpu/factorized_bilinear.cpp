// Multimodal factorized bilinear pooling (MFB); the math is in
// fastfusion/ops/factorized_bilinear.py.
//
// The two projections are GEMMs (with their biases); the product, dropout mask, group
// sum over k and the signed sqrt + L2 are one pass per row. The projections are the
// residuals, and with normalize also z before the normalisation (B, o), so the backward need
// not pool z again: it turns them into the projections' gradients in the same per-row pass
// (into new buffers, as autograd still holds them) and ends with the four weight/input GEMMs.
// The GEMMs go through tiled_mm (gemm.h: the same bits for any thread count).
#include "common.h"
#include "gemm.h"
#include "signed_sqrt_l2.h"

#include <torch/library.h>

namespace fastfusion {
namespace {

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
  // z before the normalisation, kept for the backward: a residual only then.
  const bool keep_z = normalize && save_residuals;
  auto pooled = keep_z ? at::empty({B, O}, options_of(type)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(type, "factorized_bilinear", [&] {
    using T = scalar_t;
    const T* pxp = px.template const_data_ptr<T>();
    const T* pyp = py.template const_data_ptr<T>();
    const T* mp = mask.defined() ? mask.template const_data_ptr<T>() : nullptr;
    T* op = out.template mutable_data_ptr<T>();
    T* zp = keep_z ? pooled.template mutable_data_ptr<T>() : nullptr;
    parallel_rows(B, 3 * E, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const T* a = pxp + b * E;
        const T* c = pyp + b * E;
        T* o_row = op + b * O;
        // Pooled into the residual when it is kept (then normalised from it into the output),
        // else in place in the output.
        T* z = zp ? zp + b * O : o_row;
        for (int64_t j = 0; j < O; ++j) {
          T s = 0;
          for (int64_t i = j * factor; i < (j + 1) * factor; ++i) s += mp ? a[i] * c[i] * mp[b * E + i] : a[i] * c[i];
          z[j] = s;
        }
        if (normalize) signed_sqrt_l2_row(z, o_row, O, eps);
      }
    });
  });
  std::vector<at::Tensor> residuals;
  if (save_residuals) residuals = keep_z ? std::vector<at::Tensor>{px, py, pooled} : std::vector<at::Tensor>{px, py};
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
  if (saved) {
    std::vector<Residual> expected{{type, {B, E}}, {type, {B, E}}};
    if (normalize) expected.push_back({type, {B, O}});  // z before the normalisation
    check_residuals(residuals, expected, "factorized_bilinear_backward");
  }
  const bool saved_z = saved && normalize;
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
    const T* zs = saved_z ? residuals[2].template const_data_ptr<T>() : nullptr;
    parallel_rows(B, 4 * E, [&](int64_t b0, int64_t b1) {
      // Without the saved z, each row's z is pooled again into this scratch.
      std::vector<T> z(normalize && !saved_z ? O : 0), gz(normalize ? O : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const T* ar = a + b * E;
        const T* cr = c + b * E;
        const T* mr = mp ? mp + b * E : nullptr;
        const T* g = gp + b * O;
        if (normalize) {
          const T* zr = zs ? zs + b * O : z.data();
          if (!zs)
            for (int64_t j = 0; j < O; ++j) {
              T s = 0;
              for (int64_t i = j * factor; i < (j + 1) * factor; ++i) s += mr ? ar[i] * cr[i] * mr[i] : ar[i] * cr[i];
              z[j] = s;
            }
          signed_sqrt_l2_backward_row(g, zr, gz.data(), O, eps);
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

TORCH_LIBRARY_FRAGMENT(fastfusion_cpu, m) {
  m.def(
      "factorized_bilinear(Tensor x, Tensor y, Tensor weight_x, Tensor? bias_x, Tensor weight_y, Tensor? bias_y, "
      "int factor, Tensor? dropout_mask, bool normalize, float eps, bool save_residuals) -> (Tensor, Tensor[])");
  m.def(
      "factorized_bilinear_backward(Tensor grad, Tensor[] residuals, Tensor x, Tensor y, Tensor weight_x, Tensor? bias_x, "
      "Tensor weight_y, Tensor? bias_y, int factor, Tensor? dropout_mask, bool normalize, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastfusion_cpu, CPU, m) {
  m.impl("factorized_bilinear", &factorized_bilinear);
  m.impl("factorized_bilinear_backward", &factorized_bilinear_backward);
}

}  // namespace fastfusion
