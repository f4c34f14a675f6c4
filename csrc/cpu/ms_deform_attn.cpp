// ms_deform_attn on the CPU: one pass over the (batch, query, head) sampling
// points for the forward, one for the backward.
//
// Semantics, NaN/inf and border rules: rexfast/ops/ms_deform_attn/reference.py;
// gradient formulas: rexfast/ops/ms_deform_attn/op.py. Per sampling point the
// kernels compute x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5, its (up to) four
// inside corner taps and their bilinear weights; outside taps read a row of
// zeros (exactly what the reference adds for them), so the bilinear sample of
// every point is ((w0·v0 + w1·v1) + w2·v2) + w3·v3, vectorised over D, and is
// multiplied by the attention weight even when it is 0 (a NaN weight on a point
// outside the map gives NaN, as in the reference).
//
// Both kernels first copy value to a heads-major (B, M, S, D) layout and work on
// one (batch, head) at a time, so the rows they gather (and scatter into) form
// one compact S×D block (605 KB at ReLA's sizes) that stays in L2.
// Forward: tasks are (batch, head, 64-query chunk); each output row is written
// by one task. Backward: the location and attention-weight gradients belong to
// one (b, q, h) each; the value gradient is a scatter (every tap adds a·w·g to
// the row it read). It is made deterministic without atomics by ownership: a
// task owns one (batch, head, query split) and adds into its own heads-major
// partial block, walking its queries, levels, points and taps in a fixed order;
// the K query splits (K depends on the shape only: K = 1 when B·M ≥ 16) are then
// summed in split order while transposing back to (B, S, M, D). No sum depends
// on the number of threads, so results are bitwise the same for any thread
// count (tested). Dot products over D keep explicit lane accumulators summed by
// a fixed tree (see csrc/cpu/group_assign.cpp), and the build uses
// -ffp-contract=off, so no result depends on a buffer's address either.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace rexfast {
namespace {

template <typename acc_t>
constexpr int kLanes = 32 / sizeof(acc_t);  // one 256-bit vector (D = 32 fp32: 4 steps, then a 3-step tree)

// At least this many (batch, head, query split) tasks in the backward, when the
// batch and head count alone give fewer (the splits cost one extra value-gradient
// sized buffer each).
constexpr int64_t kMinBackwardTasks = 16;
constexpr int64_t kMaxQuerySplits = 8;

struct Level {
  int64_t height, width, start;
};

struct Dims {
  int64_t B, S, M, D, Q, L, P;
};

// The four corner taps of one sampling point. Corner c: dx = c & 1, dy = c >> 1.
// Outside taps have weight 0 and no pixel; `any` is false when no tap is inside
// (then the sample is 0), `nan` when the location is NaN (then it is NaN), `edge`
// on the half-pixel edge x = −1 or y = −1 (then the location gradient is 0: the
// sample is 0 for every x ≤ −1, so its derivative there is the left-hand one).
template <typename acc_t>
struct Taps {
  bool nan = false, any = false, edge = false;
  bool inside[4] = {false, false, false, false};
  int64_t pixel[4] = {0, 0, 0, 0};  // row of value's S axis
  acc_t wx[4] = {0, 0, 0, 0}, wy[4] = {0, 0, 0, 0}, w[4] = {0, 0, 0, 0};
};

template <typename acc_t>
inline Taps<acc_t> point_taps(acc_t loc_x, acc_t loc_y, const Level& lv) {
  Taps<acc_t> t;
  const acc_t x = loc_x * static_cast<acc_t>(lv.width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(lv.height) - acc_t(0.5);
  if (std::isnan(x) || std::isnan(y)) {
    t.nan = true;
    return t;
  }
  t.edge = x == acc_t(-1) || y == acc_t(-1);
  // Some tap is inside iff −1 ≤ x < W and −1 ≤ y < H (x = −1: the x0+1 = 0 tap,
  // weight 0). This also rejects ±inf and huge values before any integer conversion.
  if (!(x >= acc_t(-1) && x < static_cast<acc_t>(lv.width) && y >= acc_t(-1) &&
        y < static_cast<acc_t>(lv.height))) {
    return t;
  }
  const acc_t x0 = std::floor(x), y0 = std::floor(y);
  const acc_t fx = x - x0, fy = y - y0;
  const int64_t ix = static_cast<int64_t>(x0), iy = static_cast<int64_t>(y0);  // in [−1, W−1] × [−1, H−1]
  for (int c = 0; c < 4; ++c) {
    const int dx = c & 1, dy = c >> 1;
    const int64_t cx = ix + dx, cy = iy + dy;
    if (cx < 0 || cx > lv.width - 1 || cy < 0 || cy > lv.height - 1) continue;
    t.inside[c] = true;
    t.any = true;
    t.pixel[c] = lv.start + cy * lv.width + cx;
    t.wx[c] = dx ? fx : acc_t(1) - fx;
    t.wy[c] = dy ? fy : acc_t(1) - fy;
    t.w[c] = t.wx[c] * t.wy[c];
  }
  return t;
}

std::vector<Level> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t S) {
  const int64_t L = spatial_shapes.size(0);
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  std::vector<Level> levels(L);
  for (int64_t l = 0; l < L; ++l) {
    levels[l] = {sh[2 * l], sh[2 * l + 1], st[l]};
    // Every read stays inside value: the op checks Σ H·W = S and the starts,
    // but this kernel may be called directly, so bound each level by S here.
    TORCH_CHECK(levels[l].height >= 1 && levels[l].width >= 1, "ms_deform_attn (cpu): level ", l,
                " has spatial shape (", levels[l].height, ", ", levels[l].width, ")");
    TORCH_CHECK(levels[l].start >= 0 && levels[l].height <= S && levels[l].width <= S &&
                    levels[l].start + levels[l].height * levels[l].width <= S,
                "ms_deform_attn (cpu): level ", l, " (start ", levels[l].start, ", shape ", levels[l].height, "x",
                levels[l].width, ") does not fit in value's S = ", S);
  }
  return levels;
}

Dims check_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4 && loc.dim() == 6 && attn.dim() == 5, op,
              " (cpu): value must be (B, S, M, D), sampling_locations (B, Q, M, L, P, 2), attention_weights "
              "(B, Q, M, L, P); got ",
              value.sizes(), ", ", loc.sizes(), ", ", attn.sizes());
  TORCH_CHECK(value.device().is_cpu() && loc.device().is_cpu() && attn.device().is_cpu(), op,
              " (cpu): value, sampling_locations, attention_weights must be CPU tensors");
  TORCH_CHECK(value.scalar_type() == loc.scalar_type() && value.scalar_type() == attn.scalar_type(), op,
              " (cpu): value, sampling_locations, attention_weights must share a dtype");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong, op,
              " (cpu): spatial_shapes and level_start_index must be int64");
  const Dims d{value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), loc.size(3), loc.size(4)};
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == d.L && spatial_shapes.size(1) == 2 &&
                  level_start_index.dim() == 1 && level_start_index.size(0) == d.L,
              op, " (cpu): spatial_shapes must be (L, 2) and level_start_index (L,) with L = ", d.L);
  TORCH_CHECK(loc.size(0) == d.B && loc.size(2) == d.M && loc.size(5) == 2, op,
              " (cpu): sampling_locations must be (B, Q, M, L, P, 2) to match value ", value.sizes(), ", got ",
              loc.sizes());
  TORCH_CHECK(attn.sizes() == loc.sizes().slice(0, 5), op, " (cpu): attention_weights must be ",
              loc.sizes().slice(0, 5), ", got ", attn.sizes());
  TORCH_CHECK(value.stride(3) == 1, op, " (cpu): value needs unit stride over D");
  TORCH_CHECK(loc.is_contiguous() && attn.is_contiguous(), op,
              " (cpu): sampling_locations and attention_weights must be contiguous");
  return d;
}

// One head's map of one batch item, contiguous: (S, D) rows, instead of one row
// in every M·D of the (B, S, M, D) layout (fewer pages, measured −50% backward time).
template <typename scalar_t>
at::Tensor heads_major(const at::Tensor& value) {
  return value.permute({0, 2, 1, 3}).contiguous();  // (B, M, S, D)
}

// Fixed-order pairwise sum of the lanes (the same tree for every call).
template <typename acc_t>
inline acc_t tree_sum(acc_t* lanes) {
  for (int width = kLanes<acc_t> / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// Software prefetch of the next query's locations, weights (and output
// gradient): a (batch, head) task reads them with a stride of M·L·P·2 elements,
// too short a run per task for the hardware prefetcher (measured: −15% backward
// time). Prefetching the gathered value rows as well was slower. Advisory only:
// no result depends on it.
template <typename T>
inline void prefetch_span(const T* p, int64_t n, bool write = false) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write) __builtin_prefetch(c + off, 1, 3);
    else __builtin_prefetch(c + off, 0, 3);
  }
}

template <typename scalar_t>
inline void prefetch_point_data(const scalar_t* loc, const scalar_t* attn, int64_t row, int64_t LP) {
  prefetch_span(loc + row * LP * 2, LP * 2);
  prefetch_span(attn + row * LP, LP);
}

// ------------------------------------------------------------------ forward
constexpr int64_t kQueryChunk = 64;  // queries per forward task

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& value, const std::vector<Level>& levels, const at::Tensor& loc_t,
                    const at::Tensor& attn_t, const Dims& d, at::Tensor& out) {
  const at::Tensor vt = heads_major<scalar_t>(value);
  const scalar_t* v0 = vt.data_ptr<scalar_t>();
  const scalar_t* loc = loc_t.data_ptr<scalar_t>();
  const scalar_t* attn = attn_t.data_ptr<scalar_t>();
  scalar_t* out0 = out.data_ptr<scalar_t>();
  const int64_t D = d.D, LP = d.L * d.P;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t chunks = (d.Q + kQueryChunk - 1) / kQueryChunk;

  at::parallel_for(0, d.B * d.M * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    std::vector<Taps<acc_t>> taps(LP);
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, chunk = task % chunks;
      const int64_t b = bh / d.M, h = bh % d.M;
      const scalar_t* map = v0 + bh * d.S * D;
      const int64_t q_end = std::min(d.Q, (chunk + 1) * kQueryChunk);
      for (int64_t q = chunk * kQueryChunk; q < q_end; ++q) {
        const int64_t row = (b * d.Q + q) * d.M + h;  // (b, q, h)
        if (q + 1 < q_end) prefetch_point_data(loc, attn, row + d.M, LP);  // the next query's points
        // Phase 1: every point's taps (independent scalar work the core overlaps
        // with the gathers of phase 2).
        for (int64_t l = 0; l < d.L; ++l) {
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t point = row * LP + l * d.P + p;
            Taps<acc_t>& t = taps[l * d.P + p];
            t = point_taps<acc_t>(static_cast<acc_t>(loc[2 * point]), static_cast<acc_t>(loc[2 * point + 1]),
                                  levels[l]);
          }
        }
        // Phase 2: acc = Σ_points a · (((w0·v0 + w1·v1) + w2·v2) + w3·v3), in point order.
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t lp = 0; lp < LP; ++lp) {
          const Taps<acc_t>& t = taps[lp];
          const acc_t a = static_cast<acc_t>(attn[row * LP + lp]);
          if (t.nan || !t.any) {
            // sample NaN / 0: a·sample is NaN, or 0 unless a is not finite (a·0 = NaN)
            const acc_t add = t.nan ? a * nan : a * acc_t(0);
            if (add != acc_t(0)) {
              for (int64_t i = 0; i < D; ++i) acc[i] += add;
            }
            continue;
          }
          const scalar_t* __restrict r0 = t.inside[0] ? map + t.pixel[0] * D : zeros.data();
          const scalar_t* __restrict r1 = t.inside[1] ? map + t.pixel[1] * D : zeros.data();
          const scalar_t* __restrict r2 = t.inside[2] ? map + t.pixel[2] * D : zeros.data();
          const scalar_t* __restrict r3 = t.inside[3] ? map + t.pixel[3] * D : zeros.data();
          const acc_t w0 = t.w[0], w1 = t.w[1], w2 = t.w[2], w3 = t.w[3];
          acc_t* __restrict dst = acc.data();
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) {
            const acc_t s = ((w0 * static_cast<acc_t>(r0[i]) + w1 * static_cast<acc_t>(r1[i])) +
                             w2 * static_cast<acc_t>(r2[i])) +
                            w3 * static_cast<acc_t>(r3[i]);
            dst[i] += a * s;
          }
        }
        scalar_t* o = out0 + row * D;
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<scalar_t>(acc[i]);
      }
    }
  });
}

// ------------------------------------------------------------------ backward
template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& grad_out_t, const at::Tensor& value, const std::vector<Level>& levels,
                     const at::Tensor& loc_t, const at::Tensor& attn_t, const Dims& d, at::Tensor& grad_value,
                     at::Tensor& grad_loc_t, at::Tensor& grad_attn_t) {
  const at::Tensor vt = heads_major<scalar_t>(value);
  const scalar_t* v0 = vt.data_ptr<scalar_t>();
  const scalar_t* loc = loc_t.data_ptr<scalar_t>();
  const scalar_t* attn = attn_t.data_ptr<scalar_t>();
  const scalar_t* gout = grad_out_t.data_ptr<scalar_t>();
  scalar_t* grad_loc = grad_loc_t.data_ptr<scalar_t>();
  scalar_t* grad_attn = grad_attn_t.data_ptr<scalar_t>();
  const int64_t D = d.D, LP = d.L * d.P;
  constexpr int NL = kLanes<acc_t>;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  // Query splits: a function of the shape only (never of the thread count).
  const int64_t units = d.B * d.M;
  const int64_t K = std::min<int64_t>({kMaxQuerySplits, std::max<int64_t>(1, d.Q),
                                       std::max<int64_t>(1, (kMinBackwardTasks + units - 1) / units)});
  // Value-gradient accumulators in the heads-major layout, (K, B, M, S, D) in
  // acc_t; every task zeroes and fills its own (S, D) block.
  at::Tensor parts = at::empty({K, d.B, d.M, d.S, D}, value.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* parts0 = parts.data_ptr<acc_t>();
  const int64_t block = d.S * D;

  at::parallel_for(0, units * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(D), gs(D);
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task % K, bh = task / K;
      const int64_t b = bh / d.M, h = bh % d.M;
      const int64_t q_begin = k * d.Q / K, q_end = (k + 1) * d.Q / K;
      const scalar_t* map = v0 + bh * block;
      acc_t* part = parts0 + (k * units + bh) * block;
      std::fill(part, part + block, acc_t(0));
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t row = (b * d.Q + q) * d.M + h;  // (b, q, h)
        if (q + 1 < q_end) {  // the next query's points and output gradient
          prefetch_point_data(loc, attn, row + d.M, LP);
          prefetch_span(gout + (row + d.M) * D, D);
        }
        const scalar_t* go = gout + row * D;
        for (int64_t i = 0; i < D; ++i) g[i] = static_cast<acc_t>(go[i]);
        for (int64_t l = 0; l < d.L; ++l) {
          const Level& lv = levels[l];
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t point = row * LP + l * d.P + p;
            const acc_t a = static_cast<acc_t>(attn[point]);
            const auto t = point_taps<acc_t>(static_cast<acc_t>(loc[2 * point]),
                                             static_cast<acc_t>(loc[2 * point + 1]), lv);
            const scalar_t* __restrict r0 = t.inside[0] ? map + t.pixel[0] * D : zeros.data();
            const scalar_t* __restrict r1 = t.inside[1] ? map + t.pixel[1] * D : zeros.data();
            const scalar_t* __restrict r2 = t.inside[2] ? map + t.pixel[2] * D : zeros.data();
            const scalar_t* __restrict r3 = t.inside[3] ? map + t.pixel[3] * D : zeros.data();
            const acc_t* __restrict gp = g.data();
            acc_t* __restrict gsp = gs.data();
            // One pass over D: gs = a·g (d sample), the sample s (for d a = g·s)
            // and t_c = gs·v_c per corner, in lane accumulators.
            acc_t ls[NL] = {}, l0[NL] = {}, l1[NL] = {}, l2[NL] = {}, l3[NL] = {};
            const acc_t w0 = t.w[0], w1 = t.w[1], w2 = t.w[2], w3 = t.w[3];
            const acc_t snan = t.nan ? nan : acc_t(0);  // a NaN location samples NaN
            const int64_t full = D - D % NL;
            for (int64_t i0 = 0; i0 < full; i0 += NL) {
#pragma omp simd
              for (int j = 0; j < NL; ++j) {
                const int64_t i = i0 + j;
                const acc_t x0 = static_cast<acc_t>(r0[i]), x1 = static_cast<acc_t>(r1[i]),
                            x2 = static_cast<acc_t>(r2[i]), x3 = static_cast<acc_t>(r3[i]);
                const acc_t s = (((w0 * x0 + w1 * x1) + w2 * x2) + w3 * x3) + snan;
                const acc_t gsi = a * gp[i];
                gsp[i] = gsi;
                ls[j] += gp[i] * s;
                l0[j] += gsi * x0;
                l1[j] += gsi * x1;
                l2[j] += gsi * x2;
                l3[j] += gsi * x3;
              }
            }
            for (int64_t i = full; i < D; ++i) {
              const int j = static_cast<int>(i - full);
              const acc_t x0 = static_cast<acc_t>(r0[i]), x1 = static_cast<acc_t>(r1[i]),
                          x2 = static_cast<acc_t>(r2[i]), x3 = static_cast<acc_t>(r3[i]);
              const acc_t s = (((w0 * x0 + w1 * x1) + w2 * x2) + w3 * x3) + snan;
              const acc_t gsi = a * gp[i];
              gsp[i] = gsi;
              ls[j] += gp[i] * s;
              l0[j] += gsi * x0;
              l1[j] += gsi * x1;
              l2[j] += gsi * x2;
              l3[j] += gsi * x3;
            }
            grad_attn[point] = static_cast<scalar_t>(tree_sum(ls));
            const acc_t tc[4] = {tree_sum(l0), tree_sum(l1), tree_sum(l2), tree_sum(l3)};
            // Location: ∂w_c/∂fx = ±wy_c, ∂w_c/∂fy = ±wx_c, inside taps only (in corner order).
            acc_t gfx = 0, gfy = 0;
            for (int c = 0; c < 4; ++c) {
              if (!t.inside[c]) continue;
              gfx += (c & 1) ? t.wy[c] * tc[c] : -(t.wy[c] * tc[c]);
              gfy += (c >> 1) ? t.wx[c] * tc[c] : -(t.wx[c] * tc[c]);
            }
            if (t.edge) gfx = gfy = 0;  // the half-pixel edge x = −1 or y = −1
            grad_loc[2 * point] = static_cast<scalar_t>(gfx * static_cast<acc_t>(lv.width));
            grad_loc[2 * point + 1] = static_cast<scalar_t>(gfy * static_cast<acc_t>(lv.height));
            // Value: a·w_c·g into each inside tap's row.
            for (int c = 0; c < 4; ++c) {
              if (!t.inside[c]) continue;
              acc_t* __restrict dst = part + t.pixel[c] * D;
              const acc_t wc = t.w[c];
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) dst[i] += wc * gsp[i];
            }
          }
        }
      }
    }
  });

  // grad_value[b, s, h] = Σ_k parts[k, b, h, s] in split order, back to (B, S, M, D).
  scalar_t* gv = grad_value.data_ptr<scalar_t>();
  at::parallel_for(0, d.B * d.S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / d.S, s_ = bs % d.S;
      for (int64_t h = 0; h < d.M; ++h) {
        const acc_t* src = parts0 + ((b * d.M + h) * d.S + s_) * D;
        scalar_t* dst = gv + (bs * d.M + h) * D;
        if (K == 1) {
          for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<scalar_t>(src[i]);
          continue;
        }
        for (int64_t i = 0; i < D; ++i) {
          acc_t sum = src[i];
          for (int64_t k = 1; k < K; ++k) sum += src[k * units * block + i];
          dst[i] = static_cast<scalar_t>(sum);
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_fwd_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& loc,
                                  const at::Tensor& attn) {
  const Dims d = check_inputs("ms_deform_attn_fwd", value, spatial_shapes, level_start_index, loc, attn);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, d.S);
  at::Tensor out = at::empty({d.B, d.Q, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(value, levels, loc, attn, d, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_bwd_cpu(const at::Tensor& grad_out,
                                                                      const at::Tensor& value,
                                                                      const at::Tensor& spatial_shapes,
                                                                      const at::Tensor& level_start_index,
                                                                      const at::Tensor& loc, const at::Tensor& attn,
                                                                      bool deterministic) {
  (void)deterministic;  // the CPU kernel is always deterministic
  const Dims d = check_inputs("ms_deform_attn_bwd", value, spatial_shapes, level_start_index, loc, attn);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({d.B, d.Q, d.M * d.D}) && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == value.scalar_type() && grad_out.device().is_cpu(),
              "ms_deform_attn_bwd (cpu): grad_output must be a contiguous (B, Q, M*D) CPU tensor of value's dtype, "
              "got ",
              grad_out.sizes());
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, d.S);
  at::Tensor grad_value = at::empty({d.B, d.S, d.M, d.D}, value.options());
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  if (d.B * d.Q == 0) {
    grad_value.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(grad_out, value, levels, loc, attn, d, grad_value, grad_loc, grad_attn);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace rexfast

// Schemas (defined once, here: this file is part of every build).
// value (B,S,M,D): unit stride over D, other strides free; spatial_shapes (L,2)
// and level_start_index (L,) int64 (on the CPU for this kernel; on value's
// device for CUDA); sampling_locations (B,Q,M,L,P,2) and attention_weights
// (B,Q,M,L,P) contiguous, value's dtype. Forward returns (B,Q,M*D); backward
// takes grad_output (B,Q,M*D) contiguous and returns grad_value (B,S,M,D),
// grad_sampling_locations, grad_attention_weights, all contiguous in value's
// dtype. deterministic: CUDA only (a gather instead of atomics for grad_value).
TORCH_LIBRARY_FRAGMENT(rexfast_C, m) {
  m.def(
      "ms_deform_attn_fwd(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations,"
      " Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_bwd(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index,"
      " Tensor sampling_locations, Tensor attention_weights, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rexfast_C, CPU, m) {
  m.impl("ms_deform_attn_fwd", &rexfast::ms_deform_attn_fwd_cpu);
  m.impl("ms_deform_attn_bwd", &rexfast::ms_deform_attn_bwd_cpu);
}
