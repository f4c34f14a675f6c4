"""Run configuration: a YAML/JSON file plus ``section.key=value`` overrides.

Three sections. ``data`` and ``train`` are :class:`DataConfig` and
:class:`TrainConfig`; ``model`` is typed by the model's own config class (from
the model registry): ``name`` and ``preset`` pick it, every other key is a field
of that class (e.g. ``CGFormerConfig.token_dim``), validated by it, or one of the model's
runtime options (e.g. ``ops_backend``, :class:`rexfast.models.base.RuntimeOptions`)::

    model:
      name: cgformer
      preset: demo
      token_dim: 64

When the model config has an ``image_size`` field and the file does not set it,
it follows ``data.image_size`` (the input size).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..io import atomic_write_text


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # refcoco | refcoco+ | refcocog_umd | refcocog_google | refclef | grefcoco | synthetic
    root: str = "data"
    image_root: Optional[str] = None  # defaults to the layout each dataset documents
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 480
    max_tokens: int = 20
    tokenizer: Optional[str] = None  # vocab.txt or a local BERT folder; synthetic: <root>/vocab.txt
    num_workers: int = 0
    # The evaluation protocol. CGFormer's (the default): predictions resized to each image's original size,
    # GT masks resized to the input size with nearest neighbour for training. ReLA's: mask_resize=polygon
    # (GT polygons rasterised at the input size, for training and evaluation) and eval_resolution=input.
    mask_resize: str = "nearest"  # nearest | polygon
    eval_resolution: str = "original"  # original | input
    # experimental, GRES training: each no-target ref appears this many times per epoch (1: once, as released;
    # the README measures the trade: more no-target accuracy, less target accuracy)
    no_target_repeat: int = 1


@dataclass
class TrainConfig:
    epochs: int = 50
    max_steps: Optional[int] = None  # optimizer steps; stops early when reached
    time_budget_min: Optional[float] = None  # stop (evaluate, checkpoint) once this much training time is spent
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4  # base learning rate; the model's param_groups scale it per group
    weight_decay: float = 1e-2
    amsgrad: bool = False  # AdamW's AMSGrad variant (the released CGFormer recipe uses it)
    warmup_steps: int = 0
    schedule: str = "poly"  # poly | cosine | constant | step
    lr_steps: Optional[list] = None  # schedule "step": the optimizer steps at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    clip_grad: Optional[float] = None  # max L2 norm over every trained parameter (ReLA: 0.01)
    amp: str = "auto"  # auto (bf16 on GPU; on CPU `precision` decides) | bf16 | fp16 | off
    # CPU training precision (fp32 | bf16 | auto: bf16 where the CPU has native bf16): bf16 is autocast
    # over float32 master weights. fp32 by default: bf16 changes the numbers of a training run.
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # optimizer steps between checkpoints; 0: at each epoch end only
    eval_every: int = 1  # epochs
    # Under a time budget an epoch may never end: validate every this many
    # minutes of training on the first `eval_subset` validation samples (a fixed
    # subset), and pick best.pt from those points.
    eval_every_min: Optional[float] = None
    eval_subset: Optional[int] = None
    metric: str = "auto"  # the validation metric that selects best.pt; auto: gIoU for GRES, mIoU for RES
    out_dir: str = "runs/exp"
    device: str = "auto"
    deterministic: bool = False


@dataclass
class ModelSection:
    """The model to build: a registry name, a preset of its config class, and the typed config."""

    name: str
    preset: str
    config: Any  # an instance of the registered model's config class
    # the runtime options set (rexfast.models.base.RuntimeOptions: how the model runs, e.g.
    # ops_backend), kept beside the config fields in the run config's model section
    runtime: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "preset": self.preset, **self.config.to_dict(), **self.runtime}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: Optional[ModelSection] = None  # resolved in __post_init__ (CGFormer's released preset by default)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model is None:
            self.model = model_section({}, self.data)

    def to_dict(self) -> dict:
        return {"data": dataclasses.asdict(self.data), "model": self.model.to_dict(),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        if not isinstance(raw, dict):
            raise ValueError(f"config must be a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {"data", "model", "train"}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected data, model, train")
        data = _section(raw, "data", DataConfig)
        train = _section(raw, "train", TrainConfig)
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"config section 'model' must be a mapping, got {type(model).__name__}")
        return cls(data=data, model=model_section(model, data), train=train)


def _section(raw: dict, name: str, kind):
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"config section '{name}' must be a mapping, got {type(section).__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    bad = set(section) - names
    if bad:
        raise ValueError(f"unknown keys in config section '{name}': {sorted(bad)}; valid: {sorted(names)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(kind)}
    return kind(**{k: _coerce(v, types[k], f"{name}.{k}") for k, v in section.items()})


def model_section(raw: dict, data: DataConfig) -> ModelSection:
    """The typed model section from its raw mapping (``name``, ``preset``, config fields)."""
    from ..models import registry

    raw = dict(raw)
    name = raw.pop("name", "cgformer")
    entry = registry.get(name)
    cls = entry.config_class
    runtime, raw = entry.model_class.runtime_class.split(raw)
    preset = raw.pop("preset", cls.PRESETS[0])
    if preset not in cls.PRESETS:
        raise ValueError(f"config model.preset: unknown {name} preset {preset!r}; expected one of {list(cls.PRESETS)}")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    bad = set(raw) - set(fields)
    if bad:
        raise ValueError(f"unknown keys in config section 'model' for {name}: {sorted(bad)}; valid: "
                         f"{sorted(['name', 'preset', *fields, *entry.model_class.runtime_class.field_names()])}")
    values = {k: _coerce(v, fields[k], f"model.{k}") for k, v in raw.items()}
    if "image_size" in fields and "image_size" not in values:
        values["image_size"] = data.image_size
    try:
        config = cls.preset(preset, **values)
    except TypeError as exc:  # a field of the wrong type deep in a dataclass
        raise ValueError(f"config section 'model': {exc}") from None
    runtime = entry.model_class.runtime_class.coerce(runtime, "model")
    try:
        entry.model_class.runtime_class(**runtime)  # checked now, before any long work
    except TypeError as exc:
        raise ValueError(f"config section 'model': {exc}") from None
    return ModelSection(name=name, preset=preset, config=config, runtime=runtime)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Match a parsed value to its field type (one rule for the run config and the model
    config: :func:`rexfast.models.base.coerce_value`)."""
    from ..models.base import coerce_value

    return coerce_value(value, annotation, where)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = _parse_value(value)
    return raw


def loaded_model_fields(raw: dict, *, example: str, fixed_reason: str) -> dict:
    """The ``model`` section of parsed ``--set`` overrides (:func:`apply_overrides`) for a model
    that is loaded, not built: the config fields to replace. ``--set model=VALUE`` names no field,
    and ``model.name`` / ``model.preset`` cannot change what the weights are: both are ValueErrors
    (``example`` shows a field; ``fixed_reason`` follows ``--set model.name`` and says why)."""
    fields = raw.get("model") or {}
    if not isinstance(fields, dict):
        raise ValueError(f"--set model=... must name a field, e.g. {example}; got {fields!r}")
    fixed = sorted({"name", "preset"} & set(fields))
    if fixed:
        raise ValueError(f"--set model.{fixed[0]}{fixed_reason}")
    return fields


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        try:
            raw = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot parse config {path}: {exc}") from None
    return Config.from_dict(apply_overrides(raw, overrides or []))


def save_config(config: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
