"""The RIA mask exactly as the authors' decoder builds it, in PyTorch.

This is the truth every region decision is held to: the reference backend and the
decomposition use it directly, and the fused kernels, which never build a mask,
must reach the same decision for every (query, key) (:mod:`.plan` says how).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def official_region_blocked(region_logits: Tensor, key_size: Sequence[int], *, with_open_rows: bool = False):
    """The RIA mask as the authors' decoder builds it, (B, Q, kh·kw) bool, True = blocked.

    ``forward_prediction_heads``: ``F.interpolate(all_mask, key_size, "bilinear",
    align_corners=False)``, ``.sigmoid() < 0.5`` (flattened, the same for every
    head); ``forward``: rows that block every key are unblocked entirely. The
    logits are taken in float32 (as the authors' fp32 inference computes them;
    fp16/bf16 logits convert exactly) and contiguous (an (B, Q, mh, mw) tensor as
    their einsum makes it), and the decision is made on the tensors' device by
    PyTorch's own kernels. No gradient flows into the logits. With
    ``with_open_rows`` also returns the (B, Q) rows that were unblocked.
    """
    kh, kw = int(key_size[0]), int(key_size[1])
    logits = region_logits.detach().to(torch.float32).contiguous()
    if logits.shape[0] == 0 or logits.shape[1] == 0:  # torch's resampler refuses empty inputs
        blocked = torch.zeros(logits.shape[0], logits.shape[1], kh * kw, dtype=torch.bool, device=logits.device)
        return (blocked, blocked[..., 0]) if with_open_rows else blocked
    resampled = F.interpolate(logits, size=(kh, kw), mode="bilinear", align_corners=False)
    blocked = resampled.sigmoid().flatten(2) < 0.5
    # attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
    open_rows = blocked.all(dim=-1)
    blocked = blocked & ~open_rows[..., None]
    return (blocked, open_rows) if with_open_rows else blocked


__all__ = ["official_region_blocked"]
