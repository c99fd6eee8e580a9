// Batched real FFTs of length d on rows in memory, for the compact_bilinear kernels.
//
// ATen's CPU FFT builds and commits an MKL descriptor on every call (~85 us for d = 8192
// against ~6 us per transform), which dominated the small calls of the compact bilinear
// kernels. MKL's DFTI interface is exported by libtorch_cpu on builds that use MKL; there the
// transforms run through one committed descriptor per thread and length, one row at a time,
// computing the same numbers as ATen (which calls the same MKL routines). Builds without MKL
// (the DFTI symbols are weak references) use ATen's FFT instead, as does every build when
// FASTFUSION_CPP_ATEN_FFT is set (so that the tests cover that path too).
//
// Both directions are unnormalised: inverse(forward(x)) = d * x. Callers fold the 1/d into a
// scale they apply anyway.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ops/fft_irfft.h>
#include <ATen/ops/fft_rfft.h>
#include <c10/util/complex.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <type_traits>

// The subset of mkl_dfti.h used here (its C ABI; the enum values are MKL's).
extern "C" {
struct DFTI_DESCRIPTOR;
long DftiCreateDescriptor_s_1d(DFTI_DESCRIPTOR**, int domain, ...) __attribute__((weak));
long DftiCreateDescriptor_d_1d(DFTI_DESCRIPTOR**, int domain, ...) __attribute__((weak));
long DftiSetValue(DFTI_DESCRIPTOR*, int param, ...) __attribute__((weak));
long DftiCommitDescriptor(DFTI_DESCRIPTOR*) __attribute__((weak));
long DftiComputeForward(DFTI_DESCRIPTOR*, void*, ...) __attribute__((weak));
long DftiComputeBackward(DFTI_DESCRIPTOR*, void*, ...) __attribute__((weak));
long DftiFreeDescriptor(DFTI_DESCRIPTOR**) __attribute__((weak));
}

namespace fastfusion {
namespace fft_detail {

enum : int {
  kConjugateEvenStorage = 10,  // DFTI_CONJUGATE_EVEN_STORAGE
  kPlacement = 11,             // DFTI_PLACEMENT
  kThreadLimit = 27,           // DFTI_THREAD_LIMIT
  kReal = 33,                  // DFTI_REAL
  kComplexComplex = 39,        // DFTI_COMPLEX_COMPLEX: d/2 + 1 complex outputs
  kNotInplace = 44,            // DFTI_NOT_INPLACE
};

inline bool use_dfti() {
  if (std::getenv("FASTFUSION_CPP_ATEN_FFT")) return false;
  return DftiCreateDescriptor_s_1d && DftiCreateDescriptor_d_1d && DftiSetValue && DftiCommitDescriptor &&
         DftiComputeForward && DftiComputeBackward && DftiFreeDescriptor;
}

struct Descriptor {
  DFTI_DESCRIPTOR* handle = nullptr;
  ~Descriptor() {
    if (handle) DftiFreeDescriptor(&handle);
  }
};

// The calling thread's committed descriptor for real transforms of length d, or nullptr when
// MKL refuses one (then the caller uses ATen). Descriptors are not shared between threads.
template <typename T>
DFTI_DESCRIPTOR* descriptor(int64_t d) {
  thread_local std::map<int64_t, std::unique_ptr<Descriptor>> cache;
  auto& slot = cache[d];
  if (!slot) {
    slot = std::make_unique<Descriptor>();
    auto create = std::is_same_v<T, float> ? DftiCreateDescriptor_s_1d : DftiCreateDescriptor_d_1d;
    bool ok = create(&slot->handle, kReal, static_cast<long>(d)) == 0 &&
              DftiSetValue(slot->handle, kPlacement, kNotInplace) == 0 &&
              DftiSetValue(slot->handle, kConjugateEvenStorage, kComplexComplex) == 0;
    // One thread per transform: the callers parallelise over rows already. Older MKLs lack
    // the setting, which only matters for speed.
    if (ok) DftiSetValue(slot->handle, kThreadLimit, 1);
    ok = ok && DftiCommitDescriptor(slot->handle) == 0;
    if (!ok && slot->handle) DftiFreeDescriptor(&slot->handle);
  }
  return slot->handle;
}

}  // namespace fft_detail

// Real FFTs of `rows` contiguous rows: forward (rows, d) -> (rows, d/2 + 1), inverse back.
// An instance belongs to the thread that made it (it holds that thread's descriptor).
template <typename T>
class RealFFT {
  int64_t d_, K_;
  DFTI_DESCRIPTOR* dfti_;

  at::TensorOptions real_options() const { return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value); }

 public:
  explicit RealFFT(int64_t d)
      : d_(d), K_(d / 2 + 1), dfti_(fft_detail::use_dfti() ? fft_detail::descriptor<T>(d) : nullptr) {}

  void forward(const T* in, c10::complex<T>* out, int64_t rows) const {
    if (dfti_) {
      for (int64_t r = 0; r < rows; ++r)
        TORCH_CHECK(DftiComputeForward(dfti_, const_cast<T*>(in + r * d_), out + r * K_) == 0,
                    "fastfusion cpp backend: MKL real FFT failed");
      return;
    }
    const auto x = at::from_blob(const_cast<T*>(in), {rows, d_}, real_options());
    const auto y = at::fft_rfft(x, d_, -1);
    std::copy(y.template const_data_ptr<c10::complex<T>>(), y.template const_data_ptr<c10::complex<T>>() + rows * K_, out);
  }

  void inverse(const c10::complex<T>* in, T* out, int64_t rows) const {
    if (dfti_) {
      for (int64_t r = 0; r < rows; ++r)
        TORCH_CHECK(DftiComputeBackward(dfti_, const_cast<c10::complex<T>*>(in + r * K_), out + r * d_) == 0,
                    "fastfusion cpp backend: MKL inverse real FFT failed");
      return;
    }
    const auto x = at::from_blob(const_cast<c10::complex<T>*>(in), {rows, K_},
                                 at::TensorOptions().dtype(c10::toComplexType(c10::CppTypeToScalarType<T>::value)));
    // norm="forward" leaves the inverse unscaled, matching the DFTI path.
    const auto y = at::fft_irfft(x, d_, -1, "forward");
    std::copy(y.template const_data_ptr<T>(), y.template const_data_ptr<T>() + rows * d_, out);
  }
};

}  // namespace fastfusion
