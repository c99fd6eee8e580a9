// Pieces shared by the CPU kernels: the dtype policy, batch-parallel loops, per-row kernels
// that several ops fuse into their epilogues, and reductions over the batch whose result
// does not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

// MKL's per-thread override of its thread count. Where MKL splits one call (a long transform,
// a GEMM with a long reduction) across its threads, its rounding changes with the thread
// count; the kernels supply the parallelism themselves and run each MKL call on one thread.
// MKL_Set_Num_Threads_Local is the C entry point (mkl_set_num_threads_local in mkl_service.h
// is a macro for it; the lower-case symbol is the Fortran one, which takes a pointer). It is a
// weak reference, so builds of torch without MKL still load, with nothing to limit.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace fastfusion {

// MKL runs on the calling thread alone while this lives.
class OneMklThread {
  int saved_ = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;

 public:
  ~OneMklThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(saved_);
  }
};

// float32 and float64 are computed in their own precision. float16 and bfloat16 are
// computed in float32 and the results cast back: the conversion is cheap next to the
// kernels, and it is what the references do for their transforms. Anything else is an
// error that names the dtype, since silently computing it would hide a caller's bug.
inline at::ScalarType compute_type(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
      return t.scalar_type();
    case at::kHalf:
    case at::kBFloat16:
      return at::kFloat;
    default:
      TORCH_CHECK(false, "fastfusion cpp backend (", op, "): unsupported dtype ", t.scalar_type(),
                  "; expected float32, float64, float16 or bfloat16");
  }
}

inline at::Tensor prepared(const at::Tensor& t, at::ScalarType type) {
  return t.to(type).contiguous();
}

inline std::vector<at::Tensor> prepared(at::TensorList ts, at::ScalarType type) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(prepared(t, type));
  return out;
}

// A backward kernel given residuals (see fastfusion/_dispatch.py) checks that they are what
// its forward saves: `expected` lists (dtype, shape) in order. They only ever travel through
// autograd, so a mismatch is a caller bypassing it or a bug, and the message says which.
struct Residual {
  at::ScalarType type;
  std::vector<int64_t> sizes;
};

inline void check_residuals(at::TensorList residuals, const std::vector<Residual>& expected, const char* op) {
  TORCH_CHECK(residuals.size() == expected.size(), "fastfusion cpp backend: ", op, " expects ", expected.size(),
              " residuals from its forward, got ", residuals.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    const auto& r = residuals[i];
    TORCH_CHECK(r.scalar_type() == expected[i].type && r.is_contiguous() && r.sizes() == at::IntArrayRef(expected[i].sizes),
                "fastfusion cpp backend: ", op, " residual ", i, " should be a contiguous ", expected[i].type,
                " tensor of shape ", at::IntArrayRef(expected[i].sizes), ", got ", r.scalar_type(), " ", r.sizes(),
                r.is_contiguous() ? "" : " (non-contiguous)");
  }
}

// at::empty for a large result that the kernel then writes in full. PyTorch's CPU allocator
// hands large blocks straight from mmap, so each call faults its pages in on first write,
// 4 KB at a time: for the memory-bound kernels that costs more than the kernel itself (a
// 32 MB output takes ~7 ms of faults against ~1 ms of work on the reference machine).
// Advising transparent huge pages, which most distributions enable on request ("madvise"),
// makes that 2 MB at a time. It is advice: where it is unsupported nothing changes.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1), end = (first + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// Split rows across threads only when each task gets at least ATen's grain of work; every
// row is computed by one thread in a fixed order, so results never depend on the split.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t work_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_row));
  at::parallel_for(0, rows, grain, f);
}

// at::parallel_for does not carry thread-local state (grad mode, dispatch keys) into its
// workers; kernels that call ATen operators from a worker restore it with this.
template <typename F>
inline void parallel_tasks(int64_t tasks, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    f(begin, end);
  });
}

// A sum of products kept in eight independent double lanes: the lanes let the compiler
// vectorise without reassociating, and the fixed combination order keeps it deterministic.
struct Lanes {
  double v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double total() const { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }
};

template <typename T>
inline double dot(const T* a, const T* b, int64_t n) {
  Lanes acc;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc.v[l] += double(a[i + l]) * double(b[i + l]);
  for (; i < n; ++i) acc.v[i & 7] += double(a[i]) * double(b[i]);
  return acc.total();
}

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

// Column sums of a row-major (rows, cols) array, in double, independent of the thread count:
// fixed blocks of rows are summed in parallel, then the block sums in order.
template <typename T, typename Out>
inline void column_sums(const T* data, int64_t rows, int64_t cols, Out* out) {
  constexpr int64_t kBlock = 128;
  const int64_t blocks = std::max<int64_t>(1, (rows + kBlock - 1) / kBlock);
  std::vector<double> partial(blocks * cols, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      double* acc = partial.data() + blk * cols;
      for (int64_t r = blk * kBlock; r < std::min(rows, (blk + 1) * kBlock); ++r)
        for (int64_t c = 0; c < cols; ++c) acc[c] += double(data[r * cols + c]);
    }
  });
  for (int64_t c = 0; c < cols; ++c) {
    double s = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) s += partial[blk * cols + c];
    out[c] = static_cast<Out>(s);
  }
}

}  // namespace fastfusion
