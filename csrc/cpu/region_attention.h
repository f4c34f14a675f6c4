// The masked-softmax attention core shared by region_image_attention (RIA) and
// region_language_attention (RLA) on the CPU: flash-style (online softmax, the
// backward recomputes), with the mask decided tile by tile by a "decider" and
// never stored whole.
//
// Semantics (rexfast/ops/region_attention.py): s = where(blocked, -inf,
// scale * q k^T), p = softmax(s), out = p v over all keys (IEEE), lse = log sum
// exp s. Gradients: p = exp(s - lse), dv = p^T dout, dp = dout v^T, delta =
// rowsum(dout * out), ds = where(blocked, 0, p (dp - delta)) * scale, dq = ds k,
// dk = ds^T q.
//
// Work decomposition. The mask is the same for every head, so a work item owns a
// (batch element, query block) in the forward and a (batch element, key block)
// in the backward, and loops over the heads inside: each (query block, key
// block) tile of decisions is made once and used by all heads (a BM x BN byte
// tile in L1, never the (B, Q, S) mask). A tile with no allowed key is skipped
// for a head unless skipping could change a result (IEEE products with blocked
// keys: a non-finite v in the forward; a non-finite q, k or dout, or a row with
// a non-finite lse, in the backward).
//
// Reproducibility: work items have fixed sizes that depend on the shapes only,
// each writes its own outputs (dq through per-key-block partials reduced in
// block order), every sum has one fixed order, and products are explicit
// (std::fma, or plain with the build's -ffp-contract=off), so results are
// bitwise independent of the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rexfast {
namespace region {

constexpr int64_t kBM = 16;    // queries per forward tile / backward query step
constexpr int64_t kBN = 64;    // keys per forward tile
constexpr int64_t kBNB = 128;  // keys per backward work item
constexpr int kLanes = 16;     // explicit lane accumulators of row sums (one 512-bit vector of floats)

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

// One (B, H, L, d) operand in the accumulation type: a pointer and strides in
// elements (unit stride on d). Float inputs are read in place; others converted.
template <typename acc_t>
struct Operand {
  at::Tensor holder;
  const acc_t* ptr = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;
  const acc_t* row(int64_t b, int64_t h, int64_t l) const { return ptr + b * sb + h * sh + l * sl; }
};

template <typename acc_t>
Operand<acc_t> operand(const at::Tensor& t) {
  Operand<acc_t> o;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  o.holder = (t.scalar_type() == acc_type && t.stride(3) == 1) ? t : t.to(acc_type).contiguous();
  o.ptr = o.holder.template data_ptr<acc_t>();
  o.sb = o.holder.stride(0), o.sh = o.holder.stride(1), o.sl = o.holder.stride(2);
  return o;
}

// Scratch buffers that outlive a call: one per (calling thread, slot), grown on demand
// and never shrunk, so large per-call scratch (the transposed operands, the dq
// partials) does not pay fresh page faults and zeroing on every call. Contents on
// entry are unspecified.
template <typename T>
T* workspace(int slot, size_t n) {
  thread_local std::vector<std::unique_ptr<T[]>> buffers(8);
  thread_local std::vector<size_t> sizes(8, 0);
  if (sizes[slot] < n) {
    buffers[slot].reset(new T[n]);
    sizes[slot] = n;
  }
  return buffers[slot].get();
}
enum Slot { kSlotKT = 0, kSlotVT = 1, kSlotDQ = 2 };

// x^T per (b, h) in key tiles of W: out (B, H, nkb, d, W), tile kb holding keys
// [kb W, (kb+1) W) with row stride W, zero past S so every tile computes whole
// vectors. (A tile is d·W contiguous values: a plain (d, S) transpose would put
// each of its d rows on another page and thrash the TLB.)
template <typename acc_t>
void transpose_into(const Operand<acc_t>& x, int64_t B, int64_t H, int64_t S, int64_t d, int64_t W, acc_t* out) {
  const int64_t nkb = (S + W - 1) / W;
  at::parallel_for(0, B * H * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nkb, kb = t % nkb, b = bh / H, h = bh % H;
      acc_t* dst = out + t * d * W;
      const int64_t j0 = kb * W, n = std::min(W, S - j0);
      for (int64_t c = 0; c < d; ++c) std::fill(dst + c * W + n, dst + (c + 1) * W, acc_t(0));
      for (int64_t j = 0; j < n; ++j) {
        const acc_t* src = x.row(b, h, j0 + j);
        for (int64_t c = 0; c < d; ++c) dst[c * W + j] = src[c];
      }
    }
  });
}

// Per (b, h): are all values of x finite? (vectorised scan, lane accumulators)
template <typename acc_t>
std::vector<uint8_t> all_finite(const Operand<acc_t>& x, int64_t B, int64_t H, int64_t L, int64_t d) {
  std::vector<uint8_t> out(static_cast<size_t>(B * H), 1);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      bool ok = true;
      for (int64_t l = 0; l < L && ok; ++l) {
        const acc_t* r = x.row(b, h, l);
        acc_t probe = 0;
#pragma omp simd reduction(+ : probe)
        for (int64_t c = 0; c < d; ++c) probe += r[c] - r[c];  // NaN iff some r[c] is inf or NaN
        ok = probe == 0;
      }
      out[bh] = ok;
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- float micro-kernels
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

// s[r][c] = q_{ridx[r]} . xT[:, j0 + c], float: 4 rows x 64 keys in 16 registers.
template <int64_t W>
inline void scores_tile_f32(const Operand<float>& q, int64_t b, int64_t h, const int64_t* ridx, int64_t rows,
                            const float* xT, int64_t S_pad, int64_t j0, int64_t d, float* s) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* qr[4];
    for (int i = 0; i < 4; ++i) qr[i] = q.row(b, h, ridx[std::min<int64_t>(r0 + i, rows - 1)]);
    for (int64_t c0 = 0; c0 < W; c0 += 4 * kV) {
      vf a00{}, a01{}, a02{}, a03{}, a10{}, a11{}, a12{}, a13{}, a20{}, a21{}, a22{}, a23{}, a30{}, a31{}, a32{}, a33{};
      const float* x = xT + j0 + c0;
      for (int64_t k = 0; k < d; ++k, x += S_pad) {
        const vf x0 = vload(x), x1 = vload(x + kV), x2 = vload(x + 2 * kV), x3 = vload(x + 3 * kV);
        const vf q0 = vsplat(qr[0][k]), q1 = vsplat(qr[1][k]), q2 = vsplat(qr[2][k]), q3 = vsplat(qr[3][k]);
        a00 = vfma(q0, x0, a00), a01 = vfma(q0, x1, a01), a02 = vfma(q0, x2, a02), a03 = vfma(q0, x3, a03);
        a10 = vfma(q1, x0, a10), a11 = vfma(q1, x1, a11), a12 = vfma(q1, x2, a12), a13 = vfma(q1, x3, a13);
        a20 = vfma(q2, x0, a20), a21 = vfma(q2, x1, a21), a22 = vfma(q2, x2, a22), a23 = vfma(q2, x3, a23);
        a30 = vfma(q3, x0, a30), a31 = vfma(q3, x1, a31), a32 = vfma(q3, x2, a32), a33 = vfma(q3, x3, a33);
      }
      const vf out[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
      for (int i = 0; i < 4 && r0 + i < rows; ++i)
        for (int t = 0; t < 4; ++t) vstore(s + (r0 + i) * W + c0 + t * kV, out[i][t]);
    }
  }
}

// dst_r += sum_c coef[r][c] y_{j0+c}, float, d % 16 == 0: 4 rows x 32 of d in registers.
template <int64_t W>
inline void rows_times_keys_f32(const float* coef, int64_t rows, int64_t cols, const Operand<float>& y, int64_t b,
                                int64_t h, int64_t j0, int64_t d, float* dst) {
  const float* ybase = y.row(b, h, j0);
  const int64_t ys = y.sl;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t nr = std::min<int64_t>(4, rows - r0);
    const float* cr[4];
    for (int i = 0; i < 4; ++i) cr[i] = coef + (r0 + std::min<int64_t>(i, nr - 1)) * W;
    for (int64_t k0 = 0; k0 < d; k0 += 2 * kV) {
      const bool two = k0 + kV < d;
      float* dr[4];
      for (int i = 0; i < 4; ++i) dr[i] = dst + (r0 + std::min<int64_t>(i, nr - 1)) * d + k0;
      vf a00 = vload(dr[0]), a10 = vload(dr[1]), a20 = vload(dr[2]), a30 = vload(dr[3]);
      vf a01 = two ? vload(dr[0] + kV) : vf{}, a11 = two ? vload(dr[1] + kV) : vf{};
      vf a21 = two ? vload(dr[2] + kV) : vf{}, a31 = two ? vload(dr[3] + kV) : vf{};
      const float* yc = ybase + k0;
      for (int64_t c = 0; c < cols; ++c, yc += ys) {
        const vf y0 = vload(yc), y1 = two ? vload(yc + kV) : vf{};
        const vf c0 = vsplat(cr[0][c]), c1 = vsplat(cr[1][c]), c2 = vsplat(cr[2][c]), c3 = vsplat(cr[3][c]);
        a00 = vfma(c0, y0, a00), a01 = vfma(c0, y1, a01);
        a10 = vfma(c1, y0, a10), a11 = vfma(c1, y1, a11);
        a20 = vfma(c2, y0, a20), a21 = vfma(c2, y1, a21);
        a30 = vfma(c3, y0, a30), a31 = vfma(c3, y1, a31);
      }
      const vf lo[4] = {a00, a10, a20, a30}, hi[4] = {a01, a11, a21, a31};
      for (int i = 0; i < nr; ++i) {
        vstore(dr[i], lo[i]);
        if (two) vstore(dr[i] + kV, hi[i]);
      }
    }
  }
}

// dst_c += sum_r coef[r][c] x_r, float, d % 16 == 0: 4 keys x 32 of d in registers.
template <int64_t W>
inline void keys_times_rows_f32(const float* coef, int64_t rows, int64_t cols, const float* const* xr, int64_t d,
                                float* dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += 4) {
    const int64_t nc = std::min<int64_t>(4, cols - c0);
    for (int64_t k0 = 0; k0 < d; k0 += 2 * kV) {
      const bool two = k0 + kV < d;
      float* dc[4];
      for (int i = 0; i < 4; ++i) dc[i] = dst + (c0 + std::min<int64_t>(i, nc - 1)) * d + k0;
      vf a00 = vload(dc[0]), a10 = vload(dc[1]), a20 = vload(dc[2]), a30 = vload(dc[3]);
      vf a01 = two ? vload(dc[0] + kV) : vf{}, a11 = two ? vload(dc[1] + kV) : vf{};
      vf a21 = two ? vload(dc[2] + kV) : vf{}, a31 = two ? vload(dc[3] + kV) : vf{};
      for (int64_t r = 0; r < rows; ++r) {
        const float* x = xr[r] + k0;
        const vf x0 = vload(x), x1 = two ? vload(x + kV) : vf{};
        const float* cr = coef + r * W + c0;
        const vf c0v = vsplat(cr[0]), c1v = vsplat(nc > 1 ? cr[1] : 0.0f), c2v = vsplat(nc > 2 ? cr[2] : 0.0f),
                 c3v = vsplat(nc > 3 ? cr[3] : 0.0f);
        a00 = vfma(c0v, x0, a00), a01 = vfma(c0v, x1, a01);
        a10 = vfma(c1v, x0, a10), a11 = vfma(c1v, x1, a11);
        a20 = vfma(c2v, x0, a20), a21 = vfma(c2v, x1, a21);
        a30 = vfma(c3v, x0, a30), a31 = vfma(c3v, x1, a31);
      }
      const vf lo[4] = {a00, a10, a20, a30}, hi[4] = {a01, a11, a21, a31};
      for (int i = 0; i < nc; ++i) {
        vstore(dc[i], lo[i]);
        if (two) vstore(dc[i] + kV, hi[i]);
      }
    }
  }
}

// Forward, one row of a tile (W keys): scale and mask, online-softmax update
// (returns the new running max; p overwrites s; l and the factor alpha for acc).
template <int64_t W>
inline void softmax_row_f32(float* sr, const uint8_t* ar, int64_t cols, bool masked, float scale, float& m,
                            float& l, float& alpha) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  vf mx = vsplat(neg_inf);
  for (int64_t c = 0; c < W; c += kV) {
    vi keep = (vi{} + static_cast<int32_t>(c)) + vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} < static_cast<int32_t>(cols);
    if (masked) keep &= vmask(ar + c);
    const vf x = keep ? vload(sr + c) * scale : vsplat(neg_inf);
    vstore(sr + c, x);
    mx = vnanmax(mx, x);
  }
  float bmax = mx[0];
  for (int t = 1; t < kV; ++t) bmax = nanmax(bmax, mx[t]);
  const float m_new = nanmax(m, bmax);
  const float m_use = m_new == neg_inf ? 0.0f : m_new;
  alpha = exp_f32(m - m_use);
  vf sum{};  // lane t sums columns c with c % 16 == t, in order: the kLanes order of row_sum
  const bool m_finite = std::isfinite(m_use);
  for (int64_t c = 0; c < W; c += kV) {
    const vf x = vload(sr + c);
    if (m_finite && all_neg_inf(x)) {  // 16 blocked keys: p = exp(-inf) = 0 exactly
      vstore(sr + c, vf{});
      continue;
    }
    const vf p = vexp(x - m_use);
    vstore(sr + c, p);
    sum += p;
  }
  float total = 0;
  for (int t = 0; t < kV; ++t) total += sum[t];
  l = l * alpha + total;
  m = m_new;
}

// Backward, one row of a tile: p = exp(s·scale − lse) (masked), ds = where(allowed,
// p (dp − delta), 0)·scale (over dp's storage).
template <int64_t W>
inline void grad_row_f32(float* pr, float* dpr, const uint8_t* ar, int64_t cols, bool masked, float scale, float lse,
                         float delta) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool lse_finite = std::isfinite(lse);
  for (int64_t c = 0; c < W; c += kV) {
    const vi in_range = (vi{} + static_cast<int32_t>(c)) + vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} < static_cast<int32_t>(cols);
    const vi keep = masked ? in_range & vmask(ar + c) : in_range;
    const vf x = keep ? vload(pr + c) * scale : vsplat(neg_inf);
    if (lse_finite && all_neg_inf(x)) {  // 16 blocked keys (or -inf scores): p = 0, ds = 0 exactly
      vstore(pr + c, vf{});
      vstore(dpr + c, vf{});
      continue;
    }
    const vf p = vexp(x - lse);
    vstore(pr + c, in_range ? p : vsplat(0.0f));
    const vf g = p * (vload(dpr + c) - delta);
    vstore(dpr + c, keep ? g * scale : vsplat(0.0f));
  }
}

// s[r][c] = q_{ridx[r]} . xT[:, j0 + c] for r < rows and c < W (W a multiple of 64; columns
// past S read the zero padding). Vectorised over keys (the transposed operand),
// 4 rows x 64 keys of accumulators at a time, summed over d in order.
template <typename acc_t, int64_t W>
inline void scores_tile(const Operand<acc_t>& q, int64_t b, int64_t h, const int64_t* ridx /* query of each row */,
                        int64_t rows, const acc_t* xT /* a (d, ld) tile */, int64_t S_pad /* ld */, int64_t j0,
                        int64_t d, acc_t* s /* [rows][W] */) {
  if constexpr (std::is_same_v<acc_t, float>) {
    scores_tile_f32<W>(q, b, h, ridx, rows, xT, S_pad, j0, d, s);
    return;
  }
  constexpr int64_t C = 64;
  static_assert(W % C == 0, "tile width must be a multiple of 64");
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const acc_t* qr[4];
    for (int i = 0; i < 4; ++i) qr[i] = q.row(b, h, ridx[std::min<int64_t>(r0 + i, rows - 1)]);
    for (int64_t c0 = 0; c0 < W; c0 += C) {
      acc_t acc[4][C];
      for (int i = 0; i < 4; ++i)
        for (int64_t c = 0; c < C; ++c) acc[i][c] = 0;
      for (int64_t k = 0; k < d; ++k) {
        const acc_t* x = xT + k * S_pad + j0 + c0;
        const acc_t a0 = qr[0][k], a1 = qr[1][k], a2 = qr[2][k], a3 = qr[3][k];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          acc[0][c] = madd(a0, x[c], acc[0][c]);
          acc[1][c] = madd(a1, x[c], acc[1][c]);
          acc[2][c] = madd(a2, x[c], acc[2][c]);
          acc[3][c] = madd(a3, x[c], acc[3][c]);
        }
      }
      for (int i = 0; i < 4 && r0 + i < rows; ++i) std::copy(acc[i], acc[i] + C, s + (r0 + i) * W + c0);
    }
  }
}

// dst_r += sum_c coef[r][c] * y_{j0+c} (rows of a (B,H,L,d) operand), c in order.
// 4 rows x 32 columns of d held in registers across the key loop.
template <typename acc_t, int64_t W>
inline void rows_times_keys(const acc_t* coef /* [rows][W] */, int64_t rows, int64_t cols, const Operand<acc_t>& y,
                            int64_t b, int64_t h, int64_t j0, int64_t d, acc_t* dst /* [rows][d] */) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (d % kV == 0) {
      rows_times_keys_f32<W>(coef, rows, cols, y, b, h, j0, d, dst);
      return;
    }
  }
  constexpr int64_t D = 32;
  const acc_t* ybase = y.row(b, h, j0);
  const int64_t ys = y.sl;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    int64_t k0 = 0;
    for (; k0 + D <= d; k0 += D) {
      acc_t acc[4][D];
      for (int i = 0; i < 4; ++i)
        for (int64_t k = 0; k < D; ++k) acc[i][k] = dst[(r + i) * d + k0 + k];
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t* yc = ybase + c * ys + k0;
        const acc_t c0 = coef[r * W + c], c1 = coef[(r + 1) * W + c], c2 = coef[(r + 2) * W + c],
                    c3 = coef[(r + 3) * W + c];
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) {
          acc[0][k] = madd(c0, yc[k], acc[0][k]);
          acc[1][k] = madd(c1, yc[k], acc[1][k]);
          acc[2][k] = madd(c2, yc[k], acc[2][k]);
          acc[3][k] = madd(c3, yc[k], acc[3][k]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int64_t k = 0; k < D; ++k) dst[(r + i) * d + k0 + k] = acc[i][k];
    }
    for (; k0 < d; ++k0)  // d tail: one column at a time, same order over c
      for (int i = 0; i < 4; ++i) {
        acc_t t = dst[(r + i) * d + k0];
        for (int64_t c = 0; c < cols; ++c) t = madd(coef[(r + i) * W + c], ybase[c * ys + k0], t);
        dst[(r + i) * d + k0] = t;
      }
  }
  for (; r < rows; ++r) {
    acc_t* dr = dst + r * d;
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t* yc = ybase + c * ys;
      const acc_t cr = coef[r * W + c];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) dr[k] = madd(cr, yc[k], dr[k]);
    }
  }
}

// dst_c += sum_r coef[r][c] * x_r (x_r: rows of d values), r in order. 4 keys x 32
// columns of d held in registers across the row loop.
template <typename acc_t, int64_t W>
inline void keys_times_rows(const acc_t* coef /* [rows][W] */, int64_t rows, int64_t cols, const acc_t* const* xr,
                            int64_t d, acc_t* dst /* [W][d] */) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (d % kV == 0) {
      keys_times_rows_f32<W>(coef, rows, cols, xr, d, dst);
      return;
    }
  }
  constexpr int64_t D = 32;
  int64_t c = 0;
  for (; c + 4 <= cols; c += 4) {
    int64_t k0 = 0;
    for (; k0 + D <= d; k0 += D) {
      acc_t acc[4][D];
      for (int i = 0; i < 4; ++i)
        for (int64_t k = 0; k < D; ++k) acc[i][k] = dst[(c + i) * d + k0 + k];
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* x = xr[r] + k0;
        const acc_t* cr = coef + r * W + c;
        const acc_t c0 = cr[0], c1 = cr[1], c2 = cr[2], c3 = cr[3];
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) {
          acc[0][k] = madd(c0, x[k], acc[0][k]);
          acc[1][k] = madd(c1, x[k], acc[1][k]);
          acc[2][k] = madd(c2, x[k], acc[2][k]);
          acc[3][k] = madd(c3, x[k], acc[3][k]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int64_t k = 0; k < D; ++k) dst[(c + i) * d + k0 + k] = acc[i][k];
    }
    for (; k0 < d; ++k0)
      for (int i = 0; i < 4; ++i) {
        acc_t t = dst[(c + i) * d + k0];
        for (int64_t r = 0; r < rows; ++r) t = madd(coef[r * W + c + i], xr[r][k0], t);
        dst[(c + i) * d + k0] = t;
      }
  }
  for (; c < cols; ++c) {
    acc_t* dc = dst + c * d;
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t cr = coef[r * W + c];
      const acc_t* x = xr[r];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) dc[k] = madd(cr, x[k], dc[k]);
    }
  }
}

// Row maximum (NaN-propagating) over W values with kLanes lane accumulators.
template <typename acc_t, int64_t W>
inline acc_t row_max(const acc_t* x) {
  static_assert(W % kLanes == 0, "tile width must be a multiple of the lanes");
  acc_t lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < W; c += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] = nanmax(lanes[l], x[c + l]);
  }
  acc_t m = lanes[0];
  for (int l = 1; l < kLanes; ++l) m = nanmax(m, lanes[l]);
  return m;
}

// Row sum over c < cols with kLanes explicit lane accumulators (fixed order).
template <typename acc_t>
inline acc_t row_sum(const acc_t* x, int64_t cols) {
  acc_t lanes[kLanes] = {};
  const int64_t full = cols - cols % kLanes;
  for (int64_t c = 0; c < full; c += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[c + l];
  }
  for (int64_t c = full; c < cols; ++c) lanes[c - full] += x[c];
  acc_t sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}


struct Shapes {
  int64_t B, H, Q, S, d;
};

// ----------------------------------------------------------------------------- forward
// Decider: bool masked() (false: no mask at all); bool empty(b) (a sample with no key:
// zero rows, lse -inf); bool open_rule() (a row with no allowed key attends to every
// key); void strip(b, ridx, rows, S, uint8_t* allowed /*[rows][ld]*/, ld, int64_t* counts)
// (the decisions of those rows over every key, and how many each allows); int64_t
// tile(b, ridx, rows, j0, cols, allowed, ld, counts) (the same for one key block).
//
// The forward makes a work item's decisions once, as a strip of its query block over
// all keys (kBM x S bytes of per-thread scratch, one long pass per query plane: the
// logits are read in order), counts each row's allowed keys from it (the all-blocked
// rule: such rows become all-allowed, and are reported in `open` (B, Q) for the
// backward), and then sweeps the key blocks reading their tiles from the strip.
template <typename scalar_t, typename acc_t, typename Decider>
void attention_forward(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, acc_t scale,
                       const Decider& decider, at::Tensor& out_t, at::Tensor& lse_t, uint8_t* open /* or nullptr */) {
  const Shapes s{q_t.size(0), q_t.size(1), q_t.size(2), k_t.size(2), q_t.size(3)};
  const Operand<acc_t> q = operand<acc_t>(q_t), k = operand<acc_t>(k_t), v = operand<acc_t>(v_t);
  const int64_t S_pad = (s.S + kBN - 1) / kBN * kBN;
  acc_t* kT = workspace<acc_t>(kSlotKT, static_cast<size_t>(s.B * s.H * s.d * S_pad));
  transpose_into(k, s.B, s.H, s.S, s.d, kBN, kT);
  const std::vector<uint8_t> v_finite = all_finite(v, s.B, s.H, s.S, s.d);
  scalar_t* out = out_t.data_ptr<scalar_t>();  // (B, H, Q, d) contiguous
  acc_t* lse = lse_t.data_ptr<acc_t>();        // (B, H, Q)
  const int64_t nqb = (s.Q + kBM - 1) / kBM, nkb = S_pad / kBN;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const bool masked = decider.masked();

  at::parallel_for(0, s.B * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> strip(masked ? kBM * S_pad : 0);
    std::vector<acc_t> sc(kBM * kBN), m(s.H * kBM), l(s.H * kBM), acc(s.H * kBM * s.d), cacc(kBM * s.d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nqb, i0 = (item % nqb) * kBM, rows = std::min(kBM, s.Q - i0);
      if (decider.empty(b)) {
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t row = (b * s.H + h) * s.Q + i0 + r;
            std::fill(out + row * s.d, out + (row + 1) * s.d, scalar_t(0));
            lse[row] = neg_inf;
          }
        continue;
      }
      int64_t ridx[kBM], counts[kBM];
      for (int64_t r = 0; r < rows; ++r) ridx[r] = i0 + r;
      if (masked) {
        decider.strip(b, ridx, rows, s.S, strip.data(), S_pad, counts);
        for (int64_t r = 0; r < rows; ++r) {
          const bool is_open = decider.open_rule() && counts[r] == 0;
          if (is_open) std::fill(strip.data() + r * S_pad, strip.data() + r * S_pad + s.S, uint8_t(1));
          if (open) open[b * s.Q + i0 + r] = is_open;
        }
      }
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t j0 = kb * kBN, cols = std::min(kBN, s.S - j0);
        // Rows with an allowed key in this tile; a row without one would add exactly
        // nothing (p = 0) while v is finite, so only these rows are computed.
        int64_t act[kBM], all_rows[kBM], n_act = 0;
        for (int64_t r = 0; r < rows; ++r) {
          all_rows[r] = r;
          bool any = !masked;
          if (masked) {
            const uint8_t* a = strip.data() + r * S_pad + j0;
            uint8_t o = 0;
            for (int64_t c = 0; c < cols; ++c) o |= a[c];
            any = o != 0;
          }
          if (any) act[n_act++] = r;
        }
        for (int64_t h = 0; h < s.H; ++h) {
          const bool v_ok = v_finite[b * s.H + h];
          const int64_t* rl = v_ok ? act : all_rows;
          const int64_t nr = v_ok ? n_act : rows;
          if (nr == 0) continue;
          int64_t qrow[kBM];
          for (int64_t t = 0; t < nr; ++t) qrow[t] = ridx[rl[t]];
          scores_tile<acc_t, kBN>(q, b, h, qrow, nr, kT + ((b * s.H + h) * nkb + kb) * s.d * kBN, kBN, 0, s.d,
                                  sc.data());
          acc_t* mh = m.data() + h * kBM;
          acc_t* lh = l.data() + h * kBM;
          acc_t* ah = acc.data() + h * kBM * s.d;
          for (int64_t t = 0; t < nr; ++t) {
            const int64_t r = rl[t];
            acc_t* sr = sc.data() + t * kBN;
            const uint8_t* ar = masked ? strip.data() + r * S_pad + j0 : nullptr;
            acc_t* ar_acc = ah + r * s.d;
            acc_t alpha;
            if constexpr (std::is_same_v<acc_t, float>) {
              softmax_row_f32<kBN>(sr, ar, cols, masked, scale, mh[r], lh[r], alpha);
            } else {
              // scale and mask the whole tile width (columns past S are -inf)
              for (int64_t c = 0; c < kBN; ++c) {
                const bool keep = c < cols && (!masked || ar[c]);
                sr[c] = keep ? sr[c] * scale : neg_inf;
              }
              const acc_t m_new = nanmax(mh[r], row_max<acc_t, kBN>(sr));
              const acc_t m_use = m_new == neg_inf ? acc_t(0) : m_new;
              alpha = exp_acc(mh[r] - m_use);
              for (int64_t c = 0; c < kBN; ++c) sr[c] = exp_acc(sr[c] - m_use);
              lh[r] = lh[r] * alpha + row_sum(sr, kBN);
              mh[r] = m_new;
            }
            // the row's accumulator, rescaled, into the compact block the product updates
            acc_t* ca = cacc.data() + t * s.d;
            for (int64_t c = 0; c < s.d; ++c) ca[c] = ar_acc[c] * alpha;
          }
          rows_times_keys<acc_t, kBN>(sc.data(), nr, cols, v, b, h, j0, s.d, cacc.data());
          for (int64_t t = 0; t < nr; ++t) std::copy(cacc.data() + t * s.d, cacc.data() + (t + 1) * s.d,
                                                     ah + rl[t] * s.d);
        }
      }
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = (b * s.H + h) * s.Q + i0 + r;
          const acc_t lr = l[h * kBM + r], mr = m[h * kBM + r];
          const acc_t* ar = acc.data() + (h * kBM + r) * s.d;
          for (int64_t c = 0; c < s.d; ++c) out[row * s.d + c] = static_cast<scalar_t>(ar[c] / lr);
          lse[row] = (mr == neg_inf ? acc_t(0) : mr) + std::log(lr);
        }
    }
  });
}

// ----------------------------------------------------------------------------- backward
template <typename scalar_t, typename acc_t, typename Decider>
void attention_backward(const at::Tensor& dout_t, const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t,
                        acc_t scale, const Decider& decider, const at::Tensor& out_t, const at::Tensor& lse_t,
                        at::Tensor& dq_t, at::Tensor& dk_t, at::Tensor& dv_t) {
  const Shapes s{q_t.size(0), q_t.size(1), q_t.size(2), k_t.size(2), q_t.size(3)};
  const Operand<acc_t> q = operand<acc_t>(q_t), k = operand<acc_t>(k_t), v = operand<acc_t>(v_t);
  const Operand<acc_t> dout = operand<acc_t>(dout_t), outp = operand<acc_t>(out_t);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor lse_acc = lse_t.to(acc_type).contiguous();
  const acc_t* lse = lse_acc.data_ptr<acc_t>();
  const int64_t S_pad = (s.S + kBNB - 1) / kBNB * kBNB;
  acc_t* kT = workspace<acc_t>(kSlotKT, static_cast<size_t>(s.B * s.H * s.d * S_pad));
  acc_t* vT = workspace<acc_t>(kSlotVT, static_cast<size_t>(s.B * s.H * s.d * S_pad));
  transpose_into(k, s.B, s.H, s.S, s.d, kBNB, kT);
  transpose_into(v, s.B, s.H, s.S, s.d, kBNB, vT);
  // Skipping a blocked tile is exact only with finite q, k, dout (0 * x = 0).
  const std::vector<uint8_t> qf = all_finite(q, s.B, s.H, s.Q, s.d), kf = all_finite(k, s.B, s.H, s.S, s.d),
                             gf = all_finite(dout, s.B, s.H, s.Q, s.d);
  // delta = rowsum(dout * out), and whether each row's lse is finite.
  std::vector<acc_t> delta(static_cast<size_t>(s.B * s.H * s.Q));
  std::vector<uint8_t> lse_ok(static_cast<size_t>(s.B * s.H * s.Q));
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      for (int64_t i = 0; i < s.Q; ++i) {
        const acc_t* g = dout.row(b, h, i);
        const acc_t* o = outp.row(b, h, i);
        acc_t lanes[kLanes] = {};
        const int64_t full = s.d - s.d % kLanes;
        for (int64_t c = 0; c < full; c += kLanes)
          for (int t = 0; t < kLanes; ++t) lanes[t] = madd(g[c + t], o[c + t], lanes[t]);
        for (int64_t c = full; c < s.d; ++c) lanes[c - full] = madd(g[c], o[c], lanes[c - full]);
        acc_t sum = 0;
        for (int t = 0; t < kLanes; ++t) sum += lanes[t];
        delta[bh * s.Q + i] = sum;
        lse_ok[bh * s.Q + i] = std::isfinite(lse[bh * s.Q + i]);
      }
    }
  });
  const int64_t nkb = S_pad / kBNB;
  // dq partials per key block: (nkb, B, H, Q, d), each written by its own work item.
  acc_t* dq_part = workspace<acc_t>(kSlotDQ, static_cast<size_t>(nkb * s.B * s.H * s.Q * s.d));
  scalar_t* dk = dk_t.data_ptr<scalar_t>();  // (B, H, S, d) contiguous
  scalar_t* dv = dv_t.data_ptr<scalar_t>();

  // A work item: one key block of one sample, every head. Its decisions for every
  // query are made once (Q x kBNB bytes), then per head the rows that add something
  // (an allowed key, or a non-finite q/k/dout/lse that makes 0 * x matter) are
  // gathered, and p, ds of all of them are formed before the three products, so
  // the products over rows (dv, dk) reduce over all those rows at once.
  at::parallel_for(0, s.B * nkb, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> allowed(s.Q * kBNB);
    std::vector<int64_t> counts(s.Q), act(s.Q), qrow(s.Q), all_rows(s.Q);
    for (int64_t i = 0; i < s.Q; ++i) all_rows[i] = i;
    std::vector<acc_t> p(s.Q * kBNB), dp(s.Q * kBNB), dk_acc(kBNB * s.d), dv_acc(kBNB * s.d), cacc(s.Q * s.d);
    std::vector<const acc_t*> qrows(s.Q), grows(s.Q);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    const bool masked = decider.masked();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nkb, kb = item % nkb, j0 = kb * kBNB, cols = std::min(kBNB, s.S - j0);
      acc_t* dqp = dq_part + (kb * s.B + b) * s.H * s.Q * s.d;
      std::fill(dqp, dqp + s.H * s.Q * s.d, acc_t(0));
      const bool empty = decider.empty(b);  // nothing flows back from an all-padded sample
      if (!empty && masked) {
        std::fill(counts.begin(), counts.end(), int64_t(0));
        decider.tile(b, all_rows.data(), s.Q, j0, cols, allowed.data(), kBNB, counts.data());
      }
      for (int64_t h = 0; h < s.H; ++h) {
        const int64_t bh = b * s.H + h;
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
        int64_t nr = 0;
        if (!empty) {
          // Rows that add exactly nothing to this key block (no allowed key, finite lse,
          // and finite q, k, dout: p = 0, ds = 0) are left out.
          const bool safe = qf[bh] && kf[bh] && gf[bh];
          for (int64_t i = 0; i < s.Q; ++i)
            if (!masked || counts[i] > 0 || !safe || !lse_ok[bh * s.Q + i]) act[nr++] = i;
        }
        if (nr > 0) {
          const int64_t tile = (bh * nkb + kb) * s.d * kBNB;
          scores_tile<acc_t, kBNB>(q, b, h, act.data(), nr, kT + tile, kBNB, 0, s.d, p.data());
          scores_tile<acc_t, kBNB>(dout, b, h, act.data(), nr, vT + tile, kBNB, 0, s.d, dp.data());
          for (int64_t t = 0; t < nr; ++t) {
            const int64_t i = act[t];
            acc_t* pr = p.data() + t * kBNB;
            acc_t* dpr = dp.data() + t * kBNB;
            const uint8_t* ar = allowed.data() + i * kBNB;
            const acc_t lr = lse[bh * s.Q + i], dr = delta[bh * s.Q + i];
            if constexpr (std::is_same_v<acc_t, float>) {
              grad_row_f32<kBNB>(pr, dpr, ar, cols, masked, scale, lr, dr);
            } else {
              for (int64_t c = 0; c < kBNB; ++c) {
                const bool keep = c < cols && (!masked || ar[c]);
                const acc_t x = keep ? pr[c] * scale : neg_inf;
                const acc_t pc = exp_acc(x - lr);
                pr[c] = c < cols ? pc : acc_t(0);
                const acc_t g = pc * (dpr[c] - dr);
                dpr[c] = keep ? g * scale : acc_t(0);  // now ds
              }
            }
            qrows[t] = q.row(b, h, i);
            grows[t] = dout.row(b, h, i);
          }
          keys_times_rows<acc_t, kBNB>(p.data(), nr, cols, grows.data(), s.d, dv_acc.data());
          keys_times_rows<acc_t, kBNB>(dp.data(), nr, cols, qrows.data(), s.d, dk_acc.data());
          // this key block's dq partial of the computed rows (the others stay 0)
          std::fill(cacc.begin(), cacc.begin() + nr * s.d, acc_t(0));
          rows_times_keys<acc_t, kBNB>(dp.data(), nr, cols, k, b, h, j0, s.d, cacc.data());
          acc_t* dq_rows = dqp + h * s.Q * s.d;
          for (int64_t t = 0; t < nr; ++t)
            std::copy(cacc.data() + t * s.d, cacc.data() + (t + 1) * s.d, dq_rows + act[t] * s.d);
        }
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t row = (bh * s.S + j0 + c) * s.d;
          const acc_t* ka = dk_acc.data() + c * s.d;
          const acc_t* va = dv_acc.data() + c * s.d;
          for (int64_t t = 0; t < s.d; ++t) {
            dk[row + t] = static_cast<scalar_t>(ka[t]);
            dv[row + t] = static_cast<scalar_t>(va[t]);
          }
        }
      }
    }
  });

  // dq = sum of the key-block partials, in block order.
  scalar_t* dq = dq_t.data_ptr<scalar_t>();  // (B, H, Q, d) contiguous
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(s.Q * s.d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const acc_t* src = dq_part + ((kb * s.B + b) * s.H + h) * s.Q * s.d;
#pragma omp simd
        for (int64_t t = 0; t < s.Q * s.d; ++t) sum[t] += src[t];
      }
      for (int64_t t = 0; t < s.Q * s.d; ++t) dq[bh * s.Q * s.d + t] = static_cast<scalar_t>(sum[t]);
    }
  });
}

}  // namespace region
}  // namespace rexfast
