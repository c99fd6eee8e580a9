// The GEMMs of the CPU kernels: results that do not depend on the thread count, and float32
// sums that stay accurate however long the reduction.
//
// Thread count. A multithreaded BLAS may split a GEMM's reduction (K) across threads, and then
// the order of the sum, so its bits, depend on the thread count. MKL does so on AMD CPUs for
// small outputs over long K, e.g. LMF's factor gradient (13 x 128 over K = 700, the batch).
// Here the output is cut into tiles whose sizes depend on the shapes alone; threads share the
// tiles, and each tile calls the BLAS on one thread (OneMklThread where MKL is the BLAS, as
// in the x86 wheels; ATen's own GEMM runs on one thread inside a parallel region).
//
// Accuracy. A BLAS kernel may accumulate along K in float32 in one running sum: MKL's AMD path
// gave TFN's input gradient (K = h * P_A = 16384) an error 12x PyTorch's own. So float32
// reductions longer than kDepth are cut into blocks of kDepth; the BLAS computes each block's
// product in float32 and the blocks are summed in double, an error of about one block's.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace fastfusion {
namespace gemm_detail {

constexpr int64_t kTileRows = 128;
constexpr int64_t kTileCols = 256;  // a float32 tile plus its double sum: 384 KB, in L2
constexpr int64_t kDepth = 128;

// out (m, n) = [out +] a (m, K) @ b (K, n), on this thread.
template <typename T>
void tile(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t K = a.size(1);
  if (!std::is_same_v<T, float> || K <= kDepth) {
    if (accumulate)
      out.addmm_(a, b);
    else
      at::mm_out(out, a, b);
    return;
  }
  const int64_t m = out.size(0), n = out.size(1);
  auto part = at::empty({m, n}, out.options());
  std::vector<double> sum(m * n, 0.0);
  const float* pp = part.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t ld = out.stride(0);
  if (accumulate)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) sum[i * n + j] = op[i * ld + j];
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, K - k0);
    at::mm_out(part, a.narrow(1, k0, depth), b.narrow(0, k0, depth));
    for (int64_t i = 0; i < m * n; ++i) sum[i] += double(pp[i]);
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) op[i * ld + j] = static_cast<float>(sum[i * n + j]);
}

}  // namespace gemm_detail

// out (M, N) = a (M, K) @ b (K, N), or out += a @ b with `accumulate`. a and b are any 2-D
// views of float32 or float64 data; out is contiguous. See the top of this file.
inline void tiled_mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false) {
  using namespace gemm_detail;
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(0) == out.size(0) &&
                  b.size(1) == out.size(1) && a.size(1) == b.size(0),
              "fastfusion tiled_mm_out: bad shapes ", out.sizes(), " = ", a.sizes(), " @ ", b.sizes());
  const int64_t M = out.size(0), N = out.size(1);
  if (M == 0 || N == 0) return;
  const int64_t row_tiles = (M + kTileRows - 1) / kTileRows, col_tiles = (N + kTileCols - 1) / kTileCols;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "tiled_mm_out", [&] {
    parallel_tasks(row_tiles * col_tiles, [&](int64_t t0, int64_t t1) {
      const OneMklThread one_thread;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = (t / col_tiles) * kTileRows, j0 = (t % col_tiles) * kTileCols;
        const int64_t rows = std::min(kTileRows, M - i0), cols = std::min(kTileCols, N - j0);
        gemm_detail::tile<scalar_t>(out.narrow(0, i0, rows).narrow(1, j0, cols), a.narrow(0, i0, rows),
                                    b.narrow(1, j0, cols), accumulate);
      }
    });
  });
}

inline at::Tensor tiled_mm(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  tiled_mm_out(out, a, b);
  return out;
}

}  // namespace fastfusion
