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


def _in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``rexfast ARGS`` through cli.main in this process (no interpreter start-up): the exit
    code, stdout and stderr as :func:`_rexfast` returns them."""
    from rexfast.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["rexfast", *map(str, args)], code, out, err)


@pytest.fixture
def run(tiny_cgformer_run):
    """The shared tiny training run's folder (best.pt, best/)."""
    return tiny_cgformer_run["out"]


def test_export_a_training_checkpoint_at_its_training_size(run, tmp_path):
    import onnx

    from rexfast.export import check_tensorrt_compatibility

    out = tmp_path / "exports" / "cgformer.onnx"
    proc = _rexfast("export", "--checkpoint", run / "best.pt", "--out", out)
    summary = _ok(proc)
    assert proc.stderr == ""  # the exporter's known chatter (torchvision, deprecations, constant folding) is gone
    assert summary["model"] == "cgformer" and summary["mode"] == "decomposed" and summary["opset"] == 18
    assert summary["image_size"] == [32, 32]  # the checkpoint's data.image_size
    assert summary["inputs"] == ["images", "input_ids", "attention_mask"] and summary["outputs"] == ["logits"]
    assert summary["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "text_length"}
    assert summary["rexfast_nodes"] == {}
    assert summary["onnxruntime_vs_torch_max_abs_error"]["logits"] < 1e-5
    proto = onnx.load(out)
    assert check_tensorrt_compatibility(proto) == []
    # everything needed to feed the file without rexfast (the README's export section lists the keys)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model_type"] == "cgformer" and json.loads(props["image_size"]) == [32, 32]
    assert json.loads(props["image_mean"]) == [0.485, 0.456, 0.406] and json.loads(props["image_std"]) == [
        0.229, 0.224, 0.225]
    assert props["text_max_tokens"] == "20" and "WordPiece" in props["tokenizer"]
    vocab = props["tokenizer_vocab"].split("\n")
    assert vocab[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] and "circle" in vocab
    assert json.loads(props["model_config"])["token_dim"] == 32 and props["rexfast_version"]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(f"`{key}`" in readme for key in props), sorted(k for k in props if f"`{k}`" not in readme)
    assert sorted(p.name for p in out.parent.iterdir()) == ["cgformer.onnx"]  # no temporary left


@pytest.mark.slow  # a second real export (~30 s); the default run has the cheap sibling below
def test_export_a_model_folder_hybrid_at_another_size(run, tmp_path):
    out = tmp_path / "cgformer-64.onnx"
    summary = _ok(_rexfast("export", "--checkpoint", run / "best", "--out", out, "--mode", "hybrid",
                           "--image-size", "64", "--no-verify"))
    assert summary["image_size"] == [64, 64] and summary["rexfast_nodes"] == {"group_assign": 3}
    assert summary["onnxruntime_vs_torch_max_abs_error"].startswith("not verified")
    assert out.is_file()


def test_the_flags_reach_the_exporter_and_its_result_is_printed(run, tmp_path, monkeypatch, capsys):
    """A model folder, --mode hybrid, --image-size 64 and --no-verify as export_onnx receives them,
    and the summary printed from what it returns. The real hybrid export of the tiny CGFormer at
    64² is tests/export/test_onnx_export.py's; this one's real twin is marked slow."""
    import rexfast.export
    from rexfast.export import ExportResult

    received = {}

    def fake_export(model, path, **kwargs):
        received.update(kwargs, model=type(model).__name__, path=path)
        return ExportResult(path=Path(path), model_type="cgformer", mode=kwargs["mode"], opset=kwargs["opset"],
                            image_size=(kwargs["image_size"],) * 2, input_names=("images", "input_ids",
                                                                                   "attention_mask"),
                            output_names=("logits",), dynamic_axes={"images": {0: "batch"}},
                            op_counts={("rexfast", "group_assign"): 3, ("", "MatMul"): 7}, bytes=2**20)

    monkeypatch.setattr(rexfast.export, "export_onnx", fake_export)
    out = tmp_path / "cgformer-64.onnx"
    summary = _ok(_in_process(capsys, "export", "--checkpoint", run / "best", "--out", out, "--mode", "hybrid",
                              "--image-size", "64", "--no-verify"))
    assert received["model"] == "CGFormer" and received["path"] == out
    assert received["mode"] == "hybrid" and received["verify"] is False and received["opset"] == 18
    assert received["image_size"] == 64  # "64": one side, export_onnx makes it square
    assert received["metadata"]["text_max_tokens"] == "20"
    assert summary["image_size"] == [64, 64] and summary["rexfast_nodes"] == {"group_assign": 3}
    assert summary["onnxruntime_vs_torch_max_abs_error"].startswith("not verified")
    assert summary["dynamic_axes"] == {"images": {"0": "batch"}} and summary["megabytes"] == 1.0


def test_bad_inputs_fail_with_one_line_and_write_nothing(run, tmp_path, capsys):
    """In-process (every check comes before the export), and once through a real process."""
    junk = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk)
    folder = tmp_path / "a_folder.onnx"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out" / "m.onnx"
    best = run / "best.pt"

    def error(*args) -> str:
        return _one_error(_in_process(capsys, "export", "--checkpoint", *args))

    assert "not found" in _one_error(_rexfast("export", "--checkpoint", tmp_path / "missing.pt", "--out", out))
    assert "not a rexfast checkpoint" in error(junk, "--out", out)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert "not a rexfast model folder" in error(empty, "--out", out)
    assert "multiples of 32" in error(best, "--out", out, "--image-size", "100")
    assert "multiples of 32" in error(best, "--out", out, "--image-size", "64x70")
    assert "invalid choice" in error(best, "--out", out, "--mode", "fused")
    assert "invalid choice" in error(best, "--out", out, "--opset", "21")
    assert "is a folder" in error(best, "--out", folder)
    assert "not a folder" in error(best, "--out", a_file / "m.onnx")
    assert not out.parent.exists()
    assert list(folder.iterdir()) == [] and list(empty.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder.onnx", "empty_folder", "junk.pt"]


def test_readme_export_commands_use_existing_flags():
    # tests/engine/test_readme.py checks every README command line; this one pins that the
    # export section exists and is among them.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "rexfast export --checkpoint" in readme and "## Export" in readme


def test_a_noisy_cgformer_exports_with_the_set_its_error_names(noisy_tiny_cgformer_run, tmp_path, monkeypatch,
                                                              capsys):
    import rexfast.export
    from rexfast.cli import main

    best = noisy_tiny_cgformer_run["best"]
    assert main(["export", "--checkpoint", str(best), "--out", str(tmp_path / "m.onnx")]) == 2
    line = capsys.readouterr().err.strip()
    assert "--set model.eval_noise=false" in line and "set eval_noise=False" not in line, line
    exported = {}

    def fake_export(model, path, **kwargs):  # the real export is covered above; this checks what reaches it
        exported.update(eval_noise=model.config.eval_noise, metadata=kwargs["metadata"])
        raise ValueError("stop here")

    monkeypatch.setattr(rexfast.export, "export_onnx", fake_export)
    assert main(["export", "--checkpoint", str(best), "--out", str(tmp_path / "m.onnx"), "--set",
                 "model.eval_noise=false"]) == 2
    assert exported["eval_noise"] is False and exported["metadata"]["text_max_tokens"] == "20"
    assert not (tmp_path / "m.onnx").exists()
