"""ReLA's losses as released (``criterion.py``, last layer only, no auxiliary losses)::

    loss = mask_weight · [ CE_w(bilinear↑(M → GT size), GT)
                           + 0.1 · CE_w(Xᵀ, GT_√Q×√Q)
                           + 0.1 · CE_w(no-target logits, empty) ]        w = (0.9, 1.1), mask_weight = 5

GT is the union of the referred objects (all zero for "no target");
GT_√Q×√Q = bilinear(GT → √Q × √Q).long(): a minimap cell is 1 only where the
resampled mask is exactly 1, flattened row-major (cell q ↔ query q).

``dice_weight`` > 0 (not released; the ``demo`` preset's choice) adds
``mask_weight · dice_weight · (1 − (2 Σ p·g + 1) / (Σ p + Σ g + 1))`` per sample, averaged, with
p = softmax(M↑)[target]: trained from scratch on small objects, the class-weighted CE alone
settles on "background everywhere" for hundreds of steps (about 5% of a demo image is
foreground), as a Dice term does not.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import dice_loss


def rela_losses(mask_logits: Tensor, minimap_logits: Tensor, nt_logits: Tensor, targets: Tensor, *,
                class_weights: Sequence[float] = (0.9, 1.1), minimap_size: int = 10, minimap_weight: float = 0.1,
                nt_weight: float = 0.1, mask_weight: float = 5.0, dice_weight: float = 0.0) -> dict[str, Tensor]:
    """The loss terms as a dict whose values sum to the training loss (``mask_weight`` applied to each).

    mask_logits (B, 2, h, w), minimap_logits (B, Q, 2), nt_logits (B, 2), targets (B, H, W) binary."""
    if targets.dim() == 4 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.dim() != 3 or targets.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"targets must be (B, H, W) binary masks, got {tuple(targets.shape)}")
    gt = targets.float()[:, None]  # (B, 1, H, W)
    weight = torch.tensor(tuple(class_weights), dtype=torch.float32, device=mask_logits.device)
    masks = F.interpolate(mask_logits.float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)
    minimap_gt = F.interpolate(gt, size=(minimap_size, minimap_size), mode="bilinear", align_corners=False)
    minimap_gt = minimap_gt.flatten(1).long()  # truncation: 1 only where exactly 1
    empty = (targets.flatten(1).sum(1) == 0).long()
    losses = {
        "mask_ce": mask_weight * F.cross_entropy(masks, gt[:, 0].long(), weight=weight),
        "minimap_ce": mask_weight * minimap_weight * F.cross_entropy(
            minimap_logits.float().permute(0, 2, 1), minimap_gt, weight=weight),
        "nt_ce": mask_weight * nt_weight * F.cross_entropy(nt_logits.float(), empty, weight=weight),
    }
    if dice_weight:  # softmax(M↑)[target] = sigmoid(target − background)
        losses["mask_dice"] = mask_weight * dice_weight * dice_loss(masks[:, 1] - masks[:, 0], gt[:, 0])
    return losses


__all__ = ["rela_losses"]
