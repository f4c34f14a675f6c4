"""``ReLAConfig``: everything that defines a ReLA, with its presets; ``ReLARuntime``: how one
runs (not part of what it is: keyword arguments of ``ReLA(...)``)."""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..backbones.resnet import ResNetConfig
from ..backbones.swin import SwinConfig, swin_config
from ..base import ConfigBase, RuntimeOptions, check_field_types

BACKBONES = ("swin", "resnet")
DECISIONS = ("released", "logits")


def rela_swin(name: str, **overrides) -> SwinConfig:
    """ReLA's Swin: LAVT layout, one PWAM head per stage, drop-path 0.3; window 12
    for Swin-B (``referring_swin_base.yaml``) and 7 for Swin-T."""
    window = {"base": 12, "tiny": 7}.get(name, 12)
    return swin_config(name, **{**dict(window_size=window, pwam_heads=(1, 1, 1, 1), drop_path_rate=0.3,
                                       layout="rela"), **overrides})


@dataclass
class ReLAConfig(ConfigBase):
    """Presets: :meth:`released` (Swin-B), :meth:`swin_tiny`, :meth:`r50`, :meth:`tiny`, :meth:`demo`."""

    PRESETS = ("released", "swin_tiny", "r50", "tiny", "demo")

    backbone: str = "swin"  # swin (multimodal, PWAM after every stage) | resnet (no language fusion)
    swin: Optional[SwinConfig] = field(default_factory=lambda: rela_swin("base"))
    resnet: Optional[ResNetConfig] = None
    bert: Any = "bert-base-uncased"  # preset name, dict of BertConfig fields, or local folder
    bert_weights: Optional[str] = None  # local folder / state-dict file; never downloaded
    # pixel decoder (MSDeformAttnPixelDecoder as ReLA configures it)
    conv_dim: int = 256
    mask_dim: int = 256
    enc_layers: int = 6
    enc_heads: int = 8
    enc_points: int = 4
    enc_ffn: int = 1024
    # 4 (released): region and target masks at 1/4 of the input; 2 (experimental, not released): one more FPN
    # step to 1/2 on an image stem (rexfast/models/rela/pixel_decoder.py). The demo preset keeps 4:
    # at 2 its target masks gain (held-out mIoU +5) but its no-target head fires less (N-acc -11 to -22)
    mask_stride: int = 4
    # decoder (MultiScaleMaskedReferringDecoder)
    hidden_dim: int = 256
    num_queries: int = 100  # a square number: query q is minimap cell (q // √Q, q % √Q)
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # DEC_LAYERS 10 - 1
    rla_weight: float = 0.1
    # losses (criterion.py): mask_weight × [CE(mask) + 0.1 CE(minimap) + 0.1 CE(no-target)], class weights
    mask_weight: float = 5.0
    minimap_weight: float = 0.1
    nt_weight: float = 0.1
    dice_weight: float = 0.0  # not released: a Dice term on the target mask (see losses.py); demo preset 1.0
    class_weights: tuple[float, float] = (0.9, 1.1)
    # how predict decides target vs background (and no target vs target): "released" compares
    # sigmoid(a) > sigmoid(b) in fp32 as the authors' evaluator does, which ties (and the tie goes to
    # background) wherever both logits exceed ~17, since both sigmoids round to 1; "logits" decides
    # a - b > 0. Trained from scratch the logits reach that range (demo preset: "logits").
    decision: str = "released"
    # an empty predicted mask also means "no target", not only the no-target head (not
    # released: the authors' evaluator asks the head alone; the demo preset, whose mask is empty
    # for 1 in 10 of the no-target sentences its head misses)
    no_target_if_empty: bool = False
    # the released optimizer trains BERT's layers 0..9 only (not its embeddings nor layers 10-11);
    # None trains all of BERT
    text_trained_layers: Optional[int] = 10

    def __post_init__(self):
        check_field_types(self)
        if self.backbone not in BACKBONES:
            raise ValueError(f"ReLAConfig.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if isinstance(self.swin, str):
            self.swin = rela_swin(self.swin)
        elif isinstance(self.swin, Mapping):
            swin = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.swin).items()}
            self.swin = SwinConfig(**swin)
        if isinstance(self.resnet, Mapping):
            self.resnet = ResNetConfig(**dict(self.resnet))
        if self.backbone == "swin" and self.swin is None:
            raise ValueError("ReLAConfig: backbone 'swin' needs a swin config")
        if self.backbone == "resnet" and self.resnet is None:
            self.resnet = ResNetConfig()
        if self.backbone == "resnet":
            self.swin = None
        for name in ("conv_dim", "mask_dim", "enc_heads", "enc_points", "enc_ffn", "hidden_dim", "nheads",
                     "dim_feedforward"):
            if getattr(self, name) < 1:  # before any divisibility test below divides by one of them
                raise ValueError(f"ReLAConfig.{name} must be >= 1, got {getattr(self, name)}")
        self.class_weights = tuple(float(w) for w in self.class_weights)
        if len(self.class_weights) != 2:
            raise ValueError(f"class_weights needs 2 values, got {self.class_weights}")
        side = math.isqrt(self.num_queries)
        if self.num_queries < 1 or side * side != self.num_queries:
            raise ValueError(f"num_queries must be a positive square (the minimap is √Q × √Q), got {self.num_queries}")
        if self.conv_dim != self.hidden_dim:
            raise ValueError(f"conv_dim ({self.conv_dim}) must equal hidden_dim ({self.hidden_dim}): the decoder "
                             "reads the pixel decoder's maps without a projection, as released")
        for name in ("conv_dim",):
            if getattr(self, name) % 32:
                raise ValueError(f"{name} must be a multiple of 32 (GroupNorm(32)), got {getattr(self, name)}")
        if self.mask_stride not in (2, 4):
            raise ValueError(f"ReLAConfig.mask_stride must be 4 (released) or 2, got {self.mask_stride!r}")
        if self.hidden_dim % self.nheads or self.conv_dim % self.enc_heads:
            raise ValueError("hidden_dim / conv_dim must be divisible by nheads / enc_heads")
        if not (math.isfinite(self.dice_weight) and self.dice_weight >= 0):
            raise ValueError(f"ReLAConfig.dice_weight must be a finite number >= 0, got {self.dice_weight!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"ReLAConfig.decision must be one of {DECISIONS}, got {self.decision!r}")
        if self.dec_layers < 1 or self.enc_layers < 0:
            raise ValueError(f"dec_layers must be >= 1 and enc_layers >= 0, got {self.dec_layers}, {self.enc_layers}")

    @property
    def minimap_size(self) -> int:
        return math.isqrt(self.num_queries)

    # presets ---------------------------------------------------------------
    @classmethod
    def released(cls, **overrides) -> "ReLAConfig":
        """The released checkpoint's architecture: multimodal Swin-B (window 12), BERT-base (225,521,469 parameters)."""
        return cls(**overrides)

    @classmethod
    def swin_tiny(cls, **overrides) -> "ReLAConfig":
        """The released Swin-T checkpoint's architecture (window 7)."""
        return cls(**{**dict(swin=rela_swin("tiny")), **overrides})

    @classmethod
    def r50(cls, **overrides) -> "ReLAConfig":
        """The released ResNet-50 checkpoint's architecture (no language fusion in the backbone)."""
        return cls(**{**dict(backbone="resnet", swin=None, resnet=ResNetConfig()), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "ReLAConfig":
        """A few-thousand-parameter-per-layer model at 64² for tests (CPU, seconds)."""
        base = dict(
            swin=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                            drop_path_rate=0.1, pwam_heads=(1, 1, 1, 1), layout="rela"),
            bert="tiny", conv_dim=32, mask_dim=32, enc_layers=2, enc_heads=2, enc_points=2, enc_ffn=64,
            hidden_dim=32, num_queries=16, nheads=2, dim_feedforward=64, dec_layers=3)
        return cls(**{**base, **overrides})

    @classmethod
    def demo(cls, **overrides) -> "ReLAConfig":
        """A small model that trains on CPU in minutes (synthetic data), every part from scratch.
        It adds a Dice term to the target-mask loss (``dice_weight``, not released): without it
        the class-weighted CE alone stalls on the demo's small objects (5-minute runs: held-out
        gIoU 30 → 48). It decides by the logits' difference (``decision="logits"``): its logits grow
        past the range where the released sigmoid comparison ties. An empty predicted mask also
        says "no target" (``no_target_if_empty``): a 15-minute demo checkpoint gives an empty mask
        for 1 in 10 of the no-target sentences its head misses (held-out gIoU 61.9 → 62.8, N-acc
        44.1 → 49.2, T-acc 95.2 → 95.0)."""
        base = dict(dice_weight=1.0, decision="logits", no_target_if_empty=True,
            swin=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4,
                            drop_path_rate=0.0, pwam_heads=(1, 1, 1, 1), layout="rela"),
            bert="small", conv_dim=64, mask_dim=64, enc_layers=2, enc_heads=4, enc_points=4, enc_ffn=128,
            hidden_dim=64, num_queries=16, nheads=4, dim_feedforward=128, dec_layers=3, text_trained_layers=None)
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class ReLARuntime(RuntimeOptions):
    """How a ReLA runs (:class:`~rexfast.models.base.RuntimeOptions`):
    ``ReLA(config, ops_backend="reference", region_masks_at_key_resolution=False)``.
    ``ops_backend`` pins the backend of every op (deformable attention, region attention)."""

    region_masks_at_key_resolution: bool = True  # exact reformulation (rexfast/models/rela/decoder.py)

    def fused_ops(self) -> "ReLARuntime":
        return dataclasses.replace(self, ops_backend=None, region_masks_at_key_resolution=True)


__all__ = ["ReLAConfig", "ReLARuntime", "BACKBONES", "DECISIONS", "rela_swin"]
