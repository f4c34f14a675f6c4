// Device helpers every kernel file in kernels/ uses: element conversion to and
// from the accumulator type, math overloaded on that type, and the warp sum.
// Torch-free, like the kernels (also built by CMakeLists.txt and run on the CPU
// by tests/cuda_sim, whose stand-in headers give these intrinsics).
//
// Accumulator convention (every op): float for float, __half and __nv_bfloat16
// inputs, double for double. Cvt<T>::to widens an element to its accumulator
// type, Cvt<T>::from rounds back to nearest-even (the conversion torch's own
// CUDA kernels use).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

namespace rexfast {
namespace cuda {
namespace detail {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Cvt<double> {
  static __device__ __forceinline__ double to(double x) { return x; }
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// Math on the accumulator type: the float overloads call the float functions
// (which --use_fast_math may approximate), the double ones the double functions
// (which it leaves alone).
__device__ __forceinline__ float dsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

// Butterfly sum over the 32 lanes of a full warp: every lane ends with the same,
// order-fixed value (bitwise reproducible; no atomics).
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rexfast
