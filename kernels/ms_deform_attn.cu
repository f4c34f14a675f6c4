// ms_deform_attn CUDA kernels; interface and conventions in ms_deform_attn.cuh.
//
// The same structure as the Triton kernels (rexfast/ops/ms_deform_attn/triton_kernels.py)
// and the C++ ones (csrc/cpu/ms_deform_attn.cpp), one warp per (b, q, h) row:
// lane j holds channels j, j + 32, ... of the row; every lane computes the
// point's taps (the same scalar work, no divergence), loads its channel of the
// four corner rows (coalesced D-wide rows) and accumulates.
//
// Forward, one launch: out[row, c] = Σ_points a · ((((w00·v00 + w10·v10) + w01·v01) + w11·v11)).
// Backward:
//   1. bwd_kernel, per point: s, t_k = Σ_c (a·g_c)·v_k,c and d a = Σ_c g_c·s_c
//      as warp butterfly sums (fixed order); lane 0 stores d a and d loc;
//      atomic mode: atomicAdd of w_k·a·g into the value gradient;
//      deterministic mode: lanes 0..3 record tap k's target row (or the
//      sentinel B·S·M for outside taps), its id and w_k.
//   deterministic mode only:
//   2. cub::DeviceRadixSort::SortPairs (stable) on (row, tap id);
//   3. offsets_kernel: offsets[r] = first sorted index with row ≥ r;
//   4. gather_kernel: one warp per value row sums w·(a·g) over its taps in
//      sorted (tap) order, sequentially per lane: bitwise reproducible.
//   atomic mode for half/bf16: accumulate in a float workspace, then convert.
// Indices and offsets are int64 wherever a product of sizes can pass 2^31.
#include "ms_deform_attn.cuh"

#include <cub/cub.cuh>

#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace rexfast {
namespace cuda {
namespace {

using namespace detail;  // Cvt, warp_sum (common.cuh)

constexpr int kWarps = 8;  // rows (warps) per CTA
constexpr int kThreads = kWarps * 32;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops beyond this
constexpr int kGatherWarps = 8;
constexpr int kOffsetThreads = 256;
constexpr size_t kAlign = 256;

template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

struct Level {
  int64_t height, width, start;
};

__device__ __forceinline__ Level load_level(const int64_t* shapes, const int64_t* starts, int64_t l) {
  return {shapes[2 * l], shapes[2 * l + 1], starts[l]};
}

// The four corner taps of one point, corner k: dx = k & 1, dy = k >> 1.
template <typename A>
struct Taps {
  bool nan;
  bool edge;  // x = −1 or y = −1: the location gradient is 0 (the sample is 0 for x ≤ −1)
  bool inside[4];
  int64_t pixel[4];  // row of value's S axis
  A wx[4], wy[4], w[4];
};

template <typename A>
__device__ __forceinline__ Taps<A> point_taps(A loc_x, A loc_y, const Level& lv, int64_t S) {
  Taps<A> t;
  t.nan = false;
  t.edge = false;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    t.inside[k] = false;
    t.pixel[k] = 0;
    t.wx[k] = t.wy[k] = t.w[k] = A(0);
  }
  const A wf = static_cast<A>(lv.width), hf = static_cast<A>(lv.height);
  const A x = loc_x * wf - A(0.5);
  const A y = loc_y * hf - A(0.5);
  if (isnan(x) || isnan(y)) {
    t.nan = true;  // the sample is NaN; nothing is read
    return t;
  }
  t.edge = x == A(-1) || y == A(-1);
  // Some tap is inside iff −1 ≤ x < W and −1 ≤ y < H; this also rejects ±inf and
  // huge values before any integer conversion. Degenerate levels read nothing.
  if (lv.width < 1 || lv.height < 1 || lv.width > S || lv.height > S) return t;
  if (!(x >= A(-1) && x < wf && y >= A(-1) && y < hf)) return t;
  const A x0 = floor(x), y0 = floor(y);
  const A fx = x - x0, fy = y - y0;
  const int64_t ix = static_cast<int64_t>(x0), iy = static_cast<int64_t>(y0);  // in [−1, W−1] × [−1, H−1]
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int dx = k & 1, dy = k >> 1;
    const int64_t cx = ix + dx, cy = iy + dy;
    if (cx < 0 || cx > lv.width - 1 || cy < 0 || cy > lv.height - 1) continue;
    const int64_t pixel = lv.start + cy * lv.width + cx;
    if (pixel < 0 || pixel >= S) continue;  // bad level starts: never out of bounds
    t.inside[k] = true;
    t.pixel[k] = pixel;
    t.wx[k] = dx ? fx : A(1) - fx;
    t.wy[k] = dy ? fy : A(1) - fy;
    t.w[k] = t.wx[k] * t.wy[k];
  }
  return t;
}

// ---------------------------------------------------------------- forward
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const MSDeformAttnFwdParams<T> p) {
  const MSDeformAttnDims d = p.dims;
  const int lane = threadIdx.x & 31;
  const int64_t n_rows = d.B * d.Q * d.M, LP = d.L * d.P;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < n_rows;
       row += row_stride) {
    const int64_t h = row % d.M, b = row / d.M / d.Q;
    const T* vb = p.value + b * p.value_sb + h * p.value_sm;
    for (int64_t d0 = 0; d0 < d.D; d0 += 32) {
      const int64_t c = d0 + lane;
      const bool active = c < d.D;
      A acc = 0;
      for (int64_t l = 0; l < d.L; ++l) {
        const Level lv = load_level(p.spatial_shapes, p.level_start_index, l);
        for (int64_t pt = 0; pt < d.P; ++pt) {
          const int64_t point = row * LP + l * d.P + pt;
          const A a = Cvt<T>::to(p.attn[point]);
          const Taps<A> t = point_taps<A>(Cvt<T>::to(p.loc[2 * point]), Cvt<T>::to(p.loc[2 * point + 1]), lv, d.S);
          A v[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) v[k] = (t.inside[k] && active) ? Cvt<T>::to(vb[t.pixel[k] * p.value_ss + c]) : A(0);
          A s = ((t.w[0] * v[0] + t.w[1] * v[1]) + t.w[2] * v[2]) + t.w[3] * v[3];
          if (t.nan) s = quiet_nan<A>();
          acc += a * s;  // also for a sample of 0: a NaN/inf weight gives NaN
        }
      }
      if (active) p.out[row * d.D + c] = Cvt<T>::from(acc);
    }
  }
}

// ---------------------------------------------------------------- backward
template <typename T, typename A, bool kAtomic>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const MSDeformAttnBwdParams<T> p, A* __restrict__ gacc, uint32_t* __restrict__ keys,
               int32_t* __restrict__ ids, A* __restrict__ wtap) {
  const MSDeformAttnDims d = p.dims;
  const int lane = threadIdx.x & 31;
  const int64_t n_rows = d.B * d.Q * d.M, LP = d.L * d.P;
  const uint32_t sentinel = static_cast<uint32_t>(d.B * d.S * d.M);  // after every real row
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < n_rows;
       row += row_stride) {
    const int64_t h = row % d.M, b = row / d.M / d.Q;
    const T* vb = p.value + b * p.value_sb + h * p.value_sm;
    const int64_t grow_base = b * d.S * d.M + h;  // value-gradient row of pixel s: grow_base + s·M
    for (int64_t l = 0; l < d.L; ++l) {
      const Level lv = load_level(p.spatial_shapes, p.level_start_index, l);
      for (int64_t pt = 0; pt < d.P; ++pt) {
        const int64_t point = row * LP + l * d.P + pt;
        const A a = Cvt<T>::to(p.attn[point]);
        const Taps<A> t = point_taps<A>(Cvt<T>::to(p.loc[2 * point]), Cvt<T>::to(p.loc[2 * point + 1]), lv, d.S);
        A ga = 0, tc[4] = {0, 0, 0, 0};
        for (int64_t c = lane; c < d.D; c += 32) {
          const A g = Cvt<T>::to(p.grad_out[row * d.D + c]);
          const A gs = a * g;  // d sample = a·g
          A v[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) v[k] = t.inside[k] ? Cvt<T>::to(vb[t.pixel[k] * p.value_ss + c]) : A(0);
          A s = ((t.w[0] * v[0] + t.w[1] * v[1]) + t.w[2] * v[2]) + t.w[3] * v[3];
          if (t.nan) s = quiet_nan<A>();
          ga += g * s;
#pragma unroll
          for (int k = 0; k < 4; ++k) tc[k] += gs * v[k];
          if (kAtomic) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (t.inside[k]) atomicAdd(gacc + (grow_base + t.pixel[k] * d.M) * d.D + c, t.w[k] * gs);
            }
          }
        }
        ga = warp_sum(ga);
#pragma unroll
        for (int k = 0; k < 4; ++k) tc[k] = warp_sum(tc[k]);
        if (lane == 0) {
          p.grad_attn[point] = Cvt<T>::from(ga);
          // ∂w_k/∂fx = ±wy_k, ∂w_k/∂fy = ±wx_k, inside taps only, in corner order
          A gfx = 0, gfy = 0;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!t.inside[k]) continue;
            gfx += (k & 1) ? t.wy[k] * tc[k] : -(t.wy[k] * tc[k]);
            gfy += (k >> 1) ? t.wx[k] * tc[k] : -(t.wx[k] * tc[k]);
          }
          if (t.edge) gfx = gfy = A(0);
          p.grad_loc[2 * point] = Cvt<T>::from(gfx * static_cast<A>(lv.width));
          p.grad_loc[2 * point + 1] = Cvt<T>::from(gfy * static_cast<A>(lv.height));
        }
        if (!kAtomic && lane < 4) {
          const int64_t tap = point * 4 + lane;
          bool inside = false;
          int64_t pixel = 0;
          A w = 0;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (k == lane) {
              inside = t.inside[k];
              pixel = t.pixel[k];
              w = t.w[k];
            }
          }
          keys[tap] = inside ? static_cast<uint32_t>(grow_base + pixel * d.M) : sentinel;
          ids[tap] = static_cast<int32_t>(tap);
          wtap[tap] = w;
        }
      }
    }
  }
}

// offsets[r] = the first sorted index whose row is ≥ r, for r = 0..n_vrows.
__global__ void offsets_kernel(const uint32_t* __restrict__ sorted, int64_t n_taps, int64_t n_vrows,
                               int64_t* __restrict__ offsets) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i <= n_taps; i += stride) {
    const int64_t lo = i == 0 ? 0 : static_cast<int64_t>(sorted[i - 1]) + 1;
    const int64_t key = i == n_taps ? n_vrows : static_cast<int64_t>(sorted[i]);
    const int64_t hi = key < n_vrows ? key : n_vrows;
    for (int64_t r = lo; r <= hi; ++r) offsets[r] = i;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kGatherWarps * 32)
    gather_kernel(const T* __restrict__ grad_out, const T* __restrict__ attn, const int32_t* __restrict__ ids,
                  const int64_t* __restrict__ offsets, const A* __restrict__ wtap, int64_t n_vrows, int64_t D,
                  int64_t LP, T* __restrict__ grad_value) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGatherWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGatherWarps + (threadIdx.x >> 5); r < n_vrows; r += stride) {
    const int64_t begin = offsets[r], end = offsets[r + 1];
    for (int64_t c = lane; c < D; c += 32) {
      A acc = 0;
      for (int64_t i = begin; i < end; ++i) {  // tap order: the same sums every run
        const int64_t tap = ids[i];
        const int64_t point = tap >> 2;
        const int64_t row = point / LP;  // the (b, q, h) row of the tap's point
        const A a = Cvt<T>::to(attn[point]);
        acc += wtap[tap] * (a * Cvt<T>::to(grad_out[row * D + c]));
      }
      grad_value[r * D + c] = Cvt<T>::from(acc);
    }
  }
}

template <typename T, typename A>
__global__ void convert_kernel(const A* __restrict__ src, int64_t n, T* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = Cvt<T>::from(src[i]);
}

// ---------------------------------------------------------------- host side
constexpr int64_t kIndexLimit = int64_t(1) << 31;

bool dims_ok(const MSDeformAttnDims& d) {
  if (d.B < 0 || d.Q < 0 || d.S < 1 || d.M < 1 || d.D < 1 || d.L < 1 || d.P < 1) return false;
  // sizes first bounded one by one so the products below cannot overflow
  for (int64_t x : {d.B, d.Q, d.S, d.M, d.D, d.L, d.P})
    if (x >= kIndexLimit) return false;
  if (d.B * d.S >= kIndexLimit || d.B * d.S * d.M >= kIndexLimit) return false;
  if (d.B * d.Q >= kIndexLimit || d.B * d.Q * d.M >= kIndexLimit || d.B * d.Q * d.M * d.L >= kIndexLimit ||
      d.B * d.Q * d.M * d.L * d.P >= kIndexLimit)
    return false;
  return true;
}

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

int end_bit_for(uint32_t max_key) {
  int bits = 1;
  while (bits < 32 && (uint64_t(1) << bits) <= max_key) ++bits;
  return bits;
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxBlocks, (items + per_block - 1) / per_block)));
}

// Pointers into the backward's workspace (any of them null when not needed).
template <typename A>
struct BwdWorkspace {
  A* acc = nullptr;  // atomic mode, half/bf16: float accumulation buffer (B,S,M,D)
  uint32_t* keys_in = nullptr;
  uint32_t* keys_out = nullptr;
  int32_t* ids_in = nullptr;
  int32_t* ids_out = nullptr;
  A* wtap = nullptr;
  int64_t* offsets = nullptr;
  void* cub_temp = nullptr;
  size_t cub_bytes = 0;
  size_t bytes = 0;  // total
  bool ok = false;
};

template <typename T, typename A>
BwdWorkspace<A> bwd_workspace(const MSDeformAttnDims& d, bool deterministic, void* base) {
  BwdWorkspace<A> w;
  if (!dims_ok(d)) return w;
  const int64_t n_vrows = d.B * d.S * d.M;
  const int64_t n_taps = d.B * d.Q * d.M * d.L * d.P * 4;
  char* p = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) -> void* {
    void* at = base ? static_cast<void*>(p + off) : nullptr;
    off += align_up(bytes);
    return at;
  };
  constexpr bool kNativeAtomics = sizeof(T) == sizeof(A);  // float / double accumulate in place
  if (!deterministic) {
    if (!kNativeAtomics) w.acc = static_cast<A*>(take(sizeof(A) * n_vrows * d.D));
    w.bytes = off;
    w.ok = true;
    return w;
  }
  if (n_taps >= kIndexLimit) return w;  // tap ids are int32 (CUB's item count is an int)
  w.keys_in = static_cast<uint32_t*>(take(sizeof(uint32_t) * n_taps));
  w.keys_out = static_cast<uint32_t*>(take(sizeof(uint32_t) * n_taps));
  w.ids_in = static_cast<int32_t*>(take(sizeof(int32_t) * n_taps));
  w.ids_out = static_cast<int32_t*>(take(sizeof(int32_t) * n_taps));
  w.wtap = static_cast<A*>(take(sizeof(A) * n_taps));
  w.offsets = static_cast<int64_t*>(take(sizeof(int64_t) * (n_vrows + 1)));
  size_t cub_bytes = 0;
  const int end_bit = end_bit_for(static_cast<uint32_t>(n_vrows));
  if (cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const uint32_t*>(nullptr),
                                      static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                      static_cast<int32_t*>(nullptr), static_cast<int>(n_taps), 0,
                                      end_bit) != cudaSuccess) {
    return w;
  }
  w.cub_bytes = std::max<size_t>(cub_bytes, 1);
  w.cub_temp = take(w.cub_bytes);
  w.bytes = off;
  w.ok = true;
  return w;
}

}  // namespace

template <typename T>
size_t ms_deform_attn_bwd_workspace_bytes(const MSDeformAttnDims& dims, bool deterministic) {
  using A = typename MSDeformAttnAcc<T>::type;
  const BwdWorkspace<A> w = bwd_workspace<T, A>(dims, deterministic, nullptr);
  return w.ok ? w.bytes : 0;
}

template <typename T>
cudaError_t ms_deform_attn_fwd(const MSDeformAttnFwdParams<T>& p, cudaStream_t stream) {
  using A = typename MSDeformAttnAcc<T>::type;
  const MSDeformAttnDims& d = p.dims;
  if (!dims_ok(d)) return cudaErrorInvalidValue;
  const int64_t n_rows = d.B * d.Q * d.M;
  if (n_rows == 0) return cudaSuccess;
  if (!p.value || !p.spatial_shapes || !p.level_start_index || !p.loc || !p.attn || !p.out)
    return cudaErrorInvalidValue;
  fwd_kernel<T, A><<<blocks_for(n_rows, kWarps), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ms_deform_attn_bwd(const MSDeformAttnBwdParams<T>& p, cudaStream_t stream) {
  using A = typename MSDeformAttnAcc<T>::type;
  const MSDeformAttnDims& d = p.dims;
  if (!dims_ok(d)) return cudaErrorInvalidValue;
  if (!p.grad_value) return cudaErrorInvalidValue;
  const int64_t n_rows = d.B * d.Q * d.M;
  const int64_t n_vrows = d.B * d.S * d.M;
  cudaError_t err;
  if (n_rows == 0) return cudaMemsetAsync(p.grad_value, 0, sizeof(T) * n_vrows * d.D, stream);
  if (!p.grad_out || !p.value || !p.spatial_shapes || !p.level_start_index || !p.loc || !p.attn || !p.grad_loc ||
      !p.grad_attn)
    return cudaErrorInvalidValue;
  const BwdWorkspace<A> w = bwd_workspace<T, A>(d, p.deterministic, p.workspace);
  if (!w.ok || p.workspace_bytes < w.bytes || (w.bytes > 0 && !p.workspace)) return cudaErrorInvalidValue;
  const unsigned blocks = blocks_for(n_rows, kWarps);

  if (!p.deterministic) {
    A* acc = w.acc ? w.acc : reinterpret_cast<A*>(p.grad_value);  // float/double: in place
    if ((err = cudaMemsetAsync(acc, 0, sizeof(A) * n_vrows * d.D, stream)) != cudaSuccess) return err;
    bwd_kernel<T, A, true><<<blocks, kThreads, 0, stream>>>(p, acc, nullptr, nullptr, nullptr);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (w.acc) {
      convert_kernel<T, A><<<blocks_for(n_vrows * d.D, 256), 256, 0, stream>>>(w.acc, n_vrows * d.D, p.grad_value);
      return cudaGetLastError();
    }
    return cudaSuccess;
  }

  const int64_t n_taps = n_rows * d.L * d.P * 4;
  bwd_kernel<T, A, false><<<blocks, kThreads, 0, stream>>>(p, nullptr, w.keys_in, w.ids_in, w.wtap);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  size_t cub_bytes = w.cub_bytes;
  err = cub::DeviceRadixSort::SortPairs(w.cub_temp, cub_bytes, w.keys_in, w.keys_out, w.ids_in, w.ids_out,
                                        static_cast<int>(n_taps), 0, end_bit_for(static_cast<uint32_t>(n_vrows)),
                                        stream);
  if (err != cudaSuccess) return err;
  offsets_kernel<<<blocks_for(n_taps + 1, kOffsetThreads), kOffsetThreads, 0, stream>>>(w.keys_out, n_taps, n_vrows,
                                                                                        w.offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  gather_kernel<T, A><<<blocks_for(n_vrows, kGatherWarps), kGatherWarps * 32, 0, stream>>>(
      p.grad_out, p.attn, w.ids_out, w.offsets, w.wtap, n_vrows, d.D, d.L * d.P, p.grad_value);
  return cudaGetLastError();
}

#define REXFAST_MS_DEFORM_ATTN_INSTANTIATE(T)                                                    \
  template size_t ms_deform_attn_bwd_workspace_bytes<T>(const MSDeformAttnDims&, bool);          \
  template cudaError_t ms_deform_attn_fwd<T>(const MSDeformAttnFwdParams<T>&, cudaStream_t);    \
  template cudaError_t ms_deform_attn_bwd<T>(const MSDeformAttnBwdParams<T>&, cudaStream_t);

REXFAST_MS_DEFORM_ATTN_INSTANTIATE(float)
REXFAST_MS_DEFORM_ATTN_INSTANTIATE(double)
REXFAST_MS_DEFORM_ATTN_INSTANTIATE(__half)
REXFAST_MS_DEFORM_ATTN_INSTANTIATE(__nv_bfloat16)

#undef REXFAST_MS_DEFORM_ATTN_INSTANTIATE

}  // namespace cuda
}  // namespace rexfast
