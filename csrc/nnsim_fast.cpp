// Op schemas of the nnsim_fast library and the Python module entry point.
// CPU implementations live in cpu/kernels.cpp, CUDA ones in cuda/ops_cuda.cpp.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(nnsim_fast, m) {
  m.def("sketch_hash(Tensor rows, int m, int seed, int sparsity) -> (Tensor, Tensor)");
  m.def(
      "countsketch(Tensor x, Tensor? rows, int m, int seed, int offset, int sparsity, "
      "bool deterministic) -> Tensor");
  m.def(
      "countsketch_pair(Tensor f, Tensor g, Tensor? rows, int m, int seed, int offset, "
      "int sparsity, bool deterministic) -> (Tensor, Tensor)");
  m.def(
      "countsketch_pair_(Tensor(a!) acc_f, Tensor(b!) acc_g, Tensor f, Tensor g, Tensor? rows, "
      "int seed, int offset, int sparsity, bool deterministic) -> ()");
  m.def(
      "countsketch_backward(Tensor grad_y, Tensor? rows, int n, int seed, int offset, "
      "int sparsity) -> Tensor");
  m.def("hadamard_gram(Tensor a, Tensor b) -> Tensor");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "nnsim_fast native ops (registered as torch.ops.nnsim_fast.*)";
#ifdef NNSIM_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
}
