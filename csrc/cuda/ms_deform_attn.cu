// ms_deform_attn on CUDA tensors: torch glue around the torch-free kernels in
// kernels/ms_deform_attn.cu. Same schemas, outputs and dtypes as the CPU kernel
// (csrc/cpu/ms_deform_attn.cpp); semantics in rexfast/ops/ms_deform_attn/reference.py.
//
// Everything runs on the current CUDA stream; scratch memory comes from the
// caching allocator; the level shapes stay on the device (no host sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "glue.h"
#include "ms_deform_attn.cuh"

namespace rexfast {
namespace {

using glue::KernelType;

cuda::MSDeformAttnDims check_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                                    const at::Tensor& level_start_index, const at::Tensor& loc,
                                    const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4 && loc.dim() == 6 && attn.dim() == 5, op,
              " (cuda): value must be (B, S, M, D), sampling_locations (B, Q, M, L, P, 2), attention_weights "
              "(B, Q, M, L, P); got ",
              value.sizes(), ", ", loc.sizes(), ", ", attn.sizes());
  TORCH_CHECK(value.is_cuda() && loc.is_cuda() && attn.is_cuda(), op,
              " (cuda): value, sampling_locations, attention_weights must be CUDA tensors");
  TORCH_CHECK(loc.device() == value.device() && attn.device() == value.device(), op,
              " (cuda): value, sampling_locations, attention_weights must be on one device, got ", value.device(),
              ", ", loc.device(), ", ", attn.device());
  TORCH_CHECK(value.scalar_type() == loc.scalar_type() && value.scalar_type() == attn.scalar_type(), op,
              " (cuda): value, sampling_locations, attention_weights must share a dtype");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong, op,
              " (cuda): spatial_shapes and level_start_index must be int64");
  cuda::MSDeformAttnDims d;
  d.B = value.size(0), d.S = value.size(1), d.M = value.size(2), d.D = value.size(3);
  d.Q = loc.size(1), d.L = loc.size(3), d.P = loc.size(4);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == d.L && spatial_shapes.size(1) == 2 &&
                  level_start_index.dim() == 1 && level_start_index.size(0) == d.L,
              op, " (cuda): spatial_shapes must be (L, 2) and level_start_index (L,) with L = ", d.L);
  TORCH_CHECK(loc.size(0) == d.B && loc.size(2) == d.M && loc.size(5) == 2, op,
              " (cuda): sampling_locations must be (B, Q, M, L, P, 2) to match value ", value.sizes(), ", got ",
              loc.sizes());
  TORCH_CHECK(attn.sizes() == loc.sizes().slice(0, 5), op, " (cuda): attention_weights must be ",
              loc.sizes().slice(0, 5), ", got ", attn.sizes());
  return d;
}

// The layout the kernels accept: value with unit stride over D, the rest
// contiguous, the level tensors contiguous on value's device.
struct Prepared {
  at::Tensor value, spatial_shapes, level_start_index, loc, attn;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                 const at::Tensor& loc, const at::Tensor& attn) {
  Prepared p;
  p.value = value.stride(3) == 1 ? value : value.contiguous();
  p.spatial_shapes = spatial_shapes.to(value.device()).contiguous();
  p.level_start_index = level_start_index.to(value.device()).contiguous();
  p.loc = loc.contiguous();
  p.attn = attn.contiguous();
  return p;
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (unsupported sizes: see kernels/ms_deform_attn.cuh)" : "");
}

at::Tensor ms_deform_attn_fwd_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                   const at::Tensor& level_start_index_in, const at::Tensor& loc_in,
                                   const at::Tensor& attn_in) {
  const cuda::MSDeformAttnDims d =
      check_inputs("ms_deform_attn_fwd", value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const Prepared in = prepare(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  at::Tensor out = at::empty({d.B, d.Q, d.M * d.D}, in.value.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_fwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    cuda::MSDeformAttnFwdParams<T> p;
    p.dims = d;
    p.value = reinterpret_cast<const T*>(in.value.data_ptr<scalar_t>());
    p.value_sb = in.value.stride(0), p.value_ss = in.value.stride(1), p.value_sm = in.value.stride(2);
    p.spatial_shapes = in.spatial_shapes.data_ptr<int64_t>();
    p.level_start_index = in.level_start_index.data_ptr<int64_t>();
    p.loc = reinterpret_cast<const T*>(in.loc.data_ptr<scalar_t>());
    p.attn = reinterpret_cast<const T*>(in.attn.data_ptr<scalar_t>());
    p.out = reinterpret_cast<T*>(out.data_ptr<scalar_t>());
    check_cuda(cuda::ms_deform_attn_fwd<T>(p, stream), "ms_deform_attn_fwd");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
    const at::Tensor& level_start_index_in, const at::Tensor& loc_in, const at::Tensor& attn_in,
    bool deterministic) {
  const cuda::MSDeformAttnDims d =
      check_inputs("ms_deform_attn_bwd", value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({d.B, d.Q, d.M * d.D}) &&
                  grad_out_in.device() == value_in.device(),
              "ms_deform_attn_bwd (cuda): grad_output must be (B, Q, M*D) on ", value_in.device(), ", got ",
              grad_out_in.sizes(), " on ", grad_out_in.device());
  TORCH_CHECK(!deterministic || d.B * d.Q * d.M * d.L * d.P < (int64_t(1) << 29),
              "ms_deform_attn_bwd (cuda): the deterministic value gradient supports below 2^31 taps "
              "(4·B·Q·M·L·P), got ", 4 * d.B * d.Q * d.M * d.L * d.P,
              "; disable torch.use_deterministic_algorithms for the atomic one");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const Prepared in = prepare(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  const at::Tensor grad_out = grad_out_in.to(in.value.scalar_type()).contiguous();
  at::Tensor grad_value = at::empty({d.B, d.S, d.M, d.D}, in.value.options());
  at::Tensor grad_loc = at::empty(in.loc.sizes(), in.loc.options());
  at::Tensor grad_attn = at::empty(in.attn.sizes(), in.attn.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_bwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    const size_t ws_bytes = cuda::ms_deform_attn_bwd_workspace_bytes<T>(d, deterministic);
    at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                              in.value.options().dtype(at::kByte));
    cuda::MSDeformAttnBwdParams<T> p;
    p.dims = d;
    p.grad_out = reinterpret_cast<const T*>(grad_out.data_ptr<scalar_t>());
    p.value = reinterpret_cast<const T*>(in.value.data_ptr<scalar_t>());
    p.value_sb = in.value.stride(0), p.value_ss = in.value.stride(1), p.value_sm = in.value.stride(2);
    p.spatial_shapes = in.spatial_shapes.data_ptr<int64_t>();
    p.level_start_index = in.level_start_index.data_ptr<int64_t>();
    p.loc = reinterpret_cast<const T*>(in.loc.data_ptr<scalar_t>());
    p.attn = reinterpret_cast<const T*>(in.attn.data_ptr<scalar_t>());
    p.grad_value = reinterpret_cast<T*>(grad_value.data_ptr<scalar_t>());
    p.grad_loc = reinterpret_cast<T*>(grad_loc.data_ptr<scalar_t>());
    p.grad_attn = reinterpret_cast<T*>(grad_attn.data_ptr<scalar_t>());
    p.deterministic = deterministic;
    p.workspace = ws.data_ptr();
    p.workspace_bytes = ws_bytes;
    check_cuda(cuda::ms_deform_attn_bwd<T>(p, stream), "ms_deform_attn_bwd");
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace rexfast

TORCH_LIBRARY_IMPL(rexfast_C, CUDA, m) {
  m.impl("ms_deform_attn_fwd", &rexfast::ms_deform_attn_fwd_cuda);
  m.impl("ms_deform_attn_bwd", &rexfast::ms_deform_attn_bwd_cuda);
}
