"""Helpers of the web page tests: the serve extra's modules (skip, or fail under CI), a free port,
and a demo-like model layout (model folders beside the synthetic data, as ``rexfast demo`` writes them)."""

from __future__ import annotations

import os
import socket

import pytest
import torch


def require(module: str):
    """``module``, or a skip naming the serve extra; under CI=true a missing one fails the test
    (CI installs the serve extra: a skip there would hide the page's tests)."""
    try:
        return __import__(module)
    except ImportError as exc:
        message = f"{module} is not installed (pip install -e \".[serve]\"): {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_demo_layout(root, *, models=("rela", "cgformer"), size: int = 64, n_test: int = 6) -> dict:
    """``<root>/data`` (synthetic scenes) and ``<root>/train/<model>`` model folders (tiny, untrained,
    seed 0), laid out as ``rexfast demo`` lays out its run; returns the paths."""
    from rexfast.engine import builders
    from rexfast.engine.config import Config, DataConfig, model_section
    from rexfast.models.preprocessing import default_preprocessing

    data = DataConfig(dataset="synthetic", root=str(root / "data"), image_size=size)
    builders.generate_synthetic_data(data, n_train=1, n_val=1, n_test=n_test, seed=3)
    tokenizer = builders.build_tokenizer(data)
    folders = {}
    for name in models:
        torch.manual_seed(0)
        cfg = Config(data=data, model=model_section({"name": name, "preset": "tiny"}, data))
        model = builders.build_model(cfg, tokenizer).eval()
        folders[name] = model.save_pretrained(
            root / "train" / name, tokenizer=tokenizer,
            preprocessing=default_preprocessing(model.config).replace(image_size=size, max_tokens=20))
    images = sorted((root / "data" / "synthetic" / "images").glob("test_*.png"))
    return {"root": root, "data": root / "data", "folders": folders, "images": images}
