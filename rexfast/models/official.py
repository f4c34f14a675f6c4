"""Reading the authors' released checkpoint files (shared by the models' loaders).

Released files are ``torch.save`` pickles: CGFormer's ``{"model_state_dict": ...}``
(DDP copies carry ``module.`` prefixes), ReLA's detectron2 ``{"model": ...}``.
They are read with ``weights_only=True``, which refuses anything that is not a
tensor or a plain value before it can run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Union

from torch import Tensor

from ..io import safe_torch_load


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


__all__ = ["ADVICE", "given", "merge_partial", "read_checkpoint"]
