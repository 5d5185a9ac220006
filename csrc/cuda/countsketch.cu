// CUDA CountSketch: the fused pair scatter (an atomic path and a bitwise
// reproducible path), the backward gather, and the hash of given rows.
//
// Work layout shared by the scatter and the gather: a "group" of G lanes
// (G a power of two <= 32, chosen from the row width) owns one row at a time.
// Lane j < s of the group hashes block j of the row once; the others receive
// each (bucket, signed scale) by shuffle.  A lane moves 16-byte units of the
// row (vector loads when the layout allows, strided scalar loads otherwise),
// several units in flight before the first use.
//
// Atomic path: atomics into the m x d outputs.  When m is small, many rows hit
// the same few output rows at once and global atomics serialise in L2; a block
// then owns an m x tile slice of the output in shared memory for a whole chunk
// of rows and flushes it with one atomic per element.
//
// Deterministic path: a stable LSD radix sort of the (row, block) entries by
// bucket (8 bits a pass, per-tile histograms, an exclusive scan, and a scatter
// whose in-tile ranks follow entry order), so each bucket lists its rows in
// row order.  Each bucket's list is cut into pieces of fixed length; a thread
// sums one piece of one column in list order, and the pieces of one bucket are
// then added by a tree of fixed fan-in, one level per launch.  Every cut, every
// tree and every order depends only on the sizes and the hash, so the bits are
// the same on every run.  All counts and offsets are int64; nothing is limited
// to 2^31 entries.
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace nnsim {
namespace cuda {
namespace {

using detail::aligned16;
using detail::ceil_div;
using detail::Elem;
using detail::load_elem;

constexpr int kThreads = 256;
// The scatter kernels declare one resident block as their floor: ptxas then
// keeps their working set in registers (about 100) instead of spilling to
// reach a higher occupancy; two such blocks per SM still keep 32 KB of loads
// in flight, enough to cover DRAM latency.
// Shared-memory budget of one privatised output tile (no opt-in needed).
constexpr int64_t kSharedTileBytes = 48 * 1024;
// Narrower tiles make the flush cost dominate; use global atomics instead.
constexpr int64_t kMinSharedTileCols = 64;
// Below this many (row, block) entries per output row the flush of a shared
// tile costs as much as the atomics it saves.
constexpr int64_t kSharedMinEntriesPerBucket = 4;

// 16-byte units a lane keeps in flight per input matrix: two, unless two
// units would need more than 32 bytes of accumulator registers.
__host__ __device__ constexpr int units_per_lane(int elem_bytes, int acc_bytes) {
  return (16 / elem_bytes) * acc_bytes > 32 ? 1 : 2;
}

int group_log2_for(int64_t units_per_row, int units_per_lane_count) {
  const int64_t lanes_needed = ceil_div(units_per_row, units_per_lane_count);
  int log2 = 0;
  while (log2 < 5 && (int64_t(1) << log2) < lanes_needed) ++log2;
  return log2;
}

struct Range {
  int64_t begin;
  int64_t end;
};

struct ScatterParams {
  const void* f;
  int64_t f_row_stride;
  int64_t f_col_stride;
  int64_t df;
  const void* g;
  int64_t g_row_stride;
  int64_t g_col_stride;
  int64_t dg;
  int64_t n;
  int64_t m;
  const int64_t* row_ids;
  int64_t offset;
  void* out_f;
  void* out_g;
  int group_log2;
  bool vec_f;       // 16-byte loads of f
  bool vec_g;
  bool vec_out_f;   // float4 atomics into out_f (sm_90)
  bool vec_out_g;
  // Shared-tile path: tile_cols == 0 means one tile holding all of f and g.
  int64_t tile_cols;
  int64_t f_tiles;
  int64_t tiles;
  int64_t rows_per_chunk;
  SketchHash hash;
};

__device__ __forceinline__ int64_t global_row_of(const int64_t* row_ids, int64_t offset,
                                                 int64_t row) {
  // Wraps modulo 2^64 like the CPU and the Python reference (unsigned: defined).
  return static_cast<int64_t>(static_cast<uint64_t>(offset) +
                              static_cast<uint64_t>(row_ids != nullptr ? row_ids[row] : row));
}

// Block j of a row: its bucket and its signed scale.  Slots j >= s get a zero
// scale so that a shuffle from them is harmless.
template <typename A>
__device__ __forceinline__ void hash_slot(const SketchHash& hash, int64_t global_row, int j,
                                          int64_t& bucket, A& factor) {
  if (j < hash.sparsity) {
    const uint64_t h = row_hash(hash.key[j], global_row);
    bucket = hash_bucket(hash, j, h);
    const A scale = static_cast<A>(hash.scale);
    factor = hash_negative(h) ? -scale : scale;
  } else {
    bucket = 0;
    factor = A(0);
  }
}

// Loads columns [col, col + V) of a row, clipped to `end` (zeros beyond).
// kStream marks data read exactly once: it should not evict the outputs that
// the atomics keep hot in L2.
template <typename T, typename A, bool kStream>
__device__ __forceinline__ void load_unit(const T* row, int64_t col, int64_t end,
                                          int64_t col_stride, bool vec,
                                          A (&v)[Elem<T>::kPerUnit]) {
  constexpr int V = Elem<T>::kPerUnit;
  if (vec && col + V <= end) {
    const int4* p = reinterpret_cast<const int4*>(row + col);
    const int4 raw = kStream ? __ldcs(p) : __ldg(p);
    Elem<T>::template unpack<A>(raw, v);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      v[e] = col + e < end ? load_elem<T, A>(row, (col + e) * col_stride) : A(0);
    }
  }
}

// dst[e] += factor * v[e] for e < min(V, valid).
template <typename A, int V, bool kShared>
__device__ __forceinline__ void add_unit(A* dst, int64_t valid, A factor, const A (&v)[V],
                                         bool vec_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (!kShared && std::is_same<A, float>::value && V % 4 == 0) {
    if (vec_out && valid >= V) {
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        atomicAdd(reinterpret_cast<float4*>(dst) + q,
                  make_float4(factor * v[4 * q], factor * v[4 * q + 1], factor * v[4 * q + 2],
                              factor * v[4 * q + 3]));
      }
      return;
    }
  }
#endif
  (void)vec_out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (e < valid) atomicAdd(dst + e, factor * v[e]);
  }
}

// The row loop of a group: rows first_row, first_row + row_step, ... < end_row;
// columns fr of f and gr of g.  Destination row b of f starts at
// dst_f + b * dst_f_cols, and column c lands at (c - dst_f_origin).
template <typename T, typename A, bool kShared>
__device__ __forceinline__ void scatter_rows(const ScatterParams& p, int64_t first_row,
                                             int64_t end_row, int64_t row_step, Range fr,
                                             Range gr, A* dst_f, int64_t dst_f_cols,
                                             int64_t dst_f_origin, A* dst_g, int64_t dst_g_cols,
                                             int64_t dst_g_origin) {
  constexpr int V = Elem<T>::kPerUnit;
  constexpr int U = units_per_lane(sizeof(T), sizeof(A));
  const int group = 1 << p.group_log2;
  const int lane = threadIdx.x & 31;
  const int slot = lane & (group - 1);
  const unsigned mask =
      group == 32 ? 0xFFFFFFFFu : (((1u << group) - 1u) << (lane & ~(group - 1)));
  const int s = p.hash.sparsity;
  const int rounds = (s + group - 1) >> p.group_log2;
  const int64_t units_f = ceil_div(fr.end - fr.begin, V);
  const int64_t units_g = ceil_div(gr.end - gr.begin, V);
  const int64_t per_pass = int64_t(U) * group;
  const int64_t passes_f = ceil_div(units_f, per_pass);
  const int64_t passes_g = ceil_div(units_g, per_pass);
  const int64_t passes = passes_f > passes_g ? passes_f : passes_g;
  const T* f = static_cast<const T*>(p.f);
  const T* g = static_cast<const T*>(p.g);

  for (int64_t row = first_row; row < end_row; row += row_step) {
    const int64_t global_row = global_row_of(p.row_ids, p.offset, row);
    int64_t bucket = 0;
    A factor = A(0);
    if (rounds == 1) hash_slot(p.hash, global_row, slot, bucket, factor);
    const T* f_row = units_f > 0 ? f + row * p.f_row_stride : f;
    const T* g_row = units_g > 0 ? g + row * p.g_row_stride : g;
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int64_t first_unit = pass * per_pass + slot;
      A fv[U][V];
      A gv[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t unit = first_unit + int64_t(u) * group;
        load_unit<T, A, true>(f_row, unit < units_f ? fr.begin + unit * V : fr.end, fr.end,
                              p.f_col_stride, p.vec_f, fv[u]);
        load_unit<T, A, true>(g_row, unit < units_g ? gr.begin + unit * V : gr.end, gr.end,
                              p.g_col_stride, p.vec_g, gv[u]);
      }
      for (int r = 0; r < rounds; ++r) {
        if (rounds > 1) hash_slot(p.hash, global_row, r * group + slot, bucket, factor);
        const int count = s - r * group < group ? s - r * group : group;
        for (int k = 0; k < count; ++k) {
          const int64_t b = __shfl_sync(mask, static_cast<long long>(bucket), k, group);
          const A fac = __shfl_sync(mask, factor, k, group);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t unit = first_unit + int64_t(u) * group;
            if (unit < units_f) {
              const int64_t col = fr.begin + unit * V;
              add_unit<A, V, kShared>(dst_f + b * dst_f_cols + (col - dst_f_origin), fr.end - col,
                                      fac, fv[u], p.vec_out_f);
            }
            if (unit < units_g) {
              const int64_t col = gr.begin + unit * V;
              add_unit<A, V, kShared>(dst_g + b * dst_g_cols + (col - dst_g_origin), gr.end - col,
                                      fac, gv[u], p.vec_out_g);
            }
          }
        }
      }
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    scatter_global_kernel(const __grid_constant__ ScatterParams p) {
  const int64_t group = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> p.group_log2;
  const int64_t groups = (int64_t(gridDim.x) * kThreads) >> p.group_log2;
  scatter_rows<T, A, false>(p, group, p.n, groups, Range{0, p.df}, Range{0, p.dg},
                            static_cast<A*>(p.out_f), p.df, 0, static_cast<A*>(p.out_g), p.dg,
                            0);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    scatter_shared_kernel(const __grid_constant__ ScatterParams p) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  A* tile = reinterpret_cast<A*>(shared_raw);
  const int64_t tile_id = int64_t(blockIdx.x) % p.tiles;
  const int64_t chunk = int64_t(blockIdx.x) / p.tiles;
  Range fr{0, 0};
  Range gr{0, 0};
  if (p.tile_cols == 0) {
    fr.end = p.df;
    gr.end = p.dg;
  } else if (tile_id < p.f_tiles) {
    fr.begin = tile_id * p.tile_cols;
    fr.end = fr.begin + p.tile_cols < p.df ? fr.begin + p.tile_cols : p.df;
  } else {
    gr.begin = (tile_id - p.f_tiles) * p.tile_cols;
    gr.end = gr.begin + p.tile_cols < p.dg ? gr.begin + p.tile_cols : p.dg;
  }
  const int fw = static_cast<int>(fr.end - fr.begin);
  const int gw = static_cast<int>(gr.end - gr.begin);
  const int f_entries = static_cast<int>(p.m) * fw;
  const int entries = f_entries + static_cast<int>(p.m) * gw;
  A* tile_f = tile;
  A* tile_g = tile + f_entries;
  for (int k = threadIdx.x; k < entries; k += kThreads) tile[k] = A(0);
  __syncthreads();

  const int64_t row_begin = chunk * p.rows_per_chunk;
  const int64_t row_end = row_begin + p.rows_per_chunk < p.n ? row_begin + p.rows_per_chunk : p.n;
  scatter_rows<T, A, true>(p, row_begin + (threadIdx.x >> p.group_log2), row_end,
                           kThreads >> p.group_log2, fr, gr, tile_f, fw, fr.begin, tile_g, gw,
                           gr.begin);
  __syncthreads();

  // Zeros are skipped: adding them would change nothing but cost an atomic.
  A* out_f = static_cast<A*>(p.out_f);
  A* out_g = static_cast<A*>(p.out_g);
  for (int k = threadIdx.x; k < f_entries; k += kThreads) {
    const A v = tile_f[k];
    if (v != A(0)) atomicAdd(out_f + int64_t(k / fw) * p.df + fr.begin + k % fw, v);
  }
  for (int k = threadIdx.x; k < entries - f_entries; k += kThreads) {
    const A v = tile_g[k];
    if (v != A(0)) atomicAdd(out_g + int64_t(k / gw) * p.dg + gr.begin + k % gw, v);
  }
}

// ---------------------------------------------------------------- deterministic path

constexpr int kScanThreads = 256;
constexpr int kScanMaxBlocks = 1024;
constexpr int kSortThreads = 256;  // one thread per 8-bit digit value
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kSortItems = 8;
constexpr int64_t kSortTile = int64_t(kSortThreads) * kSortItems;
constexpr int kMaxSortBlocks = 65535;
// Bucket counts are privatised in shared memory up to this many buckets.
constexpr int64_t kPrivateCountBuckets = 8192;
// Entries per piece of a bucket list: at least this many ...
constexpr int64_t kMinPieceLength = 256;
// ... and long enough that partial sums of multi-piece buckets stay below this
// many accumulator elements.
constexpr double kPartialBudget = double(int64_t(1) << 25);
constexpr int kReduceThreads = 256;

struct EntryParams {
  const int64_t* row_ids;
  int64_t offset;
  SketchHash hash;
};

// Entry e is block j = e % s of local row e / s.
__device__ __forceinline__ uint64_t entry_hash(const EntryParams& p, int64_t e, int64_t& row,
                                               int& block) {
  const int s = p.hash.sparsity;
  if (s == 1) {
    row = e;
    block = 0;
  } else {
    row = e / s;
    block = static_cast<int>(e - row * s);
  }
  return row_hash(p.hash.key[block], global_row_of(p.row_ids, p.offset, row));
}

__device__ __forceinline__ int64_t entry_bucket(const EntryParams& p, int64_t e) {
  int64_t row;
  int block;
  const uint64_t h = entry_hash(p, e, row, block);
  return hash_bucket(p.hash, block, h);
}

// Inclusive scan across a block; `total` receives the block's sum.  `scratch`
// holds one value per warp.  Every thread of the block must call it.
template <int kBlock>
__device__ __forceinline__ int64_t block_inclusive_scan(int64_t v, int64_t* scratch,
                                                        int64_t& total) {
  constexpr int kWarps = kBlock / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t up = __shfl_up_sync(0xFFFFFFFFu, static_cast<long long>(v), o);
    if (lane >= o) v += up;
  }
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < kWarps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t up = __shfl_up_sync(0xFFFFFFFFu, static_cast<long long>(w), o);
      if (lane >= o) w += up;
    }
    if (lane < kWarps) scratch[lane] = w;
  }
  __syncthreads();
  const int64_t before = warp > 0 ? scratch[warp - 1] : 0;
  total = scratch[kWarps - 1];
  __syncthreads();
  return v + before;
}

__global__ void __launch_bounds__(kScanThreads)
    scan_block_sums_kernel(const int64_t* data, int64_t n, int64_t per_block, int64_t* sums) {
  __shared__ int64_t scratch[kScanThreads / 32];
  const int64_t begin = int64_t(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < n ? begin + per_block : n;
  int64_t sum = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kScanThreads) sum += data[i];
  int64_t total;
  block_inclusive_scan<kScanThreads>(sum, scratch, total);
  if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kScanMaxBlocks)
    scan_top_kernel(int64_t* sums, int count) {
  __shared__ int64_t scratch[kScanMaxBlocks / 32];
  const int64_t v = int(threadIdx.x) < count ? sums[threadIdx.x] : 0;
  int64_t total;
  const int64_t inclusive = block_inclusive_scan<kScanMaxBlocks>(v, scratch, total);
  if (int(threadIdx.x) < count) sums[threadIdx.x] = inclusive - v;
}

__global__ void __launch_bounds__(kScanThreads)
    scan_apply_kernel(int64_t* data, int64_t n, int64_t per_block, const int64_t* sums) {
  __shared__ int64_t scratch[kScanThreads / 32];
  const int64_t begin = int64_t(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < n ? begin + per_block : n;
  int64_t carry = sums[blockIdx.x];
  for (int64_t base = begin; base < end; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < end ? data[i] : 0;
    int64_t total;
    const int64_t inclusive = block_inclusive_scan<kScanThreads>(v, scratch, total);
    if (i < end) data[i] = carry + inclusive - v;
    carry += total;
  }
}

// In-place exclusive prefix sum of n int64 values; `sums` holds kScanMaxBlocks.
cudaError_t exclusive_scan(int64_t* data, int64_t n, int64_t* sums, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  int64_t blocks = ceil_div(n, int64_t(kScanThreads) * 8);
  if (blocks > kScanMaxBlocks) blocks = kScanMaxBlocks;
  const int64_t per_block = ceil_div(n, blocks);
  blocks = ceil_div(n, per_block);
  scan_block_sums_kernel<<<static_cast<unsigned>(blocks), kScanThreads, 0, stream>>>(
      data, n, per_block, sums);
  scan_top_kernel<<<1, kScanMaxBlocks, 0, stream>>>(sums, static_cast<int>(blocks));
  scan_apply_kernel<<<static_cast<unsigned>(blocks), kScanThreads, 0, stream>>>(data, n,
                                                                                 per_block, sums);
  return cudaGetLastError();
}

// counts[b] = number of entries in bucket b.  Order does not matter here, so
// plain atomics are fine; with few buckets they are privatised per block.
__global__ void __launch_bounds__(kThreads)
    bucket_count_kernel(const __grid_constant__ EntryParams p, int64_t entries, int64_t m,
                        bool privatised, unsigned long long* counts) {
  extern __shared__ unsigned int local_counts[];
  if (privatised) {
    for (int64_t b = threadIdx.x; b < m; b += kThreads) local_counts[b] = 0;
    __syncthreads();
  }
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < entries; e += stride) {
    const int64_t b = entry_bucket(p, e);
    if (privatised) {
      atomicAdd(local_counts + b, 1u);
    } else {
      atomicAdd(counts + b, 1ull);
    }
  }
  if (privatised) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < m; b += kThreads) {
      if (local_counts[b] != 0) {
        atomicAdd(counts + b, static_cast<unsigned long long>(local_counts[b]));
      }
    }
  }
}

// From bucket sizes: pieces per bucket, and partial-sum slots for buckets of
// more than one piece.  Entry m of each array is zeroed so that the exclusive
// scans end with the totals.
__global__ void __launch_bounds__(kThreads)
    piece_count_kernel(int64_t* counts, int64_t m, int64_t piece_length, int64_t* pieces,
                       int64_t* slots) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x; b <= m; b += stride) {
    if (b == m) {
      counts[b] = 0;
      pieces[b] = 0;
      slots[b] = 0;
    } else {
      const int64_t k = ceil_div(counts[b], piece_length);
      pieces[b] = k;
      slots[b] = k > 1 ? k : 0;
    }
  }
}

__device__ __forceinline__ int sort_digit(int64_t bucket, int shift) {
  return static_cast<int>((bucket >> shift) & 255);
}

// Per-tile digit histograms, digit-major (hist[digit * tiles + tile]) so that
// one exclusive scan yields every (digit, tile) output offset.
__global__ void __launch_bounds__(kSortThreads)
    radix_histogram_kernel(const __grid_constant__ EntryParams p, const int64_t* in,
                           int64_t entries, int shift, int64_t tiles, int64_t* hist) {
  __shared__ unsigned int counts[256];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    counts[threadIdx.x] = 0;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSortItems; ++k) {
      const int64_t pos = tile * kSortTile + int64_t(k) * kSortThreads + threadIdx.x;
      if (pos < entries) {
        const int64_t e = in != nullptr ? in[pos] : pos;
        atomicAdd(counts + sort_digit(entry_bucket(p, e), shift), 1u);
      }
    }
    __syncthreads();
    hist[int64_t(threadIdx.x) * tiles + tile] = counts[threadIdx.x];
    __syncthreads();
  }
}

// Stable scatter of one radix pass.  Entries of a tile are ranked in entry
// order: round k takes positions k * 256 + thread, lanes of a warp agree on
// equal digits with __match_any_sync, and per-digit counters carry the ranks
// across warps and rounds.  The last pass writes the row index (bitwise
// complemented when the sign is negative) instead of the entry.
__global__ void __launch_bounds__(kSortThreads)
    radix_scatter_kernel(const __grid_constant__ EntryParams p, const int64_t* in, int64_t* out,
                         int64_t entries, int shift, int64_t tiles, const int64_t* offsets,
                         bool last) {
  __shared__ int64_t base[256];
  __shared__ unsigned int running[256];
  __shared__ unsigned int warp_counts[kSortWarps][256];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    base[threadIdx.x] = offsets[int64_t(threadIdx.x) * tiles + tile];
    running[threadIdx.x] = 0;
    for (int k = 0; k < kSortItems; ++k) {
      const int64_t pos = tile * kSortTile + int64_t(k) * kSortThreads + threadIdx.x;
      const bool valid = pos < entries;
      int64_t e = 0;
      int64_t row = 0;
      int digit = 256;  // invalid lanes form a group of their own
      bool negative = false;
      if (valid) {
        e = in != nullptr ? in[pos] : pos;
        int block;
        const uint64_t h = entry_hash(p, e, row, block);
        digit = sort_digit(hash_bucket(p.hash, block, h), shift);
        negative = hash_negative(h);
      }
#pragma unroll
      for (int w = 0; w < kSortWarps; ++w) warp_counts[w][threadIdx.x] = 0;
      __syncthreads();
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
      const unsigned rank = __popc(peers & lanes_below);
      if (valid && rank == 0) warp_counts[warp][digit] = __popc(peers);
      __syncthreads();
      {
        unsigned int acc = running[threadIdx.x];
#pragma unroll
        for (int w = 0; w < kSortWarps; ++w) {
          const unsigned int c = warp_counts[w][threadIdx.x];
          warp_counts[w][threadIdx.x] = acc;
          acc += c;
        }
        running[threadIdx.x] = acc;
      }
      __syncthreads();
      if (valid) {
        const int64_t dst = base[digit] + warp_counts[warp][digit] + rank;
        out[dst] = last ? (negative ? ~row : row) : e;
      }
      __syncthreads();
    }
  }
}

struct ReduceParams {
  const void* f;
  int64_t f_row_stride;
  int64_t f_col_stride;
  int64_t df;
  const void* g;
  int64_t g_row_stride;
  int64_t g_col_stride;
  int64_t dg;
  const int64_t* sorted;        // rows in bucket order, ~row for negative signs
  const int64_t* bucket_start;  // m + 1
  const int64_t* piece_start;   // m + 1
  const int64_t* slot_start;    // m + 1
  int64_t m;
  int64_t piece_length;
  int64_t max_pieces;
  void* out_f;
  void* out_g;
  void* partial;  // [slots, df + dg]
  double scale;
};

template <typename T, typename A>
__device__ __forceinline__ A sum_piece(const int64_t* sorted, int64_t k0, int64_t k1, const T* x,
                                       int64_t row_stride, int64_t col_offset, A scale) {
  A acc = A(0);
  int64_t k = k0;
  // Loads of four entries are issued before their (ordered) additions.
  for (; k + 4 <= k1; k += 4) {
    int64_t e[4];
    A v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) e[q] = __ldg(sorted + k + q);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t row = e[q] < 0 ? ~e[q] : e[q];
      v[q] = load_elem<T, A>(x, row * row_stride + col_offset);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) acc = acc + (e[q] < 0 ? -scale : scale) * v[q];
  }
  for (; k < k1; ++k) {
    const int64_t e = __ldg(sorted + k);
    const int64_t row = e < 0 ? ~e : e;
    acc = acc + (e < 0 ? -scale : scale) * load_elem<T, A>(x, row * row_stride + col_offset);
  }
  return acc;
}

// One block per piece (grid-stride), threads over the columns of f then g.
// A bucket of one piece is owned by this thread alone and is added directly;
// otherwise the piece's sum goes to its partial slot.
template <typename T, typename A>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_pieces_kernel(const __grid_constant__ ReduceParams p) {
  const int64_t total_pieces = p.piece_start[p.m];
  const int64_t cols = p.df + p.dg;
  const A scale = static_cast<A>(p.scale);
  for (int64_t piece = blockIdx.x; piece < total_pieces; piece += gridDim.x) {
    int64_t lo = 0;
    int64_t hi = p.m;  // piece_start[lo] <= piece < piece_start[hi]
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (p.piece_start[mid] <= piece) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const int64_t bucket = lo;
    const int64_t first_piece = p.piece_start[bucket];
    const int64_t pieces = p.piece_start[bucket + 1] - first_piece;
    const int64_t k0 = p.bucket_start[bucket] + (piece - first_piece) * p.piece_length;
    const int64_t k_end = p.bucket_start[bucket + 1];
    const int64_t k1 = k0 + p.piece_length < k_end ? k0 + p.piece_length : k_end;
    for (int64_t col = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; col < cols;
         col += int64_t(gridDim.y) * blockDim.x) {
      const bool in_f = col < p.df;
      const int64_t c = in_f ? col : col - p.df;
      const A sum =
          in_f ? sum_piece<T, A>(p.sorted, k0, k1, static_cast<const T*>(p.f), p.f_row_stride,
                                 c * p.f_col_stride, scale)
               : sum_piece<T, A>(p.sorted, k0, k1, static_cast<const T*>(p.g), p.g_row_stride,
                                 c * p.g_col_stride, scale);
      if (pieces == 1) {
        A* dst = in_f ? static_cast<A*>(p.out_f) + bucket * p.df + c
                      : static_cast<A*>(p.out_g) + bucket * p.dg + c;
        *dst = *dst + sum;
      } else {
        static_cast<A*>(p.partial)[(p.slot_start[bucket] + piece - first_piece) * cols + col] = sum;
      }
    }
  }
}

// The partial sums of a bucket of c > 1 pieces sit in its c slots, in piece
// order.  They are added by a tree of fan-in kCombineFanIn, one launch per
// level: at the level of stride S the live values of a bucket are slots
// 0, S, 2S, ... (relative to its first slot); group g adds live values
// gK .. gK + K - 1 in that order and leaves the sum in the group's first slot,
// or adds it to the output when the bucket has one group left.  Groups touch
// disjoint slots, so the level needs no atomics, and the tree's shape depends
// on c alone: the same bits on every run, whatever the scheduling.  A serial
// sum over the pieces would leave only m * cols threads to add c values each:
// at small m (every row in a few buckets) that tail outlasted the scatter.
constexpr int64_t kCombineFanIn = 32;

// Groups of every bucket at the level of stride `stride`; buckets already
// reduced to one value (or never split) have none.  Entry m is zeroed so that
// the exclusive scan ends with the total.
__global__ void __launch_bounds__(kThreads)
    combine_group_count_kernel(const int64_t* slot_start, int64_t m, int64_t stride,
                               int64_t* groups) {
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x; b <= m; b += step) {
    int64_t count = 0;
    if (b < m) {
      const int64_t live = ceil_div(slot_start[b + 1] - slot_start[b], stride);
      count = live > 1 ? ceil_div(live, kCombineFanIn) : 0;
    }
    groups[b] = count;
  }
}

// One level of the tree: a block per group (grid-stride), threads over columns.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads)
    combine_level_kernel(const __grid_constant__ ReduceParams p, const int64_t* group_start,
                         int64_t stride) {
  const int64_t total_groups = group_start[p.m];
  const int64_t cols = p.df + p.dg;
  A* partial = static_cast<A*>(p.partial);
  for (int64_t item = blockIdx.x; item < total_groups; item += gridDim.x) {
    int64_t lo = 0;
    int64_t hi = p.m;  // group_start[lo] <= item < group_start[hi]
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (group_start[mid] <= item) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const int64_t bucket = lo;
    const int64_t group = item - group_start[bucket];
    const bool last_group = group_start[bucket + 1] - group_start[bucket] == 1;
    const int64_t live = ceil_div(p.slot_start[bucket + 1] - p.slot_start[bucket], stride);
    const int64_t first = group * kCombineFanIn;
    const int64_t members = live - first < kCombineFanIn ? live - first : kCombineFanIn;
    A* const head = partial + (p.slot_start[bucket] + first * stride) * cols;
    const int64_t member_step = stride * cols;
    for (int64_t col = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; col < cols;
         col += int64_t(gridDim.y) * blockDim.x) {
      const A* src = head + col;
      A sum = *src;
      for (int64_t j = 1; j < members; ++j) {
        src += member_step;
        sum = sum + *src;
      }
      if (last_group) {
        A* dst = col < p.df ? static_cast<A*>(p.out_f) + bucket * p.df + col
                            : static_cast<A*>(p.out_g) + bucket * p.dg + (col - p.df);
        *dst = *dst + sum;
      } else {
        head[col] = sum;
      }
    }
  }
}

// ---------------------------------------------------------------- backward and hash

struct GatherParams {
  const void* grad_y;
  void* grad_x;
  int64_t d;
  int64_t n;
  const int64_t* row_ids;
  int64_t offset;
  int group_log2;
  bool vec;
  SketchHash hash;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_kernel(const __grid_constant__ GatherParams p) {
  using A = typename Elem<T>::Acc;
  constexpr int V = Elem<T>::kPerUnit;
  constexpr int U = units_per_lane(sizeof(T), sizeof(A));
  const int group = 1 << p.group_log2;
  const int lane = threadIdx.x & 31;
  const int slot = lane & (group - 1);
  const unsigned mask =
      group == 32 ? 0xFFFFFFFFu : (((1u << group) - 1u) << (lane & ~(group - 1)));
  const int s = p.hash.sparsity;
  const int rounds = (s + group - 1) >> p.group_log2;
  const int64_t units = ceil_div(p.d, V);
  const int64_t per_pass = int64_t(U) * group;
  const int64_t passes = ceil_div(units, per_pass);
  const T* grad_y = static_cast<const T*>(p.grad_y);
  T* grad_x = static_cast<T*>(p.grad_x);
  const int64_t first = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> p.group_log2;
  const int64_t step = (int64_t(gridDim.x) * kThreads) >> p.group_log2;

  for (int64_t row = first; row < p.n; row += step) {
    const int64_t global_row = global_row_of(p.row_ids, p.offset, row);
    int64_t bucket = 0;
    A factor = A(0);
    if (rounds == 1) hash_slot(p.hash, global_row, slot, bucket, factor);
    T* out_row = grad_x + row * p.d;
    for (int64_t pass = 0; pass < passes; ++pass) {
      A acc[U][V];
      int64_t col[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t unit = pass * per_pass + int64_t(u) * group + slot;
        col[u] = unit < units ? unit * V : p.d;
#pragma unroll
        for (int e = 0; e < V; ++e) acc[u][e] = A(0);
      }
      for (int r = 0; r < rounds; ++r) {
        if (rounds > 1) hash_slot(p.hash, global_row, r * group + slot, bucket, factor);
        const int count = s - r * group < group ? s - r * group : group;
        for (int k = 0; k < count; ++k) {
          const int64_t b = __shfl_sync(mask, static_cast<long long>(bucket), k, group);
          const A fac = __shfl_sync(mask, factor, k, group);
          const T* src = grad_y + b * p.d;
#pragma unroll
          for (int u = 0; u < U; ++u) {
            A v[V];
            load_unit<T, A, false>(src, col[u], p.d, 1, p.vec, v);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[u][e] = acc[u][e] + fac * v[e];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (col[u] >= p.d) continue;
        if (p.vec && col[u] + V <= p.d) {
          *reinterpret_cast<int4*>(out_row + col[u]) = Elem<T>::pack(acc[u]);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            if (col[u] + e < p.d) out_row[col[u] + e] = Elem<T>::from(acc[u][e]);
          }
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    sketch_hash_kernel(const __grid_constant__ SketchHash hash, const int64_t* rows, int64_t n,
                       int64_t* buckets, float* signs) {
  const int s = hash.sparsity;
  const int64_t entries = n * s;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < entries; e += stride) {
    const int64_t i = e / s;
    const int j = static_cast<int>(e - i * s);
    const uint64_t h = row_hash(hash.key[j], rows[i]);
    buckets[e] = hash_bucket(hash, j, h);
    signs[e] = hash_negative(h) ? -1.0f : 1.0f;
  }
}

// ---------------------------------------------------------------- host side

size_t dtype_bytes(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
  }
  return 0;
}

cudaError_t device_info(int& sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
}

// Blocks for a grid-stride kernel: enough to fill the device once, at most
// what the work needs.
template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, size_t shared_bytes, int64_t wanted, int64_t& blocks) {
  int sms = 0;
  cudaError_t err = device_info(sms);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared_bytes);
  if (err != cudaSuccess) return err;
  const int64_t full = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  blocks = wanted < full ? wanted : full;
  if (blocks < 1) blocks = 1;
  return cudaSuccess;
}

bool vector_loadable(const MatrixView& x) {
  const int64_t bytes = static_cast<int64_t>(dtype_bytes(x.dtype));
  return x.col_stride == 1 && aligned16(x.data) && (x.row_stride * bytes) % 16 == 0;
}

ScatterParams scatter_params(const CountSketchArgs& a) {
  ScatterParams p{};
  p.f = a.f.data;
  p.f_row_stride = a.f.row_stride;
  p.f_col_stride = a.f.col_stride;
  p.df = a.f.cols;
  if (a.has_g) {
    p.g = a.g.data;
    p.g_row_stride = a.g.row_stride;
    p.g_col_stride = a.g.col_stride;
    p.dg = a.g.cols;
  }
  p.n = a.f.rows;
  p.m = a.m;
  p.row_ids = a.rows.row_ids;
  p.offset = a.rows.offset;
  p.out_f = a.out_f;
  p.out_g = a.out_g;
  p.vec_f = vector_loadable(a.f);
  p.vec_g = a.has_g && vector_loadable(a.g);
  p.vec_out_f = a.acc == DType::kFloat32 && aligned16(a.out_f) && p.df % 4 == 0;
  p.vec_out_g = a.has_g && a.acc == DType::kFloat32 && aligned16(a.out_g) && p.dg % 4 == 0;
  p.hash = a.hash;
  return p;
}

template <typename T, typename A>
cudaError_t launch_atomic(const CountSketchArgs& args, cudaStream_t stream) {
  constexpr int V = Elem<T>::kPerUnit;
  constexpr int U = units_per_lane(sizeof(T), sizeof(A));
  ScatterParams p = scatter_params(args);
  const int64_t s = p.hash.sparsity;
  const int64_t acc_bytes = sizeof(A);
  const int64_t width = p.df + p.dg;

  // Shared-tile layout, if m is small enough for a useful tile.
  bool shared = false;
  if (p.m * width * acc_bytes <= kSharedTileBytes) {
    shared = true;
    p.tile_cols = 0;
    p.f_tiles = 1;
    p.tiles = 1;
  } else {
    const int64_t cols = (kSharedTileBytes / (p.m * acc_bytes)) / 8 * 8;
    if (cols >= kMinSharedTileCols) {
      shared = true;
      p.tile_cols = cols;
      p.f_tiles = ceil_div(p.df, cols);
      p.tiles = p.f_tiles + ceil_div(p.dg, cols);
    }
  }
  if (p.n * s < kSharedMinEntriesPerBucket * p.m) shared = false;

  if (shared) {
    const int64_t tile_width = p.tile_cols == 0 ? (p.df > p.dg ? p.df : p.dg) : p.tile_cols;
    p.group_log2 = group_log2_for(ceil_div(tile_width, V), U);
    const int64_t tile_entries = p.tile_cols == 0 ? p.m * width : p.m * p.tile_cols;
    const size_t shared_bytes = static_cast<size_t>(tile_entries * acc_bytes);
    int64_t resident = 0;
    cudaError_t err =
        resident_blocks(scatter_shared_kernel<T, A>, shared_bytes, int64_t(1) << 40, resident);
    if (err != cudaSuccess) return err;
    // One wave: each block flushes its tile once, so fewer, longer chunks win,
    // but every chunk must still cover several entries per output row.
    int64_t chunks = ceil_div(resident, p.tiles);
    const int64_t max_chunks = (p.n * s) / (kSharedMinEntriesPerBucket * p.m);
    if (chunks > max_chunks) chunks = max_chunks;
    if (chunks < 1) chunks = 1;
    p.rows_per_chunk = ceil_div(p.n, chunks);
    chunks = ceil_div(p.n, p.rows_per_chunk);
    const int64_t blocks = chunks * p.tiles;
    if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
    scatter_shared_kernel<T, A>
        <<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream>>>(p);
    return cudaGetLastError();
  }

  p.group_log2 = group_log2_for(ceil_div(p.df > p.dg ? p.df : p.dg, V), U);
  const int64_t groups_per_block = kThreads >> p.group_log2;
  int64_t blocks = 0;
  cudaError_t err =
      resident_blocks(scatter_global_kernel<T, A>, 0, ceil_div(p.n, groups_per_block), blocks);
  if (err != cudaSuccess) return err;
  scatter_global_kernel<T, A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Workspace of the deterministic path, in 256-byte aligned pieces.
struct DeterministicLayout {
  int64_t entries = 0;
  int passes = 1;
  int64_t tiles = 0;
  int64_t piece_length = kMinPieceLength;
  int64_t max_pieces = 0;
  int64_t max_slots = 0;
  // Most pieces one bucket can have: the combine tree needs levels for this many.
  int64_t max_bucket_pieces = 0;
  size_t counts = 0, pieces = 0, slots = 0, groups = 0, scan_sums = 0, hist = 0, sorted0 = 0,
         sorted1 = 0, partial = 0, total = 0;
};

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

DeterministicLayout deterministic_layout(const CountSketchArgs& a) {
  DeterministicLayout l;
  const int64_t s = a.hash.sparsity;
  const int64_t cols = a.f.cols + (a.has_g ? a.g.cols : 0);
  l.entries = a.f.rows * s;
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < a.m) ++bits;
  l.passes = bits <= 8 ? 1 : (bits + 7) / 8;
  l.tiles = ceil_div(l.entries, kSortTile);
  const double wanted = 2.0 * double(l.entries) * double(cols) / kPartialBudget;
  l.piece_length = wanted > double(kMinPieceLength) ? static_cast<int64_t>(wanted) + 1
                                                   : kMinPieceLength;
  const int64_t nonempty = a.m < l.entries ? a.m : l.entries;
  l.max_pieces = ceil_div(l.entries, l.piece_length) + nonempty;
  // A bucket of c > L entries has ceil(c / L) < 2c / L pieces.
  l.max_slots = ceil_div(2 * l.entries, l.piece_length);
  l.max_bucket_pieces = ceil_div(l.entries, l.piece_length);
  const size_t index_bytes = sizeof(int64_t) * static_cast<size_t>(a.m + 1);
  size_t at = 0;
  l.counts = at;
  at += align256(index_bytes);
  l.pieces = at;
  at += align256(index_bytes);
  l.slots = at;
  at += align256(index_bytes);
  l.groups = at;
  at += align256(index_bytes);
  l.scan_sums = at;
  at += align256(sizeof(int64_t) * kScanMaxBlocks);
  l.hist = at;
  at += align256(sizeof(int64_t) * 256 * static_cast<size_t>(l.tiles));
  l.sorted0 = at;
  at += align256(sizeof(int64_t) * static_cast<size_t>(l.entries));
  l.sorted1 = at;
  if (l.passes > 1) at += align256(sizeof(int64_t) * static_cast<size_t>(l.entries));
  l.partial = at;
  at += align256(dtype_bytes(a.acc) * static_cast<size_t>(l.max_slots) * static_cast<size_t>(cols));
  l.total = at;
  return l;
}

template <typename T, typename A>
cudaError_t launch_deterministic(const CountSketchArgs& args, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
  const DeterministicLayout l = deterministic_layout(args);
  if (workspace == nullptr || workspace_bytes < l.total) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  int64_t* counts = reinterpret_cast<int64_t*>(ws + l.counts);
  int64_t* pieces = reinterpret_cast<int64_t*>(ws + l.pieces);
  int64_t* slots = reinterpret_cast<int64_t*>(ws + l.slots);
  int64_t* groups = reinterpret_cast<int64_t*>(ws + l.groups);
  int64_t* scan_sums = reinterpret_cast<int64_t*>(ws + l.scan_sums);
  int64_t* hist = reinterpret_cast<int64_t*>(ws + l.hist);
  int64_t* sorted[2] = {reinterpret_cast<int64_t*>(ws + l.sorted0),
                        reinterpret_cast<int64_t*>(ws + l.sorted1)};
  const int64_t m = args.m;

  EntryParams ep{};
  ep.row_ids = args.rows.row_ids;
  ep.offset = args.rows.offset;
  ep.hash = args.hash;

  cudaError_t err =
      cudaMemsetAsync(counts, 0, sizeof(int64_t) * static_cast<size_t>(m + 1), stream);
  if (err != cudaSuccess) return err;
  {
    const bool privatised = m <= kPrivateCountBuckets;
    const size_t shared_bytes = privatised ? sizeof(unsigned int) * static_cast<size_t>(m) : 0;
    int64_t blocks = 0;
    err = resident_blocks(bucket_count_kernel, shared_bytes, ceil_div(l.entries, kThreads), blocks);
    if (err != cudaSuccess) return err;
    bucket_count_kernel<<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream>>>(
        ep, l.entries, m, privatised, reinterpret_cast<unsigned long long*>(counts));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Grid of the kernels that visit every bucket once (grid-stride).
  const int64_t bucket_blocks =
      ceil_div(m + 1, kThreads) < 4096 ? ceil_div(m + 1, kThreads) : 4096;
  {
    piece_count_kernel<<<static_cast<unsigned>(bucket_blocks), kThreads, 0, stream>>>(
        counts, m, l.piece_length, pieces, slots);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  for (int64_t* array : {counts, pieces, slots}) {
    err = exclusive_scan(array, m + 1, scan_sums, stream);
    if (err != cudaSuccess) return err;
  }

  const unsigned sort_blocks =
      static_cast<unsigned>(l.tiles < kMaxSortBlocks ? l.tiles : kMaxSortBlocks);
  for (int pass = 0; pass < l.passes; ++pass) {
    const int shift = 8 * pass;
    const int64_t* in = pass == 0 ? nullptr : sorted[(pass - 1) & 1];
    int64_t* out = sorted[pass & 1];
    radix_histogram_kernel<<<sort_blocks, kSortThreads, 0, stream>>>(ep, in, l.entries, shift,
                                                                     l.tiles, hist);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    err = exclusive_scan(hist, 256 * l.tiles, scan_sums, stream);
    if (err != cudaSuccess) return err;
    radix_scatter_kernel<<<sort_blocks, kSortThreads, 0, stream>>>(
        ep, in, out, l.entries, shift, l.tiles, hist, pass == l.passes - 1);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  ReduceParams rp{};
  rp.f = args.f.data;
  rp.f_row_stride = args.f.row_stride;
  rp.f_col_stride = args.f.col_stride;
  rp.df = args.f.cols;
  if (args.has_g) {
    rp.g = args.g.data;
    rp.g_row_stride = args.g.row_stride;
    rp.g_col_stride = args.g.col_stride;
    rp.dg = args.g.cols;
  }
  rp.sorted = sorted[(l.passes - 1) & 1];
  rp.bucket_start = counts;
  rp.piece_start = pieces;
  rp.slot_start = slots;
  rp.m = m;
  rp.piece_length = l.piece_length;
  rp.max_pieces = l.max_pieces;
  rp.out_f = args.out_f;
  rp.out_g = args.out_g;
  rp.partial = ws + l.partial;
  rp.scale = args.hash.scale;
  const int64_t cols = rp.df + rp.dg;
  {
    const int64_t x = l.max_pieces < (int64_t(1) << 20) ? l.max_pieces : (int64_t(1) << 20);
    int64_t y = ceil_div(cols, kReduceThreads);
    if (y > 65535) y = 65535;
    reduce_pieces_kernel<T, A><<<dim3(static_cast<unsigned>(x), static_cast<unsigned>(y)),
                                 kReduceThreads, 0, stream>>>(rp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  for (int64_t stride = 1; stride < l.max_bucket_pieces; stride *= kCombineFanIn) {
    combine_group_count_kernel<<<static_cast<unsigned>(bucket_blocks), kThreads, 0, stream>>>(
        slots, m, stride, groups);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    err = exclusive_scan(groups, m + 1, scan_sums, stream);
    if (err != cudaSuccess) return err;
    // The group count is on the device; size the grid by a bound.  A bucket
    // of c > stride slots has at most c / (stride K) + 1 groups, and at most
    // min(m, max_slots / (stride + 1)) buckets have that many slots.
    int64_t active = l.max_slots / (stride + 1);
    if (active > m) active = m;
    const int64_t bound = ceil_div(l.max_slots, stride * kCombineFanIn) + active;
    int64_t x = 0;
    err = resident_blocks(combine_level_kernel<A>, 0, bound, x);
    if (err != cudaSuccess) return err;
    int64_t y = ceil_div(cols, kReduceThreads);
    if (y > 65535) y = 65535;
    combine_level_kernel<A><<<dim3(static_cast<unsigned>(x), static_cast<unsigned>(y)),
                              kReduceThreads, 0, stream>>>(rp, groups, stride);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return err;
}

template <typename T>
cudaError_t dispatch_acc(const CountSketchArgs& args, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  if (args.acc == DType::kFloat64) {
    return args.deterministic
               ? launch_deterministic<T, double>(args, workspace, workspace_bytes, stream)
               : launch_atomic<T, double>(args, stream);
  }
  if (args.acc == DType::kFloat32) {
    return args.deterministic
               ? launch_deterministic<T, float>(args, workspace, workspace_bytes, stream)
               : launch_atomic<T, float>(args, stream);
  }
  return cudaErrorInvalidValue;
}

bool valid_hash(const SketchHash& hash, int64_t m) {
  return hash.sparsity >= 1 && hash.sparsity <= kMaxSparsity && m >= 1 &&
         hash.width * hash.sparsity == m;
}

int64_t columns(const CountSketchArgs& a) { return a.f.cols + (a.has_g ? a.g.cols : 0); }

}  // namespace

size_t countsketch_workspace_bytes(const CountSketchArgs& args) {
  if (!args.deterministic || args.f.rows <= 0 || columns(args) <= 0) return 0;
  return deterministic_layout(args).total;
}

cudaError_t launch_countsketch(const CountSketchArgs& args, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_hash(args.hash, args.m) || args.f.rows < 0) return cudaErrorInvalidValue;
  if (args.has_g && (args.g.rows != args.f.rows || args.g.dtype != args.f.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (args.f.rows == 0 || columns(args) == 0) return cudaSuccess;
  switch (args.f.dtype) {
    case DType::kFloat16:
      return dispatch_acc<__half>(args, workspace, workspace_bytes, stream);
    case DType::kBFloat16:
      return dispatch_acc<__nv_bfloat16>(args, workspace, workspace_bytes, stream);
    case DType::kFloat32:
      return dispatch_acc<float>(args, workspace, workspace_bytes, stream);
    case DType::kFloat64:
      return dispatch_acc<double>(args, workspace, workspace_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {

template <typename T>
cudaError_t launch_gather(const void* grad_y, int64_t m, int64_t d, RowIndex rows, int64_t n,
                          const SketchHash& hash, void* grad_x, cudaStream_t stream) {
  using A = typename Elem<T>::Acc;
  constexpr int V = Elem<T>::kPerUnit;
  constexpr int U = units_per_lane(sizeof(T), sizeof(A));
  (void)m;
  GatherParams p{};
  p.grad_y = grad_y;
  p.grad_x = grad_x;
  p.d = d;
  p.n = n;
  p.row_ids = rows.row_ids;
  p.offset = rows.offset;
  p.hash = hash;
  p.vec = aligned16(grad_y) && aligned16(grad_x) && (d * int64_t(sizeof(T))) % 16 == 0;
  p.group_log2 = group_log2_for(ceil_div(d, V), U);
  int64_t blocks = 0;
  const cudaError_t err =
      resident_blocks(gather_kernel<T>, 0, ceil_div(n, kThreads >> p.group_log2), blocks);
  if (err != cudaSuccess) return err;
  gather_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_countsketch_backward(const void* grad_y, DType dtype, int64_t m, int64_t d,
                                        RowIndex rows, int64_t n, const SketchHash& hash,
                                        void* grad_x, cudaStream_t stream) {
  if (!valid_hash(hash, m) || n < 0 || d < 0) return cudaErrorInvalidValue;
  if (n == 0 || d == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return launch_gather<__half>(grad_y, m, d, rows, n, hash, grad_x, stream);
    case DType::kBFloat16:
      return launch_gather<__nv_bfloat16>(grad_y, m, d, rows, n, hash, grad_x, stream);
    case DType::kFloat32:
      return launch_gather<float>(grad_y, m, d, rows, n, hash, grad_x, stream);
    case DType::kFloat64:
      return launch_gather<double>(grad_y, m, d, rows, n, hash, grad_x, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_sketch_hash(const int64_t* rows, int64_t n, const SketchHash& hash,
                               int64_t* buckets, float* signs, cudaStream_t stream) {
  if (hash.sparsity < 1 || hash.sparsity > kMaxSparsity || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  int64_t blocks = 0;
  const cudaError_t err =
      resident_blocks(sketch_hash_kernel, 0, ceil_div(n * hash.sparsity, kThreads), blocks);
  if (err != cudaSuccess) return err;
  sketch_hash_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(hash, rows, n,
                                                                             buckets, signs);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace nnsim
