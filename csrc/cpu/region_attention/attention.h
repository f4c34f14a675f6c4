// The masked-softmax attention core shared by region_image_attention (RIA) and
// region_language_attention (RLA) on the CPU: flash-style (online softmax, the
// backward recomputes), with the mask decided tile by tile by a "decider" and
// never stored whole.
//
// Semantics (rexfast/ops/region_attention/core.py): s = where(blocked, -inf,
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
//
// Files: simd.h (scalar and 16-float vector primitives), tiles.h (operands and
// tile micro-kernels), this file (scratch, the prepasses and the forward and
// backward drivers).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "simd.h"
#include "tiles.h"

namespace rexfast {
namespace region {

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
  const at::Tensor lse_acc = contiguous_as(lse_t, acc_type);
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
