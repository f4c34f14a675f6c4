"""CGFormer losses.

Released code (``model/segmenter.py``), reproduced term for term:
    loss = Σ_i λ_i · Dice(hit_map_i[:, referent], nearest(mask))   λ = (0.001, 0.01, 0.1)
         + Dice(pred, mask) + BCE(pred, mask)
where Dice applies a *sigmoid* to its input — also to the hit maps, which are
already 0/1 straight-through assignments, so the hit-map terms see sigmoid(0/1)
(a quirk kept for fidelity; the gradient still flows through the
straight-through estimator). ``sigmoid_focal_loss(alpha=-1, gamma=0)`` in the
released code is plain mean BCE-with-logits.

Paper variant: an InfoNCE contrastive loss between the sentence feature and
the referent token (see :func:`contrastive_loss`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import dice_loss


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def contrastive_loss(tokens: Tensor, sentence: Tensor, referent_index: int = -1, temperature: float = 0.07) -> Tensor:
    """InfoNCE that makes the referent token the one that matches the sentence.

    For sentence ``b`` the positive is its image's referent token; the
    negatives are the other tokens of the same image and the referent tokens of
    the other samples in the batch. Similarities are cosine, divided by
    ``temperature``. tokens (B, N, C), sentence (B, C).
    """
    b, n, _ = tokens.shape
    tokens = F.normalize(tokens.float(), dim=-1)
    sentence = F.normalize(sentence.float(), dim=-1)
    ref = referent_index % n
    own = torch.einsum("bnc,bc->bn", tokens, sentence)  # (B, N): the image's own tokens
    cross = sentence @ tokens[:, ref].t()  # (B, B): referent tokens of every sample
    eye = torch.eye(b, dtype=torch.bool, device=tokens.device)
    cross = cross.masked_fill(eye, float("-inf"))  # own referent already in `own`
    logits = torch.cat([own, cross], dim=1) / temperature
    target = torch.full((b,), ref, dtype=torch.long, device=tokens.device)
    return F.cross_entropy(logits, target)


def no_target_loss(nt_logits: Tensor, targets: Tensor, class_weights=(0.9, 1.1)) -> Tensor:
    """ReLA's no-target loss: class-weighted CE of the (target, no target) logits
    against "the target mask is empty"."""
    empty = (targets.flatten(1).sum(1) == 0).long()
    weight = torch.tensor(tuple(class_weights), dtype=torch.float32, device=nt_logits.device)
    return F.cross_entropy(nt_logits.float(), empty, weight=weight)


def cgformer_losses(
    logits: Tensor,
    hit_maps: Sequence[Tensor],
    targets: Tensor,
    *,
    referent_index: int = -1,
    hitmap_weights: Sequence[float] = (0.001, 0.01, 0.1),
    tokens: Optional[Tensor] = None,
    sentence: Optional[Tensor] = None,
    contrastive_weight: float = 0.0,
    temperature: float = 0.07,
) -> dict[str, Tensor]:
    """The loss terms as a dict whose values sum to the total training loss.

    logits (B, 1, H, W) at the input size; hit_maps: (B, N, h_i, w_i) per group
    block; targets (B, H, W) or (B, 1, H, W) binary.
    """
    if targets.dim() == 3:
        targets = targets.unsqueeze(1)
    if targets.dim() != 4 or targets.shape[1] != 1:
        raise ValueError(f"targets must be (B, H, W) or (B, 1, H, W), got {tuple(targets.shape)}")
    if targets.shape[0] != logits.shape[0] or targets.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must match the mask logits {tuple(logits.shape)} in batch and size")
    if len(hitmap_weights) != len(hit_maps):
        raise ValueError(f"{len(hit_maps)} hit maps but {len(hitmap_weights)} hit-map loss weights")
    targets = targets.float()
    hitmap = logits.new_zeros((), dtype=torch.float32)
    for hit, weight in zip(hit_maps, hitmap_weights):
        referent = hit[:, referent_index].unsqueeze(1)
        small = F.interpolate(targets, size=referent.shape[-2:], mode="nearest")
        hitmap = hitmap + weight * dice_loss(referent, small)
    losses = {"mask_dice": dice_loss(logits, targets), "mask_bce": bce_loss(logits, targets), "hitmap_dice": hitmap}
    if contrastive_weight:
        if tokens is None or sentence is None:
            raise ValueError("the contrastive loss needs the final tokens and the sentence feature")
        losses["contrastive"] = contrastive_weight * contrastive_loss(tokens, sentence, referent_index, temperature)
    return losses


__all__ = ["dice_loss", "bce_loss", "contrastive_loss", "cgformer_losses", "no_target_loss"]
