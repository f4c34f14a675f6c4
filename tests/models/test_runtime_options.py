"""How a model runs (its runtime options: op backends, fused formulations, memory layout) is
apart from what it is (its config): set at build or load time, never written into config.json,
and read once, as options, from the configs written before they left them."""

from __future__ import annotations

import json

import pytest
import torch

from rexfast import CGFormer, CGFormerConfig, ReLA, ReLAConfig
from rexfast.models.cgformer import CGFormerRuntime
from rexfast.models.loading import load_model_source
from rexfast.models.rela import ReLARuntime

LEGACY = {CGFormer: {"ops_backend": "reference", "fused": False, "channels_last": True},
          ReLA: {"ops_backend": "reference", "region_masks_at_key_resolution": False}}


def _tiny(cls):
    torch.manual_seed(0)
    return cls((CGFormerConfig if cls is CGFormer else ReLAConfig).tiny()).eval()


def test_runtime_options_are_keyword_arguments_and_not_config_fields():
    model = CGFormer(CGFormerConfig.tiny(), ops_backend="reference", fused=False, num_tokens=3)
    assert model.runtime == CGFormerRuntime(ops_backend="reference", fused=False)
    assert model.config.num_tokens == 3 and "fused" not in model.config.to_dict()
    rela = ReLA(ReLAConfig.tiny(), region_masks_at_key_resolution=False)
    assert rela.runtime == ReLARuntime(region_masks_at_key_resolution=False)
    assert not rela.sem_seg_head.predictor.region_masks_at_key_resolution
    with pytest.raises(TypeError, match="ops_backend"):
        CGFormerConfig.tiny(ops_backend="reference")  # no longer a config field


def test_an_unknown_ops_backend_is_refused_when_the_model_is_built_or_loaded(tmp_path):
    """Not at the first forward pass: the options check their backend name."""
    with pytest.raises(ValueError, match="ops_backend must be one of reference, cpu, cuda, triton or None"):
        CGFormer(CGFormerConfig.tiny(), ops_backend="bogus")
    folder = _tiny(ReLA).save_pretrained(tmp_path / "folder")
    with pytest.raises(ValueError, match="got 'Reference'"):
        load_model_source(folder, model_overrides={"ops_backend": "Reference"}, require_tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ops_backend": "gpu"}))  # an old folder's key
    with pytest.raises(ValueError, match="got 'gpu'"):
        ReLA.from_pretrained(folder)


@pytest.mark.parametrize("cls", [CGFormer, ReLA])
def test_folders_and_checkpoints_written_with_the_old_config_keys_load_them_as_options(cls, tmp_path, recwarn):
    """A config.json and a training checkpoint's run config written before the options left the
    config hold them as fields: both load, the keys become the options, nothing is warned."""
    model = _tiny(cls)
    folder = model.save_pretrained(tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    assert not set(LEGACY[cls]) & set(config)  # what the model is, not how it ran
    (folder / "config.json").write_text(json.dumps({**config, **LEGACY[cls]}))  # as older rexfast wrote it
    assert cls.from_pretrained(folder).runtime == cls.runtime_class(**LEGACY[cls])
    assert load_model_source(folder, require_tokenizer=False).model.runtime == cls.runtime_class(**LEGACY[cls])

    run = {"model": {"name": cls.model_type, "preset": "tiny", **config, **LEGACY[cls]}, "data": {"image_size": 64}}
    run["model"].pop("model_type"), run["model"].pop("rexfast_version")
    path = tmp_path / "last.pt"
    torch.save({"format": "rexfast-checkpoint-v1", "config": run, "vocab": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c", "d"],
                "model": model.state_dict()}, path)
    loaded = load_model_source(path)
    assert loaded.model.runtime == cls.runtime_class(**LEGACY[cls])
    # --set model.ops_backend=... (values as text) still sets them, over what the file held
    again = load_model_source(path, model_overrides={"ops_backend": "cpu"})
    assert again.model.runtime.ops_backend == "cpu"
    images = torch.randn(1, 3, 64, 64)
    ids, mask = torch.randint(0, 8, (1, 6)), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        want, got = model(images, ids, mask), loaded.model(images, ids, mask)
    for a, b in zip(*(w.values() if isinstance(w, dict) else [w] for w in (want, got))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # the same model, run another way
    assert not [w for w in recwarn.list if "rexfast" in str(w.filename)]


def test_run_config_model_section_takes_options_and_writes_them_back():
    from rexfast.engine.config import Config, load_config

    cfg = load_config(None, ["model.name=cgformer", "model.preset=tiny", "model.fused=false",
                             "model.ops_backend=reference", "data.image_size=64"])
    assert cfg.model.runtime == {"fused": False, "ops_backend": "reference"}
    assert "fused" not in cfg.model.config.to_dict()
    assert Config.from_dict(cfg.to_dict()).model.runtime == cfg.model.runtime
    with pytest.raises(ValueError, match="config model.fused: expected true or false"):
        load_config(None, ["model.preset=tiny", "model.fused=3"])


def test_optimize_runs_the_fused_options_on_its_copy_only():
    import rexfast

    model = CGFormer(CGFormerConfig.tiny(), ops_backend="reference", fused=False).eval()
    opt = rexfast.optimize(model, precision="fp32")
    assert opt.runtime == CGFormerRuntime(ops_backend=None, fused=True, channels_last=True)
    assert model.runtime == CGFormerRuntime(ops_backend="reference", fused=False)
    rela = ReLA(ReLAConfig.tiny(), ops_backend="reference", region_masks_at_key_resolution=False).eval()
    opt = rexfast.optimize(rela, precision="fp32", channels_last=False)
    assert opt.runtime == ReLARuntime()
    assert all(m.backend is None for m in opt.modules() if hasattr(m, "backend"))
    assert all(m.backend == "reference" for m in rela.modules() if hasattr(m, "backend"))


def test_optimize_keeps_the_runtime_options_given_to_it():
    """``runtime=`` (what a user set explicitly, e.g. ``--set model.ops_backend=reference``) is
    kept on the copy; optimize's fused choice applies to the other options only."""
    import rexfast

    model = CGFormer(CGFormerConfig.tiny(), ops_backend="reference", fused=False).eval()
    opt = rexfast.optimize(model, precision="fp32", runtime={"ops_backend": "reference"})
    assert opt.runtime == CGFormerRuntime(ops_backend="reference", fused=True, channels_last=True)
    assert opt.optimization.runtime == {"ops_backend": "reference"}
    assert "kept ops_backend=reference" in opt.optimization.description
    # values as --set gives them (text), coerced; CGFormer's channels_last option decides the layout step
    opt = rexfast.optimize(model, precision="fp32", runtime={"fused": "false", "channels_last": False})
    assert opt.runtime == CGFormerRuntime(ops_backend=None, fused=False, channels_last=False)
    assert not opt.optimization.channels_last and opt.input_memory_format is None
    assert all(p.is_contiguous() for p in opt.parameters())
    rela = ReLA(ReLAConfig.tiny()).eval()
    opt = rexfast.optimize(rela, precision="fp32", runtime={"region_masks_at_key_resolution": False,
                                                            "ops_backend": "reference"})
    assert opt.runtime == ReLARuntime(ops_backend="reference", region_masks_at_key_resolution=False)
    assert all(m.backend == "reference" for m in opt.modules() if hasattr(m, "backend"))
    assert not opt.sem_seg_head.predictor.region_masks_at_key_resolution
    images = torch.randn(1, 3, 64, 64)
    ids, mask = torch.randint(0, 8, (1, 6)), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():  # the same model, run another way
        assert torch.allclose(opt.predict(images, ids, mask).mask, rela.predict(images, ids, mask).mask, atol=1e-5)
    for runtime, error, message in (({"fused": True}, ValueError, "ReLA has no runtime option 'fused'"),
                                    ({"ops_backend": "gpu"}, ValueError, "ops_backend must be one of"),
                                    ({"region_masks_at_key_resolution": "maybe"}, ValueError,
                                     "region_masks_at_key_resolution: expected bool"),
                                    (["ops_backend"], TypeError, "runtime must be a mapping")):
        with pytest.raises(error, match=message):
            rexfast.optimize(rela, precision="fp32", runtime=runtime)
