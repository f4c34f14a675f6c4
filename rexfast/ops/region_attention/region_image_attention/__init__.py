"""``region_image_attention`` (RIA): ReLA's region-masked image cross-attention.

``op.py`` (checks, registration, autograd, backends), ``reference.py`` (the
authors' official path in PyTorch), ``decomposition.py`` (for exporters); the
family's shared pieces (core, official mask, decision plans, Triton kernels) are
one level up in :mod:`rexfast.ops.region_attention`. The C++ and CUDA kernels are
``csrc/cpu/region_image_attention.cpp`` (on the shared core in
``csrc/cpu/region_attention/``), ``csrc/cuda/region_image_attention.cu`` and
``kernels/region_attention.cu(h)``.
"""

from .op import BACKENDS, region_image_attention
from .reference import region_image_attention_reference

__all__ = ["region_image_attention", "region_image_attention_reference", "BACKENDS"]
