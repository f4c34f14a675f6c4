"""Runtime options on the command line: ``predict`` and ``eval`` run the model as
``rexfast.optimize`` prepares it, but keep a runtime option the user set with ``--set``
(``model.ops_backend=reference`` must run every op on its reference, not be reset to the fused
backend); options a stored config held are still optimize's to choose; ``convert`` refuses
them with one error line, since a model folder does not hold them."""

from __future__ import annotations

import json

import pytest

from rexfast.cli import main
from rexfast.ops.registry import OpBackends


@pytest.fixture
def backends_run(monkeypatch):
    """The backend every op call chose, as (op, backend) pairs."""
    seen = []
    choose = OpBackends.choose

    def spy(self, device, requested):
        name = choose(self, device, requested)
        seen.append((self.op, name))
        return name

    monkeypatch.setattr(OpBackends, "choose", spy)
    return seen


def _run(capsys, *argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def test_predict_keeps_a_runtime_option_given_with_set(tiny_cgformer_run, tmp_path, capsys, backends_run):
    run = tiny_cgformer_run
    argv = ["predict", "--checkpoint", run["best"], "--image", run["image"], "--text", "the red circle",
            "--precision", "fp32", "--out-dir"]
    _run(capsys, *argv, tmp_path / "fused")
    fused = {name for _, name in backends_run}
    assert "cpu" in fused and "reference" not in fused  # optimize's choice: the C++ kernels
    backends_run.clear()
    _run(capsys, *argv, tmp_path / "reference", "--set", "model.ops_backend=reference")
    assert set(backends_run) == {("group_assign", "reference")}  # CGFormer's one rexfast op


def test_eval_keeps_runtime_options_given_with_set_and_records_them(tiny_cgformer_run, tmp_path, capsys,
                                                                   backends_run):
    out = tmp_path / "metrics.json"
    table = _run(capsys, "eval", "--checkpoint", tiny_cgformer_run["best"], "--max-samples", "2", "--no-progress",
                 "--set", "model.ops_backend=reference", "--set", "model.fused=false", "--out", out)
    assert backends_run and {name for _, name in backends_run} == {"reference"}
    metrics = json.loads(out.read_text())
    assert metrics["runtime"] == "ops_backend=reference, fused=False"
    assert "ops_backend=reference, fused=False" in table


def test_segmenter_keeps_given_options_but_not_stored_ones(tiny_cgformer_run, tmp_path):
    """An old folder's config.json holding ops_backend=reference (how it once ran) is read as an
    option, and optimize still runs the fused ops; the same option given as an override is kept."""
    import shutil

    from rexfast import Segmenter

    folder = tmp_path / "old"
    shutil.copytree(tiny_cgformer_run["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ops_backend": "reference", "fused": False}))
    seg = Segmenter.from_pretrained(folder, device="cpu", precision="fp32")
    assert seg.model.runtime.ops_backend is None and seg.model.runtime.fused
    assert seg.model.optimization.runtime == {}
    seg = Segmenter.from_pretrained(folder, device="cpu", precision="fp32", overrides=["model.fused=false"])
    assert seg.model.runtime.ops_backend is None and seg.model.runtime.fused is False
    assert seg.model.optimization.runtime == {"fused": False}


@pytest.mark.parametrize("option", ["model.ops_backend=reference", "model.fused=false",
                                    "model.region_masks_at_key_resolution=false"])
def test_convert_refuses_runtime_options(tiny_cgformer_run, tmp_path, capsys, option):
    out = tmp_path / "folder"
    capsys.readouterr()
    code = main(["convert", "--official", str(tiny_cgformer_run["best"]), "--out", str(out), "--set", option])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    name = option.split("=")[0]
    assert len(lines) == 1 and lines[0].startswith(f"rexfast: error: --set {name}: ") and "runtime option" in lines[0]
    assert "not part of a saved model" in lines[0] and not out.exists()


@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("source", ["best", "folder"])
@pytest.mark.parametrize("option, message", [
    ("model.ops_backend=bogus", "ops_backend must be one of reference, cpu, cuda, triton or None"),
    ("model.eval_noise=maybe", "config model.eval_noise: expected bool, got 'maybe'"),
])
def test_a_bad_set_value_is_the_users_error_not_the_checkpoints(tiny_cgformer_run, tmp_path, capsys, command, source,
                                                               option, message):
    """A bad ``--set`` value on a training checkpoint was reported as "best.pt: malformed rexfast
    checkpoint (...)", blaming a sound file; it reads as it does for a model folder, one line,
    exit 2, nothing written."""
    run = tiny_cgformer_run
    out = tmp_path / "out"
    args = (["--out", str(out / "m.onnx")] if command == "export"
            else ["--image", str(run["image"]), "--text", "the red circle", "--out-dir", str(out)])
    if command == "export":
        out.mkdir()
    code = main([command, "--checkpoint", str(run[source]), *args, "--set", option])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("rexfast: error: ") and message in lines[0] and "malformed" not in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_set_still_mends_a_checkpoint_whose_stored_option_this_version_refuses(tiny_cgformer_run, tmp_path, capsys):
    """A training checkpoint whose run config holds a runtime option this version refuses (an
    ops_backend it does not know) is the file's fault without --set, and loads with a --set that
    replaces the value (as a model folder does)."""
    import torch

    obj = torch.load(tiny_cgformer_run["best"], map_location="cpu", weights_only=True)
    obj["config"]["model"]["ops_backend"] = "gone"
    best = tmp_path / "best.pt"
    torch.save(obj, best)
    args = ["predict", "--checkpoint", str(best), "--image", str(tiny_cgformer_run["image"]), "--text", "the red circle"]
    assert main([*args, "--out-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert f"{best}: malformed rexfast checkpoint (ops_backend must be one of" in err, err
    assert main([*args, "--out-dir", str(tmp_path / "mended"), "--set", "model.ops_backend=reference"]) == 0
