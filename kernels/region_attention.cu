// Kernels and launchers of region_attention.cuh (see there for the semantics).
//
// The RIA decision repeats torch's CUDA upsample_bilinear2d_out_frame for one
// output element, with the roundings pinned by intrinsics (this file may be
// built with --use_fast_math, which would otherwise approximate the division
// and leave contraction to the compiler):
//   scale = in / out                        (IEEE division, as torch's host code)
//   real  = max(fma(i + 0.5, scale, -0.5), 0), i0 = (int)real, i1 = i0 + (i0 < in-1)
//   l1 = real - i0, l0 = 1 - l1
//   t0 = fma(lx0, a, lx1*b), t1 = fma(lx0, c, lx1*d), v = fma(ly0, t0, ly1*t1)
// (the contraction nvcc makes of torch's expression in its NCHW kernel, read from
// the sm_90 SASS of torch 2.11's CUDA 13 build; see RESAMPLE_CUDA in
// rexfast/ops/region_attention/plan.py); equal
// region and key sizes are a copy, as torch's launcher makes them. Then blocked
// iff v <= threshold; fast-math's flush of denormals cannot move a value across
// the threshold (about -1.8e-7).
#include "region_attention.cuh"

#include <math.h>

#include "common.cuh"

namespace rexfast {
namespace cuda {
namespace {

using namespace detail;  // Cvt, dexp, dlog, warp_sum (common.cuh)

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kPerLane = kRegionMaxD / 32;  // accumulator slots per lane

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// NaN-propagating maximum (a row with a NaN score is NaN, as in PyTorch).
template <typename A>
__device__ __forceinline__ A nanmax(A a, A b) {
  return (a != a || a > b) ? a : b;
}

// Butterfly maximum: every lane ends with the same, order-fixed value (warp_sum: common.cuh).
template <typename A>
__device__ __forceinline__ A warp_nanmax(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = nanmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// One axis of torch's CUDA bilinear kernel (align_corners=False).
struct AxisTap {
  int i0, i1;
  float l0, l1;
};
__device__ __forceinline__ AxisTap axis_tap(int64_t in, int64_t out, int64_t i) {
  const float scale = __fdiv_rn(static_cast<float>(in), static_cast<float>(out));
  float real = __fmaf_rn(__fadd_rn(static_cast<float>(i), 0.5f), scale, -0.5f);
  real = real < 0.0f ? 0.0f : real;
  AxisTap t;
  t.i0 = static_cast<int>(real);
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  t.l1 = __fsub_rn(real, static_cast<float>(t.i0));
  t.l0 = __fsub_rn(1.0f, t.l1);
  return t;
}

// torch's resampled value from texels a, b, c, d = (y0,x0), (y0,x1), (y1,x0), (y1,x1).
__device__ __forceinline__ float torch_bilinear(float a, float b, float c, float d, const AxisTap& x,
                                                const AxisTap& y) {
  const float t0 = __fmaf_rn(x.l0, a, __fmul_rn(x.l1, b));
  const float t1 = __fmaf_rn(x.l0, c, __fmul_rn(x.l1, d));
  return __fmaf_rn(y.l0, t0, __fmul_rn(y.l1, t1));
}

// Whether key j is allowed for query i of sample b (i < Q, j < S).
__device__ __forceinline__ bool allowed(const RegionMaskParams& m, int64_t Q, int64_t S, int64_t b, int64_t i,
                                        int64_t j, bool use_open) {
  if (m.mask == kMaskNone) return true;
  if (m.mask == kMaskPadding) return m.padded[b * S + j] == 0;
  if (use_open && m.open != nullptr && m.open[b * Q + i]) return true;
  const int64_t row = b * Q + i;
  float value;
  if (m.resample == kResampleMap) {
    value = m.resampled[row * S + j];
  } else {
    const float* R = m.logits + row * m.mh * m.mw;
    const int64_t ky = j / m.kw, kx = j % m.kw;
    if (m.resample == kResampleCopy) {
      value = R[ky * m.mw + kx];
    } else {
      const AxisTap y = axis_tap(m.mh, m.kh, ky), x = axis_tap(m.mw, m.kw, kx);
      const float a = R[y.i0 * m.mw + x.i0], bb = R[y.i0 * m.mw + x.i1];
      const float c = R[y.i1 * m.mw + x.i0], d = R[y.i1 * m.mw + x.i1];
      value = torch_bilinear(a, bb, c, d, x, y);
    }
  }
  return !(value <= m.threshold);
}

template <typename T, typename A>
__device__ __forceinline__ A row_dot(const T* __restrict__ x, const A* __restrict__ y, int64_t D) {
  A acc = 0;
  for (int64_t c = 0; c < D; ++c) acc += Cvt<T>::to(x[c]) * y[c];
  return acc;
}

__device__ __forceinline__ bool sample_empty(const RegionMaskParams& m, int64_t b) {
  return m.mask == kMaskPadding && m.empty != nullptr && m.empty[b];
}

// ---------------------------------------------------------------- the open-rows pass
template <typename T>
__global__ void __launch_bounds__(kThreads) open_rows_kernel(RegionAttnParams<T> p, uint8_t* open) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.B * p.Q) return;  // whole warps return together
  const int64_t b = row / p.Q, i = row % p.Q;
  bool any = false;
  for (int64_t j0 = 0; j0 < p.S && !any; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool a = j < p.S && allowed(p.m, p.Q, p.S, b, i, j, false);
    any = __any_sync(0xffffffffu, a);
  }
  if (lane == 0) open[row] = any ? 0 : 1;
}

// ---------------------------------------------------------------- forward: a warp per query row
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(RegionAttnParams<T> p) {
  using A = typename RegionAcc<T>::type;
  __shared__ A q_sh[kWarps][kRegionMaxD];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (b*H + h)*Q + i
  if (row >= p.B * p.H * p.Q) return;
  const int64_t bh = row / p.Q, i = row % p.Q, b = bh / p.H, h = bh % p.H;
  T* out = p.out + row * p.D;
  if (sample_empty(p.m, b)) {
    for (int64_t c = lane; c < p.D; c += 32) out[c] = Cvt<T>::from(A(0));
    if (lane == 0) p.lse[row] = neg_inf<A>();
    return;
  }
  const T* qr = p.q + b * p.q_sb + h * p.q_sh + i * p.q_sl;
  for (int64_t c = lane; c < p.D; c += 32) q_sh[warp][c] = Cvt<T>::to(qr[c]);
  __syncwarp();
  const T* kb = p.k + b * p.k_sb + h * p.k_sh;
  const T* vb = p.v + b * p.v_sb + h * p.v_sh;
  const bool v_finite = p.v_finite[bh] != 0;
  A m = neg_inf<A>(), l = 0, acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc[t] = 0;
  for (int64_t j0 = 0; j0 < p.S; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool in_range = j < p.S;
    const bool keep = in_range && allowed(p.m, p.Q, p.S, b, i, j, true);
    if (!__any_sync(0xffffffffu, keep) && v_finite) continue;  // exactly zero contribution
    A s = neg_inf<A>();
    if (keep) s = row_dot<T, A>(kb + j * p.k_sl, q_sh[warp], p.D) * p.scale;
    const A m_new = nanmax(m, warp_nanmax(s));
    const A m_use = m_new == neg_inf<A>() ? A(0) : m_new;
    const A alpha = dexp(m - m_use);
    const A pj = in_range ? dexp(s - m_use) : A(0);
    l = l * alpha + warp_sum(pj);
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) acc[t] *= alpha;
    const int n = static_cast<int>(p.S - j0 < 32 ? p.S - j0 : 32);
    for (int jj = 0; jj < n; ++jj) {
      const A w = __shfl_sync(0xffffffffu, pj, jj);
      const T* vr = vb + (j0 + jj) * p.v_sl;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < p.D) acc[t] += w * Cvt<T>::to(vr[c]);
      }
    }
    m = m_new;
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < p.D) out[c] = Cvt<T>::from(acc[t] / l);
  }
  if (lane == 0) p.lse[row] = (m == neg_inf<A>() ? A(0) : m) + dlog(l);
}

__device__ __forceinline__ bool lse_finite(double x) { return isfinite(x); }
__device__ __forceinline__ bool lse_finite(float x) { return isfinite(x); }

// ---------------------------------------------------------------- backward dq: a warp per query row
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(RegionAttnParams<T> p) {
  using A = typename RegionAcc<T>::type;
  __shared__ A q_sh[kWarps][kRegionMaxD];
  __shared__ A g_sh[kWarps][kRegionMaxD];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= p.B * p.H * p.Q) return;
  const int64_t bh = row / p.Q, i = row % p.Q, b = bh / p.H, h = bh % p.H;
  T* dq = p.dq + row * p.D;
  if (sample_empty(p.m, b)) {
    for (int64_t c = lane; c < p.D; c += 32) dq[c] = Cvt<T>::from(A(0));
    return;
  }
  const T* qr = p.q + b * p.q_sb + h * p.q_sh + i * p.q_sl;
  const T* gr = p.dout + row * p.D;
  for (int64_t c = lane; c < p.D; c += 32) {
    q_sh[warp][c] = Cvt<T>::to(qr[c]);
    g_sh[warp][c] = Cvt<T>::to(gr[c]);
  }
  __syncwarp();
  const T* kb = p.k + b * p.k_sb + h * p.k_sh;
  const T* vb = p.v + b * p.v_sb + h * p.v_sh;
  const A lse = p.lse_in[row], delta = p.delta[row];
  const bool can_skip = p.safe[bh] != 0 && lse_finite(lse);
  A acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc[t] = 0;
  for (int64_t j0 = 0; j0 < p.S; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool in_range = j < p.S;
    const bool keep = in_range && allowed(p.m, p.Q, p.S, b, i, j, true);
    if (!__any_sync(0xffffffffu, keep) && can_skip) continue;
    A ds = 0;  // where(blocked, 0, ...)
    if (keep) {
      const A s = row_dot<T, A>(kb + j * p.k_sl, q_sh[warp], p.D) * p.scale;
      const A dp = row_dot<T, A>(vb + j * p.v_sl, g_sh[warp], p.D);
      ds = dexp(s - lse) * (dp - delta) * p.scale;
    }
    const int n = static_cast<int>(p.S - j0 < 32 ? p.S - j0 : 32);
    for (int jj = 0; jj < n; ++jj) {
      const A w = __shfl_sync(0xffffffffu, ds, jj);
      const T* kr = kb + (j0 + jj) * p.k_sl;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < p.D) acc[t] += w * Cvt<T>::to(kr[c]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < p.D) dq[c] = Cvt<T>::from(acc[t]);
  }
}

// ---------------------------------------------------------------- backward dk, dv: a warp per key
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(RegionAttnParams<T> p) {
  using A = typename RegionAcc<T>::type;
  __shared__ A k_sh[kWarps][kRegionMaxD];
  __shared__ A v_sh[kWarps][kRegionMaxD];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t key = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (b*H + h)*S + j
  if (key >= p.B * p.H * p.S) return;
  const int64_t bh = key / p.S, j = key % p.S, b = bh / p.H, h = bh % p.H;
  T* dk = p.dk + key * p.D;
  T* dv = p.dv + key * p.D;
  A dk_acc[kPerLane], dv_acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) dk_acc[t] = dv_acc[t] = 0;
  if (!sample_empty(p.m, b)) {
    const T* kr = p.k + b * p.k_sb + h * p.k_sh + j * p.k_sl;
    const T* vr = p.v + b * p.v_sb + h * p.v_sh + j * p.v_sl;
    for (int64_t c = lane; c < p.D; c += 32) {
      k_sh[warp][c] = Cvt<T>::to(kr[c]);
      v_sh[warp][c] = Cvt<T>::to(vr[c]);
    }
    __syncwarp();
    const T* qb = p.q + b * p.q_sb + h * p.q_sh;
    const T* gb = p.dout + bh * p.Q * p.D;
    const bool safe = p.safe[bh] != 0;
    for (int64_t i0 = 0; i0 < p.Q; i0 += 32) {
      const int64_t i = i0 + lane;
      const bool in_range = i < p.Q;
      const bool keep = in_range && allowed(p.m, p.Q, p.S, b, i, j, true);
      const A lse = in_range ? p.lse_in[bh * p.Q + i] : A(0);
      const bool lse_ok = __all_sync(0xffffffffu, lse_finite(lse));
      if (!__any_sync(0xffffffffu, keep) && safe && lse_ok) continue;
      A pi = 0, ds = 0;
      if (in_range) {  // a blocked key has p = exp(-inf - lse): 0, or NaN in a NaN row
        const A s = keep ? row_dot<T, A>(qb + i * p.q_sl, k_sh[warp], p.D) * p.scale : neg_inf<A>();
        pi = dexp(s - lse);
        if (keep) ds = pi * (row_dot<T, A>(gb + i * p.D, v_sh[warp], p.D) - p.delta[bh * p.Q + i]) * p.scale;
      }
      const int n = static_cast<int>(p.Q - i0 < 32 ? p.Q - i0 : 32);
      for (int ii = 0; ii < n; ++ii) {
        const A wp = __shfl_sync(0xffffffffu, pi, ii), wd = __shfl_sync(0xffffffffu, ds, ii);
        const T* qr = qb + (i0 + ii) * p.q_sl;
        const T* gr = gb + (i0 + ii) * p.D;
#pragma unroll
        for (int t = 0; t < kPerLane; ++t) {
          const int64_t c = lane + 32 * t;
          if (c < p.D) {
            dv_acc[t] += wp * Cvt<T>::to(gr[c]);
            dk_acc[t] += wd * Cvt<T>::to(qr[c]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < p.D) {
      dk[c] = Cvt<T>::from(dk_acc[t]);
      dv[c] = Cvt<T>::from(dv_acc[t]);
    }
  }
}

template <typename T>
bool valid(const RegionAttnParams<T>& p) {
  if (p.B < 1 || p.H < 1 || p.Q < 1 || p.S < 1 || p.D < 1 || p.D > kRegionMaxD) return false;
  if (!p.q || !p.k || !p.v) return false;
  if (p.m.mask == kMaskPadding && (!p.m.padded || !p.m.empty)) return false;
  if (p.m.mask == kMaskRegion) {
    if (p.m.kh * p.m.kw != p.S || p.m.kh < 1 || p.m.kw < 1) return false;
    if (p.m.resample == kResampleMap) {
      if (!p.m.resampled) return false;
    } else if (p.m.resample == kResampleCuda || p.m.resample == kResampleCopy) {
      if (!p.m.logits || p.m.mh < 1 || p.m.mw < 1) return false;
      if (p.m.resample == kResampleCopy && (p.m.mh != p.m.kh || p.m.mw != p.m.kw)) return false;
    } else {
      return false;
    }
  }
  return true;
}

int blocks_for(int64_t warps) { return static_cast<int>((warps + kWarps - 1) / kWarps); }

}  // namespace

template <typename T>
cudaError_t region_open_rows(const RegionAttnParams<T>& p, uint8_t* open, cudaStream_t stream) {
  if (!valid(p) || p.m.mask != kMaskRegion || !open) return cudaErrorInvalidValue;
  open_rows_kernel<T><<<blocks_for(p.B * p.Q), kThreads, 0, stream>>>(p, open);
  return cudaGetLastError();
}

template <typename T>
cudaError_t region_attention_fwd(const RegionAttnParams<T>& p, cudaStream_t stream) {
  if (!valid(p) || !p.out || !p.lse || !p.v_finite) return cudaErrorInvalidValue;
  fwd_kernel<T><<<blocks_for(p.B * p.H * p.Q), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t region_attention_bwd(const RegionAttnParams<T>& p, cudaStream_t stream) {
  if (!valid(p) || !p.dout || !p.lse_in || !p.delta || !p.safe || !p.dq || !p.dk || !p.dv)
    return cudaErrorInvalidValue;
  bwd_dq_kernel<T><<<blocks_for(p.B * p.H * p.Q), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bwd_dkdv_kernel<T><<<blocks_for(p.B * p.H * p.S), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define REXFAST_REGION_INSTANTIATE(T)                                                                   \
  template cudaError_t region_open_rows<T>(const RegionAttnParams<T>&, uint8_t*, cudaStream_t);         \
  template cudaError_t region_attention_fwd<T>(const RegionAttnParams<T>&, cudaStream_t);              \
  template cudaError_t region_attention_bwd<T>(const RegionAttnParams<T>&, cudaStream_t);
REXFAST_REGION_INSTANTIATE(float)
REXFAST_REGION_INSTANTIATE(double)
REXFAST_REGION_INSTANTIATE(__half)
REXFAST_REGION_INSTANTIATE(__nv_bfloat16)
#undef REXFAST_REGION_INSTANTIATE

}  // namespace cuda
}  // namespace rexfast
