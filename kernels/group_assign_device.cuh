// group_assign's tiling constants and device helpers (the Gumbel draw, the
// fixed-order CTA sum, a warp's row dot products, the first-maximum winner):
// the pieces kernels/group_assign.cu's kernels are built from. Included by that
// file only (and by group_assign_plan.cuh for the constants); torch-free.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "common.cuh"
#include "rng.h"

namespace rexfast {
namespace cuda {
namespace group_assign_detail {

using namespace detail;  // Cvt, dexp, dsqrt, warp_sum (common.cuh)

constexpr int kWarps = 8;  // warps per CTA of the per-pixel kernels
constexpr int kThreads = kWarps * 32;
constexpr int kKPL = 8;  // row elements per lane per sweep
constexpr int kRowChunk = 32 * kKPL;
constexpr int kTokGroup = 4;  // tokens dotted per sweep of a row chunk
constexpr int kMaxTile = 64;  // pixels per CTA (halved while shared memory is short)
constexpr int kMinTile = kWarps;
constexpr size_t kSmemCap = 100 * 1024;  // optional q̂/dout staging stays below this
constexpr int kPoolThreads = 128;
constexpr int kPoolDPT = 8;  // v columns per thread per pass
constexpr int64_t kPoolTargetBlocks = 1024;
constexpr int64_t kPoolMinSeg = 256;
constexpr int kRowThreads = 256;  // per-(b,n) row kernels
// dq̂ product tiles
constexpr int kGN = 32, kGC = 64, kGP = 32, kGThreads = 256;
constexpr int64_t kGemmTargetBlocks = 1024;
constexpr int64_t kGemmMinSeg = 256;
constexpr double kL2nEps = 1e-12;

template <typename A>
__device__ __forceinline__ A draw_gumbel(uint32_t key, uint32_t index);
// The float noise is rng.h's value evaluated in double and rounded once. Not
// gumbel_from_key: setup.py builds with --use_fast_math, which turns its logf
// into __logf, whose absolute error near 1 (~1e-7) exceeds −log(u) for u close
// to 1 and can make the noise inf/NaN. Double math is not touched by fast-math,
// and the result is the float32 rounding of the float64 reference noise
// (rexfast.ops.reference.gumbel_noise), within 1 ulp of the CPU kernel's.
template <>
__device__ __forceinline__ float draw_gumbel<float>(uint32_t key, uint32_t index) {
  return static_cast<float>(gumbel_from_key_f64(key, index));
}
template <>
__device__ __forceinline__ double draw_gumbel<double>(uint32_t key, uint32_t index) {
  return gumbel_from_key_f64(key, index);
}

// Fixed-order CTA sum (blockDim.x a multiple of 32, ≤ 1024); all threads get it.
template <typename A>
__device__ A block_sum(A x, A* red /* ≥ 32 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_sum(x);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  if (warp == 0) {
    A t = lane < warps ? red[lane] : A(0);
    t = warp_sum(t);
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  const A r = red[0];
  __syncthreads();
  return r;
}

// out[n] = Σ_c mat[n*ld + c] · src[c] for n < N, c < len (one warp, lane 0
// writes out); returns Σ_c src[c]² on every lane.
template <typename T, typename A>
__device__ __forceinline__ A warp_row_dots(const T* __restrict__ src, int len, const A* mat, int64_t ld, int N,
                                           A* out, int lane) {
  A norm2 = 0;
  for (int c0 = 0; c0 < len; c0 += kRowChunk) {
    A x[kKPL];
#pragma unroll
    for (int m = 0; m < kKPL; ++m) {
      const int c = c0 + lane + 32 * m;
      x[m] = c < len ? static_cast<A>(Cvt<T>::to(src[c])) : A(0);
      norm2 += x[m] * x[m];
    }
    for (int n0 = 0; n0 < N; n0 += kTokGroup) {
      A acc[kTokGroup];
#pragma unroll
      for (int j = 0; j < kTokGroup; ++j) {
        acc[j] = 0;
        if (n0 + j < N) {
          const A* row = mat + static_cast<int64_t>(n0 + j) * ld;
#pragma unroll
          for (int m = 0; m < kKPL; ++m) {
            const int c = c0 + lane + 32 * m;
            if (c < len) acc[j] += row[c] * x[m];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kTokGroup; ++j)
        if (n0 + j < N) acc[j] = warp_sum(acc[j]);  // warp-uniform condition
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < kTokGroup; ++j)
          if (n0 + j < N) out[n0 + j] = c0 == 0 ? acc[j] : out[n0 + j] + acc[j];
      }
    }
  }
  return warp_sum(norm2);
}

// The winning token of one pixel's logits z[0..N): the first maximum (same
// comparisons as the CPU kernel), and whether the softmax column is NaN as the
// reference computes it (a NaN or +inf logit, or all -inf; the winner is then
// token 0). `max` is the maximum over the non-NaN logits. All lanes scan.
template <typename A>
struct Winner {
  int index;
  bool poisoned;
  A max;
};
template <typename A>
__device__ __forceinline__ Winner<A> first_winner(const A* z, int N) {
  int best = -1;
  bool nan = false;
  A zb = A(0);
  for (int n = 0; n < N; ++n) {
    const A zn = z[n];
    if (isnan(zn)) {
      nan = true;
    } else if (best < 0 || zn > zb) {
      zb = zn;
      best = n;
    }
  }
  const bool poisoned = nan || best < 0 || isinf(zb);
  return {poisoned ? 0 : best, poisoned, best < 0 ? A(NAN) : zb};
}

}  // namespace group_assign_detail
}  // namespace cuda
}  // namespace rexfast
