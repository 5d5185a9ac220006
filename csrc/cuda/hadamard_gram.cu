// Batched Hadamard Gram on CUDA: out[k] = (a_k a_k^T) o (b_k b_k^T).
//
// One block per 64 x 64 output tile on or above the diagonal (the result is
// symmetric) and per batch element.  The block accumulates the tile of
// a a^T in registers, then the tile of b b^T, multiplies them elementwise and
// stores the product once, at its place and, through a shared-memory
// transpose, at the mirrored place.  Neither Gram ever reaches device memory.
// 16-bit inputs are widened on load and accumulated in float32.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "common.cuh"
#include "launchers.h"

namespace nnsim {
namespace cuda {
namespace {

using detail::ceil_div;
using detail::Elem;
using detail::load_elem;

constexpr int kTile = 64;
constexpr int kTileK = 16;
constexpr int kGramThreads = 256;  // 16 x 16 threads, each a 4 x 4 micro tile
// Two resident blocks per SM as the floor: ptxas may then use ~115 registers
// for the two accumulator tiles and the unrolled k loop without spilling.
constexpr int kMicro = kTile / 16;
// Odd strides keep the transposed accesses free of bank conflicts.
constexpr int kPanelStride = kTile + 1;
constexpr int kResultStride = kTile + 1;
constexpr int kPanelElems = kTileK * kPanelStride;
constexpr int kResultElems = kTile * kResultStride;
constexpr int kSharedElems = 2 * kPanelElems > kResultElems ? 2 * kPanelElems : kResultElems;

struct GramParams {
  const void* a;
  const void* b;
  int64_t a_strides[3];
  int64_t b_strides[3];
  int64_t batch;
  int64_t m;
  int64_t da;
  int64_t db;
  int64_t tiles;  // per side
  void* out;
};

// First pair index of row t of the upper triangle of a tiles x tiles grid.
__device__ __forceinline__ int64_t triangle_row_start(int64_t t, int64_t tiles) {
  return t * tiles - t * (t - 1) / 2;
}

__device__ __forceinline__ void tile_pair(int64_t pair, int64_t tiles, int64_t& ti, int64_t& tj) {
  const double width = 2.0 * double(tiles) + 1.0;
  int64_t t = static_cast<int64_t>(0.5 * (width - sqrt(width * width - 8.0 * double(pair))));
  if (t < 0) t = 0;
  if (t > tiles - 1) t = tiles - 1;
  // The floating-point guess can be one off either way.
  while (t > 0 && triangle_row_start(t, tiles) > pair) --t;
  while (t + 1 < tiles && triangle_row_start(t + 1, tiles) <= pair) ++t;
  ti = t;
  tj = t + (pair - triangle_row_start(t, tiles));
}

// acc[a][b] = sum_k x[row_i + ty + 16a, k] * x[row_j + tx + 16b, k].  Ends
// with a barrier, so the panels are free afterwards.
template <typename T, typename A>
__device__ __forceinline__ void gram_tile(const T* x, int64_t row_stride, int64_t col_stride,
                                          int64_t m, int64_t depth, int64_t row_i, int64_t row_j,
                                          bool diagonal, A* panel_i, A* panel_j,
                                          A (&acc)[kMicro][kMicro]) {
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;
#pragma unroll
  for (int a = 0; a < kMicro; ++a) {
#pragma unroll
    for (int b = 0; b < kMicro; ++b) acc[a][b] = A(0);
  }
  // Loads: 16 consecutive threads read 16 consecutive k of one row.
  const int load_k = threadIdx.x & 15;
  const int load_r = threadIdx.x >> 4;
  const A* other = diagonal ? panel_i : panel_j;
  for (int64_t k0 = 0; k0 < depth; k0 += kTileK) {
    const int64_t k = k0 + load_k;
    const bool k_ok = k < depth;
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const int r = load_r + 16 * q;
      const int64_t gi = row_i + r;
      panel_i[load_k * kPanelStride + r] =
          k_ok && gi < m ? load_elem<T, A>(x, gi * row_stride + k * col_stride) : A(0);
      if (!diagonal) {
        const int64_t gj = row_j + r;
        panel_j[load_k * kPanelStride + r] =
            k_ok && gj < m ? load_elem<T, A>(x, gj * row_stride + k * col_stride) : A(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      A ai[kMicro];
      A aj[kMicro];
#pragma unroll
      for (int q = 0; q < kMicro; ++q) {
        ai[q] = panel_i[kk * kPanelStride + ty + 16 * q];
        aj[q] = other[kk * kPanelStride + tx + 16 * q];
      }
#pragma unroll
      for (int a = 0; a < kMicro; ++a) {
#pragma unroll
        for (int b = 0; b < kMicro; ++b) acc[a][b] = acc[a][b] + ai[a] * aj[b];
      }
    }
    __syncthreads();
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kGramThreads, 2)
    hadamard_gram_kernel(const __grid_constant__ GramParams p) {
  __shared__ __align__(16) unsigned char shared_raw[kSharedElems * sizeof(A)];
  A* panel_i = reinterpret_cast<A*>(shared_raw);
  A* panel_j = panel_i + kPanelElems;
  A* result = panel_i;  // reused once both Grams are in registers

  int64_t ti;
  int64_t tj;
  tile_pair(blockIdx.x, p.tiles, ti, tj);
  const int64_t row_i = ti * kTile;
  const int64_t row_j = tj * kTile;
  const bool diagonal = ti == tj;
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;
  const int64_t m = p.m;

  for (int64_t k = blockIdx.y; k < p.batch; k += gridDim.y) {
    A gram_a[kMicro][kMicro];
    A gram_b[kMicro][kMicro];
    gram_tile<T, A>(static_cast<const T*>(p.a) + k * p.a_strides[0], p.a_strides[1],
                    p.a_strides[2], m, p.da, row_i, row_j, diagonal, panel_i, panel_j, gram_a);
    gram_tile<T, A>(static_cast<const T*>(p.b) + k * p.b_strides[0], p.b_strides[1],
                    p.b_strides[2], m, p.db, row_i, row_j, diagonal, panel_i, panel_j, gram_b);
    // gram_tile ends with a barrier (or touched no shared memory at all).
#pragma unroll
    for (int a = 0; a < kMicro; ++a) {
#pragma unroll
      for (int b = 0; b < kMicro; ++b) {
        result[(ty + 16 * a) * kResultStride + tx + 16 * b] = gram_a[a][b] * gram_b[a][b];
      }
    }
    __syncthreads();
    A* out = static_cast<A*>(p.out) + k * m * m;
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kGramThreads) {
      const int r = idx / kTile;
      const int c = idx % kTile;
      if (row_i + r < m && row_j + c < m) {
        out[(row_i + r) * m + row_j + c] = result[r * kResultStride + c];
      }
      if (!diagonal && row_j + r < m && row_i + c < m) {
        out[(row_j + r) * m + row_i + c] = result[c * kResultStride + r];
      }
    }
    __syncthreads();
  }
}

template <typename T, typename A>
cudaError_t launch_gram(const GramArgs& args, cudaStream_t stream) {
  GramParams p{};
  p.a = args.a;
  p.b = args.b;
  for (int i = 0; i < 3; ++i) {
    p.a_strides[i] = args.a_strides[i];
    p.b_strides[i] = args.b_strides[i];
  }
  p.batch = args.batch;
  p.m = args.m;
  p.da = args.da;
  p.db = args.db;
  p.tiles = ceil_div(args.m, kTile);
  p.out = args.out;
  const int64_t pairs = p.tiles * (p.tiles + 1) / 2;
  if (pairs > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const int64_t batch_blocks = args.batch < 65535 ? args.batch : 65535;
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(batch_blocks));
  hadamard_gram_kernel<T, A><<<grid, kGramThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_hadamard_gram(const GramArgs& args, cudaStream_t stream) {
  if (args.batch < 0 || args.m < 0 || args.da < 0 || args.db < 0) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.m == 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_gram<__half, float>(args, stream);
    case DType::kBFloat16:
      return launch_gram<__nv_bfloat16, float>(args, stream);
    case DType::kFloat32:
      return launch_gram<float, float>(args, stream);
    case DType::kFloat64:
      return launch_gram<double, double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace nnsim
