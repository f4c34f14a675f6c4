"""Training, evaluation, prediction and the command line, end to end on small
synthetic data: DDP (gloo, two processes) equals single-process accumulation,
kill-and-resume equals an uninterrupted run, every command's error path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rexfast.engine.checkpoint import load as load_checkpoint
from rexfast.engine.config import Config, DataConfig, ModelConfig, TrainConfig

TINY_OPTIONS = {"decoder_dropout": 0.0}


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("REXFAST_TEST_CRASH_AFTER_STEP", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _rexfast(*args, check=True, env=None, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rexfast", *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"rexfast {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from rexfast.engine import builders

    root = tmp_path_factory.mktemp("synthetic")
    builders.generate_synthetic_data(DataConfig(dataset="synthetic", root=str(root), image_size=32),
                                     n_train=24, n_val=6, n_test=6, seed=3)
    return root


def _config(data_root: Path, out: Path, **train) -> Path:
    cfg = Config(
        data=DataConfig(dataset="synthetic", root=str(data_root), image_size=32),
        model=ModelConfig(name="cgformer", preset="tiny", options=dict(TINY_OPTIONS)),
        train=TrainConfig(**{**dict(epochs=2, batch_size=4, lr=1e-3, amp="off", device="cpu", seed=7, log_every=1,
                                    out_dir=str(out), schedule="poly"), **train}),
    )
    path = out.parent / f"{out.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _assert_same_weights(a: dict, b: dict, exact: bool):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_train_writes_logs_and_checkpoints_and_eval_reads_them(data_root, tmp_path):
    out = tmp_path / "run"
    cfg = _config(data_root, out, max_steps=3)
    _rexfast("train", "--config", cfg, "--no-progress")
    assert {"last.pt", "best.pt", "log.jsonl", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert any(r["kind"] == "eval" and "gIoU" in r for r in records)
    last = load_checkpoint(out / "last.pt")
    assert last["train_state"]["step"] == 3 and "optimizer" in last

    metrics_json = tmp_path / "metrics.json"
    proc = _rexfast("eval", "--checkpoint", out / "best.pt", "--split", "test", "--out", metrics_json)
    metrics = json.loads(metrics_json.read_text())
    for key in ("gIoU", "cIoU", "N-acc", "T-acc"):
        assert key in metrics and key in proc.stdout
    assert metrics["split"] == "test" and metrics["count"] > 0


def test_ddp_two_processes_match_one_process_accumulating_two(data_root, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _rexfast("train", "--config", _config(data_root, single, max_steps=3, grad_accum=2), "--no-progress")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rexfast",
           "train", "--config", str(_config(data_root, ddp, max_steps=3, grad_accum=1)), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _train_losses(single), _train_losses(ddp)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    # Parameters match; BatchNorm running statistics cannot: each DDP rank
    # updates them from its own micro-batch and rank 0's are broadcast, while
    # one process folds in both micro-batches.
    def params(path):
        return {k: v for k, v in load_checkpoint(path)["model"].items()
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}

    _assert_same_weights(params(single / "last.pt"), params(ddp / "last.pt"), exact=False)


def test_kill_and_resume_equals_uninterrupted(data_root, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    _rexfast("train", "--config", _config(data_root, full, max_steps=5, ckpt_every=2), "--no-progress")
    cfg = _config(data_root, broken, max_steps=5, ckpt_every=2)
    crashed = _rexfast("train", "--config", cfg, "--no-progress", check=False,
                       env=_env(REXFAST_TEST_CRASH_AFTER_STEP=3))
    assert crashed.returncode != 0
    assert load_checkpoint(broken / "last.pt")["train_state"]["step"] == 2
    _rexfast("train", "--config", cfg, "--resume", broken / "last.pt", "--no-progress")
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(broken / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 5
    _assert_same_weights(a["model"], b["model"], exact=True)
    assert _train_losses(full)[-2:] == _train_losses(broken)[-2:]


@pytest.fixture(scope="module")
def trained_checkpoint(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _rexfast("train", "--config", _config(data_root, out, max_steps=1, epochs=1), "--no-progress")
    return out / "best.pt"


def test_predict_writes_mask_and_overlay(trained_checkpoint, data_root, tmp_path):
    from PIL import Image

    image = next((data_root / "synthetic" / "images").glob("*.png"))
    proc = _rexfast("predict", "--checkpoint", trained_checkpoint, "--image", image, "--text", "the red circle",
                    "--out-dir", tmp_path)
    mask_path, overlay_path = (Path(line) for line in proc.stdout.split())
    with Image.open(image) as src, Image.open(mask_path) as mask, Image.open(overlay_path) as over:
        assert mask.size == src.size == over.size
        assert set(torch.tensor(list(mask.getdata())).unique().tolist()) <= {0, 255}


def _error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexfast: error:"), proc.stderr
    return lines[0]


def test_cli_bad_inputs_fail_with_one_clear_line(trained_checkpoint, data_root, tmp_path):
    image = next((data_root / "synthetic" / "images").glob("*.png"))
    junk_image = tmp_path / "junk.png"
    junk_image.write_bytes(b"not an image")
    junk_ckpt = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk_ckpt)
    out = tmp_path / "out"

    assert "not found" in _error(_rexfast("predict", "--checkpoint", tmp_path / "missing.pt", "--image", image,
                                          "--text", "x", "--out-dir", out, check=False))
    assert "image" in _error(_rexfast("predict", "--checkpoint", trained_checkpoint, "--image", junk_image,
                                      "--text", "the red circle", "--out-dir", out, check=False))
    assert "image not found" in _error(_rexfast("predict", "--checkpoint", trained_checkpoint, "--image",
                                                tmp_path / "nope.png", "--text", "x", "--out-dir", out, check=False))
    assert "empty" in _error(_rexfast("predict", "--checkpoint", trained_checkpoint, "--image", image, "--text", "  ",
                                      "--out-dir", out, check=False))
    _error(_rexfast("eval", "--checkpoint", junk_ckpt, check=False))
    _error(_rexfast("eval", "--checkpoint", trained_checkpoint, "--split", "nosuchsplit", check=False))
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("train:\n  learning_rate: 1\n")
    assert "learning_rate" in _error(_rexfast("train", "--config", bad_cfg, check=False))
    assert not out.exists() or not any(out.iterdir()), "a failed command left files behind"


def test_info_lists_every_backend_ci_is_meant_to_have():
    """`rexfast info` (run with the test environment: TRITON_INTERPRET=1 without a
    GPU) must list, for every op, the reference, the C++ kernel and Triton: a
    missing extension or Triton fails here instead of silently dropping tests."""
    from rexfast.ops import registry

    proc = _rexfast("info", "--json")
    info = json.loads(proc.stdout)
    assert info["rexfast_extension"] == "built", info["rexfast_extension"]
    assert not str(info["triton"]).startswith("missing"), info["triton"]
    wanted = {"reference", "cpu"} | ({"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
    assert set(info["backends_cpu"]) == set(registry.OPS)
    for op, names in info["backends_cpu"].items():
        declared = set(registry.OPS[op].names)
        assert wanted & declared <= set(names), f"{op}: {names} lacks {sorted((wanted & declared) - set(names))}"
    proc = _rexfast("info")
    assert "group_assign" in proc.stdout and "rexfast_extension" in proc.stdout


def test_demo_quick_runs_end_to_end_and_writes_everything(tmp_path):
    out = tmp_path / "demo"
    proc = _rexfast("demo", "--quick", "--out", out, "--no-progress")
    result = json.loads((out / "demo_metrics.json").read_text())
    for phase in ("untrained", "trained"):
        assert {"gIoU", "N-acc", "T-acc", "cIoU"} <= set(result[phase])
    assert (out / "training_curve.png").is_file() and result["overlays"]
    assert all(Path(p).is_file() for p in result["overlays"])
    assert "gIoU" in proc.stdout and "untrained" in proc.stdout
    shutil.rmtree(out)
