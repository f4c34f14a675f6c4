"""Run configuration: a YAML/JSON file plus ``section.key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


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


@dataclass
class ModelConfig:
    name: str = "cgformer"
    preset: str = "released"  # released | paper | tiny | demo
    options: dict = field(default_factory=dict)  # overrides of the preset's fields
    bert_weights: Optional[str] = None  # local folder or state-dict file; never downloaded
    ops_backend: Optional[str] = None  # pin group_assign's backend (reference | cpu | cuda | triton)


@dataclass
class TrainConfig:
    epochs: int = 50
    max_steps: Optional[int] = None  # optimizer steps; stops early when reached
    time_budget_min: Optional[float] = None  # stop (evaluate, checkpoint) once this much training time is spent
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    schedule: str = "poly"  # poly | cosine | constant
    clip_grad: Optional[float] = None
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # optimizer steps between checkpoints; 0: at each epoch end only
    eval_every: int = 1  # epochs
    metric: str = "auto"  # the validation metric that selects best.pt; auto: gIoU for GRES, mIoU for RES
    out_dir: str = "runs/exp"
    device: str = "auto"
    deterministic: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        if not isinstance(raw, dict):
            raise ValueError(f"config must be a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {"data", "model", "train"}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected data, model, train")
        parts = {}
        for name, kind in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
            section = raw.get(name) or {}
            names = {f.name for f in dataclasses.fields(kind)}
            bad = set(section) - names
            if bad:
                raise ValueError(f"unknown keys in config section '{name}': {sorted(bad)}; valid: {sorted(names)}")
            types = {f.name: str(f.type) for f in dataclasses.fields(kind)}
            parts[name] = kind(**{k: _coerce(v, types[k], f"{name}.{k}") for k, v in section.items()})
        return cls(**parts)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Match a parsed value to its field type (YAML 1.1 reads '3e-4' as a string)."""
    if value is None:
        return None
    base = annotation.replace("Optional[", "").rstrip("]")
    try:
        if base == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if base == "int" and isinstance(value, str):
            return int(value)
        if base == "bool" and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
    except ValueError:
        raise ValueError(f"config {where}: expected {base}, got {value!r}") from None
    if base in ("int", "float") and not isinstance(value, (int, float)) or base == "dict" and not isinstance(value, dict):
        raise ValueError(f"config {where}: expected {base}, got {value!r}")
    return value


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
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
