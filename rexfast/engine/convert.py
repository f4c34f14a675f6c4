"""``rexfast convert``: the authors' released weights → a model folder, once.

The released files are pickles; they are read with ``torch.load(weights_only=True)``
(which refuses anything but tensors and plain values) and written as
``config.json`` + ``model.safetensors``, so they never have to be unpickled again.
What the weights cannot tell (head counts of an unreleased width) comes from
``--set model.FIELD=VALUE`` overrides, nested fields included
(``--set model.swin.pwam_heads=[4,4,4,4]``).
"""

from __future__ import annotations

from pathlib import Path

from ..io import check_output_dir


def model_overrides(overrides) -> dict:
    """``model.FIELD=VALUE`` strings (values parsed as YAML) as a dict of config fields for
    ``from_official``; ValueError for another section, or for ``name``/``preset`` (``--model``
    picks the model; the architecture comes from the weights)."""
    from .config import apply_overrides

    raw = apply_overrides({}, list(overrides or ()))
    other = sorted(set(raw) - {"model"})
    if other:
        raise ValueError(f"--set {other[0]}.…: convert takes model.FIELD=VALUE overrides only (the model folder "
                         "holds no data or train settings)")
    fields = raw.get("model") or {}
    if not isinstance(fields, dict):
        raise ValueError(f"--set model=… must name a field, e.g. model.swin.pwam_heads=[8,8,8,8]; got {fields!r}")
    fixed = sorted({"name", "preset"} & set(fields))
    if fixed:
        raise ValueError(f"--set model.{fixed[0]}: the model is picked with --model, and its architecture is read "
                         "from the weights")
    return fields


def convert_official(path, out, *, model: str = "auto", overrides=()) -> str:
    from rexfast.models import registry
    from rexfast.models.cgformer.checkpoint import read_checkpoint

    out = check_output_dir(out, "--out")
    fields = model_overrides(overrides)
    state = read_checkpoint(path)  # weights_only=True; unwraps model_state_dict/model and module. prefixes
    name = registry.recognise_official(state) if model == "auto" else registry.get(model).name
    try:
        loaded = registry.get(name).model_class.from_official(state, **fields)
    except TypeError as exc:  # a field of the wrong type, or one the config class does not have
        raise ValueError(f"--set: {exc}") from None
    loaded.save_pretrained(out)
    return str(Path(out))


__all__ = ["convert_official", "model_overrides"]
