// Operator schemas of rexfast._C, defined once. Kernels register per device
// in csrc/cpu/*.cpp and csrc/cuda/*.cu; the autograd formula, fake functions
// and backend choice live with each op in rexfast/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

// A plain module init (no pybind11): importing rexfast._C runs the static
// TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace rexfast {
bool compiled_with_cuda() {
#ifdef REXFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace rexfast

TORCH_LIBRARY(rexfast_C, m) {
  m.def("compiled_with_cuda() -> bool", &rexfast::compiled_with_cuda);
  // group_assign: see rexfast/ops/group_assign.py for the math.
  // q (B,N,C), k (B,P,C), v (B,P,D): one dtype, unit stride on the last axis,
  // any batch/row stride. tau: one element. noise: contiguous (B,N,P) or none.
  // key/use_key: draw Gumbel noise from kernels/rng.h instead.
  // Returns out (B,N,D) and assign (B,N,P) in the input dtype, counts (B,N) float32.
  m.def(
      "group_assign_fwd(Tensor q, Tensor k, Tensor v, Tensor tau, Tensor? noise, int key, bool use_key)"
      " -> (Tensor, Tensor, Tensor)");
  // Returns dq, dk, dv (input dtype) and dtau (1,) (float32, float64 for float64 inputs).
  m.def(
      "group_assign_bwd(Tensor dout, Tensor dassign, Tensor q, Tensor k, Tensor v, Tensor tau, Tensor? noise,"
      " int key, bool use_key, Tensor out, Tensor counts) -> (Tensor, Tensor, Tensor, Tensor)");
}
