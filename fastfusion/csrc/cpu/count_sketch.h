// The count sketch of one row and its adjoint, for the count_sketch and compact_bilinear kernels
// (the math is in fastfusion/ops/count_sketch.py).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastfusion {

// One modality's hash (as int64, range-checked) and signs (in the compute type).
template <typename T>
struct Hashing {
  std::vector<int64_t> hash;
  std::vector<T> sign;

  Hashing(const at::Tensor& h, const at::Tensor& s, int64_t n, int64_t d) {
    TORCH_CHECK(h.numel() == n && s.numel() == n, "fastfusion cpp backend: hash and sign need ", n,
                " entries (the input's last dimension), got ", h.numel(), " and ", s.numel());
    const auto hc = h.to(at::kLong).contiguous();
    const auto sc = s.to(c10::CppTypeToScalarType<T>::value).contiguous();
    hash.assign(hc.template const_data_ptr<int64_t>(), hc.template const_data_ptr<int64_t>() + n);
    sign.assign(sc.template const_data_ptr<T>(), sc.template const_data_ptr<T>() + n);
    for (const int64_t j : hash)
      TORCH_CHECK(0 <= j && j < d, "fastfusion cpp backend: hash value ", j, " is outside [0, ", d, ")");
  }

  int64_t size() const { return static_cast<int64_t>(hash.size()); }

  void sketch(const T* x, T* out, int64_t d) const {
    std::fill(out, out + d, T(0));
    for (int64_t i = 0; i < size(); ++i) out[hash[i]] += sign[i] * x[i];
  }

  // The adjoint of sketch(): dx_i = s(i) g_{h(i)}.
  void gather(const T* g, T* dx) const {
    for (int64_t i = 0; i < size(); ++i) dx[i] = sign[i] * g[hash[i]];
  }
};

}  // namespace fastfusion
