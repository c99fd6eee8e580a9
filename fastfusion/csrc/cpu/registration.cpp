// Schemas of the CPU kernels. They live in their own namespace, not in fastfusion::, because
// the fastfusion:: ops are Python custom ops that take a backend name and dispatch through
// the Python kernel table (see csrc/README.md); fastfusion/cpp_backend.py registers these
// operators there as the "cpp" backend. The signatures mirror the ops' "torch" kernels.
#include <torch/library.h>

TORCH_LIBRARY(fastfusion_cpu, m) {
  m.def("count_sketch(Tensor x, Tensor hash, Tensor sign, int out_dim) -> Tensor");
  m.def("count_sketch_backward(Tensor grad, Tensor hash, Tensor sign) -> Tensor");
  m.def(
      "compact_bilinear(Tensor[] xs, Tensor[] hashes, Tensor[] signs, int out_dim, bool mean, Tensor? gate, "
      "bool normalize, float eps, str algorithm, bool save_residuals) -> (Tensor, Tensor[])");
  m.def(
      "compact_bilinear_backward(Tensor grad, Tensor[] residuals, Tensor[] xs, Tensor[] hashes, Tensor[] signs, int out_dim, bool mean, "
      "Tensor? gate, bool normalize, float eps, str algorithm) -> Tensor[]");
  m.def("signed_sqrt_l2(Tensor z, float eps) -> Tensor");
  m.def("signed_sqrt_l2_backward(Tensor grad, Tensor z, float eps) -> Tensor");
  m.def(
      "factorized_bilinear(Tensor x, Tensor y, Tensor weight_x, Tensor? bias_x, Tensor weight_y, Tensor? bias_y, "
      "int factor, Tensor? dropout_mask, bool normalize, float eps, bool save_residuals) -> (Tensor, Tensor[])");
  m.def(
      "factorized_bilinear_backward(Tensor grad, Tensor[] residuals, Tensor x, Tensor y, Tensor weight_x, Tensor? bias_x, "
      "Tensor weight_y, Tensor? bias_y, int factor, Tensor? dropout_mask, bool normalize, float eps) -> Tensor[]");
  m.def(
      "low_rank_fusion(Tensor[] xs, Tensor[] factors, Tensor weights, Tensor bias, bool save_residuals) "
      "-> (Tensor, Tensor[])");
  m.def(
      "low_rank_fusion_backward(Tensor grad, Tensor[] residuals, Tensor[] xs, Tensor[] factors, Tensor weights, Tensor bias) "
      "-> Tensor[]");
  m.def("tensor_fusion(Tensor[] xs, Tensor weight, Tensor? bias, bool save_residuals) -> (Tensor, Tensor[])");
  m.def(
      "tensor_fusion_backward(Tensor grad, Tensor[] residuals, Tensor[] xs, Tensor weight, Tensor? bias) "
      "-> Tensor[]");
}
