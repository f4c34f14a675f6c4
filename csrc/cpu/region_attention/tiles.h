// Tile micro-kernels of the CPU region-attention core
// (csrc/cpu/region_attention/attention.h): the (B, H, L, d) operands they read,
// and per tile the scores q k^T, the products with value/gradient rows, the
// masked online softmax of a row and its gradient, and row reductions with a
// fixed order. float has hand-vectorised versions (16-float registers,
// simd.h); double takes the generic ones.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace rexfast {
namespace region {

constexpr int64_t kBM = 16;    // queries per forward tile / backward query step
constexpr int64_t kBN = 64;    // keys per forward tile
constexpr int64_t kBNB = 128;  // keys per backward work item
constexpr int kLanes = 16;     // explicit lane accumulators of row sums (one 512-bit vector of floats)

// `t` as a contiguous tensor of `dtype` in one pass. A dtype change converts straight into a
// contiguous copy (`.to(dtype)` alone keeps a head view's strides, and a `.contiguous()` after it
// copied every bf16 operand twice); the same dtype needs `.contiguous()`, because `.to` with a
// memory format returns a strided input itself when its suggested format is already Contiguous.
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t.contiguous();
  return t.to(t.options().dtype(dtype), /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

// One (B, H, L, d) operand in the accumulation type: a pointer and strides in
// elements (unit stride on d). Float inputs with unit stride on d are read in place; others
// converted (contiguous_as).
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
  o.holder = (t.scalar_type() == acc_type && t.stride(3) == 1) ? t : contiguous_as(t, acc_type);
  TORCH_CHECK(o.holder.stride(3) == 1, "region attention: an operand without unit stride on d");
  o.ptr = o.holder.template data_ptr<acc_t>();
  o.sb = o.holder.stride(0), o.sh = o.holder.stride(1), o.sl = o.holder.stride(2);
  return o;
}

// ----------------------------------------------------------------------------- tile micro-kernels
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

}  // namespace region
}  // namespace rexfast
