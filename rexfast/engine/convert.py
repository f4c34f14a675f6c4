"""``rexfast convert``: the authors' released weights → a model folder, once.

The released files are pickles; they are read with ``torch.load(weights_only=True)``
(which refuses anything but tensors and plain values) and written as
``config.json`` + ``model.safetensors``, so they never have to be unpickled again.
"""

from __future__ import annotations

from pathlib import Path

from ..io import check_output_dir


def convert_official(path, out, *, model: str = "auto") -> str:
    from rexfast.models import registry
    from rexfast.models.cgformer.checkpoint import read_checkpoint

    out = check_output_dir(out, "--out")
    state = read_checkpoint(path)  # weights_only=True; unwraps model_state_dict/model and module. prefixes
    name = registry.recognise_official(state) if model == "auto" else registry.get(model).name
    loaded = registry.get(name).model_class.from_official(state)
    loaded.save_pretrained(out)
    return str(Path(out))


__all__ = ["convert_official"]
