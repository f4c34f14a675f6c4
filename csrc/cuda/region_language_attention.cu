// region_language_attention on CUDA tensors: torch glue around kernels/region_attention.cu
// with a key padding mask (or none). Same schemas and outputs as
// csrc/cpu/region_language_attention.cpp.
#include <torch/library.h>

#include "region_attention_glue.h"

namespace rexfast {
namespace {

struct Padding {
  at::Tensor padded, empty;  // (B, S), (B,) uint8, undefined without a mask
};

Padding padding_of(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& kpm) {
  Padding p;
  if (!kpm.has_value()) return p;
  TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == q.size(0) &&
                  kpm->size(1) == k.size(2) && kpm->device() == q.device(),
              "region_language_attention (cuda): key_padding_mask must be a (B, S) bool tensor on q's device");
  p.padded = kpm->to(at::kByte).contiguous();
  p.empty = kpm->all(-1).to(at::kByte).contiguous();
  return p;
}

void fill_padding(cuda::RegionMaskParams& m, const Padding& pad) {
  if (!pad.padded.defined()) {
    m.mask = cuda::kMaskNone;
    return;
  }
  m.mask = cuda::kMaskPadding;
  m.padded = pad.padded.data_ptr<uint8_t>();
  m.empty = pad.empty.data_ptr<uint8_t>();
}

std::tuple<at::Tensor, at::Tensor> rla_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const c10::optional<at::Tensor>& kpm, double scale) {
  region_cuda::check_qkv("region_language_attention", q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = region_cuda::inner_contiguous(q_in), k = region_cuda::inner_contiguous(k_in),
                   v = region_cuda::inner_contiguous(v_in);
  const Padding pad = padding_of(q, k, kpm);
  return region_cuda::forward("region_language_attention", q, k, v, scale,
                              [&](cuda::RegionMaskParams& m, cudaStream_t, auto&) { fill_padding(m, pad); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rla_bwd_cuda(const at::Tensor& dout, const at::Tensor& q_in,
                                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                                            const c10::optional<at::Tensor>& kpm, double scale,
                                                            const at::Tensor& out, const at::Tensor& lse) {
  region_cuda::check_qkv("region_language_attention", q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = region_cuda::inner_contiguous(q_in), k = region_cuda::inner_contiguous(k_in),
                   v = region_cuda::inner_contiguous(v_in);
  const Padding pad = padding_of(q, k, kpm);
  return region_cuda::backward("region_language_attention", dout, q, k, v, scale, out, lse,
                               [&](cuda::RegionMaskParams& m, cudaStream_t, auto&) { fill_padding(m, pad); });
}

}  // namespace
}  // namespace rexfast

TORCH_LIBRARY_IMPL(rexfast_C, CUDA, m) {
  m.impl("region_language_attention_fwd", &rexfast::rla_fwd_cuda);
  m.impl("region_language_attention_bwd", &rexfast::rla_bwd_cuda);
}
