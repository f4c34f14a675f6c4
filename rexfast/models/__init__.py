"""Models: the LAVT-style multimodal Swin backbone, the BERT text encoder,
CGFormer with its losses, and the official-checkpoint loaders."""

from .cgformer import CGFormer, CGFormerConfig
from .swin import MultiModalSwinTransformer, SwinConfig, swin_config

__all__ = ["CGFormer", "CGFormerConfig", "MultiModalSwinTransformer", "SwinConfig", "swin_config"]
