"""The C++/CUDA backends of ``region_language_attention`` (``rexfast._C``):
``csrc/cpu/region_language_attention.cpp``, ``csrc/cuda/region_language_attention.cu``."""

from __future__ import annotations

import torch


def forward(q, k, v, key_padding_mask, scale):
    return torch.ops.rexfast_C.region_language_attention_fwd(q, k, v, key_padding_mask, scale)


def backward(dout, q, k, v, key_padding_mask, scale, out, lse):
    return torch.ops.rexfast_C.region_language_attention_bwd(dout, q, k, v, key_padding_mask, scale, out, lse)
