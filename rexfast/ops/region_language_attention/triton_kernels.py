"""Triton backend of ``region_language_attention``: the kernels of
:mod:`rexfast.ops.region_attention_triton` with a key padding mask (MASK_PADDING) or
none (MASK_NONE).

    forward(q, k, v, key_padding_mask, scale)                    -> (out, lse)
    backward(dout, q, k, v, key_padding_mask, scale, out, lse)   -> (dq, dk, dv)
"""

from __future__ import annotations

import torch

from .. import region_attention_triton as rat

OP = "region_language_attention"


def _mask_args(q, key_padding_mask):
    if key_padding_mask is None:
        return rat.MaskArgs(q.device, mask=rat.MASK_NONE)
    padded = key_padding_mask.to(torch.int8).contiguous()
    empty = key_padding_mask.all(dim=-1).to(torch.int8).contiguous()
    return rat.MaskArgs(q.device, mask=rat.MASK_PADDING, padded=padded, empty=empty)


def forward(q, k, v, key_padding_mask, scale):
    return rat.forward(q, k, v, _mask_args(q, key_padding_mask), scale, OP)


def backward(dout, q, k, v, key_padding_mask, scale, out, lse):
    return rat.backward(dout, q, k, v, out, lse, _mask_args(q, key_padding_mask), scale, OP)


def compile_configs():
    return rat.compile_configs(OP)
