// group_assign on CUDA tensors: torch glue around the torch-free kernels in
// kernels/group_assign.cu. Same schemas, outputs and dtypes as the CPU kernel
// (csrc/cpu/group_assign_cpu.cpp); math in rexfast/ops/group_assign.py.
//
// Everything runs on the current CUDA stream; scratch memory comes from the
// caching allocator; tau stays on the device (no host synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
// at::cuda::getCurrentCUDAStream (= c10::cuda's) without ATen/cuda/CUDAContext.h,
// which pulls in the cuBLAS/cuSPARSE/cuSOLVER headers this file does not need.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "glue.h"
#include "group_assign.cuh"

namespace rexfast {
namespace {

using glue::acc_type_of;
using glue::inner_contiguous;
using glue::KernelType;

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& tau, const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, " (cuda): q, k, v must be 3-D, got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), op, " (cuda): q, k, v must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device() && k.device() == v.device(), op,
              " (cuda): q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), op,
              " (cuda): q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), op, " (cuda): k must be (B, P, C) to match q ",
              q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == k.size(1), op, " (cuda): v must be (B, P, D) to match k ",
              k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0 && v.size(2) > 0, op,
              " (cuda): B, N, C and D must be non-empty, got q ", q.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(1) > 0, op, " (cuda): empty pixel axis");
  TORCH_CHECK(tau.numel() == 1, op, " (cuda): tau must hold one value, got shape ", tau.sizes());
  TORCH_CHECK(at::isFloatingType(tau.scalar_type()), op, " (cuda): tau must be a float tensor");
  TORCH_CHECK(q.size(0) * q.size(1) * k.size(1) < (int64_t(1) << 31), op, " (cuda): B*N*P must be < 2^31");
  if (noise.has_value()) {
    TORCH_CHECK(noise->numel() == q.size(0) * q.size(1) * k.size(1) && noise->dim() == 3 &&
                    noise->size(0) == q.size(0) && noise->size(1) == q.size(1) && noise->size(2) == k.size(1),
                op, " (cuda): noise must be a (B, N, P) tensor, got ", noise->sizes());
    TORCH_CHECK(noise->device() == q.device(), op, " (cuda): noise is on ", noise->device(), " but q is on ",
                q.device());
    TORCH_CHECK(at::isFloatingType(noise->scalar_type()), op, " (cuda): noise must be a float tensor");
  }
}

// Inputs after the layout the kernels accept.
struct Prepared {
  at::Tensor q, k, v, tau, noise;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tau,
                 const c10::optional<at::Tensor>& noise) {
  const at::ScalarType acc = acc_type_of(q.scalar_type());
  Prepared p;
  p.q = inner_contiguous(q);
  p.k = inner_contiguous(k);
  p.v = inner_contiguous(v);
  p.tau = tau.reshape({1}).to(q.device(), acc).contiguous();
  if (noise.has_value()) p.noise = noise->to(acc).contiguous();
  return p;
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidConfiguration ? " (N too large for the per-tile shared memory)" : "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_assign_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                     const at::Tensor& v_in,
                                                                     const at::Tensor& tau_in,
                                                                     const c10::optional<at::Tensor>& noise_in,
                                                                     int64_t key, bool use_key) {
  check_inputs("group_assign_fwd", q_in, k_in, v_in, tau_in, noise_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Prepared in = prepare(q_in, k_in, v_in, tau_in, noise_in);
  const int64_t B = in.q.size(0), N = in.q.size(1), C = in.q.size(2), P = in.k.size(1), D = in.v.size(2);
  at::Tensor out = at::empty({B, N, D}, in.q.options());
  at::Tensor assign = at::empty({B, N, P}, in.q.options());
  at::Tensor counts = at::empty({B, N}, in.q.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "group_assign_fwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using A = typename cuda::GroupAssignAcc<T>::type;
    const size_t ws_bytes = cuda::group_assign_fwd_workspace_bytes<T>(B, N, P, C, D);
    TORCH_CHECK(ws_bytes > 0, "group_assign_fwd (cuda): unsupported sizes");
    at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, in.q.options().dtype(at::kByte));
    cuda::GroupAssignFwdParams<T> p;
    p.B = B, p.N = N, p.P = P, p.C = C, p.D = D;
    p.q = reinterpret_cast<const T*>(in.q.data_ptr<scalar_t>());
    p.q_sb = in.q.stride(0), p.q_sn = in.q.stride(1);
    p.k = reinterpret_cast<const T*>(in.k.data_ptr<scalar_t>());
    p.k_sb = in.k.stride(0), p.k_sp = in.k.stride(1);
    p.v = reinterpret_cast<const T*>(in.v.data_ptr<scalar_t>());
    p.v_sb = in.v.stride(0), p.v_sp = in.v.stride(1);
    p.tau = in.tau.data_ptr<A>();
    p.noise = in.noise.defined() ? in.noise.data_ptr<A>() : nullptr;
    p.key = static_cast<uint32_t>(key);
    p.use_key = use_key;
    p.out = reinterpret_cast<T*>(out.data_ptr<scalar_t>());
    p.assign = reinterpret_cast<T*>(assign.data_ptr<scalar_t>());
    p.counts = counts.data_ptr<float>();
    p.workspace = ws.data_ptr();
    p.workspace_bytes = ws_bytes;
    check_cuda(cuda::group_assign_fwd<T>(p, stream), "group_assign_fwd");
  });
  return {out, assign, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_assign_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& dassign_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& tau_in, const c10::optional<at::Tensor>& noise_in, int64_t key,
    bool use_key, const at::Tensor& out_in, const at::Tensor& counts_in) {
  check_inputs("group_assign_bwd", q_in, k_in, v_in, tau_in, noise_in);
  const int64_t B = q_in.size(0), N = q_in.size(1), C = q_in.size(2), P = k_in.size(1), D = v_in.size(2);
  TORCH_CHECK(dout_in.sizes() == at::IntArrayRef({B, N, D}), "group_assign_bwd (cuda): dout must be (B, N, D)");
  TORCH_CHECK(dassign_in.sizes() == at::IntArrayRef({B, N, P}), "group_assign_bwd (cuda): dassign must be (B, N, P)");
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef({B, N, D}), "group_assign_bwd (cuda): out must be (B, N, D)");
  TORCH_CHECK(counts_in.sizes() == at::IntArrayRef({B, N}), "group_assign_bwd (cuda): counts must be (B, N)");
  for (const at::Tensor* t : {&dout_in, &dassign_in, &out_in, &counts_in}) {
    TORCH_CHECK(t->device() == q_in.device(), "group_assign_bwd (cuda): dout, dassign, out and counts must be on ",
                q_in.device(), ", got ", t->device());
  }
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Prepared in = prepare(q_in, k_in, v_in, tau_in, noise_in);
  const at::ScalarType acc = acc_type_of(in.q.scalar_type());
  const at::Tensor dout = dout_in.to(acc).contiguous();
  const at::Tensor out = out_in.to(acc).contiguous();
  // dassign is read in the input dtype when it has it (the usual case, no
  // extra pass over B×N×P); any other dtype goes through the accumulation type
  // like the CPU kernel.
  const bool dassign_native = dassign_in.scalar_type() == in.q.scalar_type();
  const at::Tensor dassign = (dassign_native ? dassign_in : dassign_in.to(acc)).contiguous();
  const at::Tensor counts = counts_in.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty_like(in.q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(in.k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(in.v, at::MemoryFormat::Contiguous);
  at::Tensor dtau = at::empty({1}, in.q.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "group_assign_bwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using A = typename cuda::GroupAssignAcc<T>::type;
    const size_t ws_bytes = cuda::group_assign_bwd_workspace_bytes<T>(B, N, P, C, D);
    TORCH_CHECK(ws_bytes > 0, "group_assign_bwd (cuda): unsupported sizes");
    at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, in.q.options().dtype(at::kByte));
    cuda::GroupAssignBwdParams<T> p;
    p.B = B, p.N = N, p.P = P, p.C = C, p.D = D;
    p.q = reinterpret_cast<const T*>(in.q.data_ptr<scalar_t>());
    p.q_sb = in.q.stride(0), p.q_sn = in.q.stride(1);
    p.k = reinterpret_cast<const T*>(in.k.data_ptr<scalar_t>());
    p.k_sb = in.k.stride(0), p.k_sp = in.k.stride(1);
    p.v = reinterpret_cast<const T*>(in.v.data_ptr<scalar_t>());
    p.v_sb = in.v.stride(0), p.v_sp = in.v.stride(1);
    p.tau = in.tau.data_ptr<A>();
    p.noise = in.noise.defined() ? in.noise.data_ptr<A>() : nullptr;
    p.key = static_cast<uint32_t>(key);
    p.use_key = use_key;
    p.dout = dout.data_ptr<A>();
    if (dassign_native) p.dassign = reinterpret_cast<const T*>(dassign.data_ptr<scalar_t>());
    else p.dassign_acc = dassign.data_ptr<A>();
    p.out = out.data_ptr<A>();
    p.counts = counts.data_ptr<float>();
    p.dq = reinterpret_cast<T*>(dq.data_ptr<scalar_t>());
    p.dk = reinterpret_cast<T*>(dk.data_ptr<scalar_t>());
    p.dv = reinterpret_cast<T*>(dv.data_ptr<scalar_t>());
    p.dtau = dtau.data_ptr<A>();
    p.workspace = ws.data_ptr();
    p.workspace_bytes = ws_bytes;
    check_cuda(cuda::group_assign_bwd<T>(p, stream), "group_assign_bwd");
  });
  return {dq, dk, dv, dtau};
}

}  // namespace
}  // namespace rexfast

TORCH_LIBRARY_IMPL(rexfast_C, CUDA, m) {
  m.impl("group_assign_fwd", &rexfast::group_assign_fwd_cuda);
  m.impl("group_assign_bwd", &rexfast::group_assign_bwd_cuda);
}
