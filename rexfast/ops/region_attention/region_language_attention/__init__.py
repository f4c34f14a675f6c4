"""``region_language_attention`` (RLA): ReLA's region-word attention, optional key padding mask.

``op.py`` (checks, registration, autograd, backends), ``reference.py`` (PyTorch
truth), ``decomposition.py`` (for exporters); the family's shared pieces (core,
checks, Triton kernels) are one level up in :mod:`rexfast.ops.region_attention`.
The C++ and CUDA kernels are ``csrc/cpu/region_language_attention.cpp`` (on the
shared core in ``csrc/cpu/region_attention/``),
``csrc/cuda/region_language_attention.cu`` and ``kernels/region_attention.cu(h)``.
"""

from .op import BACKENDS, region_language_attention
from .reference import region_language_attention_reference

__all__ = ["region_language_attention", "region_language_attention_reference", "BACKENDS"]
