// group_assign on the CPU: one pass over the pixels for the forward, one for
// the backward, parallel over fixed-size pixel chunks.
//
// Why this shape: the op is memory-bound (k and v are B×P×C and B×P×D; q is
// tiny), so each pixel's k and v rows are read once per pass and everything
// else (similarities to the N tokens, softmax over N, argmax, the gradient
// terms) is computed from registers/L1. Chunks have a fixed size and their
// partial sums are reduced in chunk order, so results do not depend on the
// number of threads (bitwise reproducible).
//
// Math and notation: rexfast/ops/group_assign/op.py. Non-finite inputs follow
// the reference (rexfast/ops/group_assign/reference.py): a pixel whose logits
// hold a NaN or +inf, or are all -inf, has a NaN assignment column and makes
// its batch item's counts (so its outputs) NaN; a non-finite v value reaches
// every token's output (0 * inf = NaN), not only the winner's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "rng.h"

namespace rexfast {
namespace {

constexpr int64_t kChunk = 256;  // pixels per work item
constexpr double kL2nEps = 1e-12;
// From this many tokens on, the per-pixel dot products against all N tokens
// become a small matrix product per chunk (rows × C times C × N): a GEMM reuses
// each loaded k element N times from registers, where N separate dot products
// reload it from L1 and are bound by loads. Below it the direct loop wins.
constexpr int64_t kGemmMinTokens = 8;

template <typename acc_t>
inline acc_t gumbel(uint32_t key, uint32_t index);
template <>
inline float gumbel<float>(uint32_t key, uint32_t index) {
  return gumbel_from_key(key, index);
}
template <>
inline double gumbel<double>(uint32_t key, uint32_t index) {
  return gumbel_from_key_f64(key, index);
}

// Reproducibility: every sum in this file has one fixed order that depends
// only on the shapes. Reductions keep an explicit vector of lane accumulators
// (the compiler may vectorise them but cannot re-associate them, e.g. by
// peeling for the alignment of a buffer), and the build uses -ffp-contract=off
// (setup.py): a vectorised loop and its scalar peel would otherwise contract
// a*b+c into an FMA differently, so the same values at other addresses (other
// scratch buffers, another thread) gave other roundings.
template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);  // one 512-bit vector

template <typename acc_t>
inline acc_t sum_lanes(const acc_t* lanes) {
  acc_t sum = 0;
  for (int l = 0; l < kLanes<acc_t>; ++l) sum += lanes[l];
  return sum;
}

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  constexpr int L = kLanes<acc_t>;
  acc_t lanes[L] = {};
  const int64_t full = n - n % L;
  for (int64_t i = 0; i < full; i += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  for (int64_t i = full; i < n; ++i) lanes[i - full] += a[i] * b[i];
  return sum_lanes(lanes);
}

// out[r·n_tok + j] = a_r · t_j for the rows of a (rows × width) and the tokens
// of t (n_tok × width): the chunk's dot products with every token as one
// register-blocked product (4 rows × 4 tokens, a vector of lanes each), so each
// loaded row element is reused 4 times from registers instead of reloaded from
// L1 per token. Every (r, j) entry is accumulated in one fixed order that
// depends only on `width`, never on threads, alignment or where the entry sits
// in a block (a BLAS call gives no such guarantee: MKL's results differ inside
// and outside a parallel region), so ties stay exact and results are bitwise
// independent of the thread count.
template <typename acc_t>
void rows_dot_tokens(const acc_t* __restrict a, int64_t rows, int64_t width, const acc_t* __restrict t,
                     int64_t n_tok, acc_t* __restrict out) {
  constexpr int R = 4, T = 4, L = kLanes<acc_t>;
  const int64_t full = width - width % L;
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const acc_t* ar[R];
    for (int i = 0; i < R; ++i) ar[i] = a + std::min<int64_t>(r0 + i, rows - 1) * width;  // clamp: tail rows repeat
    for (int64_t j0 = 0; j0 < n_tok; j0 += T) {
      const acc_t* tj[T];
      for (int j = 0; j < T; ++j) tj[j] = t + std::min<int64_t>(j0 + j, n_tok - 1) * width;
      acc_t acc[R][T][L];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j)
          for (int l = 0; l < L; ++l) acc[i][j][l] = 0;
      for (int64_t c0 = 0; c0 < full; c0 += L) {
        for (int i = 0; i < R; ++i)
          for (int j = 0; j < T; ++j) {
#pragma omp simd
            for (int l = 0; l < L; ++l) acc[i][j][l] += ar[i][c0 + l] * tj[j][c0 + l];
          }
      }
      for (int64_t c = full; c < width; ++c)
        for (int i = 0; i < R; ++i)
          for (int j = 0; j < T; ++j) acc[i][j][c - full] += ar[i][c] * tj[j][c];
      for (int i = 0; i < R && r0 + i < rows; ++i)
        for (int j = 0; j < T && j0 + j < n_tok; ++j) {
          out[(r0 + i) * n_tok + j0 + j] = sum_lanes(acc[i][j]);
        }
    }
  }
}

// dst_r += Σ_n coef[r·n_tok + n] · t_n for each row r (dst: rows × width), summed
// over n in order (the same order as the per-pixel loop), four rows at a time
// so each loaded t element serves four rows.
template <typename acc_t>
void rows_from_tokens(const acc_t* __restrict coef, int64_t rows, int64_t n_tok, const acc_t* __restrict t,
                      int64_t width, acc_t* __restrict dst) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    acc_t* d0 = dst + r * width;
    acc_t* d1 = d0 + width;
    acc_t* d2 = d1 + width;
    acc_t* d3 = d2 + width;
    for (int64_t n = 0; n < n_tok; ++n) {
      const acc_t c0 = coef[r * n_tok + n], c1 = coef[(r + 1) * n_tok + n], c2 = coef[(r + 2) * n_tok + n],
                  c3 = coef[(r + 3) * n_tok + n];
      const acc_t* tn = t + n * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) {
        d0[c] += c0 * tn[c];
        d1[c] += c1 * tn[c];
        d2[c] += c2 * tn[c];
        d3[c] += c3 * tn[c];
      }
    }
  }
  for (; r < rows; ++r) {
    acc_t* d = dst + r * width;
    for (int64_t n = 0; n < n_tok; ++n) {
      const acc_t cn = coef[r * n_tok + n];
      const acc_t* tn = t + n * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) d[c] += cn * tn[c];
    }
  }
}

// dst_n += Σ_r coef[r·n_tok + n] · a_r for each token n (dst: n_tok × width):
// rows are added in order, four at a time per pass over dst.
template <typename acc_t>
void tokens_from_rows(const acc_t* __restrict coef, int64_t rows, int64_t n_tok, const acc_t* __restrict a,
                      int64_t width, acc_t* __restrict dst) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const acc_t* a0 = a + r * width;
    const acc_t* a1 = a0 + width;
    const acc_t* a2 = a1 + width;
    const acc_t* a3 = a2 + width;
    for (int64_t n = 0; n < n_tok; ++n) {
      const acc_t c0 = coef[r * n_tok + n], c1 = coef[(r + 1) * n_tok + n], c2 = coef[(r + 2) * n_tok + n],
                  c3 = coef[(r + 3) * n_tok + n];
      acc_t* dn = dst + n * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) {
        acc_t x = dn[c];
        x += c0 * a0[c];
        x += c1 * a1[c];
        x += c2 * a2[c];
        x += c3 * a3[c];
        dn[c] = x;
      }
    }
  }
  for (; r < rows; ++r) {
    const acc_t* ar = a + r * width;
    for (int64_t n = 0; n < n_tok; ++n) {
      const acc_t cn = coef[r * n_tok + n];
      acc_t* dn = dst + n * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) dn[c] += cn * ar[c];
    }
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t load_row(const scalar_t* __restrict src, acc_t* __restrict dst, int64_t n) {
  // Converts one row to the accumulation type and returns its squared norm.
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  return dot(dst, dst, n);
}

// The winning token of one pixel's logits z[0..N): the first maximum (as
// torch.argmax), and whether the softmax column is NaN as the reference
// computes it (a NaN or +inf logit, or all -inf; the winner is then token 0).
// `max` is the maximum over the non-NaN logits (the softmax shift).
template <typename acc_t>
struct WinnerT {
  int64_t index;
  bool poisoned;
  acc_t max;
};
template <typename acc_t>
inline WinnerT<acc_t> winner(const acc_t* z, int64_t n_tokens) {
  int64_t best = -1;
  bool nan = false;
  for (int64_t n = 0; n < n_tokens; ++n) {
    if (std::isnan(z[n])) {
      nan = true;
    } else if (best < 0 || z[n] > z[best]) {
      best = n;
    }
  }
  const acc_t max = best < 0 ? std::numeric_limits<acc_t>::quiet_NaN() : z[best];
  const bool poisoned = nan || best < 0 || std::isinf(max);
  return {poisoned ? 0 : best, poisoned, max};
}

// Large fresh outputs (dk, dv: B×P×C) cost more in first-touch page faults
// than in arithmetic. Asking for transparent huge pages (THP "madvise" mode)
// halves that cost; it is only advice, so failure is harmless.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < 8 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t start = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t stop = (begin + bytes) & ~(kHuge - 1);
  if (stop > start) madvise(reinterpret_cast<void*>(start), stop - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

struct Shapes {
  int64_t B, N, P, C, D, chunks;
};

Shapes shapes_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), v.size(2), 0};
  s.chunks = (s.P + kChunk - 1) / kChunk;
  return s;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tau,
                  const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "group_assign_fwd: q, k, v must be 3-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "group_assign (cpu): q, k, v must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "group_assign (cpu): q, k, v must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "group_assign (cpu): k must be (B, P, C)");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == k.size(1), "group_assign (cpu): v must be (B, P, D)");
  TORCH_CHECK(k.size(1) > 0, "group_assign (cpu): empty pixel axis");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "group_assign (cpu): q, k, v need unit stride on the last axis");
  TORCH_CHECK(tau.numel() == 1, "group_assign (cpu): tau must hold one value");
  TORCH_CHECK(q.size(0) * q.size(1) * k.size(1) < (int64_t(1) << 31), "group_assign (cpu): B*N*P must be < 2^31");
  if (noise.has_value()) {
    TORCH_CHECK(noise->is_contiguous() && noise->numel() == q.size(0) * q.size(1) * k.size(1),
                "group_assign (cpu): noise must be a contiguous (B, N, P) tensor");
  }
}

// l2n over the last axis of q, in the accumulation type: (B*N, C) contiguous.
// (Every reduction in this file is a loop of its own, in a fixed order: a
// tensor reduction may split its range by the thread count.)
template <typename acc_t>
at::Tensor normalised_queries(const at::Tensor& q) {
  at::Tensor qhat = q.to(c10::CppTypeToScalarType<acc_t>::value).contiguous().clone();
  const int64_t rows = q.size(0) * q.size(1), C = q.size(2);
  acc_t* x = qhat.data_ptr<acc_t>();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = x + r * C;
    const acc_t den = std::sqrt(dot(row, row, C)) + acc_t(kL2nEps);
    for (int64_t c = 0; c < C; ++c) row[c] /= den;
  }
  return qhat;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, acc_t tau,
                    const c10::optional<at::Tensor>& noise, int64_t key, bool use_key, at::Tensor& out,
                    at::Tensor& assign, at::Tensor& counts) {
  const Shapes s = shapes_of(q, k, v);
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor qhat_t = normalised_queries<acc_t>(q);
  const acc_t* qhat = qhat_t.data_ptr<acc_t>();
  const scalar_t* kp0 = k.data_ptr<scalar_t>();
  const scalar_t* vp0 = v.data_ptr<scalar_t>();
  at::Tensor noise_acc;
  const acc_t* g0 = nullptr;
  if (noise.has_value()) {
    noise_acc = noise->to(acc_type).contiguous();
    g0 = noise_acc.data_ptr<acc_t>();
  }
  scalar_t* assign0 = assign.data_ptr<scalar_t>();
  // Partial sums per (b, chunk): zeroed by their owner below.
  at::Tensor sums = at::empty({s.B, s.chunks, s.N, s.D}, q.options().dtype(acc_type));
  at::Tensor hits = at::empty({s.B, s.chunks, s.N}, q.options().dtype(acc_type));
  acc_t* sums0 = sums.data_ptr<acc_t>();
  acc_t* hits0 = hits.data_ptr<acc_t>();
  const int64_t skb = k.stride(0), skp = k.stride(1), svb = v.stride(0), svp = v.stride(1);
  const uint32_t key32 = static_cast<uint32_t>(key);
  const acc_t inv_tau = acc_t(1) / tau;

  const bool gemm = s.N >= kGemmMinTokens;
  at::parallel_for(0, s.B * s.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> krow(s.C), z(s.N);
    std::vector<acc_t> krows(gemm ? kChunk * s.C : 0), dots(gemm ? kChunk * s.N : 0), inv_ds(gemm ? kChunk : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.chunks, chunk = item % s.chunks;
      acc_t* part = sums0 + item * s.N * s.D;
      acc_t* hit = hits0 + item * s.N;
      std::fill(part, part + s.N * s.D, acc_t(0));
      std::fill(hit, hit + s.N, acc_t(0));
      const acc_t* qb = qhat + b * s.N * s.C;
      const int64_t p0 = chunk * kChunk, p_end = std::min(s.P, (chunk + 1) * kChunk);
      if (gemm) {
        for (int64_t p = p0; p < p_end; ++p) {
          const acc_t norm = std::sqrt(load_row(kp0 + b * skb + p * skp, krows.data() + (p - p0) * s.C, s.C));
          inv_ds[p - p0] = acc_t(1) / (norm + acc_t(kL2nEps));
        }
        rows_dot_tokens(krows.data(), p_end - p0, s.C, qb, s.N, dots.data());
      }
      for (int64_t p = p0; p < p_end; ++p) {
        acc_t inv_d;
        if (gemm) {
          inv_d = inv_ds[p - p0];
        } else {
          const acc_t norm = std::sqrt(load_row(kp0 + b * skb + p * skp, krow.data(), s.C));
          inv_d = acc_t(1) / (norm + acc_t(kL2nEps));
        }
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t flat = (b * s.N + n) * s.P + p;
          const acc_t raw = gemm ? dots[(p - p0) * s.N + n] : dot(qb + n * s.C, krow.data(), s.C);
          acc_t logit = raw * inv_d;
          if (g0) logit += g0[flat];
          else if (use_key) logit += gumbel<acc_t>(key32, static_cast<uint32_t>(flat));
          z[n] = logit * inv_tau;
        }
        const auto w = winner(z.data(), s.N);
        if (w.poisoned) {  // NaN softmax column: NaN assignment, NaN counts for the whole batch item
          for (int64_t n = 0; n < s.N; ++n) {
            assign0[(b * s.N + n) * s.P + p] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
            hit[n] = std::numeric_limits<acc_t>::quiet_NaN();
          }
          continue;
        }
        const int64_t best = w.index;
        for (int64_t n = 0; n < s.N; ++n) assign0[(b * s.N + n) * s.P + p] = scalar_t(n == best ? 1 : 0);
        acc_t* dst = part + best * s.D;
        const scalar_t* vrow = vp0 + b * svb + p * svp;
        acc_t nonfinite = 0;  // 0 unless the row holds an inf or NaN (0 * inf = NaN)
#pragma omp simd reduction(+ : nonfinite)
        for (int64_t d = 0; d < s.D; ++d) {
          const acc_t x = static_cast<acc_t>(vrow[d]);
          dst[d] += x;
          nonfinite += x * acc_t(0);
        }
        if (nonfinite != acc_t(0)) {  // rare: the other tokens get 0 * v, as Â·v computes it
          for (int64_t n = 0; n < s.N; ++n) {
            if (n == best) continue;
            acc_t* other = part + n * s.D;
            for (int64_t d = 0; d < s.D; ++d) other[d] += static_cast<acc_t>(vrow[d]) * acc_t(0);
          }
        }
        hit[best] += 1;
      }
    }
  });

  // Reduce the chunk partials in chunk order (deterministic), normalise.
  float* counts0 = counts.data_ptr<float>();
  scalar_t* out0 = out.data_ptr<scalar_t>();
  at::parallel_for(0, s.B * s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(s.D);
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / s.N, n = bn % s.N;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t count = 0;
      for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
        const acc_t* part = sums0 + ((b * s.chunks + chunk) * s.N + n) * s.D;
#pragma omp simd
        for (int64_t d = 0; d < s.D; ++d) acc[d] += part[d];
        count += hits0[(b * s.chunks + chunk) * s.N + n];
      }
      const acc_t scale = acc_t(1) / (count + 1);
      for (int64_t d = 0; d < s.D; ++d) out0[bn * s.D + d] = static_cast<scalar_t>(acc[d] * scale);
      counts0[bn] = static_cast<float>(count);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& dassign, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, acc_t tau, const c10::optional<at::Tensor>& noise, int64_t key,
                     bool use_key, const at::Tensor& out, const at::Tensor& counts, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv, at::Tensor& dtau) {
  const Shapes s = shapes_of(q, k, v);
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor qhat_t = normalised_queries<acc_t>(q);
  const acc_t* qhat = qhat_t.data_ptr<acc_t>();
  // Per-token constants: 1/(r+1), c = dout·out, and dout/(r+1) (the dv rows).
  const at::Tensor inv_r1_t = (1.0 / (counts.to(acc_type) + 1.0)).contiguous();
  const at::Tensor dout_acc = dout.to(acc_type).contiguous();
  const at::Tensor out_acc = out.to(acc_type).contiguous();
  at::Tensor c_t = at::empty({s.B, s.N}, q.options().dtype(acc_type));
  for (int64_t bn = 0; bn < s.B * s.N; ++bn)
    c_t.data_ptr<acc_t>()[bn] = dot(dout_acc.data_ptr<acc_t>() + bn * s.D, out_acc.data_ptr<acc_t>() + bn * s.D, s.D);
  const at::Tensor dv_rows_t = (dout_acc * inv_r1_t.unsqueeze(-1)).to(dv.scalar_type()).contiguous();
  const acc_t* inv_r1 = inv_r1_t.data_ptr<acc_t>();
  const acc_t* dout0 = dout_acc.data_ptr<acc_t>();
  const acc_t* c0 = c_t.data_ptr<acc_t>();
  const scalar_t* dv_rows = dv_rows_t.data_ptr<scalar_t>();
  const at::Tensor dassign_acc = dassign.to(acc_type).contiguous();
  const acc_t* da0 = dassign_acc.data_ptr<acc_t>();
  at::Tensor noise_acc;
  const acc_t* g0 = nullptr;
  if (noise.has_value()) {
    noise_acc = noise->to(acc_type).contiguous();
    g0 = noise_acc.data_ptr<acc_t>();
  }
  const scalar_t* kp0 = k.data_ptr<scalar_t>();
  const scalar_t* vp0 = v.data_ptr<scalar_t>();
  scalar_t* dk0 = dk.data_ptr<scalar_t>();
  scalar_t* dv0 = dv.data_ptr<scalar_t>();
  at::Tensor dqhat_parts = at::empty({s.B, s.chunks, s.N, s.C}, q.options().dtype(acc_type));
  at::Tensor dtau_parts = at::empty({s.B, s.chunks}, q.options().dtype(acc_type));
  acc_t* dqp0 = dqhat_parts.data_ptr<acc_t>();
  acc_t* dtp0 = dtau_parts.data_ptr<acc_t>();
  const int64_t skb = k.stride(0), skp = k.stride(1), svb = v.stride(0), svp = v.stride(1);
  const int64_t sdkb = dk.stride(0), sdkp = dk.stride(1), sdvb = dv.stride(0), sdvp = dv.stride(1);
  const uint32_t key32 = static_cast<uint32_t>(key);
  const acc_t inv_tau = acc_t(1) / tau;

  const bool gemm = s.N >= kGemmMinTokens;
  at::parallel_for(0, s.B * s.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> krow(s.C), vrow(s.D), dkrow(s.C), sim(s.N), z(s.N), y(s.N), ds(s.N);
    // GEMM path: the chunk's k and v rows, their products with the tokens, and
    // the dS rows that become dk and dq̂ through two more matrix products.
    const int64_t rows_cap = gemm ? kChunk : 0;
    std::vector<acc_t> krows(rows_cap * s.C), vrows(rows_cap * s.D), qdots(rows_cap * s.N), vdots(rows_cap * s.N),
        dsrows(rows_cap * s.N), dkrows(rows_cap * s.C), norms(rows_cap), inv_ds(rows_cap), radials(rows_cap);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.chunks, chunk = item % s.chunks;
      acc_t* dqp = dqp0 + item * s.N * s.C;
      std::fill(dqp, dqp + s.N * s.C, acc_t(0));
      acc_t dtau_acc = 0;
      const acc_t* qb = qhat + b * s.N * s.C;
      const acc_t* doutb = dout0 + b * s.N * s.D;
      const int64_t p0 = chunk * kChunk, p_end = std::min(s.P, (chunk + 1) * kChunk), rows = p_end - p0;
      if (gemm) {
        for (int64_t r = 0; r < rows; ++r) {
          norms[r] = std::sqrt(load_row(kp0 + b * skb + (p0 + r) * skp, krows.data() + r * s.C, s.C));
          inv_ds[r] = acc_t(1) / (norms[r] + acc_t(kL2nEps));
          load_row(vp0 + b * svb + (p0 + r) * svp, vrows.data() + r * s.D, s.D);
        }
        rows_dot_tokens(krows.data(), rows, s.C, qb, s.N, qdots.data());
        rows_dot_tokens(vrows.data(), rows, s.D, doutb, s.N, vdots.data());
      }
      for (int64_t p = p0; p < p_end; ++p) {
        const int64_t r = p - p0;
        acc_t norm, inv_d;
        if (gemm) {
          norm = norms[r];
          inv_d = inv_ds[r];
        } else {
          norm = std::sqrt(load_row(kp0 + b * skb + p * skp, krow.data(), s.C));
          inv_d = acc_t(1) / (norm + acc_t(kL2nEps));
          load_row(vp0 + b * svb + p * svp, vrow.data(), s.D);
        }
        // Recompute the forward: similarities, logits, softmax over N, argmax.
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t flat = (b * s.N + n) * s.P + p;
          sim[n] = (gemm ? qdots[r * s.N + n] : dot(qb + n * s.C, krow.data(), s.C)) * inv_d;
          acc_t logit = sim[n];
          if (g0) logit += g0[flat];
          else if (use_key) logit += gumbel<acc_t>(key32, static_cast<uint32_t>(flat));
          z[n] = logit * inv_tau;
        }
        // The forward's winner; a NaN column stays NaN through y (as in the reference).
        const auto w = winner(z.data(), s.N);
        const int64_t best = w.index;
        acc_t denom = 0;
        for (int64_t n = 0; n < s.N; ++n) denom += (y[n] = std::exp(z[n] - w.max));
        // dY = dA + (dout·v − c)/(r+1);  dZ = Y (dY − Σ Y dY)
        acc_t weighted = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          y[n] /= denom;
          const int64_t bn = b * s.N + n;
          const acc_t dout_v = gemm ? vdots[r * s.N + n] : dot(doutb + n * s.D, vrow.data(), s.D);
          ds[n] = da0[bn * s.P + p] + (dout_v - c0[bn]) * inv_r1[bn];
          weighted += y[n] * ds[n];
        }
        acc_t ds_dot_sim = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const acc_t dz = y[n] * (ds[n] - weighted);
          dtau_acc -= dz * (z[n] - w.max);  // Σ dZ = 0: the shift is exact, avoids cancellation
          ds[n] = dz * inv_tau;  // now dS
          ds_dot_sim += ds[n] * sim[n];
        }
        // dv: the pixel's token row of dout/(r+1).
        const scalar_t* dv_src = dv_rows + (b * s.N + best) * s.D;
        std::copy(dv_src, dv_src + s.D, dv0 + b * sdvb + p * sdvp);
        if (gemm) {  // dk and dq̂ for the whole chunk below
          std::copy(ds.begin(), ds.end(), dsrows.begin() + r * s.N);
          radials[r] = norm > 0 ? ds_dot_sim / norm : acc_t(0);
          continue;
        }
        // dk = (Σ_n dS_n q̂_n)/d − k (Σ_n dS_n S_n)/(‖k‖ d);  dq̂ += dS k̂
        std::fill(dkrow.begin(), dkrow.end(), acc_t(0));
        for (int64_t n = 0; n < s.N; ++n) {
          const acc_t dsn = ds[n];
          const acc_t* qn = qb + n * s.C;
          acc_t* dqn = dqp + n * s.C;
          const acc_t dsn_inv_d = dsn * inv_d;
#pragma omp simd
          for (int64_t c = 0; c < s.C; ++c) {
            dkrow[c] += dsn * qn[c];
            dqn[c] += dsn_inv_d * krow[c];
          }
        }
        const acc_t radial = norm > 0 ? ds_dot_sim / norm : acc_t(0);
        scalar_t* dkp = dk0 + b * sdkb + p * sdkp;
#pragma omp simd
        for (int64_t c = 0; c < s.C; ++c) dkp[c] = static_cast<scalar_t>((dkrow[c] - krow[c] * radial) * inv_d);
      }
      if (gemm) {
        // dk rows = (dS · q̂ − k (dS·S)/‖k‖) / d
        std::fill(dkrows.begin(), dkrows.begin() + rows * s.C, acc_t(0));
        rows_from_tokens(dsrows.data(), rows, s.N, qb, s.C, dkrows.data());
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* dkr = dkrows.data() + r * s.C;
          const acc_t* kr = krows.data() + r * s.C;
          const acc_t radial = radials[r], inv_d = inv_ds[r];
          scalar_t* dkp = dk0 + b * sdkb + (p0 + r) * sdkp;
#pragma omp simd
          for (int64_t c = 0; c < s.C; ++c) dkp[c] = static_cast<scalar_t>((dkr[c] - kr[c] * radial) * inv_d);
          for (int64_t n = 0; n < s.N; ++n) dsrows[r * s.N + n] *= inv_d;  // dS/d, for dq̂
        }
        // dq̂ (N × C) += (dS/d)ᵀ · k rows (dqp was zeroed for this chunk)
        tokens_from_rows(dsrows.data(), rows, s.N, krows.data(), s.C, dqp);
      }
      dtp0[item] = dtau_acc * inv_tau;
    }
  });

  // dq from dq̂ through the l2n backward; partials reduced in chunk order by
  // hand (a tensor reduction's order may depend on the thread count).
  at::Tensor dqhat = at::zeros({s.B, s.N, s.C}, q.options().dtype(acc_type));
  {
    acc_t* dq_acc = dqhat.data_ptr<acc_t>();
    at::parallel_for(0, s.B * s.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bn = begin; bn < end; ++bn) {
        const int64_t b = bn / s.N, n = bn % s.N;
        acc_t* dst = dq_acc + bn * s.C;
        for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
          const acc_t* src = dqp0 + ((b * s.chunks + chunk) * s.N + n) * s.C;
#pragma omp simd
          for (int64_t c = 0; c < s.C; ++c) dst[c] += src[c];
        }
      }
    });
  }
  // dq = dq̂/(‖q‖+ε) − q (q·dq̂) / (‖q‖ (‖q‖+ε)²), the last term 0 at q = 0
  const at::Tensor qa = q.to(acc_type).contiguous();
  at::Tensor dq_acc_t = at::empty({s.B, s.N, s.C}, q.options().dtype(acc_type));
  {
    const acc_t* qx = qa.data_ptr<acc_t>();
    const acc_t* g = dqhat.data_ptr<acc_t>();
    acc_t* dst = dq_acc_t.data_ptr<acc_t>();
    for (int64_t bn = 0; bn < s.B * s.N; ++bn) {
      const acc_t* qr = qx + bn * s.C;
      const acc_t* gr = g + bn * s.C;
      const acc_t norm = std::sqrt(dot(qr, qr, s.C)), den = norm + acc_t(kL2nEps);
      const acc_t radial = norm > 0 ? dot(qr, gr, s.C) / (norm * den * den) : acc_t(0);
      for (int64_t c = 0; c < s.C; ++c) dst[bn * s.C + c] = gr[c] / den - qr[c] * radial;
    }
  }
  dq.copy_(dq_acc_t);
  acc_t dtau_sum = 0;
  for (int64_t i = 0; i < s.B * s.chunks; ++i) dtau_sum += dtp0[i];  // fixed order
  dtau.fill_(dtau_sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_assign_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, const at::Tensor& tau,
                                                                    const c10::optional<at::Tensor>& noise,
                                                                    int64_t key, bool use_key) {
  check_inputs(q, k, v, tau, noise);
  const int64_t B = q.size(0), N = q.size(1), P = k.size(1), D = v.size(2);
  at::Tensor out = at::empty({B, N, D}, q.options());
  at::Tensor assign = at::empty({B, N, P}, q.options());
  advise_huge_pages(assign);
  at::Tensor counts = at::empty({B, N}, q.options().dtype(at::kFloat));
  const double tau_value = tau.to(at::kDouble).item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "group_assign_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(q, k, v, static_cast<acc_t>(tau_value), noise, key, use_key, out, assign,
                                    counts);
  });
  return {out, assign, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_assign_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& dassign, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& tau, const c10::optional<at::Tensor>& noise, int64_t key, bool use_key, const at::Tensor& out,
    const at::Tensor& counts) {
  check_inputs(q, k, v, tau, noise);
  const int64_t B = q.size(0), N = q.size(1), P = k.size(1), D = v.size(2);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({B, N, D}), "group_assign_bwd (cpu): dout must be (B, N, D)");
  TORCH_CHECK(dassign.sizes() == at::IntArrayRef({B, N, P}), "group_assign_bwd (cpu): dassign must be (B, N, P)");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({B, N, D}), "group_assign_bwd (cpu): out must be (B, N, D)");
  TORCH_CHECK(counts.sizes() == at::IntArrayRef({B, N}), "group_assign_bwd (cpu): counts must be (B, N)");
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  advise_huge_pages(dk);
  advise_huge_pages(dv);
  const bool is_double = q.scalar_type() == at::kDouble;
  at::Tensor dtau = at::empty({1}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  const double tau_value = tau.to(at::kDouble).item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "group_assign_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(dout, dassign, q, k, v, static_cast<acc_t>(tau_value), noise, key, use_key, out,
                                     counts, dq, dk, dv, dtau);
  });
  return {dq, dk, dv, dtau};
}

}  // namespace
}  // namespace rexfast

// Schemas (defined once, here: this file is part of every build).
// q (B,N,C), k (B,P,C), v (B,P,D): one dtype, unit stride on the last axis,
// any batch/row stride. tau: one element. noise: contiguous (B,N,P) or none.
// key/use_key: draw Gumbel noise from kernels/rng.h instead.
// Returns out (B,N,D) and assign (B,N,P) in the input dtype, counts (B,N) float32;
// the backward returns dq, dk, dv (input dtype) and dtau (1,) (float32, float64 for float64 inputs).
TORCH_LIBRARY_FRAGMENT(rexfast_C, m) {
  m.def(
      "group_assign_fwd(Tensor q, Tensor k, Tensor v, Tensor tau, Tensor? noise, int key, bool use_key)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_assign_bwd(Tensor dout, Tensor dassign, Tensor q, Tensor k, Tensor v, Tensor tau, Tensor? noise,"
      " int key, bool use_key, Tensor out, Tensor counts) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rexfast_C, CPU, m) {
  m.impl("group_assign_fwd", &rexfast::group_assign_fwd_cpu);
  m.impl("group_assign_bwd", &rexfast::group_assign_bwd_cpu);
}
