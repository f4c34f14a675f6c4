"""``rexfast convert``: the authors' released weights → a self-contained model folder, once.

The released files are pickles; they are read with ``torch.load(weights_only=True)``
(which refuses anything but tensors and plain values) and written as a model folder
(``config.json``, ``model.safetensors``, ``preprocessor_config.json``, ``README.md``
and, given ``tokenizer``, ``vocab.txt`` + ``tokenizer_config.json``), so they never
have to be unpickled again. Any other model source (a training checkpoint, a folder)
converts the same way.
What the weights cannot tell (head counts of an unreleased width) comes from
``--set model.FIELD=VALUE`` overrides, nested fields included
(``--set model.swin.pwam_heads=[4,4,4,4]``). Runtime options (``ops_backend``, ``fused``, …:
how a model runs, :class:`rexfast.models.base.RuntimeOptions`) are refused: a model folder
never holds them, so one given here would be dropped without a word.
"""

from __future__ import annotations

from pathlib import Path

from ..io import check_output_dir


def parse_model_overrides(overrides) -> dict:
    """``model.FIELD=VALUE`` strings (values parsed as YAML) as a dict of config fields for
    ``from_official``; ValueError for another section, or for ``name``/``preset`` (``--model``
    picks the model; the architecture comes from the weights)."""
    from .config import apply_overrides, loaded_model_fields

    raw = apply_overrides({}, list(overrides or ()))
    other = sorted(set(raw) - {"model"})
    if other:
        raise ValueError(f"--set {other[0]}.…: convert takes model.FIELD=VALUE overrides only (the model folder "
                         "holds no data or train settings)")
    return loaded_model_fields(raw, example="model.swin.pwam_heads=[8,8,8,8]",
                               fixed_reason=": the model is picked with --model, and its architecture is read "
                                            "from the weights")


def _refuse_runtime_options(fields) -> None:
    """ValueError for a runtime option of any registered model among ``fields``: it is chosen
    when a model is loaded, and a model folder does not hold it (``config.json`` is what the
    model is), so convert would drop it."""
    from rexfast.models import registry

    names = {name for entry in registry.MODELS.values() for name in entry.model_class.runtime_class.field_names()}
    given = sorted(names & set(fields))
    if given:
        name = given[0]
        raise ValueError(f"--set model.{name}: {name} is a runtime option (how a model runs), not part of a saved "
                         f"model, so convert cannot store it: give it when the folder is loaded "
                         f"(--set model.{name}=... with predict or eval)")


def convert_official(path, out, *, model: str = "auto", tokenizer=None, overrides=(), model_overrides=None) -> str:
    """Write the model folder of ``path`` to ``out`` (with ``tokenizer``: self-contained).
    ``model_overrides`` (a dict) and ``overrides`` (``model.FIELD=VALUE`` strings, as ``--set`` gives them)
    are config fields the weights cannot tell (e.g. the head counts of a Swin or BERT of a width
    the authors never released)."""
    from rexfast.models import registry
    from rexfast.models.loading import load_model_source

    out = check_output_dir(out, "--out")
    if model != "auto":
        registry.get(model)  # a ValueError naming the choices, before anything is read
    fields = {**(model_overrides or {}), **parse_model_overrides(overrides)}
    _refuse_runtime_options(fields)
    try:
        loaded = load_model_source(path, tokenizer=tokenizer, require_tokenizer=False, model_overrides=fields or None,
                                   official_model=None if model == "auto" else model)
    except TypeError as exc:  # a field of the wrong type, or one the config class does not have
        raise ValueError(f"--set: {exc}") from None
    if model != "auto" and loaded.model.model_type != model:
        raise ValueError(f"--model {model}: {path} holds a {loaded.model.model_type} model")
    card = {"source": f"{loaded.kind} {Path(path).name}", "preset": loaded.preset}
    if loaded.run_config is not None:
        data = loaded.run_config.get("data", {})
        card["trained_on"] = f"{data.get('dataset')}, split {data.get('train_split')}"
        if loaded.metrics:
            card["metrics"] = loaded.metrics
            card["metrics_on"] = f"{data.get('dataset')} {data.get('val_split')} (validation during training)"
    loaded.model.save_pretrained(out, tokenizer=loaded.tokenizer, preprocessing=loaded.preprocessing, card=card)
    return str(Path(out))


__all__ = ["convert_official", "parse_model_overrides"]
