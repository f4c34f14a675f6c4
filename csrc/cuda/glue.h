// What every torch glue file in csrc/cuda/ shares: the map from torch's element
// types to the types the torch-free kernels in kernels/ take, the accumulator
// dtype rule, and the one layout rule the kernels need.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rexfast {
namespace glue {

// at::Half / at::BFloat16 (torch's) → __half / __nv_bfloat16 (CUDA's; the same
// bits); float and double are themselves.
template <typename scalar_t>
struct KernelType {
  using type = scalar_t;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The kernels accumulate in float, or double for double inputs (kernels/common.cuh);
// scratch and statistics tensors take this dtype.
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels take any batch/row/head stride but need unit stride on the last axis.
inline at::Tensor inner_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace glue
}  // namespace rexfast
