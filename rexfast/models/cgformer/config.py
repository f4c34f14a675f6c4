"""``CGFormerConfig``: everything that defines a CGFormer, with its presets; ``CGFormerRuntime``:
how one runs (not part of what it is: keyword arguments of ``CGFormer(...)``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..backbones.swin import SwinConfig, swin_config
from ..base import ConfigBase, RuntimeOptions, check_field_types

VARIANTS = ("released", "paper")


@dataclass
class CGFormerConfig(ConfigBase):
    """Presets: :meth:`released`, :meth:`paper`, :meth:`tiny`, :meth:`demo`; any field can be overridden."""

    PRESETS = ("released", "paper", "tiny", "demo")

    variant: str = "released"  # released: 2 tokens, no contrastive loss | paper: N tokens + contrastive loss
    swin: SwinConfig = field(default_factory=lambda: swin_config("base"))
    bert: Any = "bert-base-uncased"  # preset name, dict of BertConfig fields, or local folder
    bert_weights: Optional[str] = None  # local folder / state-dict file; never downloaded
    token_dim: int = 512
    num_tokens: int = 2
    image_size: int = 480  # the size the decoder's positional embeddings are built for
    decoder_dropout: float = 0.1
    hitmap_loss_weights: tuple[float, ...] = (0.001, 0.01, 0.1)
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.07
    eval_noise: bool = False  # True: Gumbel noise at eval too, like the released code
    # The released optimizer groups (model/__init__.py: lr 1e-4 for the decoder
    # and PWAM, 5e-5 for the rest of the backbone and for BERT): learning-rate
    # factors relative to train.lr, used by CGFormer.param_groups.
    lr_backbone_scale: float = 0.5
    lr_text_scale: float = 0.5
    # GRES (no released code has it): an MLP on the final referent token predicts
    # "no target" (decoder.nt_head), trained with ReLA's class-weighted CE. Off in the
    # released architecture, so the released checkpoints load unchanged.
    no_target_head: bool = False
    no_target_weight: float = 0.5  # ReLA's 0.1 x mask weight 5
    # with the head: an empty predicted mask also means "no target" (not released; the demo
    # preset: a demo checkpoint's mask is empty on many no-target sentences its head misses)
    no_target_if_empty: bool = False

    def __post_init__(self):
        check_field_types(self)
        if isinstance(self.swin, str):
            self.swin = swin_config(self.swin)
        elif isinstance(self.swin, Mapping):
            swin = dict(self.swin)
            base = swin.pop("name", None)
            self.swin = swin_config(base, **swin) if base else SwinConfig(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in swin.items()})
        if not isinstance(self.swin, SwinConfig):
            raise TypeError(f"CGFormerConfig.swin must be a preset name, a dict of SwinConfig fields or a SwinConfig, "
                            f"got {type(self.swin).__name__}")
        self.hitmap_loss_weights = tuple(self.hitmap_loss_weights)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.image_size % 32 or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if len(self.swin.depths) != 4:
            raise ValueError(f"CGFormer needs a 4-stage Swin, got depths {self.swin.depths}")
        if len(self.hitmap_loss_weights) != 3:
            raise ValueError(f"hitmap_loss_weights needs 3 values, got {self.hitmap_loss_weights}")

    # presets ---------------------------------------------------------------
    @classmethod
    def released(cls, **overrides) -> "CGFormerConfig":
        """The released checkpoint's architecture: Swin-B (window 12), BERT-base, 2 tokens, 480²."""
        return cls(**overrides)

    @classmethod
    def paper(cls, num_tokens: int = 8, **overrides) -> "CGFormerConfig":
        """The paper's description: N tokens and a contrastive loss between the
        referent token (the last) and the sentence feature."""
        overrides.setdefault("contrastive_weight", 0.1)
        return cls(variant="paper", num_tokens=num_tokens, **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "CGFormerConfig":
        """A few-thousand-parameter-per-layer model at 64² for tests (CPU, seconds)."""
        base = dict(
            swin=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                            drop_path_rate=0.1, pwam_heads=(1, 2, 2, 2)),
            bert="tiny", token_dim=32, image_size=64)
        return cls(**{**base, **overrides})

    @classmethod
    def demo(cls, **overrides) -> "CGFormerConfig":
        """A small model that trains on CPU in minutes (synthetic GRES data). No
        dropout or drop-path: a demo run sees each sample about once; one
        learning rate for every part (everything trains from scratch); the
        no-target head on. Evaluated as it trains (and as the released code
        evaluates), with Gumbel noise (``eval_noise=True``): trained from scratch
        it learns to rely on the noise, and noise-free hard assignments then score
        far lower (a 5-minute demo checkpoint: held-out gIoU 43.0 with noise, 28.9
        without). Its predictions are therefore drawn from torch's RNG (seed it),
        and it exports only with ``eval_noise=False``. An empty predicted mask also
        says "no target" (``no_target_if_empty``), as it does for the demo ReLA."""
        base = dict(
            swin=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4,
                            drop_path_rate=0.0, pwam_heads=(1, 1, 2, 2)),
            bert="small", token_dim=64, image_size=128, decoder_dropout=0.0, lr_backbone_scale=1.0,
            lr_text_scale=1.0, no_target_head=True, no_target_if_empty=True, eval_noise=True)
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class CGFormerRuntime(RuntimeOptions):
    """How a CGFormer runs (:class:`~rexfast.models.base.RuntimeOptions`):
    ``CGFormer(config, ops_backend="reference", fused=False)``. ``ops_backend`` pins group_assign's
    backend."""

    fused: bool = True  # the exact algebraic fusions (see rexfast/models/cgformer/model.py)
    channels_last: bool = False  # keep conv feature maps (and conv weights) in NHWC

    def fused_ops(self) -> "CGFormerRuntime":
        return dataclasses.replace(self, ops_backend=None, fused=True)


__all__ = ["CGFormerConfig", "CGFormerRuntime", "VARIANTS"]
