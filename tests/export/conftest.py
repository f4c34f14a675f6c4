"""Tiny CGFormer and ReLA exported once per session and mode (each export takes ~30 s on 2 cores)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

IMAGE = 64  # the tiny presets' size


def tiny_model(name: str):
    from rexfast.models import CGFormer, CGFormerConfig, ReLA, ReLAConfig

    torch.manual_seed(0)
    model = CGFormer(CGFormerConfig.tiny()) if name == "cgformer" else ReLA(ReLAConfig.tiny())
    with torch.no_grad():  # move the zero-initialised gates and projections off zero: every path matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(model name, mode) -> (model, ExportResult, file bytes), exported on first use."""
    from rexfast.export import export_onnx

    cache = {}

    def get(name: str, mode: str):
        if (name, mode) not in cache:
            model = tiny_model(name).train()  # exported from training mode: it must come back as it was
            before = {k: v.clone() for k, v in model.state_dict().items()}
            path = tmp_path_factory.mktemp(f"{name}-{mode}") / "model.onnx"
            result = export_onnx(model, path, image_size=IMAGE, mode=mode)
            untouched = model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            cache[name, mode] = (model.eval(), result, path.read_bytes(), untouched)
        return cache[name, mode][:3]

    get.untouched = lambda name, mode: cache[name, mode][3]
    return get
