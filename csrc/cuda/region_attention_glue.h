// Torch glue shared by csrc/cuda/region_image_attention.cu and
// region_language_attention.cu: fills the torch-free kernels' parameters
// (kernels/region_attention.cuh) from tensors and launches them on the current
// stream. Same schemas, outputs and dtypes as the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "glue.h"
#include "region_attention.cuh"

namespace rexfast {
namespace region_cuda {

using glue::acc_type_of;
using glue::inner_contiguous;
using glue::KernelType;

inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, " (cuda): q, k, v must be 4-D");
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              " (cuda): q, k, v must be CUDA tensors on one device");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), op,
              " (cuda): q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              op, " (cuda): k, v must be (B, H, S, d) to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0 && k.size(2) > 0 && q.size(3) > 0, op,
              " (cuda): B, H, Q, S and d must be non-empty");
  TORCH_CHECK(q.size(3) <= cuda::kRegionMaxD, op, " (cuda): head dimension ", q.size(3), " > ", cuda::kRegionMaxD);
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

// (B*H) uint8: every value of each (b, h) slice of the given tensors finite.
inline at::Tensor finite_per_bh(std::initializer_list<at::Tensor> ts) {
  at::Tensor ok;
  for (const at::Tensor& t : ts) {
    at::Tensor f = at::isfinite(t).flatten(2).all(-1);
    ok = ok.defined() ? ok.logical_and(f) : f;
  }
  return ok.to(at::kByte).contiguous();
}

template <typename T>
void fill_qkv(cuda::RegionAttnParams<T>& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  p.B = q.size(0), p.H = q.size(1), p.Q = q.size(2), p.S = k.size(2), p.D = q.size(3);
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k = reinterpret_cast<const T*>(k.data_ptr());
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v = reinterpret_cast<const T*>(v.data_ptr());
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
}


// The forward for a filled mask; returns (out, lse).
template <typename Fill>
std::tuple<at::Tensor, at::Tensor> forward(const char* op, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, double scale, Fill&& fill_mask) {
  const at::ScalarType acc = acc_type_of(q.scalar_type());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc));
  const at::Tensor v_finite = finite_per_bh({v});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "region_attention_fwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using A = typename cuda::RegionAcc<T>::type;
    cuda::RegionAttnParams<T> p;
    fill_qkv(p, q, k, v);
    p.scale = static_cast<A>(scale);
    fill_mask(p.m, stream, p);
    p.v_finite = v_finite.data_ptr<uint8_t>();
    p.out = reinterpret_cast<T*>(out.data_ptr());
    p.lse = lse.data_ptr<A>();
    check_launch(cuda::region_attention_fwd<T>(p, stream), op);
  });
  return {out, lse};
}

template <typename Fill>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const char* op, const at::Tensor& dout_in,
                                                        const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        double scale, const at::Tensor& out, const at::Tensor& lse_in,
                                                        Fill&& fill_mask) {
  TORCH_CHECK(dout_in.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              "_bwd (cuda): dout and out must be (B, H, Q, d)");
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q.size(0) && lse_in.size(1) == q.size(1) &&
                  lse_in.size(2) == q.size(2),
              op, "_bwd (cuda): lse must be (B, H, Q)");
  const at::ScalarType acc = acc_type_of(q.scalar_type());
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor delta = (dout.to(acc) * out.to(acc)).sum(-1).contiguous();
  const at::Tensor safe = finite_per_bh({q, k, dout});
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "region_attention_bwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using A = typename cuda::RegionAcc<T>::type;
    cuda::RegionAttnParams<T> p;
    fill_qkv(p, q, k, v);
    p.scale = static_cast<A>(scale);
    fill_mask(p.m, stream, p);
    p.safe = safe.data_ptr<uint8_t>();
    p.dout = reinterpret_cast<const T*>(dout.data_ptr());
    p.lse_in = lse.data_ptr<A>();
    p.delta = delta.data_ptr<A>();
    p.dq = reinterpret_cast<T*>(dq.data_ptr());
    p.dk = reinterpret_cast<T*>(dk.data_ptr());
    p.dv = reinterpret_cast<T*>(dv.data_ptr());
    check_launch(cuda::region_attention_bwd<T>(p, stream), op);
  });
  return {dq, dk, dv};
}

}  // namespace region_cuda
}  // namespace rexfast
