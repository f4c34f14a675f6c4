"""What a model grouped for one prediction: the internals ``model.explain(...)`` returns.

Each model answers ``explain(images, input_ids, attention_mask, *, sample_seeds=None)`` with
the same :class:`~rexfast.models.base.Prediction` its ``predict`` gives (from the very same
forward pass) and one of the records below, batched (tensors with a leading batch axis).
``record.split()`` turns it into one record per sample with numpy arrays (what
:class:`rexfast.Segmentation.internals` holds).

Nothing here runs unless ``explain`` is called: ``predict`` keeps none of it, and no hook
is ever installed (a shared model can serve explained and plain calls from several threads).

* :class:`TokenGrouping` (CGFormer): at every decoder stage each of the N tokens claims the
  pixels where its Gumbel-softmax assignment wins, ``H = onehot(argmax_N softmax((S + G)/τ))``
  (``rexfast.ops.group_assign``); the referent token (the last one) is the one whose
  features the mask head turns into the mask. The seed paper's Figure 5 draws these maps.
* :class:`RegionMinimap` (ReLA): Q region queries each predict a region mask
  ``M_r[q] = E_q · F_m`` and a minimap score ``X[q] = (background, target)``; the target
  mask is their weighted sum ``M[a] = Σ_q X[q, a] M_r[q]``, so the target-vs-background
  logit, whose sign decides each pixel, is ``Σ_q w_q M_r[q]`` with ``w_q = X[q, 1] − X[q, 0]``,
  and the minimap (the √Q×√Q grid of ``σ(w_q)``, query q at cell (q // √Q, q % √Q)) says
  how much each region is "the target". The GRES paper's Figure 7 draws the minimap and
  the region masks it weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

Array = Union[Tensor, np.ndarray]


def _numpy(x: Array) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


@dataclass(frozen=True, eq=False)
class TokenGrouping:
    """CGFormer's hard pixel-to-token assignments at each decoder stage, coarse to fine.

    ``stages[s]``: float32 (B, N, h_s, w_s) — batched — or (N, h_s, w_s) for one sample; 1 where
    token n claimed the pixel, 0 elsewhere: every pixel is claimed by exactly one token
    (``stages[s].sum(axis=token) == 1``). ``referent``: the index of the token whose features
    make the mask (the last token, as released). ``token_names``: a label per token."""

    stages: tuple
    referent: int
    token_names: tuple

    @classmethod
    def from_assignments(cls, assignments: Sequence[Tensor], referent: int = -1) -> "TokenGrouping":
        """From ``group_assign``'s straight-through assignments (B, N, h, w) (one per stage):
        the hard one-hot ``onehot(argmax_N A)`` (the straight-through values equal it up to rounding)."""
        stages = []
        for a in assignments:
            if a.dim() != 4:
                raise ValueError(f"each stage's assignment must be (B, N, h, w), got {tuple(a.shape)}")
            winner = a.detach().float().argmax(dim=1)
            stages.append(torch.nn.functional.one_hot(winner, a.shape[1]).permute(0, 3, 1, 2).float())
        n = stages[0].shape[1]
        referent = referent % n
        names = tuple("referent" if i == referent else f"token {i}" for i in range(n))
        return cls(stages=tuple(stages), referent=referent, token_names=names)

    @property
    def num_tokens(self) -> int:
        return int(self.stages[0].shape[-3])

    def referent_map(self, stage: int = -1) -> np.ndarray:
        """bool (h, w) of one sample: the pixels the referent token claimed at ``stage``."""
        return _numpy(self.stages[stage])[..., self.referent, :, :] > 0.5

    def split(self) -> list["TokenGrouping"]:
        """One record per sample, numpy arrays."""
        batch = self.stages[0].shape[0]
        return [TokenGrouping(stages=tuple(_numpy(s[i]) for s in self.stages), referent=self.referent,
                              token_names=self.token_names) for i in range(batch)]


@dataclass(frozen=True, eq=False)
class RegionMinimap:
    """ReLA's region masks and minimap for one prediction.

    ``minimap_logits``: (B, Q, 2) — or (Q, 2) for one sample — the minimap head's
    (background, target) scores X; ``region_logits``: (B, Q, h, w) or (Q, h, w), the region
    masks' logits ``M_r`` at the mask features' resolution (1/4 of the input as released)."""

    minimap_logits: Array
    region_logits: Array

    @property
    def num_regions(self) -> int:
        return int(self.minimap_logits.shape[-2])

    @property
    def grid(self) -> int:
        """√Q: the minimap's side."""
        return math.isqrt(self.num_regions)

    @property
    def weights(self) -> np.ndarray:
        """w_q = X[q, 1] − X[q, 0]: region q's weight in the target-vs-background logit."""
        x = _numpy(self.minimap_logits)
        return x[..., 1] - x[..., 0]

    @property
    def minimap(self) -> np.ndarray:
        """The minimap, σ(w_q) in [0, 1] on the √Q×√Q grid (row-major: query q at (q // √Q, q % √Q)),
        the probability the minimap head gives each region of holding the target."""
        w = self.weights
        return (1.0 / (1.0 + np.exp(-w))).reshape(*w.shape[:-1], self.grid, self.grid)

    @property
    def region_probability(self) -> np.ndarray:
        """σ(M_r[q]) in [0, 1]: each region's own mask."""
        return 1.0 / (1.0 + np.exp(-_numpy(self.region_logits)))

    @property
    def target_logit(self) -> np.ndarray:
        """Σ_q w_q M_r[q] (h, w): the target-minus-background logit the mask is thresholded from."""
        return np.einsum("...q,...qhw->...hw", self.weights, _numpy(self.region_logits))

    def strongest(self, k: int = 6) -> np.ndarray:
        """The indices of the ``k`` regions with the largest minimap weight, strongest first (one sample)."""
        w = self.weights
        if w.ndim != 1:
            raise ValueError("strongest() is per sample: call split() first")
        return np.argsort(-w, kind="stable")[: max(0, min(int(k), w.shape[0]))]

    def weighted_regions(self, indices=None) -> np.ndarray:
        """σ(w_q) · σ(M_r[q]) for the given regions (default all) of one sample, in [0, 1]: a region
        mask weighted by how much the minimap says it is the target."""
        w = self.weights
        if w.ndim != 1:
            raise ValueError("weighted_regions() is per sample: call split() first")
        idx = np.arange(w.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
        return self.minimap.reshape(-1)[idx, None, None] * self.region_probability[idx]

    def split(self) -> list["RegionMinimap"]:
        x, r = _numpy(self.minimap_logits), _numpy(self.region_logits)
        return [RegionMinimap(minimap_logits=x[i], region_logits=r[i]) for i in range(x.shape[0])]


__all__ = ["TokenGrouping", "RegionMinimap"]
