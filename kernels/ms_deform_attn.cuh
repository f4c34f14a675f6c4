// ms_deform_attn (multi-scale deformable attention) on CUDA: torch-free kernels
// and host launchers.
//
// Math and the NaN/inf/border rules: rexfast/ops/ms_deform_attn/reference.py
// (and op.py for the gradients). value (B,S,M,D), S = Σ_l H_l·W_l; per row
// (b, q, h) and point (l, p): x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5, the four
// corner taps (⌊x⌋ + {0,1}, ⌊y⌋ + {0,1}), outside ones contribute 0 and are not
// read; sample = ((w00·v00 + w10·v10) + w01·v01) + w11·v11 (NaN for a NaN
// location); out[b,q,h,:] = Σ_points a·sample.
//
// Types: T ∈ {float, double, __half, __nv_bfloat16}; everything accumulates in
// A = float (double for double inputs).
//
// Layouts: value needs unit stride over D; its batch/pixel/head strides are
// free (in elements). spatial_shapes (L,2) and level_start_index (L,) are int64
// device arrays (read in-kernel: no host synchronisation). sampling_locations
// (B,Q,M,L,P,2), attention_weights (B,Q,M,L,P), out and grad_out (B,Q,M·D),
// grad_value (B,S,M,D) and the other gradients are contiguous. Every tap is
// also bounded by S, so inconsistent level shapes cannot read or write out of
// bounds.
//
// Value gradient (the backward's scatter), two modes:
//   deterministic = false: atomicAdd into grad_value (float/double) or a float
//     workspace (half/bf16, converted at the end). Not bitwise reproducible.
//   deterministic = true: per tap, its target row (b·S + s)·M + h (a sentinel
//     for outside taps) and weight are recorded; a stable radix sort (CUB) groups
//     the taps by row in tap order; one warp per value row then sums w·(a·g)
//     over its taps in that order. Bitwise reproducible on a given GPU.
//
// Scratch: the backward needs ms_deform_attn_bwd_workspace_bytes(...) bytes
// (0 in atomic mode for float/double), any alignment ≥ 256 B, contents on entry
// irrelevant. Launchers only enqueue work on `stream` and return the status.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace rexfast {
namespace cuda {

template <typename T>
struct MSDeformAttnAcc {
  using type = float;
};
template <>
struct MSDeformAttnAcc<double> {
  using type = double;
};

struct MSDeformAttnDims {
  int64_t B = 0, S = 0, M = 0, D = 0, Q = 0, L = 0, P = 0;
};

template <typename T>
struct MSDeformAttnFwdParams {
  MSDeformAttnDims dims;
  const T* value = nullptr;  // value[b*value_sb + s*value_ss + h*value_sm + d]
  int64_t value_sb = 0, value_ss = 0, value_sm = 0;
  const int64_t* spatial_shapes = nullptr;     // device, (L, 2) rows (H_l, W_l)
  const int64_t* level_start_index = nullptr;  // device, (L,)
  const T* loc = nullptr;   // (B,Q,M,L,P,2) contiguous, (x, y)
  const T* attn = nullptr;  // (B,Q,M,L,P) contiguous
  T* out = nullptr;         // (B,Q,M*D) contiguous
};

template <typename T>
struct MSDeformAttnBwdParams {
  MSDeformAttnDims dims;
  const T* grad_out = nullptr;  // (B,Q,M*D) contiguous
  const T* value = nullptr;
  int64_t value_sb = 0, value_ss = 0, value_sm = 0;
  const int64_t* spatial_shapes = nullptr;
  const int64_t* level_start_index = nullptr;
  const T* loc = nullptr;
  const T* attn = nullptr;
  T* grad_value = nullptr;  // (B,S,M,D) contiguous
  T* grad_loc = nullptr;    // (B,Q,M,L,P,2) contiguous
  T* grad_attn = nullptr;   // (B,Q,M,L,P) contiguous
  bool deterministic = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Scratch bytes the backward needs (depends on the shape, the type and the
// mode only); 0 also when the sizes are unsupported (the launcher then refuses).
template <typename T>
size_t ms_deform_attn_bwd_workspace_bytes(const MSDeformAttnDims& dims, bool deterministic);

// Enqueue the forward / backward on `stream`. Returns cudaErrorInvalidValue for
// bad sizes (any of S, M, D, L, P < 1, B or Q < 0, B·Q·M·L·P or B·S·M ≥ 2^31, in
// deterministic mode 4·B·Q·M·L·P ≥ 2^31), a null pointer or a too small
// workspace, else the launch status. B = 0 or Q = 0: nothing to compute (the
// backward zeroes grad_value).
template <typename T>
cudaError_t ms_deform_attn_fwd(const MSDeformAttnFwdParams<T>& params, cudaStream_t stream);
template <typename T>
cudaError_t ms_deform_attn_bwd(const MSDeformAttnBwdParams<T>& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace rexfast
