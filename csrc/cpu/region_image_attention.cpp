// region_image_attention (RIA) on the CPU: the masked attention core of
// region_attention/attention.h with decisions made from the region logits, tile by tile.
//
// The decision of (query i, key j) repeats torch's CPU F.interpolate arithmetic
// for that element (which formula, which roundings, which channels take the
// vector lanes: rexfast/ops/region_attention/plan.py; the
// caller passes the plan), then compares with the fp32 sigmoid threshold:
// blocked iff resampled <= threshold (NaN never blocked). Rows that block every
// key (they attend to all keys) are found from the per-row counts of the
// forward's own decision tiles (region_attention/attention.h) and handed to the backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "region_attention/attention.h"

namespace rexfast {
namespace {

// Resampling modes (RESAMPLE_* in rexfast/ops/region_attention/plan.py).
constexpr int64_t kModeCL = 0, kModeGeneric = 1, kModeCuda = 2, kModeCopy = 3, kModeMap = 4;

struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
};

// torch's per-axis source indices and weights (align_corners=False):
// compute_source_index_and_lambda on the CPU, upsample_bilinear2d_out_frame on CUDA.
Axis make_axis(int64_t in, int64_t out, bool fma, bool cuda) {
  Axis a;
  a.i0.resize(out), a.i1.resize(out), a.l0.resize(out), a.l1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    if (in == out && !cuda) {
      a.i0[i] = a.i1[i] = i;
      a.l0[i] = 1.0f, a.l1[i] = 0.0f;
      continue;
    }
    const float center = static_cast<float>(i) + 0.5f;
    float real = fma ? std::fma(scale, center, -0.5f) : scale * center - 0.5f;
    real = real < 0.0f ? 0.0f : real;
    int64_t i0;
    float l1;
    if (cuda) {
      i0 = static_cast<int64_t>(real);
      l1 = real - static_cast<float>(i0);
    } else {
      i0 = std::min(static_cast<int64_t>(std::floor(real)), in - 1);
      l1 = std::min(std::max(real - static_cast<float>(i0), 0.0f), 1.0f);
    }
    a.i0[i] = i0;
    a.i1[i] = i0 + (i0 < in - 1 ? 1 : 0);
    a.l1[i] = l1;
    a.l0[i] = 1.0f - l1;
  }
  return a;
}

// The resampled logit of (query i, key j) from texels a, b, c, d = (y0,x0),
// (y0,x1), (y1,x0), (y1,x1), rounding as torch does (see the file comment).
// Weights: CL w00, w01, w10, w11; otherwise λy0, λy1, λx0, λx1.
template <int64_t MODE, bool FMA, bool VEC>
inline float resample(float a, float b, float c, float d, float w0, float w1, float w2, float w3) {
  if constexpr (MODE == kModeCL) {
    if constexpr (VEC) {  // torch's Vectorized lanes: a*w00 + (b*w01 + (c*w10 + d*w11))
      if constexpr (FMA) return std::fma(a, w0, std::fma(b, w1, std::fma(d, w3, c * w2)));
      else return a * w0 + (b * w1 + (c * w2 + d * w3));
    } else {  // its scalar tail: ((a*w00 + b*w01) + c*w10) + d*w11
      if constexpr (FMA) return std::fma(d, w3, std::fma(c, w2, std::fma(a, w0, b * w1)));
      else return ((a * w0 + b * w1) + c * w2) + d * w3;
    }
  } else if constexpr (MODE == kModeGeneric) {  // (a*λx0 + b*λx1)*λy0 + (c*λx0 + d*λx1)*λy1
    if constexpr (FMA) return std::fma(std::fma(a, w2, b * w3), w0, std::fma(c, w2, d * w3) * w1);
    else return (a * w2 + b * w3) * w0 + (c * w2 + d * w3) * w1;
  } else {  // kModeCuda: nvcc's contraction of λy0*(λx0*a + λx1*b) + λy1*(λx0*c + λx1*d)
    const float t0 = std::fma(w2, a, w3 * b), t1 = std::fma(w2, c, w3 * d);
    return std::fma(w0, t0, w1 * t1);
  }
}

struct Resampler {
  int64_t mode = kModeCL, q_vec = 0, S = 0, plane = 0;
  bool fma = true;
  std::vector<int32_t> offs;  // (4, S): per key the texel offsets in a query's (mh, mw) plane
  std::vector<float> wts;     // (4, S): per key the weights (see resample)
  const float* map = nullptr;  // kModeMap: (B, Q, S) resampled by the caller

  Resampler(int64_t mh, int64_t mw, int64_t kh, int64_t kw, int64_t mode_, bool fma_, int64_t q_vec_)
      : mode(mode_), q_vec(q_vec_), S(kh * kw), plane(mh * mw), fma(fma_) {
    TORCH_CHECK(mode >= kModeCL && mode <= kModeMap, "region_image_attention (cpu): unknown resample mode ", mode);
    if (mode == kModeMap) return;
    const Axis ay = make_axis(mh, kh, fma, mode == kModeCuda), ax = make_axis(mw, kw, fma, mode == kModeCuda);
    offs.resize(4 * S), wts.resize(4 * S);
    for (int64_t y = 0; y < kh; ++y)
      for (int64_t x = 0; x < kw; ++x) {
        const int64_t j = y * kw + x;
        offs[0 * S + j] = static_cast<int32_t>(ay.i0[y] * mw + ax.i0[x]);
        offs[1 * S + j] = static_cast<int32_t>(ay.i0[y] * mw + ax.i1[x]);
        offs[2 * S + j] = static_cast<int32_t>(ay.i1[y] * mw + ax.i0[x]);
        offs[3 * S + j] = static_cast<int32_t>(ay.i1[y] * mw + ax.i1[x]);
        if (mode == kModeCL) {  // torch: opmath_t w00 = h0lambda * w0lambda, ...
          wts[0 * S + j] = ay.l0[y] * ax.l0[x];
          wts[1 * S + j] = ay.l0[y] * ax.l1[x];
          wts[2 * S + j] = ay.l1[y] * ax.l0[x];
          wts[3 * S + j] = ay.l1[y] * ax.l1[x];
        } else {
          wts[0 * S + j] = ay.l0[y], wts[1 * S + j] = ay.l1[y], wts[2 * S + j] = ax.l0[x], wts[3 * S + j] = ax.l1[x];
        }
      }
  }

  // out[c] = resampled logit of key j0 + c for c < cols, query i (row = b*Q + i), R its plane.
  template <int64_t MODE, bool FMA, bool VEC>
  void row_impl(const float* __restrict R, int64_t j0, int64_t cols, float* __restrict out) const {
    const int32_t *o0 = offs.data() + j0, *o1 = o0 + S, *o2 = o1 + S, *o3 = o2 + S;
    const float *w0 = wts.data() + j0, *w1 = w0 + S, *w2 = w1 + S, *w3 = w2 + S;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c)
      out[c] = resample<MODE, FMA, VEC>(R[o0[c]], R[o1[c]], R[o2[c]], R[o3[c]], w0[c], w1[c], w2[c], w3[c]);
  }

  void row(const float* R, int64_t i, int64_t row, int64_t j0, int64_t cols, float* out) const {
    if (mode == kModeMap) {
      std::copy(map + row * S + j0, map + row * S + j0 + cols, out);
    } else if (mode == kModeCopy) {
      const int32_t* o0 = offs.data() + j0;
      for (int64_t c = 0; c < cols; ++c) out[c] = R[o0[c]];
    } else if (mode == kModeCL) {
      const bool vec = i < q_vec;
      if (fma) vec ? row_impl<kModeCL, true, true>(R, j0, cols, out) : row_impl<kModeCL, true, false>(R, j0, cols, out);
      else vec ? row_impl<kModeCL, false, true>(R, j0, cols, out) : row_impl<kModeCL, false, false>(R, j0, cols, out);
    } else if (mode == kModeGeneric) {
      fma ? row_impl<kModeGeneric, true, false>(R, j0, cols, out) : row_impl<kModeGeneric, false, false>(R, j0, cols, out);
    } else {
      row_impl<kModeCuda, true, false>(R, j0, cols, out);
    }
  }
};

struct RegionDecider {
  const Resampler& rs;
  const float* logits;  // (B, Q, mh, mw) contiguous fp32
  int64_t Q;
  float threshold;
  const uint8_t* open = nullptr;  // (B, Q) in the backward: 1 = the row blocks every key, attends to all

  bool masked() const { return true; }
  bool empty(int64_t) const { return false; }
  bool open_rule() const { return true; }
  // allowed[c] for c < cols (key j0 + c, query i of sample b); returns how many.
  int64_t row(int64_t b, int64_t i, int64_t j0, int64_t cols, float* scratch, uint8_t* out) const {
    const int64_t row = b * Q + i;
    rs.row(logits + row * rs.plane, i, row, j0, cols, scratch);
    int64_t n = 0;
    const float t = threshold;
#pragma omp simd reduction(+ : n)
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t a = !(scratch[c] <= t);  // NaN: allowed
      out[c] = a;
      n += a;
    }
    return n;
  }
  // The decisions of rows ridx[0..rows) over every key into strip[r * ld + j]
  // (one long pass per query plane); returns each row's allowed count in counts.
  void strip(int64_t b, const int64_t* ridx, int64_t rows, int64_t S, uint8_t* out, int64_t ld,
             int64_t* counts) const {
    float scratch[region::kBNB];
    for (int64_t r = 0; r < rows; ++r) {
      int64_t nr = 0;
      for (int64_t j0 = 0; j0 < S; j0 += region::kBNB)
        nr += row(b, ridx[r], j0, std::min(region::kBNB, S - j0), scratch, out + r * ld + j0);
      counts[r] = nr;
    }
  }
  int64_t tile(int64_t b, const int64_t* ridx, int64_t rows, int64_t j0, int64_t cols, uint8_t* out, int64_t ld,
               int64_t* counts) const {
    float scratch[region::kBNB];
    int64_t n = 0;
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* o = out + r * ld;
      int64_t nr = 0;
      if (open && open[b * Q + ridx[r]]) {
        std::fill(o, o + cols, uint8_t(1));
        nr = cols;
      } else {
        for (int64_t c0 = 0; c0 < cols; c0 += region::kBNB)
          nr += row(b, ridx[r], j0 + c0, std::min(region::kBNB, cols - c0), scratch, o + c0);
      }
      n += nr;
      if (counts) counts[r] += nr;
    }
    return n;
  }
};

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits, int64_t kh,
           int64_t kw, const c10::optional<at::Tensor>& resampled, int64_t mode) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "region_image_attention (cpu): q, k, v must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && logits.device().is_cpu(),
              "region_image_attention (cpu): inputs must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "region_image_attention (cpu): q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "region_image_attention (cpu): k, v must be (B, H, S, d) to match q");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "region_image_attention (cpu): q, k, v need unit stride on the last axis");
  TORCH_CHECK(kh > 0 && kw > 0 && kh * kw == k.size(2), "region_image_attention (cpu): kh*kw must equal S");
  TORCH_CHECK(logits.dim() == 4 && logits.size(0) == q.size(0) && logits.size(1) == q.size(2) &&
                  logits.size(2) > 0 && logits.size(3) > 0,
              "region_image_attention (cpu): region_logits must be (B, Q, mh, mw)");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "region_image_attention (cpu): region_logits must be contiguous float32");
  TORCH_CHECK(logits.size(2) * logits.size(3) < (int64_t(1) << 31), "region_image_attention (cpu): region map too large");
  if (mode == kModeMap) {
    TORCH_CHECK(resampled.has_value() && resampled->scalar_type() == at::kFloat && resampled->is_contiguous() &&
                    resampled->numel() == q.size(0) * q.size(2) * k.size(2),
                "region_image_attention (cpu): the map mode needs the resampled logits (B, Q, S) float32");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ria_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& logits, int64_t kh,
                                                           int64_t kw, double scale, int64_t mode, bool fma,
                                                           int64_t q_vec, double threshold,
                                                           const c10::optional<at::Tensor>& resampled) {
  check(q, k, v, logits, kh, kw, resampled, mode);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), d = q.size(3);
  const bool is_double = q.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, H, Q, d}, q.options());
  at::Tensor lse = at::empty({B, H, Q}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  Resampler rs(logits.size(2), logits.size(3), kh, kw, mode, fma, q_vec);
  if (mode == kModeMap) rs.map = resampled->data_ptr<float>();
  at::Tensor open = at::empty({B, Q}, q.options().dtype(at::kBool));
  const RegionDecider dec{rs, logits.data_ptr<float>(), Q, static_cast<float>(threshold), nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "region_image_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    region::attention_forward<scalar_t, acc_t>(q, k, v, static_cast<acc_t>(scale), dec, out, lse,
                                               reinterpret_cast<uint8_t*>(open.data_ptr<bool>()));
  });
  return {out, lse, open};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ria_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& logits,
    int64_t kh, int64_t kw, double scale, int64_t mode, bool fma, int64_t q_vec, double threshold,
    const c10::optional<at::Tensor>& resampled, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& open) {
  check(q, k, v, logits, kh, kw, resampled, mode);
  TORCH_CHECK(open.scalar_type() == at::kBool && open.is_contiguous() && open.dim() == 2 && open.size(0) == q.size(0) &&
                  open.size(1) == q.size(2),
              "region_image_attention_bwd (cpu): open must be the forward's (B, Q) bool rows");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "region_image_attention_bwd (cpu): dout and out must be (B, H, Q, d)");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "region_image_attention_bwd (cpu): lse must be (B, H, Q)");
  const int64_t Q = q.size(2);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  Resampler rs(logits.size(2), logits.size(3), kh, kw, mode, fma, q_vec);
  if (mode == kModeMap) rs.map = resampled->data_ptr<float>();
  const RegionDecider dec{rs, logits.data_ptr<float>(), Q, static_cast<float>(threshold),
                          reinterpret_cast<const uint8_t*>(open.data_ptr<bool>())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "region_image_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    region::attention_backward<scalar_t, acc_t>(dout, q, k, v, static_cast<acc_t>(scale), dec, out, lse, dq, dk, dv);
  });
  return {dq, dk, dv};
}

// The resampler above as a tensor (B, Q, kh*kw): what the attention kernels compare
// with the threshold. For verification against F.interpolate (tests, and the
// one-time check in rexfast/ops/region_attention/plan.py); not used by the op itself.
at::Tensor region_resample_cpu(const at::Tensor& logits, int64_t kh, int64_t kw, int64_t mode, bool fma,
                               int64_t q_vec) {
  TORCH_CHECK(logits.dim() == 4 && logits.size(2) > 0 && logits.size(3) > 0 && kh > 0 && kw > 0,
              "region_resample (cpu): region_logits must be (B, Q, mh, mw), kh and kw positive");
  TORCH_CHECK(mode != kModeMap, "region_resample (cpu): the map mode has nothing to resample");
  const at::Tensor x = logits.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), Q = x.size(1), S = kh * kw;
  at::Tensor out = at::empty({B, Q, S}, x.options());
  const Resampler rs(x.size(2), x.size(3), kh, kw, mode, fma, q_vec);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, B * Q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) rs.row(src + row * rs.plane, row % Q, row, 0, S, dst + row * S);
  });
  return out;
}

}  // namespace
}  // namespace rexfast

// Schemas (defined once, here: this file is part of every build).
// q (B,H,Q,d), k/v (B,H,S,d): one dtype, unit stride on d. region_logits (B,Q,mh,mw)
// contiguous float32. mode/fma/q_vec/threshold: the decision plan
// (rexfast.ops.region_attention.decision_plan); resampled: (B,Q,S) float32 for mode 4.
// Returns out (B,H,Q,d) in q's dtype, lse (B,H,Q) (float32; float64 for float64 inputs) and
// open (B,Q) bool: the rows that block every key (so attend to all); the backward takes them back.
TORCH_LIBRARY_FRAGMENT(rexfast_C, m) {
  m.def(
      "region_image_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor region_logits, int kh, int kw, float scale,"
      " int mode, bool fma, int q_vec, float threshold, Tensor? resampled) -> (Tensor, Tensor, Tensor)");
  m.def(
      "region_image_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor region_logits, int kh, int kw,"
      " float scale, int mode, bool fma, int q_vec, float threshold, Tensor? resampled, Tensor out, Tensor lse,"
      " Tensor open)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("region_resample(Tensor region_logits, int kh, int kw, int mode, bool fma, int q_vec) -> Tensor");
}

TORCH_LIBRARY_IMPL(rexfast_C, CPU, m) {
  m.impl("region_image_attention_fwd", &rexfast::ria_fwd_cpu);
  m.impl("region_image_attention_bwd", &rexfast::ria_bwd_cpu);
  m.impl("region_resample", &rexfast::region_resample_cpu);
}
