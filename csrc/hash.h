// The one hash of nnsim_fast: (seed, global row, block) -> (bucket, sign).
//
// Every kernel (CPU, CUDA) and the pure-PyTorch reference in nnsim_fast/ops.py
// compute exactly these bits, so a seed names one sketch matrix whatever the
// device, batch size, thread count or sharding.  Only this header and its
// Python mirror may change the mapping, and they must change together.
//
// Construction (all arithmetic modulo 2^64):
//   key_j   = mix64(seed XOR (kBlockStride * (j + 1)))         per block j < s
//   h       = mix64(key_j + kGolden * (row + 1))               per row
//   bucket  = j * w + ((h >> 32) * w) >> 32,   w = m / s       (multiply-shift)
//   sign    = (h & 1) ? -1 : +1
// mix64 is the splitmix64 finaliser.  Buckets come from the high half of h and
// signs from the low bit, so they are (empirically) independent.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define NNSIM_HD __host__ __device__ __forceinline__
#else
#define NNSIM_HD inline
#endif

namespace nnsim {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kBlockStride = 0xD1B54A32D192ED03ull;
// Upper bound on the sparsity s (hash blocks per row); keeps SketchHash a
// fixed-size POD that can be passed by value to a CUDA kernel.
constexpr int kMaxSparsity = 32;
// Bucket widths must stay below 2^31 so the multiply-shift fits in int64 in
// the Python mirror.
constexpr int64_t kMaxBuckets = (int64_t(1) << 31) - 1;

NNSIM_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

NNSIM_HD uint64_t block_key(uint64_t seed, int block) {
  return mix64(seed ^ (kBlockStride * (uint64_t)(block + 1)));
}

NNSIM_HD uint64_t row_hash(uint64_t key, int64_t row) {
  return mix64(key + kGolden * ((uint64_t)row + 1ull));
}

// Everything a kernel needs to hash rows: built once per call on the host.
struct SketchHash {
  uint64_t key[kMaxSparsity];
  int64_t width;     // buckets per block, m / s
  int sparsity;      // s
  double scale;      // 1 / sqrt(s); kernels cast to their accumulator type
};

inline SketchHash make_sketch_hash(uint64_t seed, int64_t m, int sparsity) {
  SketchHash hash{};
  hash.sparsity = sparsity;
  hash.width = m / sparsity;
  hash.scale = 1.0 / __builtin_sqrt((double)sparsity);
  for (int j = 0; j < sparsity && j < kMaxSparsity; ++j) hash.key[j] = block_key(seed, j);
  return hash;
}

// Bucket of `row` in block j (global bucket index in [0, m)).
NNSIM_HD int64_t hash_bucket(const SketchHash& hash, int j, uint64_t h) {
  return (int64_t)j * hash.width + (int64_t)(((h >> 32) * (uint64_t)hash.width) >> 32);
}

NNSIM_HD bool hash_negative(uint64_t h) { return (h & 1ull) != 0; }

}  // namespace nnsim
