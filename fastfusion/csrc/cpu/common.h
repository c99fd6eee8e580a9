// Pieces shared by the CPU kernels: the dtype policy, batch-parallel loops, and reductions
// over the batch whose result does not depend on the thread count.
//
// The kernels are one file per op, <op>.cpp, named as the op. Each defines the schemas of its
// operators, fastfusion_cpu::<op> and fastfusion_cpu::<op>_backward (TORCH_LIBRARY_FRAGMENT),
// next to their CPU kernels (TORCH_LIBRARY_IMPL), so no list of the ops is kept by hand. The
// signatures mirror the ops' "torch" kernels. The namespace is fastfusion_cpu, not
// fastfusion, because the fastfusion:: ops are Python custom ops that take a backend name and
// dispatch through the Python kernel table (see csrc/README.md). Per-row kernels that several
// ops share live in headers named after the op they compute (count_sketch.h, signed_sqrt_l2.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
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

inline at::TensorOptions options_of(at::ScalarType type) {
  return at::TensorOptions().dtype(type);
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
