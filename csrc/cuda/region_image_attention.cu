// region_image_attention on CUDA tensors: torch glue around kernels/region_attention.cu
// (the open-rows pass, then the forward; the backward takes the open rows back).
// Same schemas and outputs as csrc/cpu/region_image_attention.cpp; the decision plan
// (mode 2 = torch's CUDA resampler, 3 = copy for equal sizes, 4 = resampled values)
// and the threshold come from rexfast/ops/region_attention/plan.py.
#include <torch/library.h>

#include "region_attention_glue.h"

namespace rexfast {
namespace {

void check_region(const at::Tensor& q, const at::Tensor& k, const at::Tensor& logits, int64_t kh, int64_t kw,
                  int64_t mode, const c10::optional<at::Tensor>& resampled) {
  TORCH_CHECK(kh > 0 && kw > 0 && kh * kw == k.size(2), "region_image_attention (cuda): kh*kw must equal S");
  TORCH_CHECK(logits.dim() == 4 && logits.size(0) == q.size(0) && logits.size(1) == q.size(2) && logits.size(2) > 0 &&
                  logits.size(3) > 0 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.device() == q.device(),
              "region_image_attention (cuda): region_logits must be contiguous float32 (B, Q, mh, mw) on q's device");
  TORCH_CHECK(mode == cuda::kResampleCuda || mode == cuda::kResampleCopy || mode == cuda::kResampleMap,
              "region_image_attention (cuda): resample mode ", mode, " is a CPU mode");
  if (mode == cuda::kResampleCopy) {
    TORCH_CHECK(logits.size(2) == kh && logits.size(3) == kw, "region_image_attention (cuda): copy needs equal sizes");
  }
  if (mode == cuda::kResampleMap) {
    TORCH_CHECK(resampled.has_value() && resampled->scalar_type() == at::kFloat && resampled->is_contiguous() &&
                    resampled->numel() == q.size(0) * q.size(2) * k.size(2) && resampled->device() == q.device(),
                "region_image_attention (cuda): the map mode needs the resampled logits (B, Q, S) float32");
  }
}

void fill_region(cuda::RegionMaskParams& m, const at::Tensor& logits, int64_t kh, int64_t kw, int64_t mode,
                 double threshold, const c10::optional<at::Tensor>& resampled, const uint8_t* open) {
  m.mask = cuda::kMaskRegion;
  m.logits = logits.data_ptr<float>();
  m.mh = logits.size(2), m.mw = logits.size(3), m.kh = kh, m.kw = kw;
  m.resample = static_cast<int>(mode);
  m.threshold = static_cast<float>(threshold);
  m.resampled = mode == cuda::kResampleMap ? resampled->data_ptr<float>() : nullptr;
  m.open = open;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ria_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const at::Tensor& v_in, const at::Tensor& logits, int64_t kh,
                                                            int64_t kw, double scale, int64_t mode, bool /*fma*/,
                                                            int64_t /*q_vec*/, double threshold,
                                                            const c10::optional<at::Tensor>& resampled) {
  region_cuda::check_qkv("region_image_attention", q_in, k_in, v_in);
  check_region(q_in, k_in, logits, kh, kw, mode, resampled);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = region_cuda::inner_contiguous(q_in), k = region_cuda::inner_contiguous(k_in),
                   v = region_cuda::inner_contiguous(v_in);
  at::Tensor open = at::empty({q.size(0), q.size(2)}, q.options().dtype(at::kBool));
  uint8_t* open_ptr = reinterpret_cast<uint8_t*>(open.data_ptr<bool>());
  auto [out, lse] = region_cuda::forward("region_image_attention", q, k, v, scale,
                                         [&](cuda::RegionMaskParams& m, cudaStream_t stream, auto& p) {
                                           fill_region(m, logits, kh, kw, mode, threshold, resampled, nullptr);
                                           // the first pass: rows that block every key
                                           region_cuda::check_launch(cuda::region_open_rows(p, open_ptr, stream),
                                                                     "region_image_attention");
                                           m.open = open_ptr;
                                         });
  return {out, lse, open};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ria_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& logits, int64_t kh, int64_t kw, double scale, int64_t mode, bool /*fma*/, int64_t /*q_vec*/,
    double threshold, const c10::optional<at::Tensor>& resampled, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& open) {
  region_cuda::check_qkv("region_image_attention", q_in, k_in, v_in);
  check_region(q_in, k_in, logits, kh, kw, mode, resampled);
  TORCH_CHECK(open.scalar_type() == at::kBool && open.is_contiguous() && open.dim() == 2 &&
                  open.size(0) == q_in.size(0) && open.size(1) == q_in.size(2) && open.device() == q_in.device(),
              "region_image_attention_bwd (cuda): open must be the forward's (B, Q) bool rows");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = region_cuda::inner_contiguous(q_in), k = region_cuda::inner_contiguous(k_in),
                   v = region_cuda::inner_contiguous(v_in);
  const uint8_t* open_ptr = reinterpret_cast<const uint8_t*>(open.data_ptr<bool>());
  return region_cuda::backward("region_image_attention", dout, q, k, v, scale, out, lse,
                               [&](cuda::RegionMaskParams& m, cudaStream_t, auto&) {
                                 fill_region(m, logits, kh, kw, mode, threshold, resampled, open_ptr);
                               });
}

}  // namespace
}  // namespace rexfast

TORCH_LIBRARY_IMPL(rexfast_C, CUDA, m) {
  m.impl("region_image_attention_fwd", &rexfast::ria_fwd_cuda);
  m.impl("region_image_attention_bwd", &rexfast::ria_bwd_cuda);
}
