"""CGFormer: forward/backward on tiny configs, exact fusions, Gumbel reproducibility,
checkpoint round trips with strict key checks, and the full-size parameter count."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rexfast.models import CGFormer, CGFormerConfig, SwinConfig
from rexfast.models.cgformer.model import DProjector
from rexfast.models.cgformer.checkpoint import config_from_state_dict, read_checkpoint, to_official_state_dict

SIZE = 64  # the tiny preset's image size
L = 20  # released word length


def make_batch(b=2, h=SIZE, w=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    input_ids = torch.randint(1000, 30000, (b, L), generator=g)
    attention_mask = torch.ones(b, L, dtype=torch.long)
    attention_mask[0, 7:] = 0  # one padded sentence
    if b > 1:
        attention_mask[1, 12:] = 0
    targets = (torch.rand(b, h, w, generator=g) > 0.6).float()
    return images, input_ids, attention_mask, targets


def tiny_model(seed=0, **kwargs):
    """The tiny preset; ``kwargs``: config fields and runtime options (``fused=False``)."""
    torch.manual_seed(seed)
    options, overrides = CGFormer.runtime_class.split(kwargs)
    return CGFormer(CGFormerConfig.tiny(**overrides), **options)


def explicit_noise(model, b=2, h=SIZE, w=SIZE, seed=1):
    """One (B, N, P) Gumbel tensor per group block (c3, c2, c1 resolutions)."""
    g = torch.Generator().manual_seed(seed)
    n = model.config.num_tokens
    out = []
    for stride in (16, 8, 4):
        u = torch.rand(b, n, (h // stride) * (w // stride), generator=g).clamp_(1e-9, 1 - 1e-7)
        out.append(-torch.log(-torch.log(u)))
    return out


# Parameters that the released code never trains; every other one must get a gradient.
NO_GRAD_PATTERNS = [
    r"^decoder\.layers\.[12]\.loadtoken\.(norm|mlp)\.",  # defined in LoadToken, unused by its forward
    r"^decoder\.cgattention[12]\.tau$",  # clamp(max=0) at its initial value 1: zero gradient
    r"^backbone\.layers\.3\.pwam_gate\.",  # last stage: the gated sum is discarded, only the PWAM output is used
]


def _exempt(name):
    return any(re.search(p, name) for p in NO_GRAD_PATTERNS)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_tiny_forward_backward_reaches_every_trained_parameter(variant):
    overrides = {} if variant == "released" else dict(variant="paper", num_tokens=4, contrastive_weight=0.1)
    model = tiny_model(**overrides).train()
    images, ids, mask, targets = make_batch()
    logits, losses = model(images, ids, mask, targets=targets)
    assert logits.shape == (2, 1, SIZE, SIZE)
    expected = {"mask_dice", "mask_bce", "hitmap_dice"} | ({"contrastive"} if variant == "paper" else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    missing, exempt_with_grad = [], []
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        if _exempt(name):
            if has_grad:
                exempt_with_grad.append(name)
        elif not has_grad:
            missing.append(name)
    assert not missing, f"parameters without gradient: {missing}"
    # the exemption list is exact: nothing listed there secretly trains
    assert not exempt_with_grad, exempt_with_grad


def test_tau_trains_once_negative():
    model = tiny_model().train()
    with torch.no_grad():
        model.decoder.cgattention1.tau.fill_(-0.5)
    images, ids, mask, targets = make_batch()
    _, losses = model(images, ids, mask, targets=targets)
    sum(losses.values()).backward()
    assert model.decoder.cgattention1.tau.grad.abs().sum() > 0


def test_fused_paths_equal_unfused_outputs_losses_and_grads():
    """(ÂX)Wᵀ + rowsum(Â)b and the folded mask head equal the released algebra."""
    images, ids, mask, targets = make_batch()
    results = []
    for fused in (True, False):
        model = tiny_model(fused=fused).train()
        noise = explicit_noise(model)
        torch.manual_seed(123)  # same dropout masks in both runs
        logits, losses = model(images, ids, mask, targets=targets, gumbel_noise=noise)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), {k: v.detach() for k, v in losses.items()}, grads))
    (l1, loss1, g1), (l2, loss2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
    for k in loss1:
        torch.testing.assert_close(loss1[k], loss2[k], rtol=1e-5, atol=1e-6)
    assert set(g1) == set(g2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-3, atol=1e-6, msg=name)


def test_train_mode_bit_for_bit_reproducible_with_explicit_noise():
    images, ids, mask, targets = make_batch()
    runs = []
    for _ in range(2):
        model = tiny_model().train()
        torch.manual_seed(7)
        logits, losses = model(images, ids, mask, targets=targets, gumbel_noise=explicit_noise(model))
        sum(losses.values()).backward()
        runs.append((logits.detach(), losses, [p.grad for p in model.parameters()]))
    (a, la, ga), (b, lb, gb) = runs
    assert torch.equal(a, b)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(ga, gb))


def test_seeded_training_noise_follows_torch_manual_seed():
    model = tiny_model().train()
    images, ids, mask, _ = make_batch()
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(model.forward_features(images, ids, mask)["hit_maps"])
    assert all(torch.equal(x, y) for x, y in zip(outs[0], outs[1]))
    assert not all(torch.equal(x, y) for x, y in zip(outs[0], outs[2]))


def test_eval_is_deterministic_and_eval_noise_flag_adds_noise():
    model = tiny_model().eval()
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(images, ids, mask)
        torch.manual_seed(1)
        b = model(images, ids, mask)
        assert torch.equal(a, b)
        model.config.eval_noise = True
        torch.manual_seed(0)
        maps0 = model.forward_features(images, ids, mask)["hit_maps"]
        torch.manual_seed(1)
        maps1 = model.forward_features(images, ids, mask)["hit_maps"]
    assert not all(torch.equal(x, y) for x, y in zip(maps0, maps1))


def test_reference_ops_backend_matches_default():
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        a = tiny_model().eval()(images, ids, mask)
        b = tiny_model(ops_backend="reference", fused=False).eval()(images, ids, mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_other_input_sizes_interpolate_positional_embeddings():
    model = tiny_model().eval()
    images, ids, mask, targets = make_batch(h=96, w=128)
    with torch.no_grad():
        out = model.forward_features(images, ids, mask)
    assert out["logits"].shape == (2, 1, 96, 128)
    assert [tuple(m.shape[-2:]) for m in out["hit_maps"]] == [(6, 8), (12, 16), (24, 32)]
    model.train()
    _, losses = model(images, ids, mask, targets=targets)
    assert torch.isfinite(sum(losses.values()))


def test_bad_inputs_raise_clear_errors():
    model = tiny_model().eval()
    images, ids, mask, targets = make_batch()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(images[..., :48], ids, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(images, ids, mask[:, :10])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(images[:, :1], ids, mask)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(images[:1], ids, mask)
    with pytest.raises(ValueError, match="empty batch"):
        model.predict(images[:0], ids[:0], mask[:0])
    with pytest.raises(ValueError, match="targets"):
        model.train()(images, ids, mask, targets=targets[..., :32])


def test_token_ids_outside_the_text_encoder_raise_value_errors_naming_the_limit():
    model = tiny_model().eval()  # tiny BERT: 64 positions, the bert-base vocabulary (30522)
    images, ids, mask, _ = make_batch()
    long_ids = torch.randint(1000, 2000, (2, 65))
    with pytest.raises(ValueError, match="at most 64"):
        model(images, long_ids, torch.ones_like(long_ids))
    with pytest.raises(ValueError, match=r"\[0, 30522\)"):
        model(images, ids.clone().index_fill_(1, torch.tensor([3]), 30522), mask)
    with pytest.raises(ValueError, match=r"\[0, 30522\)"):
        model(images, ids.clone().index_fill_(1, torch.tensor([3]), -1), mask)
    with pytest.raises(TypeError, match="integer token ids"):
        model(images, ids.float(), mask)


def test_mask_head_padding_quirk_and_fold():
    torch.manual_seed(0)
    head = DProjector(text_dim=16, in_dim=8).eval()
    x, ref = torch.randn(2, 8, 5, 6), torch.randn(2, 16)
    with torch.no_grad():
        folded, plain = head(x, ref, fused=True), head(x, ref, fused=False)
        dyn_bias = head.txt(ref)[:, -1]
    assert folded.shape == plain.shape == (2, 1, 22, 26)  # 4h+2, 4w+2: padding=1 on a 1×1 kernel
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    border = torch.cat([plain[:, 0, 0], plain[:, 0, -1], plain[:, 0, :, 0], plain[:, 0, :, -1]], dim=1)
    torch.testing.assert_close(border, dyn_bias[:, None].expand_as(border))


def test_channels_last_matches_default():
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        a = tiny_model().eval()(images, ids, mask)
        b = tiny_model(channels_last=True).eval()(images, ids, mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_agrees_with_fp32(seed):
    """bf16 autocast against fp32: logits within 10% (relative norm; bf16 keeps 8
    bits of mantissa, and a hard argmax in a group block may flip a few pixels,
    measured 0.3–5% on these random tiny models) and at least 98% of the mask
    pixels on the same side of 0."""
    model = tiny_model(seed=seed).eval()
    images, ids, mask, _ = make_batch(b=2, seed=seed)
    with torch.no_grad():
        ref = model(images, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, ids, mask).float()
    assert out.shape == ref.shape == (2, 1, SIZE, SIZE) and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.1
    assert ((out > 0) == (ref > 0)).float().mean() >= 0.98


# ----------------------------------------------------------------------------- official checkpoints
def test_official_round_trip_identical_outputs(tmp_path):
    model = tiny_model().eval()
    path = tmp_path / "best_model.pth"
    torch.save({"epoch": 1, **to_official_state_dict(model, ddp_prefix=True)}, path)
    assert all(k.startswith("module.") for k in torch.load(path)["model_state_dict"])
    loaded = CGFormer.from_official(path, config=CGFormerConfig.tiny())
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask), loaded(images, ids, mask))


def test_architecture_inferred_from_checkpoint():
    model = tiny_model(num_tokens=3)
    tiny = model.config
    state = read_checkpoint(to_official_state_dict(model))
    cfg = config_from_state_dict(state, swin=tiny.swin, bert=tiny.bert)
    assert (cfg.num_tokens, cfg.token_dim, cfg.image_size) == (3, tiny.token_dim, tiny.image_size)
    full = config_from_state_dict({k: v for k, v in _meta_released_state().items()})
    assert full == CGFormerConfig.released()
    swin = SwinConfig(**{**vars(CGFormerConfig.released().swin), "depths": (2, 2, 6, 2)})
    with torch.device("meta"):  # a released width with other depths is still inferred exactly
        other = CGFormer(CGFormerConfig.released(swin=swin)).state_dict()
    assert config_from_state_dict(other).swin == swin


def test_non_released_widths_are_refused_not_guessed():
    """The PWAM and BERT head counts leave no trace in the weights: for widths the
    released models never used, guessing gave logits off by 1.6e-2."""
    model = tiny_model().eval()
    state = to_official_state_dict(model)
    with pytest.raises(ValueError, match="PWAM head counts of a 16-wide Swin"):
        CGFormer.from_official(state)
    with pytest.raises(ValueError, match="attention heads of a 32-wide BERT"):
        CGFormer.from_official(state, swin=model.config.swin)
    loaded = CGFormer.from_official(state, swin=model.config.swin, bert=model.config.bert)
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask), loaded(images, ids, mask))


def _meta_released_state():
    with torch.device("meta"):
        return CGFormer(CGFormerConfig.released()).state_dict()


def test_from_official_rejects_unknown_missing_and_misshaped_keys():
    model = tiny_model()
    state = to_official_state_dict(model)["model_state_dict"]
    tiny = CGFormerConfig.tiny()

    extra = dict(state, **{"decoder.not_a_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys.*decoder\.not_a_layer\.weight"):
        CGFormer.from_official(extra, config=tiny)

    missing = {k: v for k, v in state.items() if k != "decoder.proj.txt.bias"}
    with pytest.raises(ValueError, match=r"missing keys.*decoder\.proj\.txt\.bias"):
        CGFormer.from_official(missing, config=tiny)

    bad = dict(state, **{"decoder.tokens.weight": torch.zeros(5, 32)})
    with pytest.raises(ValueError, match=r"shape mismatches.*decoder\.tokens\.weight"):
        CGFormer.from_official(bad, config=tiny)

    # BERT buffers older/newer transformers store, and the dropped pooler, are tolerated
    benign = dict(state, **{"text_encoder.embeddings.position_ids": torch.arange(64)[None],
                            "text_encoder.pooler.dense.weight": torch.zeros(32, 32)})
    CGFormer.from_official({"model_state_dict": benign}, config=tiny)


# ----------------------------------------------------------------------------- full-size parameter count
def _linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def _ln(d):
    return 2 * d


def swin_stage_params(d, depth, heads, window, text_dim=768, downsample=True, pwam=True):
    block = (_ln(d) + (2 * window - 1) ** 2 * heads + _linear(d, 3 * d) + _linear(d, d) + _ln(d)
             + _linear(d, 4 * d) + _linear(4 * d, d))
    total = depth * block
    if pwam:  # vis_project, f_query, W, project_mm (d→d), f_key, f_value (768→d), gate (2 × d→d, no bias)
        total += 4 * _linear(d, d) + 2 * _linear(text_dim, d) + 2 * d * d
    if downsample:
        total += _ln(4 * d) + 4 * d * 2 * d
    return total


def swin_params(embed, depths, heads, window, pwam=True):
    total = 3 * embed * 16 + embed + _ln(embed)  # patch embedding 4×4 conv + LayerNorm
    for i, (depth, h) in enumerate(zip(depths, heads)):
        total += swin_stage_params(embed * 2**i, depth, h, window, downsample=i < 3, pwam=pwam)
    return total


def bert_params(vocab=30522, hidden=768, layers=12, inter=3072, max_pos=512, types=2, pooler=False):
    emb = (vocab + max_pos + types) * hidden + _ln(hidden)
    layer = 4 * _linear(hidden, hidden) + 2 * _ln(hidden) + _linear(hidden, inter) + _linear(inter, hidden)
    return emb + layers * layer + (_linear(hidden, hidden) if pooler else 0)


def cgformer_decoder_params(d=512, text=768, n_tokens=2, pe=(30, 60, 120), c=128):
    mlp = _linear(d, 2 * d) + _linear(2 * d, d)
    load_token = (d * d + 2 * text * d + _linear(d, d)) + _ln(d) + _ln(text) + _ln(d) + mlp  # + unused norm/mlp
    load_layers = sum(s * s * d for s in pe) + 2 * (load_token + _ln(d) + mlp)
    group = _ln(d) * 3 + 4 * _linear(d, d) + mlp + 1  # norm_v, norm_t, norm; q/k/v/proj; mlp; tau
    fusion = lambda cin: _linear(cin * 9, d) + 2 * d + _linear(d * 9, d) + 2 * d  # noqa: E731
    fuses = fusion(8 * c + 4 * c) + fusion(2 * c + d) + fusion(c + d)
    head = 2 * (d * d * 9 + 2 * d) + _linear(d, d) + _linear(d, d + 1)
    return n_tokens * d + load_layers + 2 * group + fuses + head


def test_param_count_formulas_match_published_counts():
    # Swin-B window 7 classifier (timm swin_base_patch4_window7_224): 87,768,224 params
    swin_b_cls = swin_params(128, (2, 2, 18, 2), (4, 8, 16, 32), 7, pwam=False) + _ln(1024) + _linear(1024, 1000)
    assert swin_b_cls == 87_768_224
    assert bert_params(pooler=True) == 109_482_240  # bert-base-uncased


def test_full_size_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = CGFormer(CGFormerConfig.released())
    backbone = swin_params(128, (2, 2, 18, 2), (4, 8, 16, 32), 12) + sum(_ln(128 * 2**i) for i in range(4))
    counts = {n: sum(p.numel() for p in getattr(model, n).parameters())
              for n in ("backbone", "decoder", "text_encoder")}
    assert counts["backbone"] == backbone
    assert counts["text_encoder"] == bert_params()
    assert counts["decoder"] == cgformer_decoder_params()
    assert sum(counts.values()) == 253_705_595
    state = model.state_dict()
    assert "backbone.layers.0.blocks.0.attn.relative_position_index" in state  # persistent buffer, as released
    assert not any(k.startswith("text_encoder.pooler") for k in state)


# ----------------------------------------------------------------------------- losses
def test_losses_follow_the_released_formulas():
    from rexfast.models.cgformer.losses import cgformer_losses, contrastive_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    targets = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    hits = [torch.randint(0, 2, (2, 2, s, s), generator=g).float() for s in (2, 4, 8)]
    losses = cgformer_losses(logits, hits, targets)

    def dice(x, t):  # 1 - (2 Σ σ(x)t + 1) / (Σ σ(x) + Σ t + 1), averaged over the batch
        p = x.sigmoid().flatten(1)
        t = t.flatten(1)
        return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()

    bce = -(targets * torch.log(logits[:, 0].sigmoid()) + (1 - targets) * torch.log(1 - logits[:, 0].sigmoid()))
    torch.testing.assert_close(losses["mask_dice"], dice(logits[:, 0], targets))
    torch.testing.assert_close(losses["mask_bce"], bce.mean())
    hit = sum(w * dice(h[:, 1], targets[:, :: 8 // h.shape[-1], :: 8 // h.shape[-1]])  # nearest = stride sampling
              for w, h in zip((0.001, 0.01, 0.1), hits))
    torch.testing.assert_close(losses["hitmap_dice"], hit)

    # contrastive: the loss falls when the referent token matches its sentence
    sentence = torch.randn(3, 16, generator=g)
    tokens = torch.randn(3, 4, 16, generator=g)
    aligned = tokens.clone()
    aligned[:, -1] = sentence
    assert contrastive_loss(aligned, sentence) < contrastive_loss(tokens, sentence)


def test_presets_and_config_dict_round_trip():
    for name in ("released", "paper", "tiny", "demo"):
        cfg = CGFormerConfig.preset(name)
        assert CGFormerConfig.from_dict(cfg.to_dict()) == cfg
    assert CGFormerConfig.paper().num_tokens > 2 and CGFormerConfig.paper().contrastive_weight > 0
    with pytest.raises(ValueError, match="unknown CGFormerConfig preset"):
        CGFormerConfig.preset("huge")
    with pytest.raises(ValueError, match="multiple of 32"):
        CGFormerConfig.tiny(image_size=100)
    for field, value, expected in (("no_target_if_empty", "yes", "bool"), ("no_target_head", 1, "bool"),
                                   ("num_tokens", 2.0, "int"), ("decoder_dropout", "0.1", "float"),
                                   ("variant", None, "str")):
        with pytest.raises(TypeError, match=rf"^CGFormerConfig\.{field} must be {expected}, got "):
            CGFormerConfig.tiny(**{field: value})
    for field, value, expected in (("ops_backend", True, "str or None"), ("fused", "no", "bool"),
                                   ("channels_last", 1, "bool")):
        with pytest.raises(TypeError, match=rf"^CGFormerRuntime\.{field} must be {expected}, got "):
            CGFormer(CGFormerConfig.tiny(), **{field: value})


def test_no_target_head_and_no_target_if_empty_reach_predict():
    """The optional no-target head (off as released) gives nt_logits (B, 2), a no-target
    loss and predict()'s no-target probability; ``no_target_if_empty`` (the demo preset only)
    is passed on to the inference rule, and is moot without a head."""
    for name in ("released", "paper", "tiny"):
        cfg = CGFormerConfig.preset(name)
        assert not cfg.no_target_head and not cfg.no_target_if_empty
    assert CGFormerConfig.demo().no_target_head and CGFormerConfig.demo().no_target_if_empty
    images, ids, mask, targets = make_batch()
    targets[1] = 0  # a no-target sample
    for head, flag in ((True, False), (True, True), (False, True)):
        model = tiny_model(no_target_head=head, no_target_if_empty=flag)
        out = model.forward_features(images, ids, mask)
        assert ("nt_logits" in out and out["nt_logits"].shape == (2, 2)) is head
        losses = model.losses(out, targets)
        assert ("nt_ce" in losses and bool(torch.isfinite(losses["nt_ce"]))) is head
        with torch.no_grad():
            pred = model.eval().predict(images, ids, mask)
        assert (pred.no_target is not None and pred.no_target.shape == (2,)) is head
        assert model.empty_mask_says_no_target is (head and flag)


@pytest.mark.slow
def test_released_configuration_runs_at_480_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = CGFormer().eval()
    images, ids, mask, _ = make_batch(b=1, h=480, w=480)
    with torch.no_grad():
        out = model(images, ids, mask)
    assert out.shape == (1, 1, 480, 480)
    path = tmp_path / "cgformer.pth"
    torch.save(to_official_state_dict(model, ddp_prefix=True), path)
    loaded = CGFormer.from_official(path)  # architecture inferred from the weights
    assert loaded.config == CGFormerConfig.released()
    with torch.no_grad():
        assert torch.equal(loaded(images, ids, mask), out)


@pytest.mark.slow
def test_torch_compile_fullgraph_train_and_eval():
    """Dynamo captures the whole model (the training noise is drawn from torch's
    RNG under compile, so no per-step recompiles on the seed)."""
    model = tiny_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    images, ids, mask, targets = make_batch()
    _, losses = compiled(images, ids, mask, targets=targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images, ids, mask), model(images, ids, mask), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- model folders (safetensors)
@pytest.mark.parametrize("preset", ["tiny", "demo", pytest.param("released", marks=pytest.mark.slow),
                                    pytest.param("paper", marks=pytest.mark.slow)])
def test_save_pretrained_from_pretrained_bit_identical(tmp_path, preset):
    torch.manual_seed(0)
    cfg = CGFormerConfig.preset(preset)
    model = CGFormer(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    # no tokenizer given: the folder says so in its card, and holds everything else
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                 "preprocessor_config.json"]
    loaded = CGFormer.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg
    size = cfg.image_size if preset in ("tiny", "demo") else 96
    images, ids, mask, _ = make_batch(b=1, h=size, w=size)
    with torch.no_grad():  # (the demo preset draws Gumbel noise at eval: the same seed for both)
        assert torch.equal(torch.manual_seed(0) and model(images, ids, mask),
                           torch.manual_seed(0) and loaded(images, ids, mask))


def test_convert_official_to_a_model_folder(tmp_path):
    """`rexfast convert` reads the released format (weights_only) and writes a model folder."""
    import subprocess
    import sys

    from rexfast.models.text import BERT_BASE_UNCASED

    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=128, depths=(1, 1, 1, 1), num_heads=(4, 8, 16, 32), window_size=12)
    model = CGFormer(CGFormerConfig.released(swin=swin, bert=dict(BERT_BASE_UNCASED, num_hidden_layers=1),
                                             image_size=64)).eval()
    official = tmp_path / "cgformer_refcoco.pth"
    torch.save({"epoch": 3, **to_official_state_dict(model, ddp_prefix=True)}, official)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "dog"]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "rexfast", "convert", "--official", official, "--out",
                           tmp_path / "converted", "--tokenizer", vocab], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # self-contained: the tokenizer and the input size the weights imply (positional embeddings for 64²)
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
        "vocab.txt"]
    assert json.loads((tmp_path / "converted" / "preprocessor_config.json").read_text())["size"]["height"] == 64
    loaded = CGFormer.from_pretrained(tmp_path / "converted")
    images, ids, mask, _ = make_batch(b=1)
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask), loaded(images, ids, mask))


def test_from_official_accepts_exactly_the_released_key_set():
    """The released checkpoint's key names and shapes (a fixture of facts read by
    building the authors' model, not produced by rexfast's own mapping): every
    key is used, none is missing, the architecture inferred is the released one."""
    import json
    from pathlib import Path

    from rexfast.models.cgformer.checkpoint import check_keys

    fixture = json.loads((Path(__file__).parent / "fixtures" / "cgformer_released_keys.json").read_text())
    assert fixture["num_keys"] == len(fixture["keys"]) == 752
    state = {k: torch.empty(shape, device="meta") for k, shape in fixture["keys"].items()}
    config = config_from_state_dict(read_checkpoint({"model_state_dict": state}))
    assert config == CGFormerConfig.released()
    with torch.device("meta"):
        model = CGFormer(config)
    kept = check_keys(model, state)
    assert set(kept) == set(state) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == fixture["num_parameters"]


def test_forward_takes_every_argument_positionally():
    # torch.onnx's legacy (TorchScript) exporter passes forward's defaults positionally;
    # a keyword-only parameter made it fail with "takes from 4 to 5 positional arguments".
    import inspect

    from rexfast.models.registry import MODELS

    for entry in MODELS.values():
        kinds = [p.kind for p in inspect.signature(entry.model_class.forward).parameters.values()]
        assert inspect.Parameter.KEYWORD_ONLY not in kinds, entry.name
    model = tiny_model().eval()
    images, ids, mask, _ = make_batch()
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask, None, None), model(images, ids, mask))


@pytest.mark.parametrize("swin", [0, 1.5, [], None, True])
def test_a_swin_field_of_the_wrong_kind_is_a_type_error(swin):
    # it used to fail later, on `self.swin.depths`, with an AttributeError
    with pytest.raises(TypeError, match="swin"):
        CGFormerConfig.from_dict({**CGFormerConfig.tiny().to_dict(), "swin": swin})
