"""Loss terms shared by more than one model."""

from __future__ import annotations

from torch import Tensor


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """1 − (2|P∩T| + 1)/(|P| + |T| + 1) with P = sigmoid(logits), mean over the batch."""
    probs = logits.float().sigmoid().flatten(1)
    targets = targets.float().flatten(1)
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).mean()


__all__ = ["dice_loss"]
