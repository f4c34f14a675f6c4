// cuda_sim: executes CUDA C++ kernels on the host CPU, for tests only.
//
// A kernel launch runs every block of the grid; the threads of one block are
// fibers (cooperative user-mode threads, one stack each) on one OS thread, so
//   * __syncthreads() is a real barrier: a fiber that reaches it is suspended
//     until every live thread of its block has arrived;
//   * warp collectives (__shfl*_sync, __ballot_sync, __any_sync, __all_sync,
//     __syncwarp) are exchanges among the 32 lanes of a warp: each lane posts its
//     value and is suspended until every lane named in the mask has posted;
//   * blockIdx/threadIdx/blockDim/gridDim read the running fiber's context;
//   * __shared__ variables are `static thread_local`: one copy per OS worker
//     thread, and a worker runs one block at a time, so one copy per block;
//     dynamic shared memory (extern __shared__) is a per-block buffer, filled
//     with 0xFF bytes (NaN for floats) at block start and followed by an
//     inaccessible guard page;
//   * blocks are spread over `workers` OS threads (atomics then race for real).
// Faults the hardware would not report but that are undefined behaviour in
// CUDA abort the launch with a message: a warp collective whose mask names an
// exited or missing lane or a lane that does not call it, lanes of one warp in
// different collectives, __syncthreads() reached at different places, and
// deadlock (threads waiting for a barrier that can no longer complete).
// Within a block the fibers run in a chosen order (forward, reverse or seeded
// random) up to their next barrier; running a kernel under several orders and
// comparing the results exposes reads of shared data a missing barrier leaves
// unordered.
//
// What it cannot show: speed, the GPU memory model (there are no data races
// between fibers of one block: each runs alone until it blocks), races a
// missing __syncwarp() hides between lanes that happen to stay converged,
// nvcc's floating-point contraction (a*b+c fused into fma; this build uses
// -ffp-contract=off) and fast-math approximations (expf/logf here are glibc's),
// and the scheduling of divergent warps.
//
// The translation of `kernel<<<grid, block, smem, stream>>>(args)` into
// `::sim::launch(kernel, "kernel", ::sim::LaunchConfig(grid, block, smem, stream))(args)`
// and of `extern __shared__ T name[];` is done by tests/cuda_sim/sim_translate.py.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __constant__
#define __managed__

// ------------------------------------------------------------------ runtime types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
using uint3 = dim3;

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
using cudaError_t = cudaError;

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);

namespace sim {
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return ::sim::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ------------------------------------------------------------------ the thread context
namespace sim {

struct Block;

// One CUDA thread (a fiber). Kernel code reads it through threadIdx & co.
struct ThreadCtx {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int linear = 0;  // linear thread index in the block (x fastest)
  int lane = 0, warp = 0;
  Block* block = nullptr;
  void* sp = nullptr;  // saved stack pointer while suspended (x86-64 switch)
  void* uctx = nullptr;  // ucontext_t while suspended (other targets)
  int state = 0;  // 0 runnable, 1 waiting, 2 done
  uint64_t xresult = 0;  // this lane's result of the last warp collective
  const char* wait_what = nullptr;  // for deadlock reports
  const char* wait_file = nullptr;
  unsigned wait_line = 0;
};

extern thread_local ThreadCtx* g_current;
inline const ThreadCtx& ctx() { return *g_current; }

// An error only a simulation sees (undefined behaviour in CUDA): aborts the launch.
[[noreturn]] void fault(const std::string& message);

void syncthreads(const std::source_location& where);
void threadfence();

enum WarpOp : int { kOpSync, kOpShfl, kOpShflXor, kOpShflUp, kOpShflDown, kOpBallot };
// Posts `value` for this lane, waits until every lane of `mask` has posted, and
// returns this lane's result (the source lane's value for shuffles, the ballot
// bits for kOpBallot, 0 for kOpSync).
uint64_t warp_collective(unsigned mask, WarpOp op, uint64_t value, int arg, int width,
                         const std::source_location& where);
unsigned active_mask();

void* dynamic_smem();

// ------------------------------------------------------------------ launches
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

// Runs thunk(state) once per thread of every block; returns the launch status
// (configuration errors) and records a fault in the sticky error.
cudaError_t run_grid(const void* kernel, const char* name, const LaunchConfig& cfg, void (*thunk)(void*),
                     void* state);

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  const char* name;
  LaunchConfig cfg;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // CUDA converts the arguments to the parameter types and copies them once.
    struct State {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } state{kernel, std::tuple<std::decay_t<P>...>(std::forward<Args>(args)...)};
    auto thunk = [](void* s) {
      State* st = static_cast<State*>(s);
      std::apply(st->kernel, st->params);  // each thread gets its own copy of the parameters
    };
    run_grid(reinterpret_cast<const void*>(kernel), name, cfg, thunk, &state);
  }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), const char* name, const LaunchConfig& cfg) {
  return Launcher<P...>{kernel, name, cfg};
}

}  // namespace sim

#define threadIdx (::sim::ctx().thread_idx)
#define blockIdx (::sim::ctx().block_idx)
#define blockDim (::sim::ctx().block_dim)
#define gridDim (::sim::ctx().grid_dim)
#define warpSize 32

// ------------------------------------------------------------------ barriers and warp collectives
inline void __syncthreads(const std::source_location& where = std::source_location::current()) {
  ::sim::syncthreads(where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location& where = std::source_location::current()) {
  ::sim::warp_collective(mask, ::sim::kOpSync, 0, 0, 32, where);
}
inline void __threadfence() { ::sim::threadfence(); }
inline void __threadfence_block() { ::sim::threadfence(); }
inline unsigned __activemask() { return ::sim::active_mask(); }

namespace sim {
template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles take scalars of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace sim

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                     const std::source_location& where = std::source_location::current()) {
  return ::sim::from_bits<T>(::sim::warp_collective(mask, ::sim::kOpShfl, ::sim::to_bits(var), src_lane, width, where));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const std::source_location& where = std::source_location::current()) {
  return ::sim::from_bits<T>(
      ::sim::warp_collective(mask, ::sim::kOpShflXor, ::sim::to_bits(var), lane_mask, width, where));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const std::source_location& where = std::source_location::current()) {
  return ::sim::from_bits<T>(
      ::sim::warp_collective(mask, ::sim::kOpShflUp, ::sim::to_bits(var), static_cast<int>(delta), width, where));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const std::source_location& where = std::source_location::current()) {
  return ::sim::from_bits<T>(
      ::sim::warp_collective(mask, ::sim::kOpShflDown, ::sim::to_bits(var), static_cast<int>(delta), width, where));
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const std::source_location& where = std::source_location::current()) {
  return static_cast<unsigned>(::sim::warp_collective(mask, ::sim::kOpBallot, predicate != 0, 0, 32, where));
}
inline int __any_sync(unsigned mask, int predicate,
                      const std::source_location& where = std::source_location::current()) {
  return __ballot_sync(mask, predicate, where) != 0;
}
inline int __all_sync(unsigned mask, int predicate,
                      const std::source_location& where = std::source_location::current()) {
  return __ballot_sync(mask, predicate, where) == mask;
}

// ------------------------------------------------------------------ atomics (device-wide, relaxed like CUDA's)
namespace sim {
template <typename T>
inline T atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
template <typename T, typename F>
inline T atomic_update(T* address, F f) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {
  }
  return old;
}
}  // namespace sim

inline float atomicAdd(float* a, float v) { return ::sim::atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return ::sim::atomic_add(a, v); }
inline int atomicAdd(int* a, int v) { return ::sim::atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return ::sim::atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return ::sim::atomic_add(a, v); }
inline int atomicSub(int* a, int v) { return ::sim::atomic_add(a, -v); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return ::sim::atomic_add(a, 0u - v); }
inline int atomicMax(int* a, int v) {
  return ::sim::atomic_update(a, [v](int o) { return o > v ? o : v; });
}
inline unsigned atomicMax(unsigned* a, unsigned v) {
  return ::sim::atomic_update(a, [v](unsigned o) { return o > v ? o : v; });
}
inline long long atomicMax(long long* a, long long v) {
  return ::sim::atomic_update(a, [v](long long o) { return o > v ? o : v; });
}
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
  return ::sim::atomic_update(a, [v](unsigned long long o) { return o > v ? o : v; });
}
inline int atomicMin(int* a, int v) {
  return ::sim::atomic_update(a, [v](int o) { return o < v ? o : v; });
}
inline unsigned atomicMin(unsigned* a, unsigned v) {
  return ::sim::atomic_update(a, [v](unsigned o) { return o < v ? o : v; });
}
inline long long atomicMin(long long* a, long long v) {
  return ::sim::atomic_update(a, [v](long long o) { return o < v ? o : v; });
}
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
  return ::sim::atomic_update(a, [v](unsigned long long o) { return o < v ? o : v; });
}
inline int atomicExch(int* a, int v) { return std::atomic_ref<int>(*a).exchange(v, std::memory_order_relaxed); }
inline unsigned atomicExch(unsigned* a, unsigned v) {
  return std::atomic_ref<unsigned>(*a).exchange(v, std::memory_order_relaxed);
}
inline float atomicExch(float* a, float v) { return std::atomic_ref<float>(*a).exchange(v, std::memory_order_relaxed); }
template <typename T>
inline T sim_atomic_cas(T* a, T compare, T value) {
  std::atomic_ref<T>(*a).compare_exchange_strong(compare, value, std::memory_order_relaxed);
  return compare;  // the old value, whether or not it was replaced
}
inline int atomicCAS(int* a, int c, int v) { return sim_atomic_cas(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return sim_atomic_cas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) {
  return sim_atomic_cas(a, c, v);
}
inline unsigned short atomicCAS(unsigned short* a, unsigned short c, unsigned short v) {
  return sim_atomic_cas(a, c, v);
}

// ------------------------------------------------------------------ bit casts and integer intrinsics
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned long long>(x)) + 1; }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ------------------------------------------------------------------ float intrinsics
// The _rn forms are single IEEE operations in round-to-nearest-even; the host
// build uses SSE arithmetic and -ffp-contract=off, so `a + b` is exactly
// __fadd_rn. The fast approximations (__expf, __logf, __fdividef) are evaluated
// exactly here: the simulation cannot reproduce their hardware error.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// min/max as CUDA declares them for device code: integer overloads compare,
// floating-point ones are fminf/fmaxf (a NaN operand yields the other one).
template <typename A, typename B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline constexpr std::common_type_t<A, B> min(A a, B b) {
  using R = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<R>) {
    return std::fmin(static_cast<R>(a), static_cast<R>(b));
  } else {
    return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b);
  }
}
template <typename A, typename B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline constexpr std::common_type_t<A, B> max(A a, B b) {
  using R = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<R>) {
    return std::fmax(static_cast<R>(a), static_cast<R>(b));
  } else {
    return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b);
  }
}

// ------------------------------------------------------------------ half and bfloat16
// Storage types with CUDA's names and bit layout; conversions round to nearest
// even, with CUDA's results for the special values: every NaN becomes the
// canonical NaN 0x7FFF (what the sm_90 cvt instructions return), overflow
// becomes ±inf, and half subnormals are produced and read exactly.
struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(__half_raw r) : __x(r.x) {}
  constexpr operator __half_raw() const { return __half_raw{__x}; }
};
struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  constexpr operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2);

namespace sim {
// Shifts a 24-bit significand right by `shift` (1..31) with round-to-nearest-even.
constexpr uint32_t shift_rne(uint32_t m, int shift) {
  if (shift >= 32) return 0;
  const uint32_t q = m >> shift;
  const uint32_t rem = m & ((uint32_t(1) << shift) - 1);
  const uint32_t half = uint32_t(1) << (shift - 1);
  return q + ((rem > half || (rem == half && (q & 1))) ? 1 : 0);
}

constexpr unsigned short float_to_half_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;                          // NaN: canonical
  if (ax >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // ≥ 65520 rounds to inf
  const int exp = static_cast<int>(ax >> 23);                    // biased float exponent
  if (exp >= 113) {                                              // a normal half (≥ 2^-14)
    // rebias 127 → 15 and round the 23-bit mantissa to 10 bits; a carry into
    // the exponent is the correct rounding up to the next binade
    const uint32_t r = shift_rne(ax - (112u << 23), 13);
    return static_cast<unsigned short>(sign | r);
  }
  if (exp < 102) return static_cast<unsigned short>(sign);       // < 2^-25: rounds to ±0
  // a half subnormal: value = m·2^(exp−150), in units of 2^-24 that is m·2^(exp−126)
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  return static_cast<unsigned short>(sign | shift_rne(m, 126 - exp));
}

constexpr float half_bits_to_float(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN (payload kept)
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return std::bit_cast<float>(sign);
  // subnormal: normalise
  int e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return std::bit_cast<float>(sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3ffu) << 13));
}

constexpr unsigned short float_to_bf16_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical
  const uint32_t lsb = (x >> 16) & 1u;
  return static_cast<unsigned short>((x + 0x7fffu + lsb) >> 16);  // RNE; overflow carries into inf
}

constexpr float bf16_bits_to_float(unsigned short b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
}  // namespace sim

inline __half __float2half_rn(float f) { return __half_raw{::sim::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return ::sim::half_bits_to_float(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return __half_raw{x}; }
inline bool __hisnan(__half h) { return (h.__x & 0x7fffu) > 0x7c00u; }
inline bool __hisinf(__half h) { return (h.__x & 0x7fffu) == 0x7c00u; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16_raw{::sim::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::sim::bf16_bits_to_float(b.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16_raw{x}; }
inline bool __hisnan(__nv_bfloat16 b) { return (b.__x & 0x7fffu) > 0x7f80u; }
