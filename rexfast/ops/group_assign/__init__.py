"""``group_assign``: CGFormer's cosine-similarity Gumbel hard-assignment grouping.

``op.py`` (checks, registration, autograd, backends), ``reference.py`` (the
PyTorch truth), ``triton_kernels.py`` (Triton, imported on first use); the C++
and CUDA kernels are ``csrc/cpu/group_assign.cpp``, ``csrc/cuda/group_assign.cu``
and ``kernels/group_assign.cu(h)``.
"""

from .op import BACKENDS, group_assign
from .reference import group_assign_reference

__all__ = ["group_assign", "group_assign_reference", "BACKENDS"]
