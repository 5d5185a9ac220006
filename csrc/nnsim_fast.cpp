// Op schemas of the nnsim_fast library and the Python module entry point.
// CPU implementations live in cpu/kernels.cpp, CUDA ones in cuda/ops_cuda.cpp.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(nnsim_fast, m) {
  // Arguments in the order of the Python wrappers (nnsim_fast.ops), with their
  // defaults; `rows` (dataset-index keys) stays positional because autograd
  // registration does not take keyword-only tensors.
  m.def("sketch_hash(Tensor rows, int m, int seed, int sparsity=1) -> (Tensor, Tensor)");
  m.def(
      "countsketch(Tensor x, int m, int seed, int offset=0, int sparsity=1, "
      "Tensor? rows=None, bool deterministic=False) -> Tensor");
  m.def(
      "countsketch_pair(Tensor f, Tensor g, int m, int seed, int offset=0, int sparsity=1, "
      "Tensor? rows=None, bool deterministic=False) -> (Tensor, Tensor)");
  m.def(
      "countsketch_pair_(Tensor(a!) acc_f, Tensor(b!) acc_g, Tensor f, Tensor g, int seed, "
      "int offset=0, int sparsity=1, Tensor? rows=None, bool deterministic=False) -> ()");
  m.def(
      "countsketch_backward(Tensor grad_y, int n, int seed, int offset=0, int sparsity=1, "
      "Tensor? rows=None) -> Tensor");
  m.def("hadamard_gram(Tensor a, Tensor b) -> Tensor");
}

namespace nnsim {
const char* cpu_capability_name();  // cpu/kernels.cpp
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "nnsim_fast native ops (registered as torch.ops.nnsim_fast.*)";
  module.def("cpu_capability", &nnsim::cpu_capability_name,
             "The instruction-set version of the CPU scatter loop in use: avx512, avx2 or "
             "default (NNSIM_FAST_CPU_CAPABILITY selects a lower one).");
#ifdef NNSIM_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
}
