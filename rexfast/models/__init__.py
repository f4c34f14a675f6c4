"""Models: one folder each (config, model, losses, checkpoint loading), the shared
backbones and layers, the BERT text encoder and its tokenizer, the registry the engine
uses, and the one loader (:func:`load_model_source`: any model source → model,
tokenizer, preprocessing)."""

from .backbones import MultiModalSwinTransformer, SwinConfig, swin_config
from .base import Prediction, ReferringModel, RuntimeOptions
from .cgformer import CGFormer, CGFormerConfig, CGFormerRuntime
from .loading import load_model_source
from .preprocessing import Preprocessing
from .rela import ReLA, ReLAConfig, ReLARuntime
from .registry import MODELS

__all__ = ["CGFormer", "CGFormerConfig", "CGFormerRuntime", "MODELS", "Preprocessing", "load_model_source", "MultiModalSwinTransformer", "Prediction", "ReferringModel", "ReLA", "ReLAConfig", "ReLARuntime", "RuntimeOptions",
           "SwinConfig", "swin_config"]
