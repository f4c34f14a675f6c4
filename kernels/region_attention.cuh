// Masked-softmax attention with the mask decided in the kernel, for ReLA's
// region_image_attention (RIA: decisions from region logits) and
// region_language_attention (RLA: a key padding mask, or none). Torch-free CUDA.
//
// Semantics (rexfast/ops/region_attention/core.py; every backend computes the same):
//   s = where(blocked, -inf, scale * q k^T), p = softmax(s), out = p v over all
//   keys (IEEE: a blocked key has p = 0, and 0 * inf or 0 * NaN in its v is NaN),
//   lse = log sum exp s. Backward: p = exp(s - lse), dv = p^T dout,
//   dp = dout v^T, delta = rowsum(dout * out) (given), ds = where(blocked, 0,
//   p (dp - delta)) * scale, dq = ds k, dk = ds^T q.
// RIA decisions: key j blocked for query i iff the resampled logit <= threshold
// (NaN never blocked), with torch's CUDA bilinear arithmetic
// (upsample_bilinear2d_out_frame, align_corners=False; see region_attention.cu);
// rows that block every key (the open-rows pass) attend to all keys.
// RLA: padded keys blocked; a sample whose every key is padded gives zero rows
// (lse = -inf) and zero gradients.
//
// Structure: one warp per query row (forward, dq) or per key (dk, dv); lanes
// take 32 keys (or 32 queries) at a time, so each lane makes its own decision
// and dot product; sums over d are lane-local, sums over the 32 lanes are
// butterfly reductions in a fixed order. Every output element is written by one
// warp: no atomics, bitwise reproducible for a given shape and GPU. A chunk of
// 32 keys with nothing allowed is skipped where that is exact (finite v in the
// forward; finite q, k, dout and lse in the backward).
//
// Layouts: q, k, v (B,H,L,D) with unit stride on D and any batch/head/row stride
// (in elements); outputs, dout, lse, delta contiguous. D <= 256. Accumulation in
// float (double for double inputs). Launchers only enqueue on `stream` and
// return the launch status (cudaErrorInvalidValue for bad sizes or pointers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace rexfast {
namespace cuda {

enum RegionMask : int { kMaskNone = 0, kMaskPadding = 1, kMaskRegion = 2 };
// Resampling modes (RESAMPLE_* in rexfast/ops/region_attention/plan.py) that CUDA tensors use.
enum RegionResample : int { kResampleCuda = 2, kResampleCopy = 3, kResampleMap = 4 };
constexpr int kRegionMaxD = 256;

template <typename T>
struct RegionAcc {
  using type = float;
};
template <>
struct RegionAcc<double> {
  using type = double;
};

struct RegionMaskParams {
  int mask = kMaskNone;
  // kMaskRegion
  const float* logits = nullptr;  // (B, Q, mh, mw) contiguous
  int64_t mh = 0, mw = 0, kh = 0, kw = 0;
  int resample = kResampleCuda;
  float threshold = 0.0f;          // blocked iff resampled <= threshold
  const float* resampled = nullptr;  // kResampleMap: (B, Q, S)
  const uint8_t* open = nullptr;   // (B, Q): rows that attend to every key (nullptr: none)
  // kMaskPadding
  const uint8_t* padded = nullptr;  // (B, S), 1 = padded
  const uint8_t* empty = nullptr;   // (B,), 1 = every key padded
};

template <typename T>
struct RegionAttnParams {
  using acc_t = typename RegionAcc<T>::type;
  int64_t B = 0, H = 0, Q = 0, S = 0, D = 0;
  const T* q = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  const T* k = nullptr;
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  const T* v = nullptr;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  acc_t scale = 1;
  RegionMaskParams m;
  // forward
  const uint8_t* v_finite = nullptr;  // (B*H): all of v[b, h] finite
  T* out = nullptr;                   // (B, H, Q, D)
  acc_t* lse = nullptr;               // (B, H, Q)
  // backward
  const uint8_t* safe = nullptr;   // (B*H): all of q, k, dout[b, h] finite
  const T* dout = nullptr;         // (B, H, Q, D)
  const acc_t* lse_in = nullptr;   // (B, H, Q)
  const acc_t* delta = nullptr;    // (B, H, Q): rowsum(dout * out)
  T* dq = nullptr;                 // (B, H, Q, D)
  T* dk = nullptr;                 // (B, H, S, D)
  T* dv = nullptr;                 // (B, H, S, D)
};

// RIA's first pass: open[b*Q + i] = 1 iff query i of sample b blocks every key
// (p.m.open is the output here and is not read).
template <typename T>
cudaError_t region_open_rows(const RegionAttnParams<T>& p, uint8_t* open, cudaStream_t stream);
template <typename T>
cudaError_t region_attention_fwd(const RegionAttnParams<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t region_attention_bwd(const RegionAttnParams<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace rexfast
