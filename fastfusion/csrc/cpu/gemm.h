// The GEMMs of the CPU kernels: results that do not depend on the thread count, and float32
// sums that stay accurate however long the reduction.
//
// Thread count. A multithreaded BLAS may split a GEMM's reduction (K) across threads, and then
// the order of the sum, so its bits, depend on the thread count. MKL does so on AMD CPUs for
// small outputs over long K, e.g. LMF's factor gradient (13 x 128 over K = 700, the batch).
// Here the output is cut into tiles whose sizes depend on the shapes alone (Grid); threads share
// the tiles, and each tile calls the BLAS on one thread (OneMklThread where MKL is the BLAS, as
// in the x86 wheels; ATen's own GEMM runs on one thread inside a parallel region).
//
// Accuracy. A BLAS kernel may accumulate along K in float32 in one running sum: MKL's AMD path
// does, and for TFN's input gradient, whose reduction (K = h * P_A) is far longer than any of
// the reference's, that gave an error 12x PyTorch's own. A caller that reduces over more terms
// than the reference asks for Sum::kDoubleBlocks: float32 reductions longer than kDepth are then
// cut into blocks of kDepth, the BLAS computes each block's product in float32 and the blocks
// are summed in double, an error of about one block's. (Every block is a BLAS call and a pass
// over the tile, so the other GEMMs, whose reductions are the reference's own, keep one call.)
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace fastfusion {

// How a GEMM sums its reduction (see the top of this file).
enum class Sum { kBlas, kDoubleBlocks };

namespace gemm_detail {

constexpr int64_t kDepth = 128;

// The tile grid, a function of the shapes alone. Every tile is one BLAS call on one thread,
// and smaller tiles re-pack more of a and b and run the BLAS kernels less efficiently (16 tiles
// per GEMM made the cpu-quick MFB and TFN 25-30% slower than MKL's own threading). So a GEMM
// gets one tile per kWork multiply-adds (a few hundred microseconds on one core), at least two
// once it is worth splitting at all, at most kMaxTiles, and a power of two of them, so that they
// share out evenly over 2, 4, 8 or 16 threads. Each split halves the longer side of the tile
// (square-ish tiles re-pack the least), down to kMinSide.
struct Grid {
  static constexpr double kWork = double(int64_t(1) << 23), kWorthSplitting = kWork / 16;
  static constexpr int64_t kMaxTiles = 16, kMinSide = 16;
  int64_t rows, cols;  // per tile
  int64_t row_tiles, col_tiles;

  Grid(int64_t M, int64_t N, int64_t K) : rows(M), cols(N) {
    const double work = double(M) * double(N) * double(K);
    int64_t wanted = work < kWorthSplitting ? 1 : 2;
    while (wanted < kMaxTiles && wanted * kWork < work) wanted *= 2;
    for (int64_t tiles = 1; tiles < wanted; tiles *= 2) {
      if (rows >= cols && rows >= 2 * kMinSide)
        rows = (rows + 1) / 2;
      else if (cols >= 2 * kMinSide)
        cols = (cols + 1) / 2;
      else if (rows >= 2 * kMinSide)
        rows = (rows + 1) / 2;
      else
        break;
    }
    row_tiles = (M + rows - 1) / rows;
    col_tiles = (N + cols - 1) / cols;
  }
};

// out (m, n) = [out +] a (m, K) @ b (K, n), on this thread.
template <typename T>
void tile(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate, Sum sum_kind) {
  const int64_t K = a.size(1);
  if (sum_kind == Sum::kBlas || !std::is_same_v<T, float> || K <= kDepth) {
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
inline void tiled_mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false,
                         Sum sum = Sum::kBlas) {
  using namespace gemm_detail;
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(0) == out.size(0) &&
                  b.size(1) == out.size(1) && a.size(1) == b.size(0),
              "fastfusion tiled_mm_out: bad shapes ", out.sizes(), " = ", a.sizes(), " @ ", b.sizes());
  const int64_t M = out.size(0), N = out.size(1);
  if (M == 0 || N == 0) return;
  const Grid grid(M, N, a.size(1));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "tiled_mm_out", [&] {
    parallel_tasks(grid.row_tiles * grid.col_tiles, [&](int64_t t0, int64_t t1) {
      const OneMklThread one_thread;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = (t / grid.col_tiles) * grid.rows, j0 = (t % grid.col_tiles) * grid.cols;
        const int64_t rows = std::min(grid.rows, M - i0), cols = std::min(grid.cols, N - j0);
        gemm_detail::tile<scalar_t>(out.narrow(0, i0, rows).narrow(1, j0, cols), a.narrow(0, i0, rows),
                                    b.narrow(1, j0, cols), accumulate, sum);
      }
    });
  });
}

inline at::Tensor tiled_mm(const at::Tensor& a, const at::Tensor& b, Sum sum = Sum::kBlas) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  tiled_mm_out(out, a, b, /*accumulate=*/false, sum);
  return out;
}

}  // namespace fastfusion
