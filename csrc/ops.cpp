// rexfast._C: the module init and the operator library. Kernels register per
// device in csrc/cpu/<op>.cpp (with the op's schemas) and csrc/cuda/<op>.cu;
// the autograd formula, fake functions and backend choice live with each op
// in rexfast/ops/<op>/op.py.
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

// The library itself; each op defines its schemas once, beside its CPU kernel
// (TORCH_LIBRARY_FRAGMENT in csrc/cpu/<op>.cpp, compiled into every build).
TORCH_LIBRARY(rexfast_C, m) {
  m.def("compiled_with_cuda() -> bool", &rexfast::compiled_with_cuda);
}
