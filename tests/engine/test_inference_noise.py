"""A model that draws noise at inference (CGFormer with ``eval_noise=True``, as the demo
preset trains and evaluates it) answers the same on every run of ``rexfast predict`` and
``rexfast eval``: both seed torch's RNG before inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def noisy_run(noisy_tiny_cgformer_run):
    return noisy_tiny_cgformer_run


def test_the_noise_is_real(noisy_run):
    """Without a seed, two inferences of this model differ (what the seeding below removes)."""
    from rexfast.engine.loading import load_model

    model = load_model(noisy_run["best"]).model.eval()
    assert model.config.eval_noise
    g = torch.Generator().manual_seed(0)
    images, ids = torch.randn(2, 3, 32, 32, generator=g), torch.randint(5, 40, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        first, second = (model.inference_outputs(images, ids, mask)["logits"] for _ in range(2))
    assert not torch.equal(first, second)


def test_predict_and_eval_are_reproducible(noisy_run, tmp_path):
    """The same answer whatever state torch's global RNG was left in: the whole probability
    map ``rexfast predict`` computed (bit for bit: every threshold's mask with it), the mask
    file it wrote, and the eval table."""
    from rexfast.engine.evaluator import evaluate_checkpoint
    from rexfast.engine.predictor import predict_to_files

    from rexfast import Segmenter
    from rexfast.data import collate

    # a threshold inside this barely-trained model's narrow probability range (~0.52-0.54), so
    # that the mask file is neither empty nor full
    seg = Segmenter.from_pretrained(noisy_run["best"], device="cpu", precision="fp32")
    batch = collate([seg.processor(noisy_run["image"], "the red circle")], seg.device)
    with torch.no_grad():
        probs = seg.model.predict(batch["image"], batch["input_ids"], batch["attention_mask"],
                                  sample_seeds=[seg.seed]).mask
    threshold = float(torch.quantile(probs.flatten(), 0.5))
    runs = []
    for state in (1, 2):
        torch.manual_seed(state)
        written, result = predict_to_files(noisy_run["best"], noisy_run["image"], "the red circle",
                                           out_dir=tmp_path / f"run{state}", device="cpu", precision="fp32",
                                           mask_threshold=threshold)
        runs.append((result.probability, np.asarray(Image.open(written[0]))))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1]) and 0 < runs[0][1].astype(bool).sum() < runs[0][1].size
    tables = []
    for state in (1, 2):
        torch.manual_seed(state)
        tables.append(evaluate_checkpoint(noisy_run["best"], split="val", device="cpu"))
    assert tables[0] == tables[1]
