// Tensor sketch / compact bilinear pooling (the math is in fastfusion/ops/compact_bilinear.py).
//
// Compact bilinear pooling has two algorithms ("fft" and "gram", chosen in Python) that share
// the epilogue (finish_row, finish_row_backward: gate, signed sqrt + L2, and their gradients).
//
// FFT path. It works on tasks of whole samples (a fixed number, chosen from the
// shapes alone so that the result cannot depend on the thread count). A task sketches its
// positions into a buffer of about 256 KB (so that it stays in L2), transforms it with one
// batched real FFT, multiplies and pools the spectra over positions, and runs one inverse FFT
// per sample followed by the gate and the signed sqrt + L2 epilogue. No (B, T, d)
// intermediate exists, except when autograd will need one: then the spectra (B, T, d/2 + 1)
// of every modality and the pooled sketch (B, d) are copied out as residuals, which spares
// the backward half of its transforms (a copy costs about a third of a transform).
//
// The transforms are fft.h's: with MKL they cost ~6 us per 8192-point row and nothing per
// call. Smaller buffers measured faster down to 256 KB (~2.5-4 MB before, when ATen's ~85 us
// per call had to be amortised; that is still the cost without MKL: ~10 us per row at 256 KB).
//
// Gram path (two modalities). Pooling is linear, so the pooled sketch of sample b is the count
// sketch of its Gram matrix G = X_b^T Y_b (n1 x n2) with bin h1(i) + h2(j) (mod d) and sign
// s1(i) s2(j). Tasks (GramSplit, from the shapes alone) are runs of rows i of one sample: at
// least 16 of them where the rows allow, so small batches use up to 16 threads. A task
// computes its rows' G a block of ~2^16 values at a time (one GEMM on one MKL thread, the
// block staying in L2) and scatters each block, in ascending (i, j), into bins of its own in
// double; the last of a sample's tasks to finish sums their bins in task order and finishes
// the row. So no (B, n1, n2) tensor exists, only one block per thread, and the bits do not
// depend on the thread count. The only residual is z (B, d), when there is a gate or
// normalisation. The backward turns dout into dz with the FFT path's epilogue code, then
// dX_b = Y_b dG_b^T and dY_b = X_b dG_b with dG_b(i, j) = s1(i) s2(j) dz_b[h1(i) + h2(j)]:
// a task gathers its rows' blocks of dG once and feeds both GEMMs, dX's columns i being its
// own and dY summed over the blocks in order, then over the parts in part order, again
// independent of the thread count. The signs are folded into the inputs (X diag(s1),
// Y diag(s2)) so that the scatter only adds and the gather multiplies once. The GEMMs reduce
// over what the reference Gram kernel's do (T for G, n2 for dX, n1 for dY).
#include "common.h"
#include "count_sketch.h"
#include "fft.h"
#include "signed_sqrt_l2.h"

#include <c10/util/complex.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

namespace fastfusion {
namespace {

// How the batch is cut into tasks; a function of the shapes only (see the file comment). The
// tasks supply the parallelism, so every FFT call runs on one MKL thread (OneMklThread): MKL
// would otherwise split a long transform across its threads and round by the thread count.
struct Tiling {
  int64_t samples;    // per task
  int64_t positions;  // per FFT call within a task

  Tiling(int64_t modalities, int64_t T, int64_t d) {
    constexpr int64_t kRealsPerCall = int64_t(1) << 16;
    const int64_t per_position = modalities * d;
    positions = std::clamp<int64_t>(kRealsPerCall / per_position, 1, T);
    samples = positions == T ? std::max<int64_t>(1, kRealsPerCall / (per_position * T)) : 1;
  }
};

// How the Gram path cuts each sample's Gram matrix into tasks: `parts` runs of `rows` rows
// per sample, each computed `block` rows per GEMM call. A function of the shapes only. There
// are about kTasks tasks at least, so that small batches still share out over up to 16
// threads (more parts cost an extra set of bins per part and smaller GEMMs), and a block
// holds about kBlockValues values, so that it stays in L2 between the GEMM and the scatter.
struct GramSplit {
  static constexpr int64_t kTasks = 16, kMinRows = 32, kBlockValues = int64_t(1) << 16;
  int64_t parts, rows, block;

  GramSplit(int64_t batch, int64_t n, int64_t n_other) {
    parts = std::clamp<int64_t>((kTasks + batch - 1) / batch, 1, std::max<int64_t>(1, n / kMinRows));
    rows = std::max<int64_t>(1, (n + parts - 1) / parts);
    parts = std::max<int64_t>(1, (n + rows - 1) / rows);  // no empty part, except the one for n = 0
    block = std::clamp<int64_t>(kBlockValues / std::max<int64_t>(1, n_other), 1, rows);
  }
};

template <typename T>
using Complex = c10::complex<T>;

// The inputs of compact bilinear pooling in canonical form, shared by forward and backward.
template <typename T>
struct Problem {
  std::vector<at::Tensor> xs;  // (B, T, n_m) contiguous, compute type
  std::vector<Hashing<T>> hashings;
  int64_t B, positions, d, K;
  bool mean;
  at::ScalarType type;

  Problem(at::TensorList xs_in, at::TensorList hashes, at::TensorList signs, int64_t out_dim, bool mean_,
          at::ScalarType type_)
      : xs(prepared(xs_in, type_)), d(out_dim), K(out_dim / 2 + 1), mean(mean_), type(type_) {
    TORCH_CHECK(xs.size() >= 2 && hashes.size() == xs.size() && signs.size() == xs.size(),
                "fastfusion cpp backend: compact_bilinear needs as many hashes and signs as inputs (>= 2)");
    B = xs[0].size(0);
    positions = xs[0].size(1);
    // The tiling divides by T. Empty inputs never reach a compiled kernel through the
    // fastfusion:: ops (the dispatcher hands them to the "torch" kernels); a direct call says so.
    TORCH_CHECK(positions > 0, "fastfusion cpp backend: compact_bilinear needs at least one position, got T = 0; "
                "call it through fastfusion.compact_bilinear, which handles empty inputs");
    for (size_t m = 0; m < xs.size(); ++m) hashings.emplace_back(hashes[m], signs[m], xs[m].size(2), d);
  }

  int64_t modalities() const { return static_cast<int64_t>(xs.size()); }

  const T* row(int64_t m, int64_t b, int64_t t) const {
    return xs[m].template const_data_ptr<T>() + (b * positions + t) * hashings[m].size();
  }

  // Spectra (M, rows, K) of positions [t0, t0 + tp) of samples [s0, s0 + S), rows sample-major.
  at::Tensor spectra(int64_t s0, int64_t S, int64_t t0, int64_t tp) const {
    const int64_t M = modalities(), R = S * tp;
    auto sketches = at::empty({M, R, d}, at::TensorOptions().dtype(type));
    T* sp = sketches.template mutable_data_ptr<T>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t t = 0; t < tp; ++t)
          hashings[m].sketch(row(m, s0 + s, t0 + t), sp + (m * R + s * tp + t) * d, d);
    auto F = at::empty({M, R, K}, at::TensorOptions().dtype(c10::toComplexType(type)));
    const OneMklThread one_thread;
    RealFFT<T>(d).forward(sp, F.template mutable_data_ptr<Complex<T>>(), M * R);
    return F;
  }

  // pooled[s] += sum_t prod_m F_m[s, t]: the frequency-domain pooling.
  void pool(const at::Tensor& F, int64_t S, int64_t tp, Complex<T>* pooled) const {
    const int64_t M = modalities(), R = S * tp;
    const Complex<T>* f = F.template const_data_ptr<Complex<T>>();
    std::vector<Complex<T>> prod(M > 2 ? K : 0);
    for (int64_t s = 0; s < S; ++s) {
      Complex<T>* acc = pooled + s * K;
      for (int64_t t = 0; t < tp; ++t) {
        const int64_t r = s * tp + t;
        const Complex<T>* f0 = f + r * K;
        const Complex<T>* f1 = f + (R + r) * K;
        if (M == 2) {
          for (int64_t k = 0; k < K; ++k) acc[k] += f0[k] * f1[k];
          continue;
        }
        for (int64_t k = 0; k < K; ++k) prod[k] = f0[k] * f1[k];
        for (int64_t m = 2; m < M; ++m) {
          const Complex<T>* fm = f + (m * R + r) * K;
          for (int64_t k = 0; k < K; ++k) prod[k] *= fm[k];
        }
        for (int64_t k = 0; k < K; ++k) acc[k] += prod[k];
      }
    }
  }

  // The pooled sketch z (S, d) of samples [s0, s0 + S). When the task's positions fit one FFT
  // call its spectra are handed back through `kept` for the backward to reuse; with `saved`
  // (the spectra residuals, (B, T, K) per modality) they are copied there.
  at::Tensor pooled_sketch(int64_t s0, int64_t S, const Tiling& tiling, at::Tensor* kept,
                           const std::vector<at::Tensor>* saved = nullptr) const {
    auto pooled = at::zeros({S, K}, at::TensorOptions().dtype(c10::toComplexType(type)));
    Complex<T>* pp = pooled.template mutable_data_ptr<Complex<T>>();
    for (int64_t t0 = 0; t0 < positions; t0 += tiling.positions) {
      const int64_t tp = std::min(tiling.positions, positions - t0);
      auto F = spectra(s0, S, t0, tp);
      pool(F, S, tp, pp);
      if (kept && tp == positions) *kept = F;
      if (saved) {
        // A task covers whole samples or (S = 1) a run of positions: consecutive rows either way.
        const Complex<T>* f = F.template const_data_ptr<Complex<T>>();
        for (int64_t m = 0; m < modalities(); ++m)
          std::copy(f + m * S * tp * K, f + (m + 1) * S * tp * K,
                    (*saved)[m].template mutable_data_ptr<Complex<T>>() + (s0 * positions + t0) * K);
      }
    }
    // The inverse transform's 1/d, and 1/T for "mean".
    pooled.mul_(1.0 / (static_cast<double>(d) * (mean ? positions : 1)));
    auto z = at::empty({S, d}, at::TensorOptions().dtype(type));
    const OneMklThread one_thread;
    RealFFT<T>(d).inverse(pp, z.template mutable_data_ptr<T>(), S);
    return z;
  }

  // The Gram path (two modalities; see the file comment). Entry (i, k) of sample b's Gram
  // matrix G = X_b^T Y_b is added into bin h_0(i) + h_1(k) (mod d) with sign s_0(i) s_1(k).

  // The bins of row i's entries, h_own(i) + h_other(k) (mod d) for every k: one compare
  // instead of a modulo, in a pass of their own, which vectorises (the scatter and gather that
  // use them measured 20% and 40% faster than with the index arithmetic inline).
  void gram_bins(const Hashing<T>& own, int64_t i, const Hashing<T>& other, int32_t* bins) const {
    const int64_t base = own.hash[i] - d;
    for (int64_t k = 0; k < other.size(); ++k) {
      const int64_t bin = base + other.hash[k];
      bins[k] = static_cast<int32_t>(bin < 0 ? bin + d : bin);
    }
  }

  // X_m diag(s_m): modality m with its signs folded in, (B, T, n_m). The Gram matrix of the
  // signed inputs has the signed entries s_0(i) s_1(k) G(i, k), so the scatter only adds, and
  // the backward's gather applies one sign per row of dG (the other is in the signed input).
  at::Tensor signed_input(int64_t m) const {
    const std::vector<T>& sign = hashings[m].sign;
    const auto signs = at::from_blob(const_cast<T*>(sign.data()), {static_cast<int64_t>(sign.size())},
                                     at::TensorOptions().dtype(type));
    return xs[m] * signs;
  }

  // The pooled sketch z (B, d) of the whole batch, "mean" applied. finish(b, z_b) is called
  // once z's row b is complete, in the same parallel region: the last of a sample's tasks to
  // finish sums the sample's bins (in task order, so whichever thread it is, the bits are the
  // same) and finishes the row. One region, as on the FFT path: each costs a wake-up of every
  // thread, milliseconds on a loaded machine where a thread spins while another waits for a
  // core.
  template <typename Finish>
  at::Tensor gram_pooled_sketch(const Finish& finish) const {
    const Hashing<T>& rows = hashings[0];
    const Hashing<T>& cols = hashings[1];
    const int64_t n1 = rows.size(), n2 = cols.size();
    const GramSplit split(B, n1, n2);
    // Each task's bins, in double: a bin sums about n1 n2 / d entries, more than any sum of
    // the FFT path, and a double add costs what a float one does in this scatter.
    std::vector<double> bins(B * split.parts * d, 0.0);
    std::vector<std::atomic<int64_t>> tasks_done(B);
    for (auto& count : tasks_done) count.store(0, std::memory_order_relaxed);
    auto z = at::empty({B, d}, at::TensorOptions().dtype(type));
    T* zp = z.template mutable_data_ptr<T>();
    const at::Tensor x = signed_input(0), y = signed_input(1);
    parallel_tasks(B * split.parts, [&](int64_t task0, int64_t task1) {
      const OneMklThread one_thread;
      auto G = at::empty({split.block, n2}, xs[0].options());
      const T* g = G.template const_data_ptr<T>();
      std::vector<int32_t> row_bins(n2);
      for (int64_t task = task0; task < task1; ++task) {
        const int64_t b = task / split.parts, i0 = (task % split.parts) * split.rows;
        const int64_t i1 = std::min(n1, i0 + split.rows);
        double* acc = bins.data() + task * d;
        for (int64_t ib = i0; ib < i1; ib += split.block) {
          const int64_t r = std::min(split.block, i1 - ib);
          auto gram = G.narrow(0, 0, r);
          at::mm_out(gram, x[b].narrow(1, ib, r).t(), y[b]);
          for (int64_t ii = 0; ii < r; ++ii) {
            gram_bins(rows, ib + ii, cols, row_bins.data());
            const T* gr = g + ii * n2;
            for (int64_t k = 0; k < n2; ++k) acc[row_bins[k]] += double(gr[k]);
          }
        }
        // acq_rel: the last task sees every other task's bins of this sample.
        if (tasks_done[b].fetch_add(1, std::memory_order_acq_rel) + 1 < split.parts) continue;
        const double* sample_bins = bins.data() + b * split.parts * d;
        for (int64_t k = 0; k < d; ++k) {
          double sum = 0;
          for (int64_t part = 0; part < split.parts; ++part) sum += sample_bins[part * d + k];
          zp[b * d + k] = static_cast<T>(mean ? sum / positions : sum);
        }
        finish(b, zp + b * d);
      }
    });
    return z;
  }

  // Gradients of both modalities from dz (B, d), the gradient reaching the pooled sketch with
  // "mean" already applied: dX_b = Y_b dG_b^T and dY_b = X_b dG_b, dG_b(i, k) = s_0(i) s_1(k)
  // dz_b[h_0(i) + h_1(k)]. Tasks are the forward's runs of rows i; each gathers its block of
  // dG once (with s_0 folded in, s_1 being in the signed Y) and feeds both GEMMs: dX's columns
  // i are the block's alone, and dY, a sum over all i, is summed over the task's blocks in
  // order, into the gradient itself when a sample has one part, else into the part's own
  // buffer, which the sample's last part to finish adds in part order (as the forward's bins).
  // dY's s_1 is applied last, once per entry.
  void gram_backward(const at::Tensor& dz, std::vector<at::Tensor>& grads) const {
    const Hashing<T>& rows = hashings[0];
    const Hashing<T>& cols = hashings[1];
    const int64_t n1 = rows.size(), n2 = cols.size();
    const GramSplit split(B, n1, n2);
    const T* dzp = dz.template const_data_ptr<T>();
    const at::Tensor y = signed_input(1);
    const at::Tensor partial_dy =
        split.parts > 1 ? at::empty({B, split.parts, positions, n2}, xs[0].options()) : at::Tensor();
    std::vector<std::atomic<int64_t>> tasks_done(B);
    for (auto& count : tasks_done) count.store(0, std::memory_order_relaxed);
    parallel_tasks(B * split.parts, [&](int64_t task0, int64_t task1) {
      const OneMklThread one_thread;
      auto slab = at::empty({split.block, n2}, xs[0].options());  // this thread's rows of dG
      T* sp = slab.template mutable_data_ptr<T>();
      std::vector<int32_t> row_bins(n2);
      for (int64_t task = task0; task < task1; ++task) {
        const int64_t b = task / split.parts, part = task % split.parts, i0 = part * split.rows;
        const int64_t i1 = std::min(n1, i0 + split.rows);
        const T* g = dzp + b * d;
        at::Tensor dy = split.parts > 1 ? partial_dy[b][part] : grads[1][b];
        for (int64_t ib = i0; ib < i1; ib += split.block) {
          const int64_t r = std::min(split.block, i1 - ib);
          for (int64_t ii = 0; ii < r; ++ii) {
            gram_bins(rows, ib + ii, cols, row_bins.data());
            const T sign = rows.sign[ib + ii];
            T* sr = sp + ii * n2;
            for (int64_t k = 0; k < n2; ++k) sr[k] = sign * g[row_bins[k]];
          }
          const auto block = slab.narrow(0, 0, r);
          auto dx = grads[0][b].narrow(1, ib, r);
          at::mm_out(dx, y[b], block.t());
          const auto x = xs[0][b].narrow(1, ib, r);
          if (ib == i0) {
            at::mm_out(dy, x, block);
          } else {
            dy.addmm_(x, block);
          }
        }
        // acq_rel: the last task sees every other part's sum of this sample.
        if (tasks_done[b].fetch_add(1, std::memory_order_acq_rel) + 1 < split.parts) continue;
        T* out = grads[1][b].template mutable_data_ptr<T>();
        const int64_t size = positions * n2;
        if (split.parts > 1) {
          const T* parts = partial_dy[b].template const_data_ptr<T>();
          std::copy(parts, parts + size, out);
          for (int64_t p = 1; p < split.parts; ++p)
            for (int64_t e = 0; e < size; ++e) out[e] += parts[p * size + e];
        }
        for (int64_t t = 0; t < positions; ++t)
          for (int64_t k = 0; k < n2; ++k) out[t * n2 + k] *= cols.sign[k];
      }
    });
  }
};

// The epilogue of one sample: out = signed_sqrt_l2(z * gate), each step when asked for.
template <typename T>
void finish_row(const T* z, const T* gate, T* out, int64_t d, bool normalize, double eps) {
  if (gate) {
    for (int64_t j = 0; j < d; ++j) out[j] = z[j] * gate[j];
  } else {
    std::copy(z, z + d, out);
  }
  if (normalize) signed_sqrt_l2_row(out, out, d, eps);
}

// The epilogue's vector-Jacobian product for one sample: dz = d out / d z applied to `grad`,
// times `scale`, and with a gate its gradient `grad_gate`. `z` (the pooled sketch before the
// gate) is read only with a gate or normalisation; `scratch` holds d values.
template <typename T>
void finish_row_backward(const T* grad, const T* z, const T* gate, T* dz, T* grad_gate, T* scratch, int64_t d,
                         bool normalize, double eps, T scale) {
  if (normalize) {
    if (gate) {
      for (int64_t j = 0; j < d; ++j) scratch[j] = z[j] * gate[j];
      signed_sqrt_l2_backward_row(grad, scratch, dz, d, eps);
    } else {
      signed_sqrt_l2_backward_row(grad, z, dz, d, eps);
    }
  } else {
    std::copy(grad, grad + d, dz);
  }
  if (gate) {
    for (int64_t j = 0; j < d; ++j) {
      grad_gate[j] = dz[j] * z[j];
      dz[j] *= gate[j];
    }
  }
  for (int64_t j = 0; j < d; ++j) dz[j] *= scale;
}

// Row b of a (B, d) tensor, or nullptr for an undefined one (no gate).
template <typename T>
const T* row_or_null(const at::Tensor& t, int64_t b, int64_t d) {
  return t.defined() ? t.template const_data_ptr<T>() + b * d : nullptr;
}

void check_algorithm(c10::string_view algorithm, size_t modalities, int64_t out_dim, const char* op) {
  TORCH_CHECK(algorithm == "fft" || algorithm == "gram", "fastfusion cpp backend (", op,
              "): algorithm must be 'fft' or 'gram', got '", algorithm, "'");
  TORCH_CHECK(algorithm == "fft" || modalities == 2, "fastfusion cpp backend (", op,
              "): algorithm 'gram' needs exactly 2 modalities (xs), got ", modalities, "; use 'fft'");
  TORCH_CHECK(algorithm == "fft" || out_dim <= std::numeric_limits<int32_t>::max(), "fastfusion cpp backend (", op,
              "): algorithm 'gram' needs out_dim < 2^31 (its bins are int32), got ", out_dim);
}

// Residuals when saved: on the FFT path the spectra (B, T, d/2 + 1) of every modality; then,
// on either path, when there is a gate or normalisation, the pooled sketch z (B, d) as it is
// before the gate.
std::tuple<at::Tensor, std::vector<at::Tensor>> compact_bilinear(at::TensorList xs_in, at::TensorList hashes,
                                                                 at::TensorList signs, int64_t out_dim, bool mean,
                                                                 const std::optional<at::Tensor>& gate_in,
                                                                 bool normalize, double eps, c10::string_view algorithm,
                                                                 bool save_residuals) {
  check_algorithm(algorithm, xs_in.size(), out_dim, "compact_bilinear");
  const bool gram = algorithm == "gram";
  const auto type = compute_type(xs_in[0], "compact_bilinear");
  const int64_t B = xs_in[0].size(0), P = xs_in[0].size(1);
  auto out = at::empty({B, out_dim}, at::TensorOptions().dtype(type));
  std::vector<at::Tensor> residuals;
  const bool save_z = save_residuals && (gate_in.has_value() || normalize);
  AT_DISPATCH_FLOATING_TYPES(type, "compact_bilinear", [&] {
    using T = scalar_t;
    const Problem<T> problem(xs_in, hashes, signs, out_dim, mean, type);
    const at::Tensor gate = gate_in ? prepared(*gate_in, type) : at::Tensor();
    if (gram) {
      const auto z = problem.gram_pooled_sketch([&](int64_t b, const T* zb) {
        finish_row(zb, row_or_null<T>(gate, b, out_dim), out.mutable_data_ptr<T>() + b * out_dim, out_dim, normalize,
                   eps);
      });
      if (save_z) residuals.push_back(z);
      return;
    }
    if (save_residuals) {
      for (size_t m = 0; m < xs_in.size(); ++m)
        residuals.push_back(empty_output({B, P, out_dim / 2 + 1}, at::TensorOptions().dtype(c10::toComplexType(type))));
    }
    if (save_z) residuals.push_back(at::empty({B, out_dim}, at::TensorOptions().dtype(type)));
    const Tiling tiling(problem.modalities(), problem.positions, out_dim);
    const int64_t tasks = (problem.B + tiling.samples - 1) / tiling.samples;
    const std::vector<at::Tensor> saved_spectra(residuals.begin(), residuals.begin() + (save_residuals ? xs_in.size() : 0));
    parallel_tasks(tasks, [&](int64_t task0, int64_t task1) {
      for (int64_t task = task0; task < task1; ++task) {
        const int64_t s0 = task * tiling.samples, S = std::min(tiling.samples, problem.B - s0);
        const auto z = problem.pooled_sketch(s0, S, tiling, nullptr, save_residuals ? &saved_spectra : nullptr);
        const T* zp = z.template const_data_ptr<T>();
        if (save_z) std::copy(zp, zp + S * out_dim, residuals.back().template mutable_data_ptr<T>() + s0 * out_dim);
        for (int64_t s = 0; s < S; ++s)
          finish_row(zp + s * out_dim, row_or_null<T>(gate, s0 + s, out_dim),
                     out.mutable_data_ptr<T>() + (s0 + s) * out_dim, out_dim, normalize, eps);
      }
    });
  });
  return {out.to(xs_in[0].scalar_type()), residuals};
}

std::vector<at::Tensor> compact_bilinear_backward(const at::Tensor& grad_in, at::TensorList residuals,
                                                  at::TensorList xs_in, at::TensorList hashes, at::TensorList signs,
                                                  int64_t out_dim, bool mean, const std::optional<at::Tensor>& gate_in,
                                                  bool normalize, double eps, c10::string_view algorithm) {
  check_algorithm(algorithm, xs_in.size(), out_dim, "compact_bilinear_backward");
  const bool gram = algorithm == "gram";
  const auto type = compute_type(xs_in[0], "compact_bilinear_backward");
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(type, "compact_bilinear_backward", [&] {
    using T = scalar_t;
    const Problem<T> problem(xs_in, hashes, signs, out_dim, mean, type);
    const at::Tensor grad = prepared(grad_in, type);
    const at::Tensor gate = gate_in ? prepared(*gate_in, type) : at::Tensor();
    const int64_t M = problem.modalities(), K = problem.K, P = problem.positions;
    const bool saved = !residuals.empty();
    const bool needs_z = gate.defined() || normalize;
    if (saved) {
      std::vector<Residual> expected(gram ? 0 : M, {c10::toComplexType(type), {problem.B, P, K}});
      if (needs_z) expected.push_back({type, {problem.B, out_dim}});
      check_residuals(residuals, expected, "compact_bilinear_backward");
    }
    for (const auto& x : problem.xs) grads.push_back(at::empty_like(x));
    at::Tensor grad_gate = gate.defined() ? at::empty_like(gate) : at::Tensor();
    T* dgp = gate.defined() ? grad_gate.mutable_data_ptr<T>() : nullptr;
    if (gram) {
      auto dz = at::empty({problem.B, out_dim}, grad.options());
      // "mean": the reference divides the gradient by T before the Gram matrix's.
      const T scale = static_cast<T>(1.0 / (mean ? P : 1));
      const auto finish = [&](int64_t b, const T* zb) {
        std::vector<T> scratch(gate.defined() && normalize ? out_dim : 0);  // a row's work dwarfs the allocation
        finish_row_backward(grad.const_data_ptr<T>() + b * out_dim, zb, row_or_null<T>(gate, b, out_dim),
                            dz.mutable_data_ptr<T>() + b * out_dim, dgp ? dgp + b * out_dim : nullptr, scratch.data(),
                            out_dim, normalize, eps, scale);
      };
      if (needs_z && !saved) {
        problem.gram_pooled_sketch(finish);
      } else {
        const at::Tensor z = saved ? residuals[0] : at::Tensor();
        parallel_rows(problem.B, 6 * out_dim, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) finish(b, row_or_null<T>(z, b, out_dim));
        });
      }
      problem.gram_backward(dz, grads);
    } else {
      const Tiling tiling(M, P, out_dim);
      const int64_t tasks = (problem.B + tiling.samples - 1) / tiling.samples;
      // The inverse transform's 1/d and, for "mean", the 1/T, applied to g'' (the reference
      // divides by T before its FFT too).
      const T scale = static_cast<T>(1.0 / (static_cast<double>(out_dim) * (mean ? P : 1)));

      parallel_tasks(tasks, [&](int64_t task0, int64_t task1) {
        std::vector<T> scratch(out_dim);
        for (int64_t task = task0; task < task1; ++task) {
          const int64_t s0 = task * tiling.samples, S = std::min(tiling.samples, problem.B - s0);
          // The gradient reaching the pooled sketch, g'' = d out / d z (S, d), times `scale`.
          auto g2 = at::empty({S, out_dim}, grad.options());
          T* g2p = g2.template mutable_data_ptr<T>();
          at::Tensor kept, z;
          if (needs_z) z = saved ? residuals[M].narrow(0, s0, S) : problem.pooled_sketch(s0, S, tiling, &kept);
          for (int64_t s = 0; s < S; ++s) {
            const int64_t b = s0 + s;
            finish_row_backward(grad.const_data_ptr<T>() + b * out_dim, row_or_null<T>(z, s, out_dim),
                                row_or_null<T>(gate, b, out_dim), g2p + s * out_dim,
                                dgp ? dgp + b * out_dim : nullptr, scratch.data(), out_dim, normalize, eps, scale);
          }
          const OneMklThread one_thread;
          const RealFFT<T> fft(out_dim);  // this thread's transforms
          auto G = at::empty({S, K}, at::TensorOptions().dtype(c10::toComplexType(type)));
          const Complex<T>* gh = G.template const_data_ptr<Complex<T>>();
          fft.forward(g2p, G.template mutable_data_ptr<Complex<T>>(), S);

          // The adjoint of circular convolution is circular correlation:
          // dC_m = IFFT(FFT(g'') * conj(prod_{k != m} F_k)), then dx_m is C_m's adjoint.
          for (int64_t t0 = 0; t0 < P; t0 += tiling.positions) {
            const int64_t tp = std::min(tiling.positions, P - t0), R = S * tp;
            // Row r of modality j's spectra at fj[j] + r * K.
            std::vector<const Complex<T>*> fj(M);
            at::Tensor F;
            if (saved) {
              for (int64_t j = 0; j < M; ++j)
                fj[j] = residuals[j].template const_data_ptr<Complex<T>>() + (s0 * P + t0) * K;
            } else {
              F = kept.defined() ? kept : problem.spectra(s0, S, t0, tp);
              for (int64_t j = 0; j < M; ++j) fj[j] = F.template const_data_ptr<Complex<T>>() + j * R * K;
            }
            auto Q = at::empty({M, R, K}, G.options());
            Complex<T>* q = Q.template mutable_data_ptr<Complex<T>>();
            for (int64_t m = 0; m < M; ++m)
              for (int64_t r = 0; r < R; ++r) {
                Complex<T>* qr = q + (m * R + r) * K;
                std::copy(gh + (r / tp) * K, gh + (r / tp + 1) * K, qr);
                for (int64_t j = 0; j < M; ++j) {
                  if (j == m) continue;
                  const Complex<T>* f = fj[j] + r * K;
                  for (int64_t k = 0; k < K; ++k) qr[k] *= std::conj(f[k]);
                }
              }
            auto dC = at::empty({M, R, out_dim}, at::TensorOptions().dtype(type));
            T* dc = dC.template mutable_data_ptr<T>();
            fft.inverse(q, dc, M * R);
            for (int64_t m = 0; m < M; ++m) {
              const int64_t n = problem.hashings[m].size();
              T* dx = grads[m].template mutable_data_ptr<T>();
              for (int64_t s = 0; s < S; ++s)
                for (int64_t t = 0; t < tp; ++t)
                  problem.hashings[m].gather(dc + (m * R + s * tp + t) * out_dim,
                                             dx + ((s0 + s) * P + t0 + t) * n);
            }
          }
        }
      });
    }
    if (gate.defined()) grads.push_back(grad_gate);
  });
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& like = i < xs_in.size() ? xs_in[i] : *gate_in;
    grads[i] = grads[i].to(like.scalar_type());
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfusion_cpu, m) {
  m.def(
      "compact_bilinear(Tensor[] xs, Tensor[] hashes, Tensor[] signs, int out_dim, bool mean, Tensor? gate, "
      "bool normalize, float eps, str algorithm, bool save_residuals) -> (Tensor, Tensor[])");
  m.def(
      "compact_bilinear_backward(Tensor grad, Tensor[] residuals, Tensor[] xs, Tensor[] hashes, Tensor[] signs, int out_dim, bool mean, "
      "Tensor? gate, bool normalize, float eps, str algorithm) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastfusion_cpu, CPU, m) {
  m.impl("compact_bilinear", &compact_bilinear);
  m.impl("compact_bilinear_backward", &compact_bilinear_backward);
}

}  // namespace fastfusion
