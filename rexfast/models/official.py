"""Reading the authors' released checkpoint files (shared by the models' loaders).

Released files are ``torch.save`` pickles: CGFormer's ``{"model_state_dict": ...}``
(DDP copies carry ``module.`` prefixes), ReLA's detectron2 ``{"model": ...}``.
They are read with ``weights_only=True``, which refuses anything that is not a
tensor or a plain value before it can run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Mapping, Union

import torch
from torch import Tensor

from ..io import safe_torch_load
from .base import state_dict_mismatch
from .text import BERT_BASE_UNCASED

# Keys a released file may hold that no rexfast model builds: the BERT buffers other
# ``transformers`` versions store, and the pooler (the released models build BERT without one).
IGNORED_KEY_PATTERNS = (
    re.compile(r"^text_encoder\.embeddings\.(position_ids|token_type_ids)$"),
    re.compile(r"^text_encoder\.pooler\."),
)


def read_checkpoint(checkpoint: Union[str, os.PathLike, Mapping]) -> dict[str, Tensor]:
    """The model state dict of a released checkpoint (file or loaded object),
    unwrapped from ``model_state_dict`` / ``state_dict`` / ``model`` and with
    every ``module.`` prefix removed. Files are read with ``weights_only=True``."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = safe_torch_load(checkpoint, "checkpoint")
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a mapping, got {type(checkpoint).__name__}")
    state = checkpoint
    for key in ("model_state_dict", "state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue  # bookkeeping entries next to the weights (e.g. detectron2's iteration counters)
        out[key] = value
    return out


# What the weights cannot tell, and how to give it: in Python (``from_official`` keywords, a
# nested field as a partial dict) and on the command line (``rexfast convert --set``).
ADVICE = {
    "pwam_heads": "give them as swin.pwam_heads, e.g. ({h}, {h}, {h}, {h}) (Python: from_official(path, "
                  "swin={{'pwam_heads': ({h}, {h}, {h}, {h})}}); rexfast convert: --set "
                  "model.swin.pwam_heads=[{h},{h},{h},{h}])",
    "bert_heads": "give bert.num_attention_heads (Python: from_official(path, bert={'num_attention_heads': 12}); "
                  "rexfast convert: --set model.bert.num_attention_heads=12)",
    "decoder_heads": "give nheads, enc_heads and enc_points (Python: from_official(path, nheads=8, enc_heads=8, "
                     "enc_points=4); rexfast convert: --set model.nheads=8 --set model.enc_heads=8 --set "
                     "model.enc_points=4)",
}


def given(overrides: Mapping, field: str, sub: str) -> bool:
    """Whether ``overrides`` sets ``field`` whole (a config object, a name) or its ``sub`` field
    (a partial dict such as ``swin={"pwam_heads": ...}``)."""
    if field not in overrides:
        return False
    value = overrides[field]
    return sub in value if isinstance(value, Mapping) else True


def merge_partial(overrides: Mapping, field: str, inferred) -> dict:
    """``overrides`` with a partial dict for ``field`` completed from the ``inferred`` value
    (a dataclass or a dict): ``swin={"pwam_heads": [1, 2, 2, 2]}`` keeps the depths, heads
    and window read from the weights. Lists become tuples (the config fields' type)."""
    overrides = dict(overrides)
    partial = overrides.get(field)
    if isinstance(partial, Mapping):
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in partial.items()}
        if dataclasses.is_dataclass(inferred):
            names = {f.name for f in dataclasses.fields(inferred)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"unknown {type(inferred).__name__} fields {unknown} in {field}; valid: "
                                 f"{sorted(names)}")
            overrides[field] = dataclasses.replace(inferred, **values)
        else:
            overrides[field] = {**inferred, **values}
    return overrides


def required(state: Mapping[str, Tensor], key: str) -> Tensor:
    """``state[key]``, or the ValueError that says the architecture cannot be read without it."""
    if key not in state:
        raise ValueError(f"cannot infer the architecture: checkpoint has no {key!r}")
    return state[key]


def count_indices(state: Mapping[str, Tensor], pattern: str) -> int:
    """How many numbered modules the keys hold: 1 + the largest index that ``pattern``'s first group
    matches (a pattern for ``backbone.layers.0.blocks.<i>.`` counts the blocks of stage 0); 0 for none."""
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


_BERT_HEADS = {768: 12, 1024: 16}  # BERT-base / BERT-large: 64-wide heads


def bert_from_state(state: Mapping[str, Tensor], overrides: Mapping) -> tuple[object, dict]:
    """(the text encoder's BERT read from the ``text_encoder.*`` shapes, ``overrides`` without
    ``bert``): ``"bert-base-uncased"`` when it is that model, else its config dict. The head count
    leaves no trace in the weights: known for BERT-base and -large, otherwise ``overrides`` must give
    ``bert`` whole or ``bert={"num_attention_heads": ...}`` (a partial dict is completed from the
    weights)."""
    hidden = required(state, "text_encoder.embeddings.word_embeddings.weight").shape[1]
    if not given(overrides, "bert", "num_attention_heads") and hidden not in _BERT_HEADS:
        raise ValueError(f"cannot infer the attention heads of a {hidden}-wide BERT from the weights (known for "
                         f"hidden sizes {sorted(_BERT_HEADS)}): {ADVICE['bert_heads']}")
    bert = dict(
        BERT_BASE_UNCASED,
        vocab_size=state["text_encoder.embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
        num_hidden_layers=count_indices(state, r"text_encoder\.encoder\.layer\.(\d+)\."),
        num_attention_heads=_BERT_HEADS.get(hidden, 1),
        intermediate_size=required(state, "text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=required(state, "text_encoder.embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=required(state, "text_encoder.embeddings.token_type_embeddings.weight").shape[0],
    )
    overrides = merge_partial(overrides, "bert", bert)
    bert = overrides.pop("bert", bert)
    return ("bert-base-uncased" if bert == BERT_BASE_UNCASED else bert), overrides


def check_keys(model: torch.nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state restricted to loadable keys (an :data:`IGNORED_KEY_PATTERNS` key is dropped
    unless ``model`` has it); raises listing every unknown, missing or misshaped key."""
    expected = model.state_dict()
    kept = {k: v for k, v in state.items()
            if not (any(p.search(k) for p in IGNORED_KEY_PATTERNS) and k not in expected)}
    problem = state_dict_mismatch(model, kept)
    if problem:
        raise ValueError(f"the checkpoint does not match the {type(model).__name__} architecture: {problem}")
    return kept


def build_for_state(model_class, state: Mapping[str, Tensor], config, overrides: Mapping,
                    infer_config: Callable[..., object]) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """(a ``model_class`` for the released ``state``, the state it loads strictly), as every
    model's ``load_official`` needs them. ``overrides`` are config fields and runtime options
    (``model_class.runtime_class``); the config is ``config`` with the fields replaced, or, when
    ``config`` is None, ``infer_config(state, **fields)`` (the architecture read from the weights)."""
    options, fields = model_class.runtime_class.split(overrides)
    if config is None:
        config = infer_config(state, **fields)
    elif fields:
        config = dataclasses.replace(config, **fields)
    model = model_class(config, **options)
    return model, check_keys(model, state)


__all__ = ["ADVICE", "IGNORED_KEY_PATTERNS", "bert_from_state", "build_for_state", "check_keys", "count_indices",
           "given", "merge_partial", "read_checkpoint", "required"]
