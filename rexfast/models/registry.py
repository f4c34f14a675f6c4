"""The model registry: name → (config class, model class, the loader of the authors'
released checkpoints). The engine builds, trains, evaluates and loads models only
through it and the protocol of :mod:`rexfast.models.base`; a new model is a folder
plus one entry here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .cgformer import CGFormer
from .cgformer import checkpoint as cgformer_checkpoint
from .rela import ReLA
from .rela import checkpoint as rela_checkpoint


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_class: type
    model_class: type
    official_marker: str  # a state-dict key prefix only the authors' released checkpoints of this model hold
    # (path | state dict, config=None, **config overrides) -> the model in eval mode, architecture
    # inferred from the weights: what ``Model.from_official`` and the one loader call
    official_loader: Callable


def _entry(model_class, official_marker: str, official_loader: Callable) -> ModelEntry:
    return ModelEntry(model_class.model_type, model_class.config_class, model_class, official_marker, official_loader)


MODELS: dict[str, ModelEntry] = {e.name: e for e in (
    _entry(CGFormer, official_marker="decoder.cgattention1.", official_loader=cgformer_checkpoint.load_official),
    _entry(ReLA, official_marker="sem_seg_head.predictor.", official_loader=rela_checkpoint.load_official),
)}


def get(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def recognise_official(keys) -> str:
    """The model whose released checkpoints have these state-dict keys."""
    keys = list(keys)
    found = [e.name for e in MODELS.values() if any(k.startswith(e.official_marker) for k in keys)]
    if len(found) != 1:
        raise ValueError(f"cannot tell which model these weights belong to ({len(keys)} keys, e.g. {keys[:3]}); "
                         f"pass --model ({'/'.join(sorted(MODELS))})")
    return found[0]


__all__ = ["ModelEntry", "MODELS", "get", "recognise_official"]
