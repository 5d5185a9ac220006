// Argument checks shared by the CPU and CUDA bindings.  The Python wrappers in
// nnsim_fast/ops.py check the same things first with friendlier messages; these
// keep a direct torch.ops call from ever reaching a kernel with bad input.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include "hash.h"

namespace nnsim {

inline bool is_sketch_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// float16/bfloat16 accumulate (and come out) in float32; float32/float64 keep theirs.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_matrix(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be a 2-D [n, d] tensor, got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_sketch_dtype(x.scalar_type()), name,
                   " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
}

inline void check_sketch_args(int64_t m, int64_t seed, int64_t offset, int64_t sparsity) {
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxBuckets, "m must be in [1, ", kMaxBuckets, "], got ", m);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  TORCH_CHECK_VALUE(sparsity >= 1 && sparsity <= kMaxSparsity, "sparsity must be in [1, ",
                    kMaxSparsity, "], got ", sparsity);
  TORCH_CHECK_VALUE(m % sparsity == 0, "sparsity (", sparsity, ") must divide m (", m, ")");
}

inline void check_rows(const std::optional<at::Tensor>& rows, int64_t n, const at::Tensor& like) {
  if (!rows.has_value()) return;
  const at::Tensor& r = *rows;
  TORCH_CHECK_VALUE(r.dim() == 1 && r.size(0) == n, "rows must be a 1-D tensor of length ", n,
                    ", got shape ", r.sizes());
  TORCH_CHECK_TYPE(r.scalar_type() == at::kLong, "rows must be int64, got ", r.scalar_type());
  TORCH_CHECK_VALUE(r.device() == like.device(), "rows is on ", r.device(), " but the data is on ",
                    like.device());
}

inline void check_pair(const at::Tensor& f, const at::Tensor& g) {
  check_matrix(f, "f");
  check_matrix(g, "g");
  TORCH_CHECK_VALUE(f.size(0) == g.size(0), "f and g must have the same number of rows, got ",
                    f.sizes(), " and ", g.sizes());
  TORCH_CHECK_TYPE(f.scalar_type() == g.scalar_type(), "f and g must have the same dtype, got ",
                   f.scalar_type(), " and ", g.scalar_type());
  TORCH_CHECK_VALUE(f.device() == g.device(), "f is on ", f.device(), " but g is on ", g.device());
}

inline void check_accumulators(const at::Tensor& acc_f, const at::Tensor& acc_g,
                               const at::Tensor& f, const at::Tensor& g) {
  for (const auto& [acc, x, name] :
       {std::tuple<const at::Tensor&, const at::Tensor&, const char*>{acc_f, f, "acc_f"},
        std::tuple<const at::Tensor&, const at::Tensor&, const char*>{acc_g, g, "acc_g"}}) {
    TORCH_CHECK_VALUE(acc.dim() == 2 && acc.size(1) == x.size(1), name,
                      " must have shape [m, ", x.size(1), "], got ", acc.sizes());
    TORCH_CHECK_TYPE(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble, name,
                     " must be float32 or float64, got ", acc.scalar_type());
    TORCH_CHECK_VALUE(acc.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK_VALUE(acc.device() == x.device(), name, " is on ", acc.device(),
                      " but the data is on ", x.device());
  }
  TORCH_CHECK_VALUE(acc_f.size(0) == acc_g.size(0), "acc_f and acc_g must have the same m, got ",
                    acc_f.sizes(), " and ", acc_g.sizes());
  TORCH_CHECK_TYPE(acc_f.scalar_type() == acc_g.scalar_type(),
                   "acc_f and acc_g must have the same dtype, got ", acc_f.scalar_type(), " and ",
                   acc_g.scalar_type());
}

inline void check_gram_inputs(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3, "a and b must be 3-D [B, m, d], got ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_VALUE(a.size(0) == b.size(0) && a.size(1) == b.size(1),
                    "a and b must agree in B and m, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(is_sketch_dtype(a.scalar_type()) && a.scalar_type() == b.scalar_type(),
                   "a and b must share one floating dtype (float16, bfloat16, float32, float64), got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), "a is on ", a.device(), " but b is on ", b.device());
}

}  // namespace nnsim
