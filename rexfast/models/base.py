"""What every rexfast model offers the engine (and users), in one place.

The engine (trainer, evaluator, predictor, demo) knows a model only through
this protocol and the registry (:mod:`rexfast.models.registry`):

``forward(images, input_ids, attention_mask, targets=None)``
    images (B, 3, H, W) normalised as the data pipeline does; input_ids /
    attention_mask (B, L) int. Without targets: the model's outputs; with
    targets (B, H, W) binary masks: ``(outputs, losses)``, ``losses`` a dict of
    scalar tensors whose sum is the training loss.
``predict(images, input_ids, attention_mask, *, sample_seeds=None)`` → :class:`Prediction`
    the mask probability (B, H, W) at the input size and the no-target
    probability (B,) — ``None`` for a model without a no-target head (then an
    empty mask means "no target"; with a head, where ``empty_mask_says_no_target`` says so). A model that draws noise at inference draws
    sample b's from ``sample_seeds[b]`` when given, so that a sample's answer does not
    depend on its batch (:class:`rexfast.Segmenter` passes them); others ignore them.
``explain(images, input_ids, attention_mask, *, sample_seeds=None)`` → (Prediction, internals)
    ``predict``'s answer and, from the same forward pass, what the model grouped to reach it
    (:mod:`rexfast.models.explain`: CGFormer's token assignments per stage, ReLA's region
    masks and minimap). Only this call computes them; ``predict`` keeps nothing.
``inference_outputs(images, input_ids, attention_mask)`` → dict of tensors
    what an inference engine returns, by name (the outputs of an exported
    graph, :mod:`rexfast.export`): the logits the model's ``predict`` is made from.
``param_groups(train_cfg)``
    optimizer parameter groups carrying the model's released per-group learning
    rates and weight decays, from ``train_cfg.lr`` and ``train_cfg.weight_decay``.
``from_official(path)``
    the authors' released checkpoint, architecture inferred from the weights.
``config``
    the model's config dataclass (``Config.preset(name)``, ``to_dict``/``from_dict``).
``runtime``, ``set_runtime(options)``
    how the model runs (:class:`RuntimeOptions`: op backends, fused formulations, memory
    layout), apart from what it is (``config``); chosen when it is built or loaded.
``fold_batchnorm()``, ``use_fused_ops()``, ``use_channels_last()``
    what :func:`rexfast.optimize` does to its copy: BatchNorm folded into the
    preceding convolutions; every op on its fused backend; NHWC convolutions.
``fp32_modules()``
    names of submodules that must compute in float32 even when the rest of the
    model runs in bf16 (:func:`rexfast.optimize`); their forward casts its inputs
    up itself. ``prepare_images`` (called first thing in ``forward_features``)
    casts the images to ``input_dtype`` / ``input_memory_format`` when those are set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn


class ConfigBase:
    """Shared by the models' config dataclasses: named presets, and a plain-dict
    form (JSON/YAML-ready, what checkpoints and ``config.json`` hold).

    Subclasses list their preset constructors (classmethods taking overrides)
    in ``PRESETS``; ``Config.preset(name, **overrides)`` builds one."""

    PRESETS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; expected one of {list(cls.PRESETS)}")
        return getattr(cls, name)(**overrides)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: Mapping):
        if not isinstance(raw, Mapping):
            raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(raw).__name__}")
        unknown = set(raw) - set(cls.field_names())
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid: {sorted(cls.field_names())}")
        return cls(**dict(raw))

    @classmethod
    def coerce_overrides(cls, overrides: Mapping, where: str = "model") -> dict:
        """``overrides`` checked against the fields (an unknown one is a ValueError listing the
        valid ones) and coerced to their types (:func:`coerce_value`: values parsed from text,
        e.g. ``--set model.eval_noise=false``)."""
        if not isinstance(overrides, Mapping):
            raise TypeError(f"{where} overrides must be a mapping of field names to values, got "
                            f"{type(overrides).__name__}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(types)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)} in {where}; valid: {sorted(types)}")
        return {k: coerce_value(v, types[k], f"{where}.{k}") for k, v in overrides.items()}

    def with_overrides(self, overrides: Mapping, where: str = "model"):
        """A copy with some fields replaced (see :meth:`coerce_overrides`)."""
        if not overrides:
            return self
        values = self.coerce_overrides(overrides, where)
        try:
            return dataclasses.replace(self, **values)
        except TypeError as exc:  # a value of the wrong type in a nested field
            raise ValueError(f"{where}: {exc}") from None


def coerce_value(value: Any, annotation: str, where: str) -> Any:
    """Match a parsed value to its field's type annotation (YAML 1.1 reads '3e-4' as a
    string): ValueError naming ``where`` when it cannot be."""
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
    if base in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"config {where}: expected {base}, got {value!r}")
    if base == "int" and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"config {where}: expected an integer, got {value!r}")
        return int(value)
    if base == "bool" and not isinstance(value, bool):
        raise ValueError(f"config {where}: expected true or false, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise ValueError(f"config {where}: expected a string, got {value!r}")
    return value


_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


def check_field_types(config) -> None:
    """TypeError naming the field where a config dataclass holds a value of the wrong kind in
    a scalar field (``bool``, ``int``, ``float``, ``str``, or ``Optional`` of one): a field
    ``no_target_if_empty=\"yes\"`` would otherwise be read as true wherever it is tested. ints
    pass as floats; a bool is never an int or a float. Other fields are the config's to check."""
    for f in dataclasses.fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        optional = annotation.startswith("Optional[") and annotation.endswith("]")
        kind = _SCALARS.get(annotation[len("Optional["):-1] if optional else annotation)
        value = getattr(config, f.name)
        if kind is None or (optional and value is None):
            continue
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            expected = kind.__name__ + (" or None" if optional else "")
            raise TypeError(f"{type(config).__name__}.{f.name} must be {expected}, got {value!r}")


def _plain(value: Any) -> Any:
    """Tuples → lists, recursively: the config as JSON/YAML writes it back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How a model runs, as opposed to what it is (its config): chosen when the model is built
    or loaded — keyword arguments of the model class, of ``from_official`` and of the loader's
    ``model_overrides`` (``--set model.OPTION=VALUE``) — and by :func:`rexfast.optimize`, the way
    transformers picks ``attn_implementation`` at load time. Never written into ``config.json``.
    Every option changes speed or memory layout only: outputs agree up to rounding. Each model
    extends this class with its own options (:attr:`ReferringModel.runtime_class`).

    Configs written before the options left them (``config.json`` of older model folders, the
    run config of older training checkpoints, YAML run configs) hold them as config fields: the
    loaders read those keys once, as options (:meth:`split`)."""

    ops_backend: Optional[str] = None  # pin every op's backend (reference | cpu | cuda | triton); None: chosen per call

    def __post_init__(self):
        from ..ops.registry import BACKENDS

        check_field_types(self)
        if self.ops_backend is not None and self.ops_backend not in BACKENDS:  # refused now, not at the first call
            raise ValueError(f"ops_backend must be one of {', '.join(BACKENDS)} or None (chosen per call), "
                             f"got {self.ops_backend!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def split(cls, values: Mapping) -> tuple[dict, dict]:
        """(the options among ``values``, everything else): how a mapping that may mix options
        with config fields (a config written before the options left the configs, ``--set``
        overrides, keyword arguments) is read."""
        names = set(cls.field_names())
        return ({k: v for k, v in values.items() if k in names}, {k: v for k, v in values.items() if k not in names})

    @classmethod
    def coerce(cls, values: Mapping, where: str = "model") -> dict:
        """``values`` coerced to the options' types (values parsed from text, e.g.
        ``--set model.fused=false``): :func:`coerce_value`."""
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        return {k: coerce_value(v, types[k], f"{where}.{k}") for k, v in values.items()}

    def changed(self) -> dict:
        """The options that differ from their defaults (what a run config records)."""
        default = type(self)()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def fused_ops(self) -> "RuntimeOptions":
        """These options with every op on its automatically chosen (fused) backend and the
        model's exact fused formulations (what :func:`rexfast.optimize` runs)."""
        return dataclasses.replace(self, ops_backend=None)


class Prediction(NamedTuple):
    mask: Tensor  # (B, H, W) probability that a pixel belongs to the referred object(s)
    no_target: Optional[Tensor]  # (B,) probability that nothing is referred; None without a no-target head


class ReferringModel(nn.Module):
    """Base class of the registered models: shared input checks and the model-folder format."""

    model_type: ClassVar[str]  # the registry name, written into model folders
    config_class: ClassVar[type]
    runtime_class: ClassVar[type] = RuntimeOptions  # how it runs (its RuntimeOptions subclass)
    runtime: RuntimeOptions
    input_multiple: ClassVar[int] = 32  # image height and width must be multiples of this
    # Set on an optimized copy (rexfast.optimize): the dtype / memory format its
    # weights expect, so that callers keep passing float32 NCHW images.
    input_dtype: Optional[torch.dtype] = None
    input_memory_format: Optional[torch.memory_format] = None

    @property
    def empty_mask_says_no_target(self) -> bool:
        """Whether an empty thresholded mask also means "no target" for this model, beside its
        no-target head (a model without a head always answers so:
        :func:`rexfast.engine.inference.decide_no_target`). False here: the head alone decides;
        models whose config can say otherwise (``no_target_if_empty``) override it."""
        return False

    def fp32_modules(self) -> tuple[str, ...]:
        """Submodules that stay float32 under a bf16 model (see the module docstring)."""
        return ()

    def fold_batchnorm(self) -> int:
        """Fold every BatchNorm that follows a convolution into it, in place (inference
        only: the running statistics); returns the number folded (``rexfast.optimize``)."""
        from .layers import fold_batchnorm

        return fold_batchnorm(self)

    @classmethod
    def _config_and_runtime(cls, config, kwargs: Mapping):
        """The constructor's arguments read: (config, runtime options). ``kwargs`` holds runtime
        options (:attr:`runtime_class`) and config field overrides; without ``config`` the
        overrides apply to the first preset (the released architecture)."""
        options, overrides = cls.runtime_class.split(kwargs)
        if config is None:
            config = cls.config_class.preset(cls.config_class.PRESETS[0], **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        return config, cls.runtime_class(**options)

    def set_runtime(self, runtime: RuntimeOptions) -> None:
        """Run with other :class:`RuntimeOptions` from now on (same weights; outputs agree up to
        rounding). Models whose submodules hold an option extend :meth:`_apply_runtime`."""
        if not isinstance(runtime, self.runtime_class):
            raise TypeError(f"runtime must be a {self.runtime_class.__name__}, got {type(runtime).__name__}")
        self.runtime = runtime
        self._apply_runtime()

    def _apply_runtime(self) -> None:
        """Hand :attr:`runtime` to the submodules that hold an option (nothing by default)."""

    def use_fused_ops(self) -> None:
        """Run every op on its automatically chosen (fused) backend and take the exact fused
        formulations, whatever the runtime options pinned (``rexfast.optimize`` calls this on its
        copy): :meth:`RuntimeOptions.fused_ops`."""
        self.set_runtime(self.runtime.fused_ops())

    def use_channels_last(self) -> None:
        """Convolution weights, and the images given, channels-last (NHWC) from now on
        (``rexfast.optimize`` calls this on its copy). Models that also keep their feature
        maps NHWC extend it."""
        self.to(memory_format=torch.channels_last)
        self.input_memory_format = torch.channels_last

    def prepare_images(self, images: Tensor) -> Tensor:
        """The images in the dtype and memory format the (optimized) weights expect."""
        if self.input_dtype is not None and images.dtype != self.input_dtype:
            images = images.to(self.input_dtype)
        if self.input_memory_format is not None:
            images = images.contiguous(memory_format=self.input_memory_format)
        return images

    def explain(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *,
                sample_seeds=None) -> tuple[Prediction, Any]:
        """``predict``'s answer and the model's internals from the same forward pass (see the
        module docstring); a model with nothing to show says so."""
        raise NotImplementedError(f"{type(self).__name__} does not explain its predictions")

    def save_pretrained(self, directory, *, tokenizer=None, preprocessing=None, card=None):
        """Write a model folder (see :func:`rexfast.models.pretrained.save_pretrained`):
        ``config.json``, ``model.safetensors``, ``preprocessor_config.json``, ``README.md``
        and, given a ``tokenizer``, ``vocab.txt`` + ``tokenizer_config.json``."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, tokenizer=tokenizer, preprocessing=preprocessing, card=card)

    @classmethod
    def from_pretrained(cls, directory):
        """The model of a :meth:`save_pretrained` folder (no code runs while reading it), in eval mode.
        (:func:`rexfast.models.loading.load_model_source` also gives its tokenizer and preprocessing.)"""
        from .loading import stored_model_config
        from .pretrained import read_pretrained_config, read_pretrained_weights

        model_type, fields = read_pretrained_config(directory)
        if model_type != cls.model_type:
            raise ValueError(f"{directory} holds a {model_type!r} model, not a {cls.model_type!r} ({cls.__name__})")
        # the loader's reading of config.json (keys of folders written before the runtime options left it: options)
        _, config, options = stored_model_config(model_type, fields)
        state = read_pretrained_weights(directory)
        model = cls(config, **options)
        load_state_strict(model, state, directory)
        return model.eval()

    @classmethod
    def from_official(cls, checkpoint, config=None, **kwargs):
        """The authors' released checkpoint (a path, read with ``weights_only=True``, or a loaded
        dict; wrappers and DDP ``module.`` prefixes handled), loaded strictly, in eval mode. The
        architecture is inferred from the weights unless ``config`` is given; keyword arguments
        override config fields or set runtime options (:attr:`runtime_class`, e.g.
        ``ops_backend="cpu"``; ReLA also takes ``honour_lang_weight``). Runs the loader the
        model's registry entry names (:mod:`rexfast.models.registry`)."""
        from .registry import get

        return get(cls.model_type).official_loader(checkpoint, config=config, **kwargs)

    def text_limits(self) -> tuple[int, int]:
        """(vocabulary size, maximum positions) of the text encoder."""
        cfg = self.text_encoder.config
        return int(cfg.vocab_size), int(cfg.max_position_embeddings)

    def check_inputs(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> None:
        """ValueError/TypeError naming the argument for every malformed input."""
        multiple = self.input_multiple
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be (B, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalised as the data pipeline does), got {images.dtype}")
        h, w = images.shape[-2:]
        if h % multiple or w % multiple or h == 0 or w == 0:
            raise ValueError(f"image height and width must be positive multiples of {multiple}, got {h}×{w}")
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"batch sizes differ: images {images.shape[0]}, input_ids {input_ids.shape[0]}")
        if images.shape[0] == 0:  # the text encoder cannot even reshape an empty batch
            raise ValueError("images is an empty batch (B = 0): give at least one image")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        vocab, positions = self.text_limits()
        if input_ids.shape[1] > positions:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; the text encoder takes at most {positions}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())  # one host sync per call, skipped under compile
            if low < 0 or high >= vocab:
                raise ValueError(f"input_ids must lie in [0, {vocab}) (the text encoder's vocabulary), "
                                 f"got values in [{low}, {high}]")


def _listing(keys: list, limit: int = 4) -> str:
    shown = ", ".join(map(str, keys[:limit]))
    return f"[{shown}{f', … and {len(keys) - limit} more' if len(keys) > limit else ''}]"


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> Optional[str]:
    """None when ``state`` has exactly the model's keys and shapes, else a one-line
    description of every missing, unexpected and misshaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted((k, tuple(state[k].shape), tuple(expected[k].shape)) for k in set(state) & set(expected)
                    if tuple(state[k].shape) != tuple(expected[k].shape))
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}; key, file, model): {_listing(shapes)}")
    return "; ".join(parts) or None


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], source) -> None:
    """``model.load_state_dict(state, strict=True)``, with a ValueError that lists every
    mismatched key (e.g. weights of another preset) instead of load_state_dict's RuntimeError."""
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ValueError(f"the weights in {source} do not fit this {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ConfigBase", "Prediction", "RuntimeOptions", "check_field_types", "coerce_value", "ReferringModel", "count_parameters", "load_state_strict",
           "state_dict_mismatch"]
