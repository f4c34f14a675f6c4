"""ReLA: forward/backward on tiny configs, gradient coverage, released parameter and
key counts, the released key sets (fixtures read from the authors' code),
checkpoint round trips, lang_weight loading, determinism, bad input.

The comparison with the authors' own code on their architectures (outputs to
rel. err. ~1e-5) is run outside the repository (the authors' code is not part of
rexfast); see the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rexfast import ReLA, ReLAConfig
from rexfast.models.rela.checkpoint import LANG_WEIGHT, check_keys, config_from_state_dict, to_official_state_dict
from rexfast.models.official import read_checkpoint

SIZE = 64
FIXTURES = Path(__file__).parent / "fixtures"


def make_batch(b=2, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(1000, 30000, (b, 20), generator=g)
    mask = torch.ones(b, 20, dtype=torch.long)
    mask[0, 7:] = 0
    targets = (torch.rand(b, size, size, generator=g) > 0.6).float()
    targets[-1] = 0  # a no-target sample
    return images, ids, mask, targets


def tiny(seed=0, **kwargs):
    """The tiny preset; ``kwargs``: config fields and runtime options."""
    torch.manual_seed(seed)
    options, overrides = ReLA.runtime_class.split(kwargs)
    return ReLA(ReLAConfig.tiny(**overrides), **options)


def perturb(model, seed=1):
    """Every weight non-trivial (the released init leaves the word projection, the
    PWAM gates and the deformable offsets' weights at 0, which hides those paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.abs().mean().clamp(min=1e-2) if p.numel() > 1 else torch.tensor(0.5)
            p.add_(torch.randn(p.shape, generator=g) * scale * 0.3)
    return model


def test_shapes_losses_and_predict():
    model = tiny().eval()
    images, ids, mask, targets = make_batch()
    out = model(images, ids, mask)
    assert out["mask_logits"].shape == (2, 2, SIZE // 4, SIZE // 4)
    assert out["nt_logits"].shape == (2, 2) and out["minimap_logits"].shape == (2, 16, 2)
    pred = model.predict(images, ids, mask)
    assert pred.mask.shape == (2, SIZE, SIZE) and pred.no_target.shape == (2,)
    assert ((pred.mask >= 0) & (pred.mask <= 1)).all()
    model.train()
    out, losses = model(images, ids, mask, targets=targets)
    assert set(losses) == {"mask_ce", "minimap_ce", "nt_ce"} and all(torch.isfinite(v) for v in losses.values())

def test_mask_stride_2_predicts_region_and_target_masks_at_half_the_input_size():
    """Not released (the demo preset): one more FPN step to 1/2 on an image stem."""
    model = tiny(mask_stride=2).eval()
    assert ReLAConfig.tiny().mask_stride == 4 and ReLAConfig.released().mask_stride == 4
    assert not any("image_stem" in k for k in tiny().state_dict())
    images, ids, mask, targets = make_batch()
    out = model(images, ids, mask)
    assert out["mask_logits"].shape == (2, 2, SIZE // 2, SIZE // 2)
    assert out["nt_logits"].shape == (2, 2) and out["minimap_logits"].shape == (2, 16, 2)
    pred = model.predict(images, ids, mask)
    assert pred.mask.shape == (2, SIZE, SIZE)
    # the image stem sees the pixels: a change the 1/4 backbone cannot resolve reaches the mask
    moved = images.clone()
    moved[:, :, 1::2, 1::2] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(moved, ids, mask)["mask_logits"], out["mask_logits"])
    model.train()
    _, losses = model(images, ids, mask, targets=targets)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="mask_stride must be 4 .released. or 2, got 8"):
        ReLAConfig.tiny(mask_stride=8)
    with pytest.raises(TypeError, match=r"^ReLAConfig\.mask_stride must be int"):
        ReLAConfig.tiny(mask_stride="2")
    with pytest.raises(ValueError, match="needs the images"):
        model.sem_seg_head.pixel_decoder(model.backbone(images, model.text_encoder(input_ids=ids).last_hidden_state,
                                                        mask.float()))


def test_dice_term_is_off_as_released_and_exact_when_on():
    """The demo preset's Dice term: absent by default (the released losses), and
    mask_weight · dice_weight · mean_b(1 − (2Σpg + 1)/(Σp + Σg + 1)) when on, with p the
    target softmax of the upsampled target mask, written out here by hand."""
    import torch.nn.functional as F

    from rexfast.models.rela.losses import rela_losses

    g = torch.Generator().manual_seed(3)
    mask_logits = torch.randn(3, 2, 8, 8, generator=g, requires_grad=True)
    minimap, nt = torch.randn(3, 16, 2, generator=g), torch.randn(3, 2, generator=g)
    targets = (torch.rand(3, 32, 32, generator=g) > 0.8).float()
    targets[2] = 0  # no target: the Dice term pushes the whole mask to background
    released = rela_losses(mask_logits, minimap, nt, targets, minimap_size=4)
    assert set(released) == {"mask_ce", "minimap_ce", "nt_ce"}
    with_dice = rela_losses(mask_logits, minimap, nt, targets, minimap_size=4, dice_weight=0.7)
    for name in released:
        assert torch.equal(with_dice[name], released[name])
    p = F.interpolate(mask_logits, size=(32, 32), mode="bilinear", align_corners=False).softmax(1)[:, 1]
    expected = [1 - (2 * (p[b] * targets[b]).sum() + 1) / (p[b].sum() + targets[b].sum() + 1) for b in range(3)]
    torch.testing.assert_close(with_dice["mask_dice"], 5.0 * 0.7 * torch.stack(expected).mean())
    with_dice["mask_dice"].backward()
    assert mask_logits.grad[2, 1].gt(0).all()  # no-target sample: every target logit pushed down
    assert ReLAConfig.released().dice_weight == 0 and ReLAConfig.demo().dice_weight > 0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dice_weight"):
            ReLAConfig.tiny(dice_weight=bad)


def test_decision_released_ties_where_sigmoids_saturate_and_logits_does_not():
    """The released evaluator compares sigmoid(target) > sigmoid(background) in fp32: where both
    logits are above ~17 both sigmoids are 1.0 and the pixel goes to background, whatever the
    difference. ``decision="logits"`` (the demo preset) decides target − background > 0."""
    from rexfast.models.base import Prediction

    model = tiny().eval()
    # mask logits (B=1, 2, 2, 2): background / target per pixel; nt logits (target, no target)
    mask_logits = torch.tensor([[[[20.0, 0.0], [1.0, 3.0]], [[30.0, 1.0], [1.0, -3.0]]]])
    nt_logits = torch.tensor([[25.0, 40.0]])
    model.forward_features = lambda *a, **k: {"mask_logits": mask_logits, "nt_logits": nt_logits}
    images = torch.zeros(1, 3, 2, 2)
    released = model.predict(images, None, None)
    assert isinstance(released, Prediction)
    assert (released.mask > 0.5).tolist() == [[[False, True], [False, False]]]  # 30 vs 20: a tie, background
    assert not bool(released.no_target[0] > 0.5)  # 40 vs 25: a tie, "target"
    model.config.decision = "logits"
    by_logits = model.predict(images, None, None)
    assert (by_logits.mask > 0.5).tolist() == [[[True, True], [False, False]]]  # equal logits: background
    assert bool(by_logits.no_target[0] > 0.5)
    with pytest.raises(ValueError, match="decision"):
        ReLAConfig.tiny(decision="argmax")
    assert ReLAConfig.released().decision == "released" and ReLAConfig.demo().decision == "logits"


def test_no_target_if_empty_is_the_demo_presets_alone_and_reaches_predict():
    """The authors' evaluator asks the no-target head alone: every released preset keeps that;
    the demo preset also calls an empty mask "no target", and the model says which rule holds."""
    for name in ("released", "swin_tiny", "r50", "tiny"):
        assert ReLAConfig.preset(name).no_target_if_empty is False
    assert ReLAConfig.demo().no_target_if_empty is True
    images, ids, mask, _ = make_batch()
    for flag in (False, True):
        model = tiny(no_target_if_empty=flag).eval()
        with torch.no_grad():
            assert model.predict(images, ids, mask).no_target.shape == (2,)
        assert model.empty_mask_says_no_target is flag


# Parameters the released initialisation gives no gradient at the first step
# (they are zero-initialised in the authors' code: a two-layer gate whose both
# weights start at 0 stays at 0 — in the released ReLA the PWAM gates never train).
ZERO_INIT_NO_GRAD = [
    r"^backbone\.layers\.\d\.res_gate\.[02]\.weight$",
    r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$",  # reaches only the zero-initialised offset/weight heads
    r"^sem_seg_head\.predictor\.RLA_lang_att\.multihead_attn\.(in_proj_weight|out_proj\.weight)$",  # lang_proj = 0
]


@pytest.mark.parametrize("preset", ["tiny", "tiny_r50", "tiny_mask_stride_2"])
def test_every_parameter_is_trained(preset):
    model = {"tiny": tiny, "tiny_r50": lambda: tiny(backbone="resnet"),
             "tiny_mask_stride_2": lambda: tiny(mask_stride=2)}[preset]()
    images, ids, mask, targets = make_batch()
    model.train()
    _, losses = model(images, ids, mask, targets=targets)
    sum(losses.values()).backward()
    silent = sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    # ReLA-R50 reads the words only through the zero-initialised lang_proj: BERT has no gradient at the start
    allowed = ZERO_INIT_NO_GRAD + ([r"^text_encoder\."] if preset == "tiny_r50" else [])
    assert all(any(re.search(pat, n) for pat in allowed) for n in silent), silent
    perturb(model).zero_grad()
    _, losses = model(images, ids, mask, targets=targets)
    sum(losses.values()).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"parameters without a gradient once every weight is non-zero: {silent}"


@pytest.mark.parametrize("preset, params, keys", [
    ("released", 225_521_469, 912), ("swin_tiny", 162_560_575, 744), ("r50", 153_368_197, 766)])
def test_full_size_parameter_and_key_counts(preset, params, keys):
    with torch.device("meta"):
        model = ReLA(ReLAConfig.preset(preset))
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


@pytest.mark.parametrize("fixture, preset", [("rela_swin_base_keys.json", "released"),
                                             ("rela_swin_tiny_keys.json", "swin_tiny"),
                                             ("rela_r50_keys.json", "r50")])
def test_from_official_accepts_exactly_the_released_key_set(fixture, preset):
    """Key names and shapes read by building the authors' models (not rexfast's own
    mapping): every key is used, none is missing, the architecture inferred is the released one."""
    data = json.loads((FIXTURES / fixture).read_text())
    state = {k: torch.empty(shape, device="meta") for k, shape in data["keys"].items()}
    config = config_from_state_dict(read_checkpoint({"model": state}))
    assert config == ReLAConfig.preset(preset)
    with torch.device("meta"):
        model = ReLA(config)
    kept = check_keys(model, state)
    assert set(kept) == set(model.state_dict()) == set(state) - {"text_encoder.embeddings.position_ids"}
    assert sum(p.numel() for p in model.parameters()) == data["num_parameters"]


def test_official_round_trip_and_lang_weight(tmp_path):
    model = perturb(tiny()).eval()
    with torch.no_grad():
        model.sem_seg_head.predictor.lang_weight.fill_(1.5)
    path = tmp_path / "model_final.pth"
    state = to_official_state_dict(model)
    state["model"]["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # as transformers 4.x saved it
    torch.save({**state, "iteration": 150000}, path)
    images, ids, mask, _ = make_batch()
    cfg = model.config
    honoured = ReLA.from_official(path, config=cfg, honour_lang_weight=True)
    default = ReLA.from_official(path, config=cfg)
    assert float(honoured.sem_seg_head.predictor.lang_weight.detach()) == 1.5
    assert float(default.sem_seg_head.predictor.lang_weight.detach()) == 0.0  # as the authors' loader leaves it
    with torch.no_grad():
        want = model(images, ids, mask)
        got = honoured(images, ids, mask)
        other = default(images, ids, mask)
    for key in ("mask_logits", "nt_logits", "minimap_logits"):
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(other["mask_logits"], want["mask_logits"])  # the gate moved from σ(1.5) to σ(0)


def test_official_layout_round_trip_infers_mask_stride_2():
    """rexfast's 1/2 mask step written in the released layout loads back with its stem
    (the architecture inferred from the weights; the released files never have one)."""
    model = perturb(tiny(mask_stride=2)).eval()
    state = to_official_state_dict(model)["model"]
    overrides = dict(swin=model.config.swin, bert="tiny", nheads=2, enc_heads=2, enc_points=2)
    assert config_from_state_dict(state, **overrides) == model.config
    loaded = ReLA.from_official(state, honour_lang_weight=True, **overrides)
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        assert torch.equal(loaded(images, ids, mask)["mask_logits"], model(images, ids, mask)["mask_logits"])


def test_from_official_rejects_unknown_missing_misshaped_and_refuses_to_guess():
    model = tiny()
    state = to_official_state_dict(model)["model"]
    cfg = model.config
    with pytest.raises(ValueError, match=r"unexpected keys.*sem_seg_head\.predictor\.extra"):
        ReLA.from_official(dict(state, **{"sem_seg_head.predictor.extra": torch.zeros(1)}), config=cfg)
    with pytest.raises(ValueError, match=r"missing keys.*minimap_embed\.bias"):
        ReLA.from_official({k: v for k, v in state.items() if k != "sem_seg_head.predictor.minimap_embed.bias"},
                           config=cfg)
    bad = dict(state)
    bad["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(16, 33)
    with pytest.raises(ValueError, match=r"shape mismatches.*query_feat"):
        ReLA.from_official(bad, config=cfg)
    with pytest.raises(ValueError, match="PWAM head counts of a 16-wide Swin"):
        ReLA.from_official(state)


@pytest.mark.parametrize("preset", ["tiny", "demo", pytest.param("released", marks=pytest.mark.slow),
                                    pytest.param("r50", marks=pytest.mark.slow)])
def test_save_pretrained_from_pretrained_bit_identical(tmp_path, preset):
    torch.manual_seed(0)
    cfg = ReLAConfig.preset(preset)
    model = ReLA(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = ReLA.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg
    size = 64 if preset in ("tiny", "demo") else 96
    images, ids, mask, _ = make_batch(b=1, size=size)
    with torch.no_grad():
        a, b = model(images, ids, mask), loaded(images, ids, mask)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_is_deterministic_and_training_reproducible():
    model = perturb(tiny()).eval()
    images, ids, mask, targets = make_batch()
    with torch.no_grad():
        a, b = model(images, ids, mask), model(images, ids, mask)
    assert all(torch.equal(a[k], b[k]) for k in a)
    model.train()
    grads = []
    for _ in range(2):
        torch.manual_seed(5)  # drop-path draws from torch's RNG
        model.zero_grad()
        _, losses = model(images, ids, mask, targets=targets)
        sum(losses.values()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.equal(x, y) for x, y in zip(*grads))


@pytest.mark.parametrize("mask_stride", [4, 2])
def test_region_masks_at_key_resolution_is_exact(mask_stride):
    """E·interp(F) = interp(E·F): both ways give the same outputs (decisions agree away from ties)."""
    model = perturb(tiny(mask_stride=mask_stride)).eval()
    other = tiny(region_masks_at_key_resolution=False, mask_stride=mask_stride).eval()
    other.load_state_dict(model.state_dict())
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        a, b = model(images, ids, mask), other(images, ids, mask)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


def test_param_groups_follow_the_released_optimizer():
    from types import SimpleNamespace

    model = ReLA(ReLAConfig.tiny(bert={"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 3,
                                       "num_attention_heads": 2, "intermediate_size": 64},
                                 text_trained_layers=2))
    groups = {g["name"]: g for g in model.param_groups(SimpleNamespace(lr=1e-5, weight_decay=0.05))}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[i] for i in ids["no_decay"]}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert "sem_seg_head.predictor.query_feat.weight" in no_decay and "backbone.norm0.weight" in no_decay
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    assert "sem_seg_head.pixel_decoder.input_proj.0.1.weight" in no_decay  # GroupNorm
    assert "sem_seg_head.pixel_decoder.transformer.level_embed" not in no_decay  # an nn.Parameter, not an Embedding
    text = {names[i] for i in ids["text"]}
    assert all(n.startswith("text_encoder.encoder.layer.") for n in text)
    assert {n.split(".")[3] for n in text} == {"0", "1"}  # layers 0..1: embeddings and layer 2 never update
    assert LANG_WEIGHT in {names[i] for i in ids["decay"]}


def test_bad_inputs_raise_clear_errors():
    model = tiny().eval()
    images, ids, mask, targets = make_batch()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(images[..., :48], ids, mask)
    with pytest.raises(ValueError, match="at most 64"):
        model(images, torch.randint(1000, 2000, (2, 65)), torch.ones(2, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        model.predict(images[:0], ids[:0], mask[:0])
    with pytest.raises(ValueError, match="targets"):
        model.train()(images, ids, mask, targets=targets[..., :32])
    with pytest.raises(ValueError, match="too small for this ReLA"):
        model(images[..., :32, :32], ids, mask)
    with pytest.raises(ValueError, match="square"):
        ReLAConfig.tiny(num_queries=10)


@pytest.mark.parametrize("field, value, expected", [
    ("no_target_if_empty", "yes", "bool"), ("no_target_if_empty", 1, "bool"),
    ("num_queries", 16.0, "int"), ("dec_layers", True, "int"),
    ("dice_weight", True, "float"), ("rla_weight", "0.1", "float"), ("decision", None, "str"),
    ("bert_weights", 1, "str or None")])
def test_config_fields_of_the_wrong_kind_raise_a_type_error_naming_them(field, value, expected):
    with pytest.raises(TypeError, match=rf"^ReLAConfig\.{field} must be {expected}, got "):
        ReLAConfig.tiny(**{field: value})


@pytest.mark.parametrize("field, value, expected", [
    ("region_masks_at_key_resolution", None, "bool"), ("ops_backend", 3, "str or None")])
def test_runtime_options_of_the_wrong_kind_raise_a_type_error_naming_them(field, value, expected):
    with pytest.raises(TypeError, match=rf"^ReLARuntime\.{field} must be {expected}, got "):
        ReLA(ReLAConfig.tiny(), **{field: value})


def test_backbone_configs_check_their_scalar_fields():
    from rexfast.models.backbones.resnet import ResNetConfig
    from rexfast.models.backbones.swin import SwinConfig

    with pytest.raises(TypeError, match=r"^SwinConfig\.window_size must be int, got '7'"):
        SwinConfig(window_size="7")
    with pytest.raises(TypeError, match=r"^SwinConfig\.mlp_ratio must be float, got False"):
        SwinConfig(mlp_ratio=False)
    with pytest.raises(TypeError, match=r"^ResNetConfig\.depth must be int, got 50\.0"):
        ResNetConfig(depth=50.0)
    # ints are floats; every preset passes, and a config survives its dict form
    assert SwinConfig(mlp_ratio=4).mlp_ratio == 4
    for preset in ReLAConfig.PRESETS:
        config = ReLAConfig.preset(preset)
        assert ReLAConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("field", ["conv_dim", "mask_dim", "enc_heads", "enc_points", "enc_ffn", "hidden_dim",
                                   "nheads", "dim_feedforward"])
@pytest.mark.parametrize("value", [0, -8])
def test_sizes_below_one_are_a_value_error_naming_them(field, value):
    # enc_heads = 0 in a config.json reached `conv_dim % enc_heads`: ZeroDivisionError (fuzzing,
    # tests/fuzz/corpus/model_folder/crash-rela-enc-heads-zero.bin)
    with pytest.raises(ValueError, match=field):
        ReLAConfig.from_dict({**ReLAConfig.tiny().to_dict(), field: value})
