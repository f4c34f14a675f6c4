"""``rexfast export``: a training checkpoint and a model folder to ONNX, and every bad input
ending in one ``rexfast: error:`` line, exit code 2 and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _rexfast(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "rexfast", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def _ok(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _one_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexfast: error:"), proc.stderr
    return lines[0]


@pytest.fixture
def run(tiny_cgformer_run):
    """The shared tiny training run's folder (best.pt, best/)."""
    return tiny_cgformer_run["out"]


def test_export_a_training_checkpoint_at_its_training_size(run, tmp_path):
    import onnx

    from rexfast.export import check_tensorrt_compatibility

    out = tmp_path / "exports" / "cgformer.onnx"
    summary = _ok(_rexfast("export", "--checkpoint", run / "best.pt", "--out", out))
    assert summary["model"] == "cgformer" and summary["mode"] == "decomposed" and summary["opset"] == 18
    assert summary["image_size"] == [32, 32]  # the checkpoint's data.image_size
    assert summary["inputs"] == ["images", "input_ids", "attention_mask"] and summary["outputs"] == ["logits"]
    assert summary["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "text_length"}
    assert summary["rexfast_nodes"] == {}
    assert summary["onnxruntime_vs_torch_max_abs_error"]["logits"] < 1e-5
    proto = onnx.load(out)
    assert check_tensorrt_compatibility(proto) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["cgformer.onnx"]  # no temporary left


def test_export_a_model_folder_hybrid_at_another_size(run, tmp_path):
    out = tmp_path / "cgformer-64.onnx"
    summary = _ok(_rexfast("export", "--checkpoint", run / "best", "--out", out, "--mode", "hybrid",
                           "--image-size", "64", "--no-verify"))
    assert summary["image_size"] == [64, 64] and summary["rexfast_nodes"] == {"group_assign": 3}
    assert summary["onnxruntime_vs_torch_max_abs_error"].startswith("not verified")
    assert out.is_file()


def test_bad_inputs_fail_with_one_line_and_write_nothing(run, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk)
    folder = tmp_path / "a_folder.onnx"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out" / "m.onnx"
    best = run / "best.pt"
    assert "not found" in _one_error(_rexfast("export", "--checkpoint", tmp_path / "missing.pt", "--out", out))
    assert "not a rexfast checkpoint" in _one_error(_rexfast("export", "--checkpoint", junk, "--out", out))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert "not a rexfast model folder" in _one_error(_rexfast("export", "--checkpoint", empty, "--out", out))
    assert "multiples of 32" in _one_error(_rexfast("export", "--checkpoint", best, "--out", out,
                                                    "--image-size", "100"))
    assert "multiples of 32" in _one_error(_rexfast("export", "--checkpoint", best, "--out", out,
                                                    "--image-size", "64x70"))
    assert "invalid choice" in _one_error(_rexfast("export", "--checkpoint", best, "--out", out, "--mode", "fused"))
    assert "invalid choice" in _one_error(_rexfast("export", "--checkpoint", best, "--out", out, "--opset", "21"))
    assert "is a folder" in _one_error(_rexfast("export", "--checkpoint", best, "--out", folder))
    assert "not a folder" in _one_error(_rexfast("export", "--checkpoint", best, "--out", a_file / "m.onnx"))
    assert not out.parent.exists()
    assert list(folder.iterdir()) == [] and list(empty.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder.onnx", "empty_folder", "junk.pt"]


def test_readme_export_commands_use_existing_flags():
    # tests/engine/test_readme.py checks every README command line; this one pins that the
    # export section exists and is among them.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "rexfast export --checkpoint" in readme and "## Export" in readme
