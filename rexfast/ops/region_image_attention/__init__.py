"""``region_image_attention`` (RIA): ReLA's region-masked image cross-attention.

``op.py`` (checks, registration, autograd, backends), ``reference.py`` (the
authors' official path in PyTorch), ``triton_kernels.py`` (Triton, imported on
first use); the C++ and CUDA kernels are ``csrc/cpu/region_image_attention.cpp``
(on the shared core ``csrc/cpu/region_attention.h``),
``csrc/cuda/region_image_attention.cu`` and ``kernels/region_attention.cu(h)``.
"""

from .op import BACKENDS, region_image_attention
from .reference import region_image_attention_reference

__all__ = ["region_image_attention", "region_image_attention_reference", "BACKENDS"]
