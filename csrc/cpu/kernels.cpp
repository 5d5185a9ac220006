// CPU implementations of the nnsim_fast ops.
//
// Determinism: in the sketch ops every output element is written by exactly
// one thread, and the rows that feed it are added in row order, so results
// are bitwise identical for any thread count.  The scatter gives each thread a
// range of buckets (and column tiles when m is small); the backward gather and
// the hash parallelise over rows.  No atomics.  hadamard_gram tiles its output
// by shape alone and runs one single-threaded GEMM per tile (see
// hadamard_gram_cpu), so it too gives the same bits for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <array>
#include <vector>

#include "../checks.h"
#include "../hash.h"

namespace nnsim {
namespace {

// Rows whose entries a task gathers at a time (bounded thread-local lists).
constexpr int64_t kChunkRows = 16384;
// Rows hashed per block of a call (bounds the hash scratch to ~12 bytes x this x s).
constexpr int64_t kScatterBlockRows = 1 << 20;
constexpr int64_t kMinTileCols = 16;
// Below this many multiply-adds a call stays on the calling thread.
constexpr int64_t kSerialWork = 1 << 16;
constexpr int64_t kGramBlock = 128;

// Global rows wrap modulo 2^64 (unsigned arithmetic: defined behaviour); the
// hash works on 64-bit patterns, and the Python reference wraps the same way.
inline int64_t global_row(const int64_t* rows, int64_t offset, int64_t i) {
  return static_cast<int64_t>(static_cast<uint64_t>(offset) +
                              static_cast<uint64_t>(rows != nullptr ? rows[i] : i));
}

// Buckets and signed values (sign / sqrt(s)) of rows [0, n), s entries per row.
template <typename bucket_t, typename acc_t>
void hash_rows(const SketchHash& hash, const int64_t* rows, int64_t offset, int64_t n,
               bucket_t* bucket, acc_t* value, bool parallel) {
  const int s = hash.sparsity;
  const acc_t scale = static_cast<acc_t>(hash.scale);
  auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = global_row(rows, offset, i);
      for (int j = 0; j < s; ++j) {
        const uint64_t h = row_hash(hash.key[j], r);
        bucket[i * s + j] = static_cast<bucket_t>(hash_bucket(hash, j, h));
        value[i * s + j] = hash_negative(h) ? -scale : scale;
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, n, 16384, body);
  } else {
    body(0, n);
  }
}

// Work split of the scatter.  A task owns a contiguous range of buckets (one
// range per thread; column tiles as well when m < threads) and walks all rows
// in order, adding those that land in its range and prefetching the next one.
// Each row is thus read once, by its owner, in address order, and every output
// element has one owner and one summation order -- the row order -- whatever
// the number of threads.  The hashes are computed once per row beforehand, so
// a call opens two parallel regions in all.
struct Split {
  int64_t ranges;     // bucket ranges [r * m / ranges, (r + 1) * m / ranges)
  int64_t col_tiles;  // column tiles per input
};

Split make_split(int64_t m, int64_t df, int64_t dg) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ranges = std::min(m, threads);
  int64_t col_tiles = (threads + ranges - 1) / ranges;
  col_tiles = std::min(col_tiles, std::max<int64_t>(1, std::max(df, dg) / kMinTileCols));
  return {ranges, col_tiles};
}

// The inner loop out += v * x, compiled for several instruction sets; one is
// picked at load time from what the CPU supports, or from the environment
// variable NNSIM_FAST_CPU_CAPABILITY (avx512 | avx2 | default) so that tests
// can run every version on one machine.  -ffp-contract=off keeps the multiply
// and the add separately rounded in every version, so all give the same bits.
template <typename T>
inline void axpy_loop(T* __restrict out, const T* __restrict x, T v, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] += v * x[c];
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NNSIM_X86_VERSIONS 1
template <typename T>
__attribute__((target("avx512f"))) void axpy_avx512(T* __restrict out, const T* __restrict x,
                                                     T v, int64_t n) {
  axpy_loop(out, x, v, n);
}
template <typename T>
__attribute__((target("avx2"))) void axpy_avx2(T* __restrict out, const T* __restrict x, T v,
                                                int64_t n) {
  axpy_loop(out, x, v, n);
}
#endif

enum class Capability { kDefault, kAvx2, kAvx512 };

Capability detect_capability() {
  Capability best = Capability::kDefault;
#ifdef NNSIM_X86_VERSIONS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = Capability::kAvx2;
  if (__builtin_cpu_supports("avx512f")) best = Capability::kAvx512;
#endif
  const char* asked = std::getenv("NNSIM_FAST_CPU_CAPABILITY");
  if (asked == nullptr) return best;
  const std::string name(asked);
  const Capability wanted = name == "avx512" ? Capability::kAvx512
                            : name == "avx2" ? Capability::kAvx2
                                             : Capability::kDefault;
  return std::min(best, wanted);  // never a version the CPU cannot run
}

Capability capability() {
  static const Capability chosen = detect_capability();
  return chosen;
}

template <typename T>
void axpy(T* __restrict out, const T* __restrict x, T v, int64_t n) {
#ifdef NNSIM_X86_VERSIONS
  switch (capability()) {
    case Capability::kAvx512: return axpy_avx512(out, x, v, n);
    case Capability::kAvx2: return axpy_avx2(out, x, v, n);
    default: break;
  }
#endif
  axpy_loop(out, x, v, n);
}

template <typename in_t, typename acc_t>
inline void axpy_row(acc_t* __restrict out, const in_t* __restrict x, acc_t v, int64_t n) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    axpy(out, x, v, n);
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] += v * static_cast<acc_t>(x[c]);
  }
}

template <typename in_t>
inline void prefetch_row(const in_t* row, int64_t width, int64_t col_stride) {
  if (col_stride != 1) return;
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = width * static_cast<int64_t>(sizeof(in_t));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 0);
}

// Adds rows (entry e = row * s + block, rows relative to x) to their buckets.
template <typename in_t, typename acc_t>
void add_rows(const in_t* __restrict x, int64_t row_stride, int64_t col_stride,
              const int64_t* entry, int64_t count, int s, const int32_t* bucket,
              const acc_t* value, acc_t* acc, int64_t acc_cols, int64_t c0, int64_t width) {
  if (width <= 0) return;
  constexpr int64_t kAhead = 2;
  for (int64_t k = 0; k < count; ++k) {
    if (k + kAhead < count)
      prefetch_row(x + (entry[k + kAhead] / s) * row_stride + c0 * col_stride, width, col_stride);
    const int64_t e = entry[k];
    const in_t* __restrict x_row = x + (e / s) * row_stride + c0 * col_stride;
    acc_t* __restrict out = acc + static_cast<int64_t>(bucket[e]) * acc_cols + c0;
    const acc_t v = value[e];
    if (col_stride == 1) {
      axpy_row<in_t, acc_t>(out, x_row, v, width);
    } else {
      for (int64_t c = 0; c < width; ++c) out[c] += v * static_cast<acc_t>(x_row[c * col_stride]);
    }
  }
}

template <typename in_t, typename acc_t>
void accumulate_pair(at::Tensor& acc_f, at::Tensor& acc_g, const at::Tensor& f,
                     const at::Tensor* g, const int64_t* rows, const SketchHash& hash,
                     int64_t offset) {
  const int64_t n = f.size(0);
  const int64_t m = acc_f.size(0);
  const int64_t d[2] = {f.size(1), g != nullptr ? g->size(1) : 0};
  const int s = hash.sparsity;
  const in_t* x[2] = {f.const_data_ptr<in_t>(), g != nullptr ? g->const_data_ptr<in_t>() : nullptr};
  const int64_t row_stride[2] = {f.stride(0), g != nullptr ? g->stride(0) : 0};
  const int64_t col_stride[2] = {f.stride(1), g != nullptr ? g->stride(1) : 0};
  acc_t* out[2] = {acc_f.mutable_data_ptr<acc_t>(),
                   g != nullptr ? acc_g.mutable_data_ptr<acc_t>() : nullptr};
  // Small calls run on the calling thread: waking the pool costs more than they do.
  const bool small = n * s * (d[0] + d[1]) < kSerialWork;
  const Split split = small ? Split{1, 1} : make_split(m, d[0], d[1]);

  // One hash evaluation per (row, block), for blocks of rows at a time so the
  // scratch arrays stay bounded; buckets fit int32 (m < 2^31).  Every element
  // still sums its rows in row order, so the blocking does not change the bits.
  const int64_t block_rows = std::min(n, kScatterBlockRows);
  std::vector<int32_t> bucket(block_rows * s);
  std::vector<acc_t> value(block_rows * s);
  const int64_t tasks = split.ranges * split.col_tiles;
  for (int64_t start = 0; start < n; start += block_rows) {
    const int64_t rows_here = std::min(block_rows, n - start);
    hash_rows<int32_t, acc_t>(hash, rows != nullptr ? rows + start : nullptr,
                              rows != nullptr ? offset
                                              : static_cast<int64_t>(static_cast<uint64_t>(offset) +
                                                                     static_cast<uint64_t>(start)),
                              rows_here,
                              bucket.data(), value.data(), !small);
    auto run = [&](int64_t lo, int64_t hi) {
      std::vector<int64_t> list;
      list.reserve(std::min(rows_here, kChunkRows) * s);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t r = t / split.col_tiles, tile = t % split.col_tiles;
        const int64_t first = r * m / split.ranges, last = (r + 1) * m / split.ranges;
        for (int64_t begin = 0; begin < rows_here; begin += kChunkRows) {
          const int64_t end = std::min(rows_here, begin + kChunkRows);
          list.clear();
          for (int64_t e = begin * s; e < end * s; ++e) {
            const int64_t b = bucket[e];
            if (b >= first && b < last) list.push_back(e);
          }
          for (int k = 0; k < 2; ++k) {
            if (x[k] == nullptr) continue;
            const int64_t width = (d[k] + split.col_tiles - 1) / split.col_tiles;
            const int64_t c0 = tile * width;
            add_rows<in_t, acc_t>(x[k] + start * row_stride[k], row_stride[k], col_stride[k],
                                  list.data(), static_cast<int64_t>(list.size()), s,
                                  bucket.data(), value.data(), out[k], d[k], c0,
                                  std::min(width, d[k] - c0));
          }
        }
      }
    };
    if (small) {
      run(0, tasks);
    } else {
      at::parallel_for(0, tasks, 1, run);
    }
  }
}

const int64_t* rows_ptr(const std::optional<at::Tensor>& rows, at::Tensor& holder) {
  if (!rows.has_value()) return nullptr;
  holder = rows->contiguous();
  const int64_t* ids = holder.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < holder.numel(); ++i)
    TORCH_CHECK_VALUE(ids[i] >= 0, "rows must be non-negative row indices, got ", ids[i],
                      " at position ", i);
  return ids;
}

// acc_g / g may be absent (single-input countsketch): pass g == nullptr.
void accumulate_dispatch(at::Tensor& acc_f, at::Tensor& acc_g, const at::Tensor& f,
                         const at::Tensor* g, const std::optional<at::Tensor>& rows,
                         int64_t seed, int64_t offset, int64_t sparsity) {
  if (f.size(0) == 0) return;
  at::Tensor rows_holder;
  const int64_t* row_ids = rows_ptr(rows, rows_holder);
  const SketchHash hash =
      make_sketch_hash(static_cast<uint64_t>(seed), acc_f.size(0), static_cast<int>(sparsity));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "countsketch", [&] {
    using in_t = scalar_t;
    if (acc_f.scalar_type() == at::kDouble) {
      accumulate_pair<in_t, double>(acc_f, acc_g, f, g, row_ids, hash, offset);
    } else {
      accumulate_pair<in_t, float>(acc_f, acc_g, f, g, row_ids, hash, offset);
    }
  });
}

void countsketch_pair_inplace_cpu(at::Tensor acc_f, at::Tensor acc_g, const at::Tensor& f,
                                  const at::Tensor& g, int64_t seed, int64_t offset,
                                  int64_t sparsity, const std::optional<at::Tensor>& rows,
                                  bool /*deterministic: the CPU path always is*/) {
  check_pair(f, g);
  check_accumulators(acc_f, acc_g, f, g);
  check_sketch_args(acc_f.size(0), seed, offset, sparsity);
  check_rows(rows, f.size(0), f);
  accumulate_dispatch(acc_f, acc_g, f, &g, rows, seed, offset, sparsity);
}

std::tuple<at::Tensor, at::Tensor> countsketch_pair_cpu(const at::Tensor& f, const at::Tensor& g,
                                                        int64_t m, int64_t seed, int64_t offset,
                                                        int64_t sparsity,
                                                        const std::optional<at::Tensor>& rows,
                                                        bool deterministic) {
  check_pair(f, g);
  check_sketch_args(m, seed, offset, sparsity);
  const auto options = f.options().dtype(accumulate_dtype(f.scalar_type()));
  at::Tensor sketch_f = at::zeros({m, f.size(1)}, options);
  at::Tensor sketch_g = at::zeros({m, g.size(1)}, options);
  countsketch_pair_inplace_cpu(sketch_f, sketch_g, f, g, seed, offset, sparsity, rows,
                               deterministic);
  return {sketch_f, sketch_g};
}

at::Tensor countsketch_cpu(const at::Tensor& x, int64_t m, int64_t seed, int64_t offset,
                           int64_t sparsity, const std::optional<at::Tensor>& rows,
                           bool /*deterministic*/) {
  check_matrix(x, "x");
  check_sketch_args(m, seed, offset, sparsity);
  check_rows(rows, x.size(0), x);
  at::Tensor sketch = at::zeros({m, x.size(1)}, x.options().dtype(accumulate_dtype(x.scalar_type())));
  at::Tensor unused;
  accumulate_dispatch(sketch, unused, x, nullptr, rows, seed, offset, sparsity);
  return sketch;
}

at::Tensor countsketch_backward_cpu(const at::Tensor& grad_y, int64_t n, int64_t seed,
                                    int64_t offset, int64_t sparsity,
                                    const std::optional<at::Tensor>& rows) {
  check_matrix(grad_y, "grad_y");
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const int64_t m = grad_y.size(0);
  check_sketch_args(m, seed, offset, sparsity);
  check_rows(rows, n, grad_y);
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor grad_x = at::empty({n, gy.size(1)}, gy.options());
  if (n == 0 || gy.size(1) == 0) return grad_x;
  at::Tensor rows_holder;
  const int64_t* row_ids = rows_ptr(rows, rows_holder);
  const SketchHash hash = make_sketch_hash(static_cast<uint64_t>(seed), m, static_cast<int>(sparsity));
  const int64_t d = gy.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "countsketch_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = gy.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_x.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(hash.scale);
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> row(d);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = global_row(row_ids, offset, i);
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int j = 0; j < hash.sparsity; ++j) {
          const uint64_t h = row_hash(hash.key[j], r);
          const scalar_t* __restrict g_row = src + hash_bucket(hash, j, h) * d;
          const acc_t v = hash_negative(h) ? -scale : scale;
          for (int64_t c = 0; c < d; ++c) row[c] += v * static_cast<acc_t>(g_row[c]);
        }
        for (int64_t c = 0; c < d; ++c) dst[i * d + c] = static_cast<scalar_t>(row[c]);
      }
    });
  });
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> sketch_hash_cpu(const at::Tensor& rows, int64_t m, int64_t seed,
                                                   int64_t sparsity) {
  TORCH_CHECK_VALUE(rows.dim() == 1, "rows must be a 1-D tensor, got shape ", rows.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "rows must be int64, got ", rows.scalar_type());
  check_sketch_args(m, seed, 0, sparsity);
  const at::Tensor r = rows.contiguous();
  const int64_t n = r.size(0);
  at::Tensor buckets = at::empty({n, sparsity}, r.options());
  at::Tensor signs = at::empty({n, sparsity}, r.options().dtype(at::kFloat));
  const SketchHash hash = make_sketch_hash(static_cast<uint64_t>(seed), m, static_cast<int>(sparsity));
  hash_rows<int64_t, float>(hash, r.const_data_ptr<int64_t>(), 0, n,
                           buckets.mutable_data_ptr<int64_t>(), signs.mutable_data_ptr<float>(), true);
  // hash_rows stores sign / sqrt(s); report the bare sign.
  float* sign = signs.mutable_data_ptr<float>();
  for (int64_t k = 0; k < n * sparsity; ++k) sign[k] = sign[k] < 0 ? -1.0f : 1.0f;
  return {buckets, signs};
}

// Square block of the Gram tiling: a function of m only, so the tiling -- and
// with it every GEMM call and its bits -- never depends on the thread count.
int64_t gram_block(int64_t m) {
  if (m >= 2 * kGramBlock) return kGramBlock;
  return std::max<int64_t>(1, (m + 1) / 2);  // two blocks even for small m: work to share
}

// Lower triangle := upper triangle, so a square tile is symmetric bit for bit
// (the BLAS computes the two halves of X X^T by different instruction paths).
template <typename scalar_t>
void mirror_upper(scalar_t* tile, int64_t rows, int64_t stride) {
  for (int64_t i = 1; i < rows; ++i)
    for (int64_t j = 0; j < i; ++j) tile[i * stride + j] = tile[j * stride + i];
}

// (a a^T) o (b b^T) per batch element.  Only blocks on and above the diagonal
// are computed (the result is symmetric) and mirrored; diagonal blocks copy
// their upper triangle down, so the output is exactly symmetric on every path.
//
// Determinism: the tiling depends on the shapes only, and every tile is one
// single-threaded GEMM call -- each runs inside the parallel region, where the
// BLAS stays on the calling thread, and a call with a single task still opens
// the region (a second, empty task) rather than letting the BLAS spread one
// GEMM over the pool.  So the bits are the same for any thread count.
at::Tensor hadamard_gram_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_gram_inputs(a_in, b_in);
  // The op's backward is registered separately, so no graph is wanted in here;
  // detached inputs keep the out= GEMMs below legal on inputs that require grad,
  // also in the pool's threads, whose grad mode is not the caller's.
  const auto dtype = accumulate_dtype(a_in.scalar_type());
  const at::Tensor a = a_in.detach().to(dtype).contiguous();
  const at::Tensor b = b_in.detach().to(dtype).contiguous();
  const int64_t batch = a.size(0);
  const int64_t m = a.size(1);
  at::Tensor out = at::empty({batch, m, m}, a.options());
  if (batch == 0 || m == 0) return out;
  const int64_t block = gram_block(m);
  const int64_t blocks = (m + block - 1) / block;
  std::vector<std::array<int64_t, 3>> tasks;
  for (int64_t k = 0; k < batch; ++k)
    for (int64_t bi = 0; bi < blocks; ++bi)
      for (int64_t bj = bi; bj < blocks; ++bj) tasks.push_back({k, bi, bj});
  const int64_t count = static_cast<int64_t>(tasks.size());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "hadamard_gram", [&] {
    at::parallel_for(0, std::max<int64_t>(count, 2), 1, [&](int64_t lo, int64_t hi) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain kernels, no autograd
      for (int64_t t = lo; t < std::min(hi, count); ++t) {
        const auto [k, bi, bj] = tasks[t];
        const int64_t r0 = bi * block, rn = std::min(block, m - r0);
        const int64_t c0 = bj * block, cn = std::min(block, m - c0);
        const at::Tensor ak = a.select(0, k), bk = b.select(0, k);
        at::Tensor out_k = out.select(0, k);
        at::Tensor tile = out_k.narrow(0, r0, rn).narrow(1, c0, cn);
        at::mm_out(tile, ak.narrow(0, r0, rn), ak.narrow(0, c0, cn).t());
        tile.mul_(at::mm(bk.narrow(0, r0, rn), bk.narrow(0, c0, cn).t()));
        if (bi == bj) {
          mirror_upper(tile.data_ptr<scalar_t>(), rn, m);
        } else {
          out_k.narrow(0, c0, cn).narrow(1, r0, rn).copy_(tile.t());
        }
      }
    });
  });
  return out;
}

}  // namespace

const char* cpu_capability_name() {
  switch (capability()) {
    case Capability::kAvx512: return "avx512";
    case Capability::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace nnsim

TORCH_LIBRARY_IMPL(nnsim_fast, CPU, m) {
  m.impl("sketch_hash", &nnsim::sketch_hash_cpu);
  m.impl("countsketch", &nnsim::countsketch_cpu);
  m.impl("countsketch_pair", &nnsim::countsketch_pair_cpu);
  m.impl("countsketch_pair_", &nnsim::countsketch_pair_inplace_cpu);
  m.impl("countsketch_backward", &nnsim::countsketch_backward_cpu);
  m.impl("hadamard_gram", &nnsim::hadamard_gram_cpu);
}
