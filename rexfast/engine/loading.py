"""Any model source with the run configuration the engine runs it under.

:func:`rexfast.models.loading.load_model_source` turns a model folder, a training
checkpoint, a released ``.pth`` or a Hub id into a model, its tokenizer and its
preprocessing. ``eval``, ``predict``, the demo and :class:`rexfast.Segmenter` also need
the run :class:`~rexfast.engine.config.Config` (data and train sections) and the
``--set`` overrides applied to it: :func:`load_model` adds both.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from .builders import check_input_size
from .config import Config, ModelSection, apply_overrides, loaded_model_fields


@dataclasses.dataclass
class Loaded:
    """A model ready for inference with its run config, tokenizer and preprocessing."""

    model: torch.nn.Module
    config: Config  # the run Config: a training checkpoint's own; for other sources data/train defaults
    tokenizer: object
    preprocessing: object  # rexfast.models.preprocessing.Preprocessing, after --set data.image_size / max_tokens
    source: object = None  # the rexfast.models.loading.LoadedModel it came from
    # the runtime options --set gave (e.g. {"ops_backend": "reference"}), as the model holds them:
    # what the user chose explicitly, which rexfast.optimize keeps (its runtime=) instead of its own choice
    runtime_overrides: dict = dataclasses.field(default_factory=dict)


def load_model(source, *, overrides=(), tokenizer=None, device="cpu", require_tokenizer: bool = True) -> Loaded:
    """Any model source (:func:`rexfast.models.loading.load_model_source`: a model folder, a
    training checkpoint, a released ``.pth`` with a tokenizer, a Hub id) with its run config.

    ``overrides`` are ``section.key=value`` strings: ``model.*`` replace model config fields
    before the weights load or set runtime options (kept in :attr:`Loaded.runtime_overrides`,
    which the commands hand to :func:`rexfast.optimize`), ``data.*`` the data settings (``data.image_size`` and
    ``data.max_tokens`` also the preprocessing; ``data.tokenizer`` acts as ``tokenizer``).
    A training checkpoint brings its run config; other sources run at their stored
    preprocessing with the default data and train sections."""
    from rexfast.models.loading import load_model_source

    overrides = list(overrides or ())
    raw = apply_overrides({}, overrides)
    unknown = set(raw) - {"data", "model", "train"}
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)} in --set; expected data, model, train")
    model_over = loaded_model_fields(raw, example="model.eval_noise=false",
                                     fixed_reason=" cannot change a trained model's architecture; set single "
                                                  "fields (model.FIELD=VALUE)")
    data_over = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    tokenizer = tokenizer or data_over.get("tokenizer")
    loaded = load_model_source(source, tokenizer=tokenizer, model_overrides=model_over, device=device,
                               require_tokenizer=require_tokenizer)
    if "image_size" not in data_over:  # (the one note: a folder without preprocessor_config.json)
        for note in loaded.notes:
            logging.getLogger("rexfast").warning(note)
    if loaded.run_config is not None:
        cfg = Config.from_dict(apply_overrides(copy.deepcopy(loaded.run_config), overrides))
    else:  # the model section is the loaded model's (its overrides are applied above)
        spec = loaded.preprocessing
        base = {"data": {"image_size": spec.image_size, "max_tokens": spec.max_tokens}}
        cfg = Config.from_dict(apply_overrides(base, [o for o in overrides if not o.startswith("model.")]))
    entry_presets = type(loaded.model.config).PRESETS
    cfg.model = ModelSection(name=loaded.model.model_type, preset=loaded.preset or entry_presets[0],
                             config=loaded.model.config, runtime=loaded.model.runtime.changed())
    if isinstance(tokenizer, (str, Path)):
        cfg.data.tokenizer = str(tokenizer)
    check_input_size(cfg)
    if cfg.data.max_tokens < 2:
        raise ValueError(f"data.max_tokens must be >= 2 (room for [CLS] and [SEP]), got {cfg.data.max_tokens}")
    preprocessing = loaded.preprocessing.replace(image_size=cfg.data.image_size, max_tokens=cfg.data.max_tokens)
    given, _ = loaded.model.runtime_class.split(model_over)
    runtime = {name: getattr(loaded.model.runtime, name) for name in given}
    return Loaded(loaded.model, cfg, loaded.tokenizer, preprocessing, loaded, runtime)


__all__ = ["Loaded", "load_model"]
