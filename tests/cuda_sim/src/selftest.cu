// Kernels that exercise cuda_sim itself (tests/cuda_sim/test_sim_runtime.py):
// indexing, barriers, dynamic shared memory, warp collectives, atomics, the
// conversions, the CUB stand-in, launch errors, and the undefined behaviour the
// simulation reports. Written as CUDA and translated like kernels/*.cu.
#include <cub/cub.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

extern __shared__ __align__(16) float dyn[];

// Six ints per thread: its global linear id's view of every index variable.
__global__ void index_kernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + 8 * (block * nthreads + thread);
  o[0] = blockIdx.x, o[1] = blockIdx.y, o[2] = blockIdx.z;
  o[3] = threadIdx.x, o[4] = threadIdx.y, o[5] = threadIdx.z;
  o[6] = gridDim.x * 100 + gridDim.y * 10 + gridDim.z;
  o[7] = blockDim.x * 100 + blockDim.y * 10 + blockDim.z;
}

// A tree sum in dynamic shared memory: correct only if every barrier works.
__global__ void block_sum_kernel(const float* x, float* out, int n) {
  const int t = threadIdx.x;
  float s = 0;
  for (int i = t; i < n; i += blockDim.x) s += x[blockIdx.x * n + i];
  dyn[t] = s;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (t < half) dyn[t] += dyn[t + half];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = dyn[0];
}

// Per lane: shfl, xor, up, down of in[lane] (int and double), ballot/any/all.
__global__ void warp_ops_kernel(const int* in, int* out, double* dout, int width, int arg) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int x = in[threadIdx.x];
  int* o = out + 8 * threadIdx.x;
  o[0] = __shfl_sync(0xffffffffu, x, arg, width);
  o[1] = __shfl_xor_sync(0xffffffffu, x, arg, width);
  o[2] = __shfl_up_sync(0xffffffffu, x, static_cast<unsigned>(arg), width);
  o[3] = __shfl_down_sync(0xffffffffu, x, static_cast<unsigned>(arg), width);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, x & 1));
  o[5] = __any_sync(0xffffffffu, x == 7 + 32 * warp);
  o[6] = __all_sync(0xffffffffu, x >= 0);
  o[7] = static_cast<int>(__activemask());
  dout[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 0.25 + x, arg, width);
  __syncwarp();
  (void)lane;
}

// Half of a warp shuffles among itself with a partial mask (legal).
__global__ void half_warp_kernel(const int* in, int* out) {
  const int lane = threadIdx.x & 31;
  int x = in[threadIdx.x];
  if (lane < 16) x = __shfl_down_sync(0x0000ffffu, x, 1, 16);
  else x = __shfl_up_sync(0xffff0000u, x, 1, 16);
  out[threadIdx.x] = x;
}

__global__ void atomics_kernel(float* f, double* d, int* i, unsigned long long* u, int* mx, int* cas_count) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(f, 1.0f);
  atomicAdd(d, 0.5);
  atomicAdd(i, 1);
  atomicAdd(u, 2ull);
  atomicMax(mx, gid);
  int old = *cas_count, seen;
  do {  // an increment through compare-and-swap
    seen = old;
    old = atomicCAS(cas_count, seen, seen + 1);
  } while (old != seen);
}

// Reads the neighbour's shared value with or without the barrier in between.
__global__ void neighbour_kernel(int* out, int with_barrier) {
  int* s = reinterpret_cast<int*>(dyn);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = t;
  if (with_barrier) __syncthreads();
  out[t] = s[(t + 1) % n];
}

// ---- undefined behaviour the simulation must report
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void deadlock_kernel(int* out) {
  int x = threadIdx.x;
  if ((threadIdx.x & 31) < 16) __syncthreads();
  else x = __shfl_sync(0xffffffffu, x, 0);
  out[threadIdx.x] = x;
}

__global__ void lane_exits_kernel(int* out) {
  int x = threadIdx.x;
  if ((threadIdx.x & 31) >= 16) return;
  x = __shfl_sync(0xffffffffu, x, 3);
  out[threadIdx.x] = x;
}

__global__ void outside_mask_kernel(int* out) {
  int x = threadIdx.x;
  if ((threadIdx.x & 31) < 16) x = __shfl_sync(0x0000ffffu, x, 20);
  out[threadIdx.x] = x;
}

__global__ void mixed_collectives_kernel(int* out) {
  int x = threadIdx.x;
  if ((threadIdx.x & 31) < 16) x = __shfl_sync(0xffffffffu, x, 0);
  else x = static_cast<int>(__ballot_sync(0xffffffffu, x));
  out[threadIdx.x] = x;
}

__global__ void write_kernel(int* out, int64_t index) { out[index] = 1; }

__global__ void smem_write_kernel(int64_t byte) { reinterpret_cast<unsigned char*>(dyn)[byte] = 1; }

__global__ void noop_kernel() {}

}  // namespace

extern "C" {

int sim_test_index(int* out, const int* grid, const int* block) {
  index_kernel<<<dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2])>>>(out);
  return cudaGetLastError();
}

int sim_test_block_sum(const float* x, float* out, int blocks, int threads, int n) {
  block_sum_kernel<<<blocks, threads, threads * sizeof(float)>>>(x, out, n);
  return cudaGetLastError();
}

int sim_test_warp_ops(const int* in, int* out, double* dout, int threads, int width, int arg) {
  warp_ops_kernel<<<1, threads>>>(in, out, dout, width, arg);
  return cudaGetLastError();
}

int sim_test_half_warp(const int* in, int* out) {
  half_warp_kernel<<<1, 64>>>(in, out);
  return cudaGetLastError();
}

int sim_test_atomics(int blocks, int threads, float* f, double* d, int* i, unsigned long long* u, int* mx,
                     int* cas_count) {
  atomics_kernel<<<blocks, threads>>>(f, d, i, u, mx, cas_count);
  return cudaGetLastError();
}

int sim_test_neighbour(int* out, int threads, int with_barrier) {
  neighbour_kernel<<<1, threads, threads * sizeof(int)>>>(out, with_barrier);
  return cudaGetLastError();
}

// which: 0 divergent barrier, 1 deadlock, 2 a lane exits before a collective,
// 3 a shuffle reads outside its mask, 4 different collectives in one warp.
int sim_test_fault(int which, int* out) {
  switch (which) {
    case 0: divergent_barrier_kernel<<<1, 64>>>(out); break;
    case 1: deadlock_kernel<<<1, 64>>>(out); break;
    case 2: lane_exits_kernel<<<1, 64>>>(out); break;
    case 3: outside_mask_kernel<<<1, 64>>>(out); break;
    default: mixed_collectives_kernel<<<1, 64>>>(out); break;
  }
  return cudaGetLastError();
}

int sim_test_write(int* out, int64_t index) {
  write_kernel<<<1, 1>>>(out, index);
  return cudaGetLastError();
}

int sim_test_smem_write(size_t smem, int64_t byte) {
  smem_write_kernel<<<1, 1, smem>>>(byte);
  return cudaGetLastError();
}

// which: 0 an empty grid, 1 too many threads, 2 > 48 KiB of dynamic shared
// memory without the attribute, 3 the same after cudaFuncSetAttribute, 4 more
// than the device's opt-in limit.
int sim_test_launch_config(int which, int smem) {
  switch (which) {
    case 0: noop_kernel<<<0, 32>>>(); break;
    case 1: noop_kernel<<<1, 2048>>>(); break;
    case 2: smem_write_kernel<<<1, 32, static_cast<size_t>(smem)>>>(0); break;
    case 3: {
      const cudaError_t err = cudaFuncSetAttribute(smem_write_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return err;
      smem_write_kernel<<<1, 32, static_cast<size_t>(smem)>>>(0);
      break;
    }
    default:
      return cudaFuncSetAttribute(smem_write_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  }
  return cudaGetLastError();
}

// ---- host-side intrinsics, element-wise over arrays
void sim_test_float2half(const float* x, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(x[i]));
}
void sim_test_half2float(const uint16_t* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(x[i]));
}
void sim_test_float2bf16(const float* x, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}
void sim_test_bf162float(const uint16_t* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__ushort_as_bfloat16(x[i]));
}
// op: 0 __fadd_rn, 1 __fsub_rn, 2 __fmul_rn, 3 __fdiv_rn, 4 __fmaf_rn(a, b, c)
void sim_test_float_op(int op, const float* a, const float* b, const float* c, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    switch (op) {
      case 0: out[i] = __fadd_rn(a[i], b[i]); break;
      case 1: out[i] = __fsub_rn(a[i], b[i]); break;
      case 2: out[i] = __fmul_rn(a[i], b[i]); break;
      case 3: out[i] = __fdiv_rn(a[i], b[i]); break;
      default: out[i] = __fmaf_rn(a[i], b[i], c[i]); break;
    }
  }
}

int sim_test_sort_pairs(const uint32_t* keys_in, uint32_t* keys_out, const int32_t* ids_in, int32_t* ids_out, int n,
                        int begin_bit, int end_bit) {
  size_t bytes = 0;
  cudaError_t err = cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, ids_in, ids_out, n, begin_bit,
                                                    end_bit);
  if (err != cudaSuccess) return err;
  void* temp = nullptr;
  if ((err = cudaMalloc(&temp, bytes)) != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, ids_in, ids_out, n, begin_bit, end_bit);
  cudaFree(temp);
  return err;
}

}  // extern "C"
