"""The C++/CUDA backends of ``region_image_attention`` (``rexfast._C``): the decision
plan for the tensors' device, then the fused kernels (``csrc/cpu/region_image_attention.cpp``,
``csrc/cuda/region_image_attention.cu``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..region_attention import RESAMPLE_MAP, decision_plan


def plan_args(q, region_logits, kh, kw):
    """(logits fp32 contiguous, mode, fma, q_vec, threshold, resampled-or-None) for the kernels."""
    logits = region_logits.detach().to(torch.float32).contiguous()
    plan = decision_plan(q.device, q.shape[2], tuple(logits.shape[2:]), (kh, kw))
    resampled = None
    if plan.mode == RESAMPLE_MAP:  # a resampler the kernel does not reproduce: take torch's values
        resampled = F.interpolate(logits, size=(kh, kw), mode="bilinear", align_corners=False).flatten(2).contiguous()
    return logits, plan.mode, plan.fma, plan.q_vec, plan.threshold, resampled


def forward(q, k, v, region_logits, kh, kw, scale):
    logits, mode, fma, q_vec, threshold, resampled = plan_args(q, region_logits, kh, kw)
    return torch.ops.rexfast_C.region_image_attention_fwd(q, k, v, logits, kh, kw, scale, mode, fma, q_vec, threshold,
                                                         resampled)


def backward(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows):
    logits, mode, fma, q_vec, threshold, resampled = plan_args(q, region_logits, kh, kw)
    return torch.ops.rexfast_C.region_image_attention_bwd(dout, q, k, v, logits, kh, kw, scale, mode, fma, q_vec,
                                                         threshold, resampled, out, lse, open_rows.contiguous())
