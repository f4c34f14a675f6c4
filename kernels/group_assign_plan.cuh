// group_assign's host-side planning: how the workspace is carved, how pixels
// are split into pooling segments and dq̂ product tiles, and the size and
// launch limits the launchers in kernels/group_assign.cu check. Host code (the
// CUDA runtime only, no kernels); torch-free.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <algorithm>

#include "group_assign.cuh"
#include "group_assign_device.cuh"

namespace rexfast {
namespace cuda {
namespace group_assign_detail {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Carves typed arrays out of the workspace (or only measures with base == nullptr).
struct Carver {
  char* base;
  size_t off = 0;
  template <typename U>
  U* take(int64_t n) {
    off = (off + 255) & ~size_t(255);
    U* ptr = base ? reinterpret_cast<U*>(base + off) : nullptr;
    off += static_cast<size_t>(n) * sizeof(U);
    return ptr;
  }
};

struct PoolPlan {
  int64_t segs, seg_len;
};
inline PoolPlan pool_plan(int64_t B, int64_t N, int64_t P) {
  int64_t segs = std::max<int64_t>(1, ceil_div(kPoolTargetBlocks, B * N));
  segs = std::max<int64_t>(1, std::min(segs, ceil_div(P, kPoolMinSeg)));
  const int64_t seg_len = ceil_div(ceil_div(P, segs), kPoolThreads) * kPoolThreads;
  return {ceil_div(P, seg_len), seg_len};
}

struct GemmPlan {
  int64_t psplit, plen, ntiles, ctiles;
};
inline GemmPlan gemm_plan(int64_t B, int64_t N, int64_t P, int64_t C) {
  const int64_t ntiles = ceil_div(N, kGN), ctiles = ceil_div(C, kGC);
  int64_t psplit = std::max<int64_t>(1, ceil_div(kGemmTargetBlocks, B * ntiles * ctiles));
  psplit = std::max<int64_t>(1, std::min(psplit, ceil_div(P, kGemmMinSeg)));
  const int64_t plen = ceil_div(ceil_div(P, psplit), kGP) * kGP;
  return {ceil_div(P, plen), plen, ntiles, ctiles};
}

inline bool sizes_ok(int64_t B, int64_t N, int64_t P, int64_t C, int64_t D) {
  constexpr int64_t kIntMax = 2147483647;
  if (B < 1 || N < 1 || P < 1 || C < 1 || D < 1) return false;
  if (N > kIntMax || C > kIntMax || D > kIntMax) return false;
  if (B * N > kIntMax || B * N * P > kIntMax) return false;  // the hash index is 32-bit
  return true;
}

inline cudaError_t smem_limit(size_t* limit) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  *limit = static_cast<size_t>(optin);
  return cudaSuccess;
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

inline bool grid_ok(int64_t blocks) { return blocks >= 1 && blocks <= 2147483647; }

template <typename T>
struct FwdWork {
  using A = typename GroupAssignAcc<T>::type;
  A* qhat;
  int* labels;
  A* partial;
  A* hits;
  int* poison;           // (B,) 1 where a pixel's softmax column is NaN
  int* nonfinite;        // (B*N*segs, D) non-finite v values per token segment
  int* nonfinite_total;  // (B, D)
  PoolPlan pool;
  size_t bytes;
};
template <typename T>
FwdWork<T> fwd_work(void* base, int64_t B, int64_t N, int64_t P, int64_t C, int64_t D) {
  using A = typename GroupAssignAcc<T>::type;
  FwdWork<T> w{};
  w.pool = pool_plan(B, N, P);
  Carver cv{static_cast<char*>(base)};
  w.qhat = cv.take<A>(B * N * C);
  w.labels = cv.take<int>(B * P);
  w.partial = cv.take<A>(B * N * w.pool.segs * D);
  w.hits = cv.take<A>(B * N * w.pool.segs);
  w.poison = cv.take<int>(B);
  w.nonfinite = cv.take<int>(B * N * w.pool.segs * D);
  w.nonfinite_total = cv.take<int>(B * D);
  w.bytes = cv.off;
  return w;
}

template <typename T>
struct BwdWork {
  using A = typename GroupAssignAcc<T>::type;
  A* qhat;
  A* inv_r1;
  A* cvec;
  T* dv_rows;
  A* dsk;
  A* dtau_part;
  A* dq_part;
  GemmPlan gemm;
  size_t bytes;
};
template <typename T>
BwdWork<T> bwd_work(void* base, int64_t B, int64_t N, int64_t P, int64_t C, int64_t D) {
  using A = typename GroupAssignAcc<T>::type;
  BwdWork<T> w{};
  w.gemm = gemm_plan(B, N, P, C);
  Carver cv{static_cast<char*>(base)};
  w.qhat = cv.take<A>(B * N * C);
  w.inv_r1 = cv.take<A>(B * N);
  w.cvec = cv.take<A>(B * N);
  w.dv_rows = cv.take<T>(B * N * D);
  w.dsk = cv.take<A>(B * N * P);
  w.dtau_part = cv.take<A>(B * ceil_div(P, kMinTile));
  w.dq_part = cv.take<A>(B * w.gemm.psplit * N * C);
  w.bytes = cv.off;
  return w;
}

}  // namespace group_assign_detail
}  // namespace cuda
}  // namespace rexfast
