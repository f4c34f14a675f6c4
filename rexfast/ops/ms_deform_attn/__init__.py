"""``ms_deform_attn``: multi-scale deformable attention (Deformable DETR; ReLA's pixel decoder).

``op.py`` (checks, registration, autograd, backends), ``reference.py`` (the
PyTorch truth and its NaN/border rules), ``triton_kernels.py`` (Triton, imported
on first use); the C++ and CUDA kernels are ``csrc/cpu/ms_deform_attn.cpp``,
``csrc/cuda/ms_deform_attn.cu`` and ``kernels/ms_deform_attn.cu(h)``.
"""

from .op import BACKENDS, ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "BACKENDS"]
