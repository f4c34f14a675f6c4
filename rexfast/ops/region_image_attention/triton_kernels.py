"""Triton backend of ``region_image_attention``: the kernels of
:mod:`rexfast.ops.region_attention_triton` with region decisions (MASK_REGION).

    forward(q, k, v, region_logits, kh, kw, scale)                         -> (out, lse, open_rows)
    backward(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows) -> (dq, dk, dv)

The forward runs the first cheap pass (``_open_rows_kernel``: rows that block every
key) and then the flash kernel; the backward takes the forward's open rows back.
"""

from __future__ import annotations

import torch

from .. import region_attention_triton as rat

OP = "region_image_attention"


def forward(q, k, v, region_logits, kh, kw, scale):
    margs = rat.region_mask_args(q, region_logits, kh, kw)
    margs.open = rat.open_rows(q, margs, kh * kw)
    out, lse = rat.forward(q, k, v, margs, scale, OP)
    return out, lse, margs.open.bool()


def backward(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows):
    margs = rat.region_mask_args(q, region_logits, kh, kw)
    margs.open = open_rows.to(torch.int8).contiguous()
    return rat.backward(dout, q, k, v, out, lse, margs, scale, OP)


def compile_configs():
    return rat.compile_configs(OP)
