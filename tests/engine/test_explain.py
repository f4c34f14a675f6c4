"""Explain: what each model grouped for one prediction (``Segmenter(..., explain=True)``,
``rexfast predict --explain``): the maps' shapes and normalisation, that they come from the
very forward pass that made the answer, and that a plain call computes and keeps none of it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rexfast.data import collate
from rexfast.engine import builders
from rexfast.engine.config import Config, DataConfig, model_section
from rexfast.engine.explain_figure import explain_png
from rexfast.engine.segmenter import Segmenter
from rexfast.models.explain import RegionMinimap, TokenGrouping
from rexfast.models.preprocessing import default_preprocessing

SIZE = 64  # the tiny ReLA needs at least 64²


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_data")
    data = DataConfig(dataset="synthetic", root=str(root), image_size=SIZE)
    builders.generate_synthetic_data(data, n_train=1, n_val=1, n_test=2, seed=4)
    image = sorted((root / "synthetic" / "images").glob("test_*.png"))[0]
    return data, builders.build_tokenizer(data), image


def _segmenter(scene, name, seed=0, **model):
    data, tokenizer, _ = scene
    torch.manual_seed(seed)
    cfg = Config(data=data, model=model_section({"name": name, "preset": "tiny", **model}, data))
    net = builders.build_model(cfg, tokenizer)
    return Segmenter(net, tokenizer, default_preprocessing(net.config).replace(image_size=SIZE, max_tokens=20))


@pytest.fixture(scope="module")
def cgformer(scene):
    return _segmenter(scene, "cgformer", eval_noise=True)  # noise at inference: the demo preset's way


@pytest.fixture(scope="module")
def rela(scene):
    return _segmenter(scene, "rela")


def _no_hooks(model) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("which", ["cgformer", "rela"])
def test_explained_answer_equals_the_plain_one_and_a_plain_call_keeps_nothing(which, request, scene):
    seg = request.getfixturevalue(which)
    image = scene[2]
    plain = seg(image, "the red circle")
    explained = seg(image, "the red circle", explain=True)
    assert plain.internals is None
    np.testing.assert_array_equal(plain.mask, explained.mask)
    np.testing.assert_array_equal(plain.probability, explained.probability)
    assert (plain.no_target, plain.no_target_prob) == (explained.no_target, explained.no_target_prob)
    assert _no_hooks(seg.model)  # explain installs nothing that a later plain call would run
    # the Segmenter-wide default, and a per-call override back to plain
    always = Segmenter(seg.model, seg.tokenizer, seg.preprocessing, explain=True)
    assert always(image, "the red circle").internals is not None
    assert always(image, "the red circle", explain=False).internals is None
    with pytest.raises(TypeError, match="explain must be True or False"):
        Segmenter(seg.model, seg.tokenizer, seg.preprocessing, explain="yes")
    with pytest.raises(TypeError, match="explain must be True or False"):
        seg(image, "the red circle", explain=1)


def test_rela_plain_forward_keeps_no_region_masks(rela, scene):
    item = rela.processor(scene[2], "the red circle")
    batch = collate([item], "cpu")
    with torch.no_grad():
        out = rela.model.forward_features(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert "region_logits" not in out and "region_embed" not in out


def test_cgformer_token_maps_shapes_and_normalisation(cgformer, scene):
    result = cgformer(scene[2], "the blue square", explain=True)
    grouping = result.internals
    assert isinstance(grouping, TokenGrouping)
    n = cgformer.model.config.num_tokens
    assert grouping.referent == n - 1 and grouping.token_names[-1] == "referent"
    assert [s.shape for s in grouping.stages] == [(n, SIZE // 16, SIZE // 16), (n, SIZE // 8, SIZE // 8),
                                                  (n, SIZE // 4, SIZE // 4)]
    for stage in grouping.stages:
        assert stage.dtype == np.float32
        assert set(np.unique(stage)) <= {0.0, 1.0}  # hard assignments
        np.testing.assert_array_equal(stage.sum(axis=0), 1.0)  # every pixel claimed by exactly one token


@pytest.mark.parametrize("seed", [0, 5])
def test_cgformer_referent_final_map_is_the_assignment_that_made_the_mask(cgformer, scene, seed):
    """The map explain returns is the last group block's assignment in the forward pass that
    produced this mask: the same Gumbel draw (the Segmenter's seed), not another run's."""
    seg = Segmenter(cgformer.model, cgformer.tokenizer, cgformer.preprocessing, seed=seed)
    result = seg(scene[2], "the blue square", explain=True)
    item = seg.processor(scene[2], "the blue square")
    batch = collate([item], "cpu")
    with torch.no_grad():
        out = seg.model.forward_features(batch["image"], batch["input_ids"], batch["attention_mask"],
                                         sample_seeds=[seed])
    last = out["hit_maps"][-1][0]  # (N, h, w): the straight-through assignment of the last stage
    np.testing.assert_array_equal(result.internals.referent_map(), (last.argmax(0) == last.shape[0] - 1).numpy())
    np.testing.assert_allclose(result.internals.stages[-1], last.numpy(), atol=1e-6)
    # and the mask came out of that same pass
    prob = out["logits"].float().sigmoid()[0, 0].numpy()
    np.testing.assert_array_equal(result.probability, prob)


def test_cgformer_maps_follow_the_noise_draw(cgformer, scene):
    """Two seeds draw different Gumbel noise, so the captured assignments differ: the maps are
    this call's, not a fixed picture."""
    maps = [Segmenter(cgformer.model, cgformer.tokenizer, cgformer.preprocessing, seed=s)(
        scene[2], "the blue square", explain=True).internals.stages[-1] for s in (0, 5)]
    assert not np.array_equal(maps[0], maps[1])


def test_rela_minimap_and_regions_shapes_normalisation_and_sum(rela, scene):
    result = rela(scene[2], "the red circle", explain=True)
    record = result.internals
    assert isinstance(record, RegionMinimap)
    q = rela.model.config.num_queries
    g = int(round(q ** 0.5))
    assert record.minimap_logits.shape == (q, 2)
    assert record.region_logits.shape == (q, SIZE // 4, SIZE // 4)
    assert record.minimap.shape == (g, g)
    assert ((record.minimap >= 0) & (record.minimap <= 1)).all()
    weighted = record.weighted_regions()
    assert weighted.shape == (q, SIZE // 4, SIZE // 4)
    assert ((weighted >= 0) & (weighted <= 1)).all()
    # query q is cell (q // g, q % g), and the minimap is the softmax target probability
    x = torch.as_tensor(record.minimap_logits)
    np.testing.assert_allclose(record.minimap.reshape(-1), x.softmax(-1)[:, 1].numpy(), rtol=1e-5, atol=1e-6)
    top = record.strongest(4)
    assert list(top) == list(np.argsort(-record.weights)[:4]) and len(set(top.tolist())) == 4
    # the target mask is the minimap-weighted sum of the region masks: resized and squashed as
    # ReLA's predict does, Σ_q w_q M_r[q] gives the answer's probability
    logit = torch.as_tensor(record.target_logit)[None, None]
    prob = torch.sigmoid(F.interpolate(logit, size=(SIZE, SIZE), mode="bilinear", align_corners=False))[0, 0]
    np.testing.assert_allclose(prob.numpy(), result.probability, atol=2e-5)


@pytest.mark.parametrize("which", ["cgformer", "rela"])
def test_explain_figure_renders(which, request, scene):
    seg = request.getfixturevalue(which)
    result = seg(scene[2], "the red circle", explain=True)
    png = explain_png(result)
    figure = Image.open(io.BytesIO(png))
    assert figure.format == "PNG" and figure.width > 400 and figure.height > 300
    assert len(np.unique(np.asarray(figure.convert("L")))) > 20  # drawn, not blank
    with pytest.raises(ValueError, match="explain=True"):
        explain_png(seg(scene[2], "the red circle"))


def test_predict_cli_explain_writes_the_figure(tiny_cgformer_run, tmp_path):
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "-m", "rexfast", "predict", "--checkpoint", str(tiny_cgformer_run["best"]),
                           "--image", str(tiny_cgformer_run["image"]), "--text", "the red circle", "--out-dir",
                           str(out), "--explain", "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert [p.name.rsplit("_", 1)[1] for p in written] == ["mask.png", "overlay.png", "explain.png"]
    assert Image.open(written[2]).format == "PNG"
