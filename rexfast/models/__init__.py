"""Models: one folder each (config, model, losses, checkpoint loading), the shared
backbones and layers, the BERT text encoder, and the registry the engine uses."""

from .backbones import MultiModalSwinTransformer, SwinConfig, swin_config
from .base import Prediction, ReferringModel
from .cgformer import CGFormer, CGFormerConfig
from .rela import ReLA, ReLAConfig
from .registry import MODELS

__all__ = ["CGFormer", "CGFormerConfig", "MODELS", "MultiModalSwinTransformer", "Prediction", "ReferringModel", "ReLA", "ReLAConfig",
           "SwinConfig", "swin_config"]
