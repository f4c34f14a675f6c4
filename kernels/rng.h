// Counter-based Gumbel noise shared by every backend (C++ CPU, CUDA, and the
// Triton and PyTorch versions in rexfast/): element i of a (B,N,P) noise field
// for a 32-bit key is  h = mix32(mix32(i ^ key) + key),
// u = ((h >> 9) + 0.5) * 2^-23 (exact in float32, never 0 or 1),
// g = -log(-log(u)). Nothing is ever materialised: kernels call this inline.
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define REXFAST_HD __host__ __device__ __forceinline__
#else
#define REXFAST_HD inline
#endif

namespace rexfast {

// lowbias32 by C. Wellons (integer hash prospector).
REXFAST_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

REXFAST_HD float gumbel_from_key(uint32_t key, uint32_t index) {
  uint32_t h = mix32(mix32(index ^ key) + key);
  float u = (static_cast<float>(h >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
  return -logf(-logf(u));
}

REXFAST_HD double gumbel_from_key_f64(uint32_t key, uint32_t index) {
  uint32_t h = mix32(mix32(index ^ key) + key);
  double u = (static_cast<double>(h >> 9) + 0.5) * 1.1920928955078125e-07;
  return -log(-log(u));
}

}  // namespace rexfast
