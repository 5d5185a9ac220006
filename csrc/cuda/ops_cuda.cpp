// CUDA implementations of the nnsim_fast ops: argument checks (the same as the
// CPU side, from checks.h), tensors -> raw launchers, current stream, every
// launch checked.  Kernels live in countsketch.cu and hadamard_gram.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/min.h>
#include <ATen/ops/zeros.h>
#include <c10/util/intrusive_ptr.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../hash.h"
#include "launchers.h"

namespace nnsim {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
  return cuda::DType::kFloat32;
}

cuda::MatrixView matrix_view(const at::Tensor& x) {
  cuda::MatrixView v;
  v.data = x.const_data_ptr();
  v.rows = x.size(0);
  v.cols = x.size(1);
  v.row_stride = x.stride(0);
  v.col_stride = x.stride(1);
  v.dtype = to_dtype(x.scalar_type());
  return v;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

SketchHash hash_of(int64_t seed, int64_t m, int64_t sparsity) {
  return make_sketch_hash(static_cast<uint64_t>(seed), m, static_cast<int>(sparsity));
}

// Refuses negative dataset rows, as the CPU ops do.  The values live on the
// device, so the check costs one small reduction and one wait of the host for
// the current stream.  Two things keep that off the hot path: without `rows`
// (stream-numbered rows) there is nothing to check, and a rows tensor that
// passed is remembered, so the calls of one batch that share it (every layer's
// sketch, the backward gather in the same thread) check it once.  The memory
// is a weak reference to the tensor, which pins its address (no other tensor
// can take it while we hold it), plus its version counter, which every
// in-place write through torch bumps.  Writes that bypass torch (DLPack, raw
// pointers) are not seen; a negative row let through is not unsafe, since
// global rows wrap modulo 2^64 in every kernel, it only breaks the contract.
// Inside CUDA graph capture no wait is allowed and a check would only see the
// values at capture time, so none is made.
void check_rows_non_negative(const std::optional<at::Tensor>& rows) {
  if (!rows.has_value() || rows->numel() == 0) return;
  const at::Tensor& r = *rows;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_stream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Checked {
    WeakTensor tensor{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    uint32_t version = 0;
  };
  thread_local Checked last;
  c10::TensorImpl* impl = r.unsafeGetTensorImpl();
  // Inference tensors keep no version counter: they are checked every time.
  const bool versioned = !r.is_inference();
  if (versioned && last.tensor._unsafe_get_target() == impl &&
      last.version == impl->version_counter().current_version()) {
    return;
  }
  const int64_t smallest = r.min().item<int64_t>();
  TORCH_CHECK_VALUE(smallest >= 0, "rows must be non-negative row indices, got ", smallest);
  if (versioned) {
    last.tensor = WeakTensor(r.getIntrusivePtr());
    last.version = impl->version_counter().current_version();
  }
}

// Keeps a contiguous copy of `rows` alive for the duration of the launch.
cuda::RowIndex row_index(const std::optional<at::Tensor>& rows, int64_t offset,
                         at::Tensor& holder) {
  cuda::RowIndex index;
  index.offset = offset;
  if (rows.has_value()) {
    holder = rows->contiguous();
    index.row_ids = holder.const_data_ptr<int64_t>();
  }
  return index;
}

// acc_f (+ acc_g) += S f (+ S g).  g == nullptr sketches f alone.
void accumulate(const at::Tensor& acc_f, const at::Tensor* acc_g, const at::Tensor& f,
                const at::Tensor* g, const std::optional<at::Tensor>& rows, int64_t seed,
                int64_t offset, int64_t sparsity, bool deterministic) {
  if (f.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(f.device());
  check_rows_non_negative(rows);
  at::Tensor rows_holder;
  cuda::CountSketchArgs args;
  args.f = matrix_view(f);
  if (g != nullptr) {
    args.g = matrix_view(*g);
    args.has_g = true;
    args.out_g = acc_g->data_ptr();
  }
  args.rows = row_index(rows, offset, rows_holder);
  args.m = acc_f.size(0);
  args.hash = hash_of(seed, args.m, sparsity);
  args.out_f = acc_f.data_ptr();
  args.acc = to_dtype(acc_f.scalar_type());
  args.deterministic = deterministic;
  const size_t bytes = cuda::countsketch_workspace_bytes(args);
  at::Tensor workspace;
  if (bytes > 0) {
    // The caching allocator is stream ordered: freeing this at scope exit is
    // safe while the kernels still run on the current stream.
    workspace = at::empty({static_cast<int64_t>(bytes)}, f.options().dtype(at::kByte));
  }
  C10_CUDA_CHECK(cuda::launch_countsketch(args, bytes > 0 ? workspace.data_ptr() : nullptr, bytes,
                                          current_stream()));
}

void countsketch_pair_inplace_cuda(at::Tensor acc_f, at::Tensor acc_g, const at::Tensor& f,
                                   const at::Tensor& g, int64_t seed, int64_t offset,
                                   int64_t sparsity, const std::optional<at::Tensor>& rows,
                                   bool deterministic) {
  check_pair(f, g);
  check_accumulators(acc_f, acc_g, f, g);
  check_sketch_args(acc_f.size(0), seed, offset, sparsity);
  check_rows(rows, f.size(0), f);
  accumulate(acc_f, &acc_g, f, &g, rows, seed, offset, sparsity, deterministic);
}

std::tuple<at::Tensor, at::Tensor> countsketch_pair_cuda(const at::Tensor& f, const at::Tensor& g,
                                                         int64_t m, int64_t seed, int64_t offset,
                                                         int64_t sparsity,
                                                         const std::optional<at::Tensor>& rows,
                                                         bool deterministic) {
  check_pair(f, g);
  check_sketch_args(m, seed, offset, sparsity);
  check_rows(rows, f.size(0), f);
  const c10::cuda::CUDAGuard guard(f.device());
  const auto options = f.options().dtype(accumulate_dtype(f.scalar_type()));
  at::Tensor sketch_f = at::zeros({m, f.size(1)}, options);
  at::Tensor sketch_g = at::zeros({m, g.size(1)}, options);
  accumulate(sketch_f, &sketch_g, f, &g, rows, seed, offset, sparsity, deterministic);
  return {sketch_f, sketch_g};
}

at::Tensor countsketch_cuda(const at::Tensor& x, int64_t m, int64_t seed, int64_t offset,
                            int64_t sparsity, const std::optional<at::Tensor>& rows,
                            bool deterministic) {
  check_matrix(x, "x");
  check_sketch_args(m, seed, offset, sparsity);
  check_rows(rows, x.size(0), x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor sketch =
      at::zeros({m, x.size(1)}, x.options().dtype(accumulate_dtype(x.scalar_type())));
  accumulate(sketch, nullptr, x, nullptr, rows, seed, offset, sparsity, deterministic);
  return sketch;
}

at::Tensor countsketch_backward_cuda(const at::Tensor& grad_y, int64_t n, int64_t seed,
                                     int64_t offset, int64_t sparsity,
                                     const std::optional<at::Tensor>& rows) {
  check_matrix(grad_y, "grad_y");
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int64_t m = grad_y.size(0);
  check_sketch_args(m, seed, offset, sparsity);
  check_rows(rows, n, grad_y);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  check_rows_non_negative(rows);
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor grad_x = at::empty({n, gy.size(1)}, gy.options());
  if (n == 0 || gy.size(1) == 0) return grad_x;
  at::Tensor rows_holder;
  const cuda::RowIndex index = row_index(rows, offset, rows_holder);
  C10_CUDA_CHECK(cuda::launch_countsketch_backward(
      gy.const_data_ptr(), to_dtype(gy.scalar_type()), m, gy.size(1), index, n,
      hash_of(seed, m, sparsity), grad_x.data_ptr(), current_stream()));
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> sketch_hash_cuda(const at::Tensor& rows, int64_t m,
                                                    int64_t seed, int64_t sparsity) {
  TORCH_CHECK_VALUE(rows.dim() == 1, "rows must be a 1-D tensor, got shape ", rows.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "rows must be int64, got ", rows.scalar_type());
  check_sketch_args(m, seed, 0, sparsity);
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor r = rows.contiguous();
  const int64_t n = r.size(0);
  at::Tensor buckets = at::empty({n, sparsity}, r.options());
  at::Tensor signs = at::empty({n, sparsity}, r.options().dtype(at::kFloat));
  if (n == 0) return {buckets, signs};
  C10_CUDA_CHECK(cuda::launch_sketch_hash(r.const_data_ptr<int64_t>(), n,
                                          hash_of(seed, m, sparsity),
                                          buckets.mutable_data_ptr<int64_t>(),
                                          signs.mutable_data_ptr<float>(), current_stream()));
  return {buckets, signs};
}

// Route of hadamard_gram.  The fused kernel computes only the upper triangle
// and writes the product once, but runs on CUDA cores; cuBLAS (two bmm and a
// multiply) wins once the Grams are large enough to be GEMM-bound, much
// earlier for 16-bit inputs, which cuBLAS feeds to the tensor cores.  The
// thresholds count multiply-adds, B * m^2 * (da + db).  The environment
// variable NNSIM_FAST_GRAM=fused|bmm overrides the rule (for benchmarks).
constexpr double kFusedMaxMacs32 = double(int64_t(1) << 30);
constexpr double kFusedMaxMacs16 = double(int64_t(1) << 24);

bool use_fused_gram(const at::Tensor& a, const at::Tensor& b) {
  const char* route = std::getenv("NNSIM_FAST_GRAM");
  if (route != nullptr && std::strcmp(route, "fused") == 0) return true;
  if (route != nullptr && std::strcmp(route, "bmm") == 0) return false;
  const double m = static_cast<double>(a.size(1));
  const double macs = static_cast<double>(a.size(0)) * m * m *
                      static_cast<double>(a.size(2) + b.size(2));
  const bool sixteen_bit = a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16;
  return macs <= (sixteen_bit ? kFusedMaxMacs16 : kFusedMaxMacs32);
}

at::Tensor hadamard_gram_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_gram_inputs(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::ScalarType out_dtype = accumulate_dtype(a.scalar_type());
  const int64_t batch = a.size(0);
  const int64_t m = a.size(1);
  if (!use_fused_gram(a, b)) {
    const at::Tensor a_t = a.transpose(1, 2);
    const at::Tensor b_t = b.transpose(1, 2);
    at::Tensor gram_a;
    at::Tensor gram_b;
    if (out_dtype != a.scalar_type()) {
      // float16/bfloat16 products accumulate and come out in float32.
      gram_a = at::bmm(a, a_t, out_dtype);
      gram_b = at::bmm(b, b_t, out_dtype);
    } else {
      gram_a = at::bmm(a, a_t);
      gram_b = at::bmm(b, b_t);
    }
    gram_a.mul_(gram_b);
    return gram_a;
  }
  at::Tensor out = at::empty({batch, m, m}, a.options().dtype(out_dtype));
  if (batch == 0 || m == 0) return out;
  cuda::GramArgs args;
  args.a = a.const_data_ptr();
  args.b = b.const_data_ptr();
  args.dtype = to_dtype(a.scalar_type());
  args.batch = batch;
  args.m = m;
  args.da = a.size(2);
  args.db = b.size(2);
  for (int i = 0; i < 3; ++i) {
    args.a_strides[i] = a.stride(i);
    args.b_strides[i] = b.stride(i);
  }
  args.out = out.data_ptr();
  C10_CUDA_CHECK(cuda::launch_hadamard_gram(args, current_stream()));
  return out;
}

}  // namespace
}  // namespace nnsim

TORCH_LIBRARY_IMPL(nnsim_fast, CUDA, m) {
  m.impl("sketch_hash", &nnsim::sketch_hash_cuda);
  m.impl("countsketch", &nnsim::countsketch_cuda);
  m.impl("countsketch_pair", &nnsim::countsketch_pair_cuda);
  m.impl("countsketch_pair_", &nnsim::countsketch_pair_inplace_cuda);
  m.impl("countsketch_backward", &nnsim::countsketch_backward_cuda);
  m.impl("hadamard_gram", &nnsim::hadamard_gram_cuda);
}
