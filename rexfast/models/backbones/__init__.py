"""Backbones shared by the models: the LAVT multimodal Swin with PWAM (CGFormer, ReLA)."""

from .swin import MultiModalSwinTransformer, SwinConfig, swin_config

__all__ = ["MultiModalSwinTransformer", "SwinConfig", "swin_config"]
