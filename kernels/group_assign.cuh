// group_assign on CUDA: torch-free kernels and host launchers.
//
// Math (rexfast/ops/group_assign.py; q: B×N×C tokens, k: B×P×C pixel keys,
// v: B×P×D pixel values, τ > 0, G Gumbel noise or 0):
//   S = l2n(q) l2n(k)ᵀ, Z = (S + G)/τ, Y = softmax_N(Z), A = onehot(argmax_N Z)
//   (first maximum wins), r = Σ_P A, out = (A / (r + 1)) v.
// The backward is the straight-through gradient of csrc/cpu/group_assign_cpu.cpp.
//
// Types: T ∈ {float, __half, __nv_bfloat16, double}; every sum is accumulated
// in acc_t = float (double for double inputs). All reductions run in a fixed
// order (no floating-point atomics), so results are bitwise reproducible for a
// given shape on a given GPU.
//
// Layouts: q, k, v need unit stride on their last axis; the batch and row
// strides are free (in elements). Outputs and the noise tensor are contiguous.
// Gumbel noise: `noise` (B,N,P) in acc_t, or, when noise == nullptr and
// use_key, drawn in-kernel from kernels/rng.h at flat index (b·N + n)·P + p.
//
// Scratch memory: the caller passes `workspace` of at least
// group_assign_{fwd,bwd}_workspace_bytes(...) bytes (any alignment ≥ 256 B,
// e.g. from a caching allocator); its contents on entry do not matter.
// Launchers only enqueue work on `stream` and return the launch status.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace rexfast {
namespace cuda {

template <typename T>
struct GroupAssignAcc {
  using type = float;
};
template <>
struct GroupAssignAcc<double> {
  using type = double;
};

template <typename T>
struct GroupAssignFwdParams {
  using acc_t = typename GroupAssignAcc<T>::type;
  int64_t B = 0, N = 0, P = 0, C = 0, D = 0;
  const T* q = nullptr;  // q[b*q_sb + n*q_sn + c]
  int64_t q_sb = 0, q_sn = 0;
  const T* k = nullptr;  // k[b*k_sb + p*k_sp + c]
  int64_t k_sb = 0, k_sp = 0;
  const T* v = nullptr;  // v[b*v_sb + p*v_sp + d]
  int64_t v_sb = 0, v_sp = 0;
  const acc_t* tau = nullptr;    // device pointer to one value
  const acc_t* noise = nullptr;  // contiguous (B,N,P) or nullptr
  uint32_t key = 0;
  bool use_key = false;  // in-kernel noise when noise == nullptr
  T* out = nullptr;       // (B,N,D) contiguous
  T* assign = nullptr;    // (B,N,P) contiguous, one-hot over N
  float* counts = nullptr;  // (B,N) pixels per token
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

template <typename T>
struct GroupAssignBwdParams {
  using acc_t = typename GroupAssignAcc<T>::type;
  int64_t B = 0, N = 0, P = 0, C = 0, D = 0;
  const T* q = nullptr;
  int64_t q_sb = 0, q_sn = 0;
  const T* k = nullptr;
  int64_t k_sb = 0, k_sp = 0;
  const T* v = nullptr;
  int64_t v_sb = 0, v_sp = 0;
  const acc_t* tau = nullptr;
  const acc_t* noise = nullptr;
  uint32_t key = 0;
  bool use_key = false;
  const acc_t* dout = nullptr;    // (B,N,D) contiguous
  const T* dassign = nullptr;     // (B,N,P) contiguous, in the input dtype, or
  const acc_t* dassign_acc = nullptr;  // the same in acc_t (used when non-null)
  const acc_t* out = nullptr;     // (B,N,D) contiguous, the forward output
  const float* counts = nullptr;  // (B,N), the forward counts
  T* dq = nullptr;       // (B,N,C) contiguous
  T* dk = nullptr;       // (B,P,C) contiguous
  T* dv = nullptr;       // (B,P,D) contiguous
  acc_t* dtau = nullptr;  // one value
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Scratch bytes the launchers need (depends on the shape only).
template <typename T>
size_t group_assign_fwd_workspace_bytes(int64_t B, int64_t N, int64_t P, int64_t C, int64_t D);
template <typename T>
size_t group_assign_bwd_workspace_bytes(int64_t B, int64_t N, int64_t P, int64_t C, int64_t D);

// Enqueue the forward / backward on `stream`. Returns cudaErrorInvalidValue
// for bad sizes (any of B,N,P,C,D < 1, B*N*P ≥ 2^31), a null pointer or a too
// small workspace, cudaErrorInvalidConfiguration when N is too large for the
// per-tile shared memory of the current device, else the launch status.
template <typename T>
cudaError_t group_assign_fwd(const GroupAssignFwdParams<T>& params, cudaStream_t stream);
template <typename T>
cudaError_t group_assign_bwd(const GroupAssignBwdParams<T>& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace rexfast
