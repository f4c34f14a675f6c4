// SIMD and scalar arithmetic primitives of the CPU region-attention core
// (csrc/cpu/region_attention/attention.h): the fused multiply-add, the
// NaN-propagating maximum, the softmax's exp (scalar and on 16 lanes), and the
// 16-float vector type with its loads, stores, masks and fmas. Every rounding
// here is explicit, so the results do not depend on the optimiser.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rexfast {
namespace region {

// ----------------------------------------------------------------------------- scalars
template <typename acc_t>
inline acc_t madd(acc_t a, acc_t b, acc_t c) {
  return std::fma(a, b, c);
}

// NaN-propagating maximum (softmax of a row with a NaN score is NaN).
template <typename acc_t>
inline acc_t nanmax(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// exp for the softmax: 2^n * e^r, n = round(x / ln 2), a degree-7 polynomial on
// |r| <= ln2/2 (relative error < 2e-7), branch-free so loops vectorise; exact at
// the special values the semantics need (exp(-inf) = 0, exp(+inf) = inf, NaN).
// Results below 2^-126 flush to 0 (e^-87 relative to the row maximum); the
// softmax only takes exp of x <= 0 (x in (88, 88.72] would read exp(88)).
inline float exp_f32(float x) {
  const float cx = std::min(std::max(x, -87.0f), 88.0f);
  const float t = cx * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float r = madd(n, -6.93145752e-1f, cx);
  const float rr = madd(n, -1.42860677e-6f, r);
  float p = 1.98412698e-4f;
  p = madd(p, rr, 1.38888889e-3f);
  p = madd(p, rr, 8.33333333e-3f);
  p = madd(p, rr, 4.16666667e-2f);
  p = madd(p, rr, 1.66666667e-1f);
  p = madd(p, rr, 0.5f);
  p = madd(p, rr, 1.0f);
  p = madd(p, rr, 1.0f);
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  float y = p * two_n;
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

// ----------------------------------------------------------------------------- 16-float vectors
// Explicit 16-float vectors (GCC vector extensions) so accumulators stay in
// registers; every multiply-add is an explicit fused one (vfma), so the order
// and the roundings are fixed by this code, not by the optimiser.
using vf = float __attribute__((vector_size(64)));
using vi = int32_t __attribute__((vector_size(64)));
using vu8 = uint8_t __attribute__((vector_size(16)));
constexpr int kV = 16;

inline vf vload(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}
inline void vstore(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
inline vf vsplat(float x) { return vf{} + x; }
inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  vf r;
  for (int i = 0; i < kV; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}
inline vi vmask(const uint8_t* p) {  // 16 allowed-bytes -> lane mask (-1 / 0)
  vu8 m;
  std::memcpy(&m, p, sizeof(vu8));
  return __builtin_convertvector(m, vi) != 0;
}
inline vf vnanmax(vf a, vf b) { return (a != a) | (a > b) ? a : b; }
// Whether every lane of x is -inf (then exp(x - m) is exactly 0 for a finite m).
inline bool all_neg_inf(vf x) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ) == 0xFFFF;
#else
  bool all = true;
  for (int i = 0; i < kV; ++i) all = all && x[i] == -std::numeric_limits<float>::infinity();
  return all;
#endif
}

// exp_f32 on 16 lanes (the same algorithm; see exp_f32).
inline vf vexp(vf x) {
  const vf lo = vsplat(-87.0f), hi = vsplat(88.0f);
  vf cx = x < lo ? lo : x;
  cx = cx > hi ? hi : cx;
  cx = x != x ? vsplat(0.0f) : cx;
  const vf t = cx * 1.44269504088896341f;
  const vf n = (t + 12582912.0f) - 12582912.0f;
  const vf r = vfma(n, vsplat(-6.93145752e-1f), cx);
  const vf rr = vfma(n, vsplat(-1.42860677e-6f), r);
  vf p = vsplat(1.98412698e-4f);
  p = vfma(p, rr, vsplat(1.38888889e-3f));
  p = vfma(p, rr, vsplat(8.33333333e-3f));
  p = vfma(p, rr, vsplat(4.16666667e-2f));
  p = vfma(p, rr, vsplat(1.66666667e-1f));
  p = vfma(p, rr, vsplat(0.5f));
  p = vfma(p, rr, vsplat(1.0f));
  p = vfma(p, rr, vsplat(1.0f));
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf y = p * (vf)bits;
  y = x < lo ? vsplat(0.0f) : y;
  y = x > 88.72283935546875f ? vsplat(std::numeric_limits<float>::infinity()) : y;
  return x != x ? x : y;
}

}  // namespace region
}  // namespace rexfast
