// Device utilities shared by the CUDA kernels: element types, 16-byte units,
// and small integer utilities.  Raw CUDA only (no ATen), see launchers.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
// Native double atomicAdd (6.0) and __match_any_sync (7.0) are relied on.
#error "nnsim_fast CUDA kernels need compute capability 7.0 or newer"
#endif

namespace nnsim {
namespace cuda {
namespace detail {

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Element traits.  A "unit" is the 16 bytes one vector load moves; kPerUnit
// elements of T.  Acc is the accumulation type the contract prescribes
// (float32 for 16-bit inputs).  All conversions are explicit intrinsics so the
// code builds under torch's -D__CUDA_NO_HALF_CONVERSIONS__ family of flags.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Acc = float;
  static constexpr int kPerUnit = 4;
  template <typename A>
  __device__ __forceinline__ static A to(float v) { return static_cast<A>(v); }
  template <typename A>
  __device__ __forceinline__ static void unpack(const int4& raw, A* v) {
    v[0] = static_cast<A>(__int_as_float(raw.x));
    v[1] = static_cast<A>(__int_as_float(raw.y));
    v[2] = static_cast<A>(__int_as_float(raw.z));
    v[3] = static_cast<A>(__int_as_float(raw.w));
  }
  __device__ __forceinline__ static float from(float v) { return v; }
  __device__ __forceinline__ static int4 pack(const float* v) {
    return make_int4(__float_as_int(v[0]), __float_as_int(v[1]), __float_as_int(v[2]),
                     __float_as_int(v[3]));
  }
};

template <>
struct Elem<double> {
  using Acc = double;
  static constexpr int kPerUnit = 2;
  template <typename A>
  __device__ __forceinline__ static A to(double v) { return static_cast<A>(v); }
  template <typename A>
  __device__ __forceinline__ static void unpack(const int4& raw, A* v) {
    v[0] = static_cast<A>(__hiloint2double(raw.y, raw.x));
    v[1] = static_cast<A>(__hiloint2double(raw.w, raw.z));
  }
  __device__ __forceinline__ static double from(double v) { return v; }
  __device__ __forceinline__ static int4 pack(const double* v) {
    return make_int4(__double2loint(v[0]), __double2hiint(v[0]), __double2loint(v[1]),
                     __double2hiint(v[1]));
  }
};

template <>
struct Elem<__half> {
  using Acc = float;
  static constexpr int kPerUnit = 8;
  template <typename A>
  __device__ __forceinline__ static A to(__half v) { return static_cast<A>(__half2float(v)); }
  __device__ __forceinline__ static float half_bits(unsigned int bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  template <typename A>
  __device__ __forceinline__ static void unpack(const int4& raw, A* v) {
    const unsigned int w[4] = {static_cast<unsigned int>(raw.x), static_cast<unsigned int>(raw.y),
                               static_cast<unsigned int>(raw.z), static_cast<unsigned int>(raw.w)};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = static_cast<A>(half_bits(w[k] & 0xFFFFu));
      v[2 * k + 1] = static_cast<A>(half_bits(w[k] >> 16));
    }
  }
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static int4 pack(const float* v) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = static_cast<unsigned int>(__half_as_ushort(__float2half_rn(v[2 * k]))) |
             (static_cast<unsigned int>(__half_as_ushort(__float2half_rn(v[2 * k + 1]))) << 16);
    }
    return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                     static_cast<int>(w[3]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static constexpr int kPerUnit = 8;
  template <typename A>
  __device__ __forceinline__ static A to(__nv_bfloat16 v) {
    return static_cast<A>(__bfloat162float(v));
  }
  template <typename A>
  __device__ __forceinline__ static void unpack(const int4& raw, A* v) {
    // bfloat16 is the high half of a float32: widening is a shift.
    const unsigned int w[4] = {static_cast<unsigned int>(raw.x), static_cast<unsigned int>(raw.y),
                               static_cast<unsigned int>(raw.z), static_cast<unsigned int>(raw.w)};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = static_cast<A>(__uint_as_float(w[k] << 16));
      v[2 * k + 1] = static_cast<A>(__uint_as_float(w[k] & 0xFFFF0000u));
    }
  }
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static int4 pack(const float* v) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] =
          static_cast<unsigned int>(__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k]))) |
          (static_cast<unsigned int>(__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k + 1])))
           << 16);
    }
    return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                     static_cast<int>(w[3]));
  }
};

// Reads element `index` of a strided row as A.
template <typename T, typename A>
__device__ __forceinline__ A load_elem(const T* row, int64_t index) {
  return Elem<T>::template to<A>(row[index]);
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace detail
}  // namespace cuda
}  // namespace nnsim
