// Flat C entry points (for ctypes) to the host launchers of kernels/: each fills
// the launcher's parameter struct exactly as the torch glue in csrc/cuda/ does
// and returns its cudaError_t. dtype codes: 0 float, 1 double, 2 half, 3 bfloat16.
#include <stdint.h>

#include "group_assign.cuh"
#include "ms_deform_attn.cuh"
#include "region_attention.cuh"

namespace {

template <typename F>
auto dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(double{});
    case 2: return f(__half{});
    default: return f(__nv_bfloat16{});
  }
}

bool dtype_ok(int dtype) { return dtype >= 0 && dtype <= 3; }

}  // namespace

using namespace rexfast::cuda;

extern "C" {

// ------------------------------------------------------------------ group_assign
// dims: B, N, P, C, D; strides (in elements): q (sb, sn), k (sb, sp), v (sb, sp).
size_t sim_group_assign_workspace(int dtype, int backward, const int64_t* dims) {
  if (!dtype_ok(dtype)) return 0;
  return dispatch(dtype, [&](auto t) -> size_t {
    using T = decltype(t);
    return backward ? group_assign_bwd_workspace_bytes<T>(dims[0], dims[1], dims[2], dims[3], dims[4])
                    : group_assign_fwd_workspace_bytes<T>(dims[0], dims[1], dims[2], dims[3], dims[4]);
  });
}

int sim_group_assign_fwd(int dtype, const int64_t* dims, const void* q, const int64_t* q_str, const void* k,
                         const int64_t* k_str, const void* v, const int64_t* v_str, const void* tau,
                         const void* noise, uint32_t key, int use_key, void* out, void* assign, float* counts,
                         void* workspace, size_t workspace_bytes) {
  if (!dtype_ok(dtype)) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = typename GroupAssignAcc<T>::type;
    GroupAssignFwdParams<T> p;
    p.B = dims[0], p.N = dims[1], p.P = dims[2], p.C = dims[3], p.D = dims[4];
    p.q = static_cast<const T*>(q), p.q_sb = q_str[0], p.q_sn = q_str[1];
    p.k = static_cast<const T*>(k), p.k_sb = k_str[0], p.k_sp = k_str[1];
    p.v = static_cast<const T*>(v), p.v_sb = v_str[0], p.v_sp = v_str[1];
    p.tau = static_cast<const A*>(tau);
    p.noise = static_cast<const A*>(noise);
    p.key = key;
    p.use_key = use_key != 0;
    p.out = static_cast<T*>(out);
    p.assign = static_cast<T*>(assign);
    p.counts = counts;
    p.workspace = workspace;
    p.workspace_bytes = workspace_bytes;
    return group_assign_fwd<T>(p, nullptr);
  });
}

int sim_group_assign_bwd(int dtype, const int64_t* dims, const void* q, const int64_t* q_str, const void* k,
                         const int64_t* k_str, const void* v, const int64_t* v_str, const void* tau,
                         const void* noise, uint32_t key, int use_key, const void* dout, const void* dassign,
                         const void* dassign_acc, const void* out, const float* counts, void* dq, void* dk, void* dv,
                         void* dtau, void* workspace, size_t workspace_bytes) {
  if (!dtype_ok(dtype)) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = typename GroupAssignAcc<T>::type;
    GroupAssignBwdParams<T> p;
    p.B = dims[0], p.N = dims[1], p.P = dims[2], p.C = dims[3], p.D = dims[4];
    p.q = static_cast<const T*>(q), p.q_sb = q_str[0], p.q_sn = q_str[1];
    p.k = static_cast<const T*>(k), p.k_sb = k_str[0], p.k_sp = k_str[1];
    p.v = static_cast<const T*>(v), p.v_sb = v_str[0], p.v_sp = v_str[1];
    p.tau = static_cast<const A*>(tau);
    p.noise = static_cast<const A*>(noise);
    p.key = key;
    p.use_key = use_key != 0;
    p.dout = static_cast<const A*>(dout);
    p.dassign = static_cast<const T*>(dassign);
    p.dassign_acc = static_cast<const A*>(dassign_acc);
    p.out = static_cast<const A*>(out);
    p.counts = counts;
    p.dq = static_cast<T*>(dq);
    p.dk = static_cast<T*>(dk);
    p.dv = static_cast<T*>(dv);
    p.dtau = static_cast<A*>(dtau);
    p.workspace = workspace;
    p.workspace_bytes = workspace_bytes;
    return group_assign_bwd<T>(p, nullptr);
  });
}

// ------------------------------------------------------------------ ms_deform_attn
// dims: B, S, M, D, Q, L, P; value strides (sb, ss, sm) in elements.
static MSDeformAttnDims msda_dims(const int64_t* d) {
  MSDeformAttnDims m;
  m.B = d[0], m.S = d[1], m.M = d[2], m.D = d[3], m.Q = d[4], m.L = d[5], m.P = d[6];
  return m;
}

size_t sim_msda_workspace(int dtype, const int64_t* dims, int deterministic) {
  if (!dtype_ok(dtype)) return 0;
  return dispatch(dtype, [&](auto t) -> size_t {
    using T = decltype(t);
    return ms_deform_attn_bwd_workspace_bytes<T>(msda_dims(dims), deterministic != 0);
  });
}

int sim_msda_fwd(int dtype, const int64_t* dims, const void* value, const int64_t* v_str, const int64_t* shapes,
                 const int64_t* starts, const void* loc, const void* attn, void* out) {
  if (!dtype_ok(dtype)) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto t) -> int {
    using T = decltype(t);
    MSDeformAttnFwdParams<T> p;
    p.dims = msda_dims(dims);
    p.value = static_cast<const T*>(value), p.value_sb = v_str[0], p.value_ss = v_str[1], p.value_sm = v_str[2];
    p.spatial_shapes = shapes;
    p.level_start_index = starts;
    p.loc = static_cast<const T*>(loc);
    p.attn = static_cast<const T*>(attn);
    p.out = static_cast<T*>(out);
    return ms_deform_attn_fwd<T>(p, nullptr);
  });
}

int sim_msda_bwd(int dtype, const int64_t* dims, const void* grad_out, const void* value, const int64_t* v_str,
                 const int64_t* shapes, const int64_t* starts, const void* loc, const void* attn, void* grad_value,
                 void* grad_loc, void* grad_attn, int deterministic, void* workspace, size_t workspace_bytes) {
  if (!dtype_ok(dtype)) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto t) -> int {
    using T = decltype(t);
    MSDeformAttnBwdParams<T> p;
    p.dims = msda_dims(dims);
    p.grad_out = static_cast<const T*>(grad_out);
    p.value = static_cast<const T*>(value), p.value_sb = v_str[0], p.value_ss = v_str[1], p.value_sm = v_str[2];
    p.spatial_shapes = shapes;
    p.level_start_index = starts;
    p.loc = static_cast<const T*>(loc);
    p.attn = static_cast<const T*>(attn);
    p.grad_value = static_cast<T*>(grad_value);
    p.grad_loc = static_cast<T*>(grad_loc);
    p.grad_attn = static_cast<T*>(grad_attn);
    p.deterministic = deterministic != 0;
    p.workspace = workspace;
    p.workspace_bytes = workspace_bytes;
    return ms_deform_attn_bwd<T>(p, nullptr);
  });
}

// ------------------------------------------------------------------ region attention
// dims: B, H, Q, S, D; strides (sb, sh, sl) of q, k, v; region: mh, mw, kh, kw.
// what: 0 the open-rows pass (into open_out), 1 forward, 2 backward.
int sim_region_attention(int what, int dtype, const int64_t* dims, const void* q, const int64_t* q_str,
                         const void* k, const int64_t* k_str, const void* v, const int64_t* v_str, double scale,
                         int mask, const float* logits, const int64_t* region, int resample, float threshold,
                         const float* resampled, const uint8_t* open, const uint8_t* padded, const uint8_t* empty,
                         const uint8_t* v_finite, void* out, void* lse, const uint8_t* safe, const void* dout,
                         const void* lse_in, const void* delta, void* dq, void* dk, void* dv, uint8_t* open_out) {
  if (!dtype_ok(dtype) || what < 0 || what > 2) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = typename RegionAcc<T>::type;
    RegionAttnParams<T> p;
    p.B = dims[0], p.H = dims[1], p.Q = dims[2], p.S = dims[3], p.D = dims[4];
    p.q = static_cast<const T*>(q), p.q_sb = q_str[0], p.q_sh = q_str[1], p.q_sl = q_str[2];
    p.k = static_cast<const T*>(k), p.k_sb = k_str[0], p.k_sh = k_str[1], p.k_sl = k_str[2];
    p.v = static_cast<const T*>(v), p.v_sb = v_str[0], p.v_sh = v_str[1], p.v_sl = v_str[2];
    p.scale = static_cast<A>(scale);
    p.m.mask = mask;
    p.m.logits = logits;
    if (region) p.m.mh = region[0], p.m.mw = region[1], p.m.kh = region[2], p.m.kw = region[3];
    p.m.resample = resample;
    p.m.threshold = threshold;
    p.m.resampled = resampled;
    p.m.open = open;
    p.m.padded = padded;
    p.m.empty = empty;
    p.v_finite = v_finite;
    p.out = static_cast<T*>(out);
    p.lse = static_cast<A*>(lse);
    p.safe = safe;
    p.dout = static_cast<const T*>(dout);
    p.lse_in = static_cast<const A*>(lse_in);
    p.delta = static_cast<const A*>(delta);
    p.dq = static_cast<T*>(dq);
    p.dk = static_cast<T*>(dk);
    p.dv = static_cast<T*>(dv);
    if (what == 0) return static_cast<int>(region_open_rows<T>(p, open_out, nullptr));
    if (what == 1) return static_cast<int>(region_attention_fwd<T>(p, nullptr));
    return static_cast<int>(region_attention_bwd<T>(p, nullptr));
  });
}

}  // extern "C"
