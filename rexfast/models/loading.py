"""One loader: any model source → the model, its tokenizer and its preprocessing.

:func:`load_model_source` is how every command and the Python API get a model
(``eval``, ``predict``, ``export``, ``convert``, :class:`rexfast.Segmenter`). A
source is one of:

=====================================  =============================================================
a model folder                         ``save_pretrained``, ``train/best/``, ``rexfast convert``:
                                       config, weights, tokenizer, preprocessing (older folders have
                                       no tokenizer: pass one)
a training checkpoint                  ``best.pt`` / ``last.pt`` (format ``rexfast-checkpoint-v1``):
                                       weights, run config, vocabulary
the authors' released ``.pth``         recognised by its keys (:mod:`rexfast.models.registry`), loaded
                                       by the model's official loader; needs a tokenizer
a Hugging Face Hub repo id             ``owner/name`` holding a model folder, resolved through
                                       ``huggingface_hub``: from its cache when there, downloaded only
                                       when not cached and offline mode (``HF_HUB_OFFLINE``) is off
=====================================  =============================================================

Nothing read here runs code: ``.pt``/``.pth`` files are read with
``torch.load(weights_only=True)``, folders hold JSON, text and safetensors, and
tokenizers are read from local files only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..io import UnsafeFileError, safe_torch_load
from .preprocessing import Preprocessing, default_preprocessing, read_preprocessing

CHECKPOINT_FORMAT = "rexfast-checkpoint-v1"
KINDS = ("folder", "checkpoint", "official", "hub")
# owner/name as the Hub spells repository ids; a local path that does not exist is only taken for
# one when it has this form and no file suffix a checkpoint would have
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


class CheckpointError(ValueError):
    """A model source that cannot be used: not a model, unsafe, malformed, or missing a part."""


@dataclass
class LoadedModel:
    """What :func:`load_model_source` gives: a model ready for inference and how to feed it."""

    model: Any  # a rexfast model (ReferringModel), eval mode, on the requested device
    tokenizer: Any  # a transformers BertTokenizer; None only when require_tokenizer=False found none
    preprocessing: Preprocessing
    kind: str  # folder | checkpoint | official | hub
    path: Path  # the local file or folder read (for a hub id: its snapshot folder)
    source: str  # as given
    run_config: Optional[dict] = None  # a training checkpoint's run config (data, model, train), as stored
    metrics: Optional[dict] = None  # a best.pt's validation metrics
    preset: Optional[str] = None  # the config preset, where the source records it
    notes: list = field(default_factory=list)  # what the loader assumed (e.g. a folder without a preprocessor)


def looks_like_hub_id(source) -> bool:
    """``owner/name``, not an existing path, no checkpoint file suffix."""
    if not isinstance(source, str) or os.path.exists(source):
        return False
    return bool(_HUB_ID.match(source)) and not source.endswith(_FILE_SUFFIXES) and ".." not in source


def _hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def resolve_hub(repo_id: str) -> Path:
    """The local snapshot folder of a Hub model repository: from the cache (``HF_HUB_CACHE``)
    when it holds the id, else downloaded, unless offline mode is on (then a clear error)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if _hub_offline():
        raise FileNotFoundError(
            f"model not found: {repo_id} is no local file or folder, and as a Hugging Face Hub id it is not in the "
            "cache while offline mode is on (HF_HUB_OFFLINE)") from None
    try:
        return Path(snapshot_download(repo_id))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"model not found: {repo_id} is no local file or folder, and fetching it from the "
                                f"Hugging Face Hub failed: {' '.join(str(exc).split())[:300]}") from None


def read_training_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """A rexfast training checkpoint, read with ``weights_only=True``; one clear
    :class:`CheckpointError` for anything else (a hostile file is refused before any of it is used)."""
    try:
        obj = safe_torch_load(path, "checkpoint")
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    if not is_training_checkpoint(obj):
        raise CheckpointError(
            f"{path} is not a rexfast checkpoint (no '{CHECKPOINT_FORMAT}' marker); the authors' released weights "
            "load with a tokenizer (`--tokenizer`), or convert them once with `rexfast convert --official`")
    _check_training_checkpoint(obj, path)
    return obj


def is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def _check_training_checkpoint(obj: dict, path) -> None:
    for key, kind in (("config", dict), ("vocab", list), ("model", dict)):
        if not isinstance(obj.get(key), kind):
            raise CheckpointError(f"{path}: malformed rexfast checkpoint ('{key}' is missing or not a {kind.__name__})")


def _tokenizer_from(value, where: str):
    """A tokenizer given as a path (vocab.txt or folder) or already loaded."""
    from .tokenizer import load_tokenizer

    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return load_tokenizer(value)
    if hasattr(value, "encode") and hasattr(value, "get_vocab"):
        return value
    raise TypeError(f"{where} must be a path to a vocab.txt / tokenizer folder or a tokenizer, got "
                    f"{type(value).__name__}")


def _check_tokenizer_fits(model, tokenizer, source) -> None:
    if tokenizer is None:
        return
    vocab, _ = model.text_limits()
    size = len(tokenizer.get_vocab())
    if size > vocab:
        raise CheckpointError(f"the tokenizer has {size} tokens but the text encoder of {source} knows {vocab}: "
                              "it is not the vocabulary this model was trained with")


def _runtime_options(entry, fields: Mapping, overrides: Mapping) -> tuple[dict, dict, dict]:
    """(the model's runtime options, the stored config fields, the config overrides): the
    options a stored config holds (one written before they left the configs: read once, as
    options) updated by those among ``overrides``, coerced to their types and checked by the
    options' own class (a :class:`~rexfast.models.base.RuntimeOptions` built from them)."""
    runtime = entry.model_class.runtime_class
    stored, fields = runtime.split(fields)
    given, overrides = runtime.split(overrides)
    options = runtime.coerce({**stored, **given})
    runtime(**options)  # its own checks (types, a known ops_backend), before any weights are read
    return options, fields, overrides


def stored_model_config(name, fields: Mapping, overrides: Optional[Mapping] = None):
    """(registry entry, config, runtime options) of a stored model config: what every loader
    does with a model folder's ``config.json`` fields
    (:func:`rexfast.models.pretrained.read_pretrained_config`) and with a training checkpoint's
    run config. Keys of runtime options in ``fields`` (configs written before the options left
    them) become options; ``overrides`` replace config fields and set options. The options come
    back as keyword arguments of the model class, already checked; ValueError/TypeError for an
    unknown model, field or option, or a value of the wrong kind."""
    from . import registry

    entry = registry.get(name)
    options, fields, overrides = _runtime_options(entry, fields, dict(overrides or {}))
    config = entry.config_class.from_dict(fields).with_overrides(overrides)
    return entry, config, options


def load_model_source(source, *, tokenizer=None, model_overrides: Optional[Mapping] = None, device="cpu",
                      require_tokenizer: bool = True, official_model: Optional[str] = None) -> LoadedModel:
    """The model of ``source`` (see the module docstring) in eval mode on ``device``, with its
    tokenizer and preprocessing.

    ``tokenizer`` (a vocab.txt, a tokenizer folder, or a loaded tokenizer) replaces the
    source's own; a released ``.pth`` and a folder without one need it, unless
    ``require_tokenizer=False`` (export feeds token ids). ``model_overrides`` replaces model
    config fields before the weights load (e.g. ``{"eval_noise": False}``) and sets runtime
    options (e.g. ``{"ops_backend": "reference"}``, :class:`rexfast.models.base.RuntimeOptions`);
    values given as text are coerced to the field's type. ``official_model`` names the model of
    a released ``.pth`` instead of recognising it from its keys."""
    from . import registry
    from .base import load_state_strict
    from .official import read_checkpoint
    from .pretrained import read_pretrained_config, read_pretrained_weights
    from .tokenizer import load_tokenizer, tokenizer_from_vocab

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"model source must be a path or a Hugging Face Hub id, got {type(source).__name__}")
    given = str(source)
    overrides = dict(model_overrides or {})
    user_tokenizer = _tokenizer_from(tokenizer, "tokenizer")
    path = Path(source)
    kind = "folder"
    if path.is_dir():
        pass
    elif path.is_file():
        kind = "file"
    elif looks_like_hub_id(given):
        path, kind = resolve_hub(given), "hub"
    else:
        raise FileNotFoundError(f"model not found: {given} (no such file or folder; expected a model folder, a "
                                "training checkpoint such as best.pt, a released .pth, or a Hugging Face Hub id "
                                "owner/name)")

    notes: list[str] = []
    if kind in ("folder", "hub"):
        entry, config, options = stored_model_config(*read_pretrained_config(path), overrides)
        model = entry.model_class(config, **options)
        load_state_strict(model, read_pretrained_weights(path), path)
        preprocessing = read_preprocessing(path)
        if preprocessing is None:
            preprocessing = default_preprocessing(config)
            notes.append(f"{path} has no preprocessor_config.json (written by an older rexfast): running it at "
                         f"{preprocessing.image_size}², the size its config implies; set another with "
                         "--set data.image_size=N")
        own = load_tokenizer(path) if (path / "vocab.txt").is_file() else None
        tok = user_tokenizer or own
        if tok is None and require_tokenizer:
            raise CheckpointError(
                f"{path} is a model folder without a tokenizer (written before rexfast stored one in the folder): "
                "pass --tokenizer (a local vocab.txt or BERT folder; Python: tokenizer=), or re-save it with its "
                "tokenizer")
        loaded = LoadedModel(model, tok, preprocessing, kind, path, given, notes=notes)
    else:
        try:
            obj = safe_torch_load(path, "checkpoint")
        except UnsafeFileError as exc:
            raise CheckpointError(str(exc)) from None
        if is_training_checkpoint(obj):
            _check_training_checkpoint(obj, path)
            run = obj["config"]
            if not isinstance(run.get("model"), dict) or not isinstance(run["model"].get("name"), str):
                raise CheckpointError(f"{path}: malformed rexfast checkpoint (its config names no model)")
            fields = {k: v for k, v in run["model"].items() if k not in ("name", "preset")}
            try:
                entry, config, options = stored_model_config(run["model"]["name"], fields, overrides)
            except (TypeError, ValueError) as exc:
                # the file's fault only when its own config fails without the overrides too; else the
                # caller's (--set), raised as a model folder's is (an override may also mend a stored
                # value, e.g. an ops_backend this version does not know)
                try:
                    stored_model_config(run["model"]["name"], fields)
                except (TypeError, ValueError) as stored:
                    raise CheckpointError(f"{path}: malformed rexfast checkpoint ({stored})") from None
                raise exc from None
            model = entry.model_class(config, **options)
            try:
                load_state_strict(model, obj["model"], path)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            data = run.get("data") if isinstance(run.get("data"), dict) else {}
            preprocessing = Preprocessing(image_size=int(data.get("image_size", 480)),
                                          max_tokens=int(data.get("max_tokens", 20)))
            tok = user_tokenizer or tokenizer_from_vocab(obj["vocab"])
            loaded = LoadedModel(model, tok, preprocessing, "checkpoint", path, given, run_config=run,
                                 metrics=obj.get("metrics") if isinstance(obj.get("metrics"), dict) else None,
                                 preset=run["model"].get("preset"))
        else:
            state = read_checkpoint(obj)
            try:
                name = registry.get(official_model).name if official_model else registry.recognise_official(state)
            except ValueError:
                raise CheckpointError(
                    f"{path} is not a rexfast checkpoint (no '{CHECKPOINT_FORMAT}' marker), nor a released "
                    f"checkpoint of a known model ({', '.join(sorted(registry.MODELS))}): it holds "
                    f"{len(state)} tensors") from None
            if user_tokenizer is None and require_tokenizer:
                raise CheckpointError(
                    f"{path} is the authors' released {name} checkpoint, which holds no tokenizer: pass --tokenizer "
                    "(the local bert-base-uncased vocab.txt or folder; Python: tokenizer=), or convert it once with "
                    "`rexfast convert --official ... --tokenizer ...` into a self-contained model folder")
            entry = registry.get(name)
            options, _, overrides = _runtime_options(entry, {}, overrides)
            model = entry.official_loader(state, **entry.config_class.coerce_overrides(overrides), **options)
            loaded = LoadedModel(model, user_tokenizer, default_preprocessing(model.config), "official", path, given)
    _check_tokenizer_fits(loaded.model, loaded.tokenizer, given)
    loaded.model = loaded.model.to(device).eval()
    return loaded


__all__ = ["CHECKPOINT_FORMAT", "KINDS", "CheckpointError", "LoadedModel", "load_model_source", "looks_like_hub_id",
           "resolve_hub", "read_training_checkpoint", "is_training_checkpoint", "stored_model_config"]
