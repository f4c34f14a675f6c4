// region_language_attention (RLA) on the CPU: the masked attention core of
// region_attention/attention.h with a key padding mask over words (or none). A sample
// whose every word is padded gives zero output rows (lse = -inf) and zero
// gradients (rexfast/ops/region_attention/region_language_attention/reference.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "region_attention/attention.h"

namespace rexfast {
namespace {

struct PaddingDecider {
  const uint8_t* padded = nullptr;  // (B, S), 1 = padded; nullptr = no mask
  int64_t S = 0;
  std::vector<uint8_t> empty_;  // (B,): every word padded

  bool masked() const { return padded != nullptr; }
  bool empty(int64_t b) const { return padded != nullptr && empty_[b]; }
  bool open_rule() const { return false; }
  void strip(int64_t b, const int64_t*, int64_t rows, int64_t S_, uint8_t* out, int64_t ld, int64_t* counts) const {
    const uint8_t* p = padded + b * S;
    int64_t n = 0;
    for (int64_t j = 0; j < S_; ++j) {
      out[j] = !p[j];
      n += out[j];
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (r > 0) std::copy(out, out + S_, out + r * ld);
      counts[r] = n;
    }
  }
  int64_t tile(int64_t b, const int64_t*, int64_t rows, int64_t j0, int64_t cols, uint8_t* out, int64_t ld,
               int64_t* counts) const {
    const uint8_t* p = padded + b * S + j0;
    int64_t n = 0;
    for (int64_t c = 0; c < cols; ++c) {
      out[c] = !p[c];
      n += out[c];
    }
    for (int64_t r = 1; r < rows; ++r) std::copy(out, out + cols, out + r * ld);
    if (counts)
      for (int64_t r = 0; r < rows; ++r) counts[r] += n;
    return n * rows;
  }
};

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& kpm) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "region_language_attention (cpu): q, k, v must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "region_language_attention (cpu): inputs must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "region_language_attention (cpu): q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "region_language_attention (cpu): k, v must be (B, H, S, d) to match q");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "region_language_attention (cpu): q, k, v need unit stride on the last axis");
  TORCH_CHECK(k.size(2) > 0, "region_language_attention (cpu): empty key axis");
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == q.size(0) &&
                    kpm->size(1) == k.size(2) && kpm->device().is_cpu(),
                "region_language_attention (cpu): key_padding_mask must be a (B, S) bool CPU tensor");
  }
}

PaddingDecider decider_for(const c10::optional<at::Tensor>& kpm, at::Tensor& holder, int64_t B, int64_t S) {
  PaddingDecider dec;
  if (!kpm.has_value()) return dec;
  holder = kpm->contiguous().to(at::kByte);
  dec.padded = holder.data_ptr<uint8_t>();
  dec.S = S;
  dec.empty_.assign(static_cast<size_t>(B), 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < S; ++j) dec.empty_[b] = dec.empty_[b] && dec.padded[b * S + j];
  return dec;
}

std::tuple<at::Tensor, at::Tensor> rla_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const c10::optional<at::Tensor>& kpm, double scale) {
  check(q, k, v, kpm);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), d = q.size(3), S = k.size(2);
  const bool is_double = q.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, H, Q, d}, q.options());
  at::Tensor lse = at::empty({B, H, Q}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  at::Tensor holder;
  const PaddingDecider dec = decider_for(kpm, holder, B, S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "region_language_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    region::attention_forward<scalar_t, acc_t>(q, k, v, static_cast<acc_t>(scale), dec, out, lse, nullptr);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rla_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const c10::optional<at::Tensor>& kpm, double scale,
                                                           const at::Tensor& out, const at::Tensor& lse) {
  check(q, k, v, kpm);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "region_language_attention_bwd (cpu): dout and out must be (B, H, Q, d)");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "region_language_attention_bwd (cpu): lse must be (B, H, Q)");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor holder;
  const PaddingDecider dec = decider_for(kpm, holder, q.size(0), k.size(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "region_language_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    region::attention_backward<scalar_t, acc_t>(dout, q, k, v, static_cast<acc_t>(scale), dec, out, lse, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace rexfast

// Schemas. q (B,H,Q,d), k/v (B,H,S,d): one dtype, unit stride on d; key_padding_mask
// (B,S) bool (True = padded) or none. Returns out (B,H,Q,d) and lse (B,H,Q)
// (float32; float64 for float64 inputs; -inf for all-padded samples).
TORCH_LIBRARY_FRAGMENT(rexfast_C, m) {
  m.def(
      "region_language_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale)"
      " -> (Tensor, Tensor)");
  m.def(
      "region_language_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask,"
      " float scale, Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rexfast_C, CPU, m) {
  m.impl("region_language_attention_fwd", &rexfast::rla_fwd_cpu);
  m.impl("region_language_attention_bwd", &rexfast::rla_bwd_cpu);
}
