// Host-side entry points of the CUDA kernels.
//
// Plain C++ over raw device pointers, element strides and a stream: no ATen or
// torch types, so the kernels compile with nvcc alone (CI has no CUDA torch)
// and the torch binding (ops_cuda.cpp) stays a thin adapter.  Every launcher
// returns the first CUDA error it meets (cudaErrorInvalidValue for arguments
// it cannot serve) and never throws.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "../hash.h"

namespace nnsim {
namespace cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// A read-only matrix of rows x cols elements; strides are in elements and may
// be anything (zero, negative or overlapping strides included).
struct MatrixView {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  DType dtype = DType::kFloat32;
};

// Global row of local row i: offset + (row_ids ? row_ids[i] : i).
struct RowIndex {
  const int64_t* row_ids = nullptr;  // device pointer, n entries, or nullptr
  int64_t offset = 0;
};

// out_f += S f and out_g += S g for the m x n sketch S named by `hash`.
// The outputs are contiguous [m, f.cols] / [m, g.cols] arrays of `acc`
// (kFloat32 or kFloat64), 8-byte aligned.  Without g (has_g false) only f is
// sketched.  f and g share dtype and row count.
struct CountSketchArgs {
  MatrixView f;
  MatrixView g;
  bool has_g = false;
  RowIndex rows;
  SketchHash hash{};
  int64_t m = 0;
  void* out_f = nullptr;
  void* out_g = nullptr;
  DType acc = DType::kFloat32;
  // false: atomics straight into the outputs (fast, summation order varies);
  // true: rows grouped by bucket and summed in row order (bitwise reproducible).
  bool deterministic = false;
};

// Device scratch the call needs (0 for the atomic path).  The caller passes at
// least this many bytes, 256-byte aligned, to launch_countsketch.
size_t countsketch_workspace_bytes(const CountSketchArgs& args);

cudaError_t launch_countsketch(const CountSketchArgs& args, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream);

// grad_x[i] = sum_j sign_j(i) * scale * grad_y[bucket_j(i)] for i < n.
// grad_y: contiguous [m, d] of `dtype`; grad_x: contiguous [n, d] of `dtype`.
// Accumulates in float32 (float64 for float64).
cudaError_t launch_countsketch_backward(const void* grad_y, DType dtype, int64_t m, int64_t d,
                                        RowIndex rows, int64_t n, const SketchHash& hash,
                                        void* grad_x, cudaStream_t stream);

// buckets[i, j] and signs[i, j] (+-1) of the given global rows, j < hash.sparsity;
// both outputs are contiguous [n, s].
cudaError_t launch_sketch_hash(const int64_t* rows, int64_t n, const SketchHash& hash,
                               int64_t* buckets, float* signs, cudaStream_t stream);

// out[k] = (a[k] a[k]^T) o (b[k] b[k]^T) for k < batch.
// a: [batch, m, da], b: [batch, m, db], any element strides, same dtype.
// out: contiguous [batch, m, m] of float32 (float64 for float64 inputs).
struct GramArgs {
  const void* a = nullptr;
  const void* b = nullptr;
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t m = 0;
  int64_t da = 0;
  int64_t db = 0;
  int64_t a_strides[3] = {0, 0, 0};
  int64_t b_strides[3] = {0, 0, 0};
  void* out = nullptr;
};

cudaError_t launch_hadamard_gram(const GramArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace nnsim
