"""``rexfast convert``: the authors' released weights → a self-contained model folder, once.

The released files are pickles; they are read with ``torch.load(weights_only=True)``
(which refuses anything but tensors and plain values) and written as a model folder
(``config.json``, ``model.safetensors``, ``preprocessor_config.json``, ``README.md``
and, given ``tokenizer``, ``vocab.txt`` + ``tokenizer_config.json``), so they never
have to be unpickled again. Any other model source (a training checkpoint, a folder)
converts the same way.
"""

from __future__ import annotations

from pathlib import Path

from ..io import check_output_dir


def convert_official(path, out, *, model: str = "auto", tokenizer=None, model_overrides=None) -> str:
    """Write the model folder of ``path`` to ``out`` (with ``tokenizer``: self-contained).
    ``model_overrides`` are config fields the weights cannot tell (e.g. the head counts of a
    Swin or BERT of a width the authors never released)."""
    from rexfast.models import registry
    from rexfast.models.loading import load_model_source

    out = check_output_dir(out, "--out")
    if model != "auto":
        registry.get(model)  # a ValueError naming the choices, before anything is read
    loaded = load_model_source(path, tokenizer=tokenizer, require_tokenizer=False, model_overrides=model_overrides,
                               official_model=None if model == "auto" else model)
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


__all__ = ["convert_official"]
