"""Training, evaluation, prediction and the command line, end to end on small
synthetic data: DDP (gloo, two processes) equals single-process accumulation,
kill-and-resume equals an uninterrupted run, every command's error path.

Most commands run through ``rexfast.cli.main`` in this process (:func:`_main`): a fresh
interpreter costs seconds of imports per call. Real processes are kept where the process is
the point: the killed training runs, torchrun, ``rexfast info`` of the test environment and
the demo."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rexfast.engine.checkpoint import load as load_checkpoint
from rexfast.engine.config import Config, DataConfig, TrainConfig, model_section

TINY_MODEL = {"name": "cgformer", "preset": "tiny", "decoder_dropout": 0.0}


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


def _main(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    """``rexfast ARGS`` through cli.main in this process, on one thread as the subprocesses
    (OMP_NUM_THREADS=1), so that a run here and a run in a subprocess agree bit for bit:
    the exit code, stdout and stderr as :func:`_rexfast` returns them."""
    from rexfast.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads, before = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)
    proc = subprocess.CompletedProcess(["rexfast", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"rexfast {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _synthetic_root(tmp_path_factory, name: str, n_train: int, n_val: int, n_test: int) -> Path:
    """A folder of synthetic 32² scenes (seed 3) with the given split sizes."""
    from rexfast.engine import builders

    root = tmp_path_factory.mktemp(name)
    builders.generate_synthetic_data(DataConfig(dataset="synthetic", root=str(root), image_size=32),
                                     n_train=n_train, n_val=n_val, n_test=n_test, seed=3)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return _synthetic_root(tmp_path_factory, "synthetic", 24, 6, 6)


def _config(data_root: Path, out: Path, *, data: dict | None = None, **train) -> Path:
    data_cfg = DataConfig(**{**dict(dataset="synthetic", root=str(data_root), image_size=32), **(data or {})})
    cfg = Config(
        data=data_cfg,
        model=model_section(dict(TINY_MODEL), data_cfg),
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
    _main("train", "--config", cfg, "--no-progress")
    assert {"last.pt", "best.pt", "log.jsonl", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert any(r["kind"] == "eval" and "gIoU" in r for r in records)
    last = load_checkpoint(out / "last.pt")
    assert last["train_state"]["step"] == 3 and "optimizer" in last
    assert all(g["fused"] for g in last["optimizer"]["param_groups"])  # one fused AdamW kernel on CPU

    metrics_json = tmp_path / "metrics.json"
    proc = _main("eval", "--checkpoint", out / "best.pt", "--split", "test", "--out", metrics_json)
    metrics = json.loads(metrics_json.read_text())
    for key in ("gIoU", "cIoU", "N-acc", "T-acc"):
        assert key in metrics and key in proc.stdout
    assert metrics["split"] == "test" and metrics["count"] > 0


def test_ddp_two_processes_match_one_process_accumulating_two(data_root, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _main("train", "--config", _config(data_root, single, max_steps=3, grad_accum=2), "--no-progress")
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


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """Four training and two validation scenes: an epoch of a few steps, and a short evaluation."""
    return _synthetic_root(tmp_path_factory, "small", 4, 2, 2)


def _killed(*args, crash_after: int) -> int:
    """``rexfast ARGS`` in a child forked from this process (so it starts with the imports
    done), killed abruptly (``os._exit``: no cleanup, no final checkpoint) after optimizer step
    ``crash_after``: its exit code."""
    import multiprocessing

    from rexfast.engine.trainer import CRASH_ENV

    def child():
        os.environ[CRASH_ENV] = str(crash_after)
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
        _main(*args, check=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's OpenMP must not need the parent's thread pool
    try:
        process = multiprocessing.get_context("fork").Process(target=child)
        process.start()
        process.join(timeout=900)
    finally:
        torch.set_num_threads(threads)
    if process.exitcode is None:
        process.kill()
        raise AssertionError("the training run meant to be killed did not end")
    return process.exitcode


def _kill_and_resume(data_root, tmp_path, *, crash_after: int, max_steps: int, **train):
    """Train uninterrupted; train again, killed after `crash_after` steps, then resumed:
    the weights (torch.equal) and the last losses must agree."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    _main("train", "--config", _config(data_root, full, max_steps=max_steps, **train), "--no-progress")
    cfg = _config(data_root, broken, max_steps=max_steps, **train)
    assert _killed("train", "--config", cfg, "--no-progress", crash_after=crash_after) == 3  # the os._exit(3)
    saved = load_checkpoint(broken / "last.pt")["train_state"]["step"]
    assert saved < crash_after
    _main("train", "--config", cfg, "--resume", broken / "last.pt", "--no-progress")
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(broken / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == max_steps
    _assert_same_weights(a["model"], b["model"], exact=True)
    assert _train_losses(full)[-2:] == _train_losses(broken)[-2:]
    return a, b


def test_kill_and_resume_equals_uninterrupted(small_root, tmp_path):
    _kill_and_resume(small_root, tmp_path, crash_after=3, max_steps=5, ckpt_every=2)


def test_kill_and_resume_across_an_epoch_boundary(small_root, tmp_path):
    # n steps per epoch: the checkpoint is taken at step n - 2 of epoch 0, the run is killed
    # after step n - 1, and the resumed run crosses into epoch 1 and stops at step n + 2
    from rexfast.engine import builders

    data = DataConfig(dataset="synthetic", root=str(small_root), image_size=32)
    n = len(builders.build_dataset(data, "train", train=True, tokenizer=builders.build_tokenizer(data))) // 4
    assert n >= 4, n
    a, b = _kill_and_resume(small_root, tmp_path, crash_after=n - 1, max_steps=n + 2, epochs=3, ckpt_every=n - 2,
                            batch_size=4)
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 1


def test_kill_and_resume_with_a_grad_scaler(small_root, tmp_path):
    # fp16 autocast on CPU: a GradScaler whose scale and growth tracker must resume exactly
    a, b = _kill_and_resume(small_root, tmp_path, crash_after=3, max_steps=5, ckpt_every=2, amp="fp16")
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0


@pytest.fixture(scope="module")
def trained_checkpoint(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _main("train", "--config", _config(data_root, out, max_steps=1, epochs=1), "--no-progress")
    return out / "best.pt"


def _written(proc) -> tuple[Path, Path]:
    lines = proc.stdout.split("\n")
    mask_path, overlay_path = (Path(line) for line in lines if line.endswith(".png"))
    return mask_path, overlay_path


def test_predict_writes_mask_and_overlay(trained_checkpoint, data_root, tmp_path):
    from PIL import Image

    from rexfast.engine.predictor import output_stem

    image = next((data_root / "synthetic" / "images").glob("*.png"))
    proc = _main("predict", "--checkpoint", trained_checkpoint, "--image", image, "--text", "the red circle",
                    "--out-dir", tmp_path)
    mask_path, overlay_path = _written(proc)
    stem = output_stem(image, "the red circle")
    assert stem.startswith(f"{image.stem}_the-red-circle_")
    assert mask_path.name == f"{stem}_mask.png" and overlay_path.name == f"{stem}_overlay.png"
    with Image.open(image) as src, Image.open(mask_path) as mask, Image.open(overlay_path) as over:
        assert mask.size == src.size == over.size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    # the same model from its self-contained model folder, which needs no other file
    folder = trained_checkpoint.parent / "best"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "preprocessor_config.json", "tokenizer_config.json",
                                                        "vocab.txt"]
    proc = _main("predict", "--checkpoint", folder, "--image", image, "--text", "the red circle", "--out-dir",
                    tmp_path / "from_folder")
    mask2, _ = _written(proc)
    with Image.open(mask_path) as m1, Image.open(mask2) as m2:
        assert np.array_equal(np.asarray(m1), np.asarray(m2))


def test_eval_from_another_folder_finds_the_data(trained_checkpoint, data_root, tmp_path):
    """Checkpoints store the data paths resolved at training time."""
    run = tmp_path / "rel"
    rel_root = os.path.relpath(data_root, tmp_path)
    cfg = _config(Path(rel_root), run, max_steps=1, epochs=1)
    _main("train", "--config", cfg, "--no-progress", cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _main("eval", "--checkpoint", run / "best.pt", "--split", "test", cwd=elsewhere)
    assert "gIoU" in proc.stdout
    moved = _error(_main("eval", "--checkpoint", run / "best.pt", "--set", "data.root=/nonexistent", check=False))
    assert "--set data.root=" in moved


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
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")

    assert "not found" in _error(_main("predict", "--checkpoint", tmp_path / "missing.pt", "--image", image,
                                          "--text", "x", "--out-dir", out, check=False))
    assert "image" in _error(_main("predict", "--checkpoint", trained_checkpoint, "--image", junk_image,
                                      "--text", "the red circle", "--out-dir", out, check=False))
    assert "image not found" in _error(_main("predict", "--checkpoint", trained_checkpoint, "--image",
                                                tmp_path / "nope.png", "--text", "x", "--out-dir", out, check=False))
    assert "empty" in _error(_main("predict", "--checkpoint", trained_checkpoint, "--image", image, "--text", "  ",
                                      "--out-dir", out, check=False))
    assert "--out-dir" in _error(_main("predict", "--checkpoint", trained_checkpoint, "--image", image, "--text",
                                          "the red circle", "--out-dir", a_file, check=False))
    assert "--out" in _error(_main("eval", "--checkpoint", trained_checkpoint, "--out", a_file / "m.json",
                                      check=False))
    assert "--batch-size" in _error(_main("eval", "--checkpoint", trained_checkpoint, "--batch-size", "0",
                                             check=False))
    _error(_main("eval", "--checkpoint", junk_ckpt, check=False))
    _error(_main("eval", "--checkpoint", trained_checkpoint, "--split", "nosuchsplit", check=False))
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("train:\n  learning_rate: 1\n")
    assert "learning_rate" in _error(_main("train", "--config", bad_cfg, check=False))
    assert not out.exists() or not any(out.iterdir()), "a failed command left files behind"


def test_a_checkpoint_of_another_architecture_is_one_error_listing_the_keys(trained_checkpoint, tmp_path):
    ckpt = load_checkpoint(trained_checkpoint)
    ckpt["config"]["model"]["token_dim"] = 48  # the weights say 32
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    line = _error(_main("eval", "--checkpoint", other, check=False))
    assert "do not fit" in line and "shape mismatches" in line and "decoder.cgattention1.k_proj.weight" in line


@pytest.mark.parametrize("case", ["image_size", "data_root", "resume_missing", "resume_weights_only",
                                  "no_target_repeat"])
def test_train_that_fails_on_bad_input_writes_nothing(trained_checkpoint, data_root, tmp_path, case):
    out = tmp_path / "run"
    cfg = _config(data_root, out, max_steps=1)
    raw = yaml.safe_load(cfg.read_text())
    if case == "image_size":  # the input size the model would fail on (not a multiple of 32)
        raw["data"]["image_size"] = 48
        del raw["model"]["image_size"]
    if case == "data_root":
        raw["data"]["root"] = str(tmp_path / "nope")
    if case == "no_target_repeat":
        raw["data"]["no_target_repeat"] = 0
    cfg.write_text(yaml.safe_dump(raw))
    extra = {"resume_missing": ["--resume", tmp_path / "absent.pt"],
             "resume_weights_only": ["--resume", trained_checkpoint]}.get(case, [])
    line = _error(_main("train", "--config", cfg, "--no-progress", *extra, check=False))
    assert {"image_size": "multiple of 32", "data_root": "not found", "resume_missing": "not found",
            "resume_weights_only": "weights only", "no_target_repeat": "no_target_repeat must be >= 1"}[case] in line
    assert not out.exists(), f"{case}: the failed run left {sorted(p.name for p in out.iterdir())}"


def test_no_target_repeat_reaches_the_training_set_only(data_root):
    from rexfast.engine import builders

    cfg = DataConfig(dataset="synthetic", root=str(data_root), image_size=32, no_target_repeat=3)
    tokenizer = builders.build_tokenizer(cfg)
    once = builders.build_dataset(DataConfig(dataset="synthetic", root=str(data_root), image_size=32), "train",
                                  train=True, tokenizer=tokenizer)
    train = builders.build_dataset(cfg, "train", train=True, tokenizer=tokenizer)
    no_target = sum(map(once.index.is_no_target, once.refs))  # from the annotations, without loading images
    assert no_target > 0 and len(train) == len(once) + 2 * no_target
    val = builders.build_dataset(cfg, "val", train=False, tokenizer=tokenizer)
    assert val.no_target_repeat == 1  # evaluation scores every sentence once


def test_torchrun_reports_a_config_error_once(tmp_path):
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("train:\n  learning_rate: 1\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rexfast",
           "train", "--config", str(bad_cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("rexfast: error:") == 1, proc.stderr[-3000:]


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
    proc = _main("info")
    assert "group_assign" in proc.stdout and "rexfast_extension" in proc.stdout


def test_demo_quick_runs_end_to_end_and_writes_everything(tmp_path):
    out = tmp_path / "demo"
    proc = _rexfast("demo", "--quick", "--out", out, "--no-progress")
    result = json.loads((out / "demo_metrics.json").read_text())
    for phase in ("untrained", "trained"):
        assert {"gIoU", "N-acc", "T-acc", "cIoU", "Pr@0.8"} <= set(result[phase])
    assert Path(result["training_curve"]).is_file() and result["overlays"]
    assert all(Path(p).is_file() for p in result["overlays"])
    assert "gIoU" in proc.stdout and "untrained" in proc.stdout
    assert "--quick is a smoke test" in proc.stdout  # why its 'trained' column may be the lower one
    # it ends with the next step, the page for the model it trained, whose example rows are its scenes
    assert proc.stdout.strip().splitlines()[-1].endswith(f"rexfast serve {out / 'train' / 'best'}")
    from rexfast.serve.examples import demo_data_root

    assert demo_data_root(out / "train" / "best") == (out / "data").resolve()
    shutil.rmtree(out)


def test_rela_trains_evaluates_and_predicts_through_the_same_commands(data_root, tmp_path):
    from PIL import Image

    out = tmp_path / "rela"
    cfg = _config(data_root, out, max_steps=2, epochs=1)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = {"name": "rela", "preset": "tiny"}
    raw["data"].update(mask_resize="polygon", eval_resolution="input", image_size=64)
    cfg.write_text(yaml.safe_dump(raw))
    _main("train", "--config", cfg, "--no-progress")
    proc = _main("eval", "--checkpoint", out / "best.pt", "--split", "test")
    assert "gIoU" in proc.stdout and "N-acc" in proc.stdout
    image = next((data_root / "synthetic" / "images").glob("*.png"))
    # a model whose no-target head always fires: predict says so and writes an empty mask
    ckpt = load_checkpoint(out / "best.pt")
    ckpt["model"]["sem_seg_head.predictor.nt_embed.layers.1.bias"] = torch.tensor([-50.0, 50.0])
    torch.save(ckpt, tmp_path / "nothing.pt")
    proc = _main("predict", "--checkpoint", tmp_path / "nothing.pt", "--image", image, "--text", "the purple star",
                    "--out-dir", tmp_path / "pred")
    assert proc.stdout.startswith("no target")
    mask_path, _ = _written(proc)
    with Image.open(mask_path) as mask:
        assert not np.asarray(mask).any()
