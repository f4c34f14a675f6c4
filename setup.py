"""Builds rexfast._C: the C++ CPU kernels always, the CUDA kernels when possible.

Environment flags:
  REXFAST_SKIP_EXTENSION=1  build no extension at all (pure-Python install; the
                            reference and Triton backends still work)
  REXFAST_FORCE_CUDA=1      build the CUDA kernels even if torch sees no GPU
                            (needs a CUDA build of torch and nvcc)
  REXFAST_SKIP_CUDA=1       never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST      CUDA archs, e.g. "9.0" or "8.0;9.0+PTX" (default: 9.0)
  REXFAST_PORTABLE=1        no -march=native for the CPU kernels (for wheels
                            that run on other CPUs)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extensions():
    if flag("REXFAST_SKIP_EXTENSION"):
        print("rexfast: REXFAST_SKIP_EXTENSION=1, building no C++/CUDA extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for's OpenMP loop is inlined from ATen's headers, so
    # without it the CPU kernels silently run on one thread. -ffp-contract=off:
    # no implicit FMA contraction, which the compiler applies differently in a
    # vectorised loop and its scalar peel, so results would depend on buffer
    # addresses and thread count (the kernels promise bitwise reproducibility).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]
    if not flag("REXFAST_PORTABLE"):
        cxx.append("-march=native")
    include_dirs = [os.path.join(ROOT, "kernels")]

    torch_has_cuda = torch.version.cuda is not None
    if flag("REXFAST_SKIP_CUDA"):
        with_cuda, why = False, "REXFAST_SKIP_CUDA=1"
    elif flag("REXFAST_FORCE_CUDA"):
        with_cuda, why = True, "REXFAST_FORCE_CUDA=1"
    elif not torch_has_cuda:
        with_cuda, why = False, f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        with_cuda, why = False, "nvcc / CUDA_HOME not found"
    else:
        with_cuda, why = True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
    print(f"rexfast: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})")

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += rel("csrc/cuda/*.cu") + rel("kernels/*.cu")
        ext = CUDAExtension(
            "rexfast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("REXFAST_WITH_CUDA", None)],
            extra_link_args=link,
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DREXFAST_WITH_CUDA"],
            },
        )
    else:
        ext = CppExtension(
            "rexfast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
