"""What a new user meets first: every command's bad input is one ``rexfast: error:`` line and
exit code 2 before any work (a read-only output folder, a device this torch lacks, a file
that is not a checkpoint, another model's checkpoint to resume, no config), advice the
command line can follow, warnings where the input is cut or unknown, and help that explains.

The commands run in this process (``rexfast.cli.main``): their error paths return before
any long work, so each costs milliseconds instead of a fresh interpreter."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from rexfast.cli import build_parser, main


def _error(capsys, *argv) -> str:
    """Run ``rexfast argv`` here; it must fail with exactly one ``rexfast: error:`` line and exit 2."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexfast: error: "), err[-2000:]
    return lines[0]


def _writable(folder: Path) -> bool:
    try:
        probe = folder / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written in, even by root (who ignores permission bits): its mode
    is 0o555 and, where that is not enough, it is made immutable (``chattr +i``, ext4/xfs/btrfs)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if _writable(folder) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if _writable(folder):
            pytest.skip("cannot make a read-only folder here (running as root, and chattr +i is not supported)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


# ----------------------------------------------------------------------------- read-only outputs
def test_output_checks_probe_writability(read_only_dir, tmp_path):
    from rexfast.io import check_output_dir, check_output_file

    with pytest.raises(ValueError, match=r"--out .*ro/new/deeper cannot be written \(in .*ro\)"):
        check_output_dir(read_only_dir / "new" / "deeper", "--out")
    with pytest.raises(ValueError, match=r"--out .*ro/m\.onnx cannot be written \(in .*ro\)"):
        check_output_file(read_only_dir / "m.onnx", "--out")
    assert check_output_dir(tmp_path / "fresh" / "run", "--out") == tmp_path / "fresh" / "run"
    assert not (tmp_path / "fresh").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]  # and leaves no probe behind


def test_every_command_refuses_a_read_only_output_before_any_work(tiny_cgformer_run, read_only_dir, capsys):
    run = tiny_cgformer_run
    commands = {
        "eval": ["eval", "--checkpoint", run["best"], "--out", read_only_dir / "e.json"],
        "export": ["export", "--checkpoint", run["best"], "--out", read_only_dir / "m.onnx"],
        "predict": ["predict", "--checkpoint", run["best"], "--image", run["image"], "--text", "the red circle",
                    "--out-dir", read_only_dir / "pred"],
        "demo": ["demo", "--quick", "--out", read_only_dir / "demo"],
        "train": ["train", "--config", run["out"] / "config.yaml", "--out", read_only_dir / "run"],
        "convert": ["convert", "--official", run["best"], "--out", read_only_dir / "folder"],
    }
    for name, argv in commands.items():
        line = _error(capsys, *argv)
        assert "cannot be written" in line and str(read_only_dir) in line, (name, line)
    assert not any(read_only_dir.iterdir())


# ----------------------------------------------------------------------------- devices
def test_a_device_this_torch_lacks_is_one_line(tiny_cgformer_run, monkeypatch, tmp_path, capsys):
    from rexfast.engine.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    run = tiny_cgformer_run
    for argv, name in (
        (["predict", "--checkpoint", run["best"], "--image", run["image"], "--text", "the red circle",
          "--out-dir", tmp_path / "pred", "--device", "cuda"], "--device cuda"),
        (["eval", "--checkpoint", run["best"], "--device", "cuda"], "--device cuda"),
        (["train", "--config", run["out"] / "config.yaml", "--out", tmp_path / "run", "--set", "train.device=cuda"],
         "train.device cuda"),
    ):
        line = _error(capsys, *argv)
        assert name in line and "CPU-only build" in line and torch.__version__ in line and "cpu" in line, line
    assert not (tmp_path / "pred").exists() and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="'gpu' is not a device name"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("CPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_index_past_the_last_gpu_is_one_line():
    from rexfast.engine.device import resolve_device

    count = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


# ----------------------------------------------------------------------------- files that are not checkpoints
def test_describe_file_names_what_a_file_is(tiny_cgformer_run, tmp_path):
    from rexfast.io import describe_file

    run = tiny_cgformer_run
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.13.0")
    jpeg = tmp_path / "i.jpg"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(jpeg)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(run["best"].read_bytes()[:5000])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  root: x\n")
    expected = {onnx: "an ONNX model", jpeg: "a JPEG image", cut: "a truncated or damaged zip archive",
                yaml_file: "a YAML file", run["best"]: "a torch.save file", run["image"]: "a PNG image",
                run["folder"] / "model.safetensors": "a safetensors file", run["folder"] / "config.json": "a JSON file",
                tmp_path: "a folder"}
    for path, kind in expected.items():
        assert describe_file(path).startswith(kind), (path, describe_file(path))


def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tiny_cgformer_run, tmp_path, capsys):
    run = tiny_cgformer_run
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.13.0")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(run["best"].read_bytes()[:5000])
    for path, words in ((onnx, "it is an ONNX model (protobuf), not a file written by torch.save; expected a "
                               "training checkpoint"),
                        (run["image"], "it is a PNG image, not a file written by torch.save"),
                        (cut, "a torch.save file cut short")):
        line = _error(capsys, "eval", "--checkpoint", path)
        assert words in line, line
        assert "Unsupported operand" not in line and line.rstrip().endswith(("checkpoint", "folder", "again")), line
    line = _error(capsys, "predict", "--checkpoint", run["best"], "--image", tmp_path, "--text", "the red circle",
                  "--out-dir", tmp_path / "pred")
    assert f"image {tmp_path} is a folder, not an image file" in line


# ----------------------------------------------------------------------------- resume, config
def test_resuming_another_models_checkpoint_names_both_models(tiny_cgformer_run, tmp_path, capsys):
    from rexfast.engine.checkpoint import load as load_checkpoint

    ckpt = load_checkpoint(tiny_cgformer_run["last"])
    ckpt["config"]["model"] = {"name": "rela", "preset": "tiny"}
    other = tmp_path / "rela_last.pt"
    torch.save(ckpt, other)
    line = _error(capsys, "train", "--config", tiny_cgformer_run["out"] / "config.yaml", "--out", tmp_path / "run",
                  "--resume", other)
    assert "is a training checkpoint of a ReLA (preset tiny), but the config builds a CGFormer" in line, line
    assert "backbone." not in line and len(line) < 400
    # the same model, another width: the two named first, then a count and a few keys
    line = _error(capsys, "train", "--config", tiny_cgformer_run["out"] / "config.yaml", "--out", tmp_path / "run",
                  "--set", "model.token_dim=48", "--resume", tiny_cgformer_run["last"])
    assert "its CGFormer (preset tiny) weights do not fit the config's CGFormer" in line, line
    assert "shape mismatches (" in line and "more]" in line and len(line) < 800, line
    assert not (tmp_path / "run").exists()


def test_train_without_a_config_lists_the_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _error(capsys, "train")
    assert "train needs a config: --config FILE" in line
    repo_configs = Path(__file__).resolve().parents[2] / "configs"
    for name in sorted(p.name for p in repo_configs.glob("*.yaml")):
        assert name in line
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- advice the CLI can follow
def test_convert_of_an_unreleased_width_says_which_set_to_pass(tiny_cgformer_run, tmp_path, capsys):
    from rexfast.engine.loading import load_model
    from rexfast.models import CGFormer
    from rexfast.models.cgformer.checkpoint import to_official_state_dict

    model = load_model(tiny_cgformer_run["best"]).model
    official = tmp_path / "official.pth"
    torch.save(to_official_state_dict(model), official)
    out = tmp_path / "folder"
    line = _error(capsys, "convert", "--official", official, "--out", out)
    assert "16-wide Swin" in line and "--set model.swin.pwam_heads=[8,8,8,8]" in line and "SwinConfig" not in line
    line = _error(capsys, "convert", "--official", official, "--out", out, "--set", "model.swin.pwam_heads=[1,2,2,2]")
    assert "32-wide BERT" in line and "--set model.bert.num_attention_heads=" in line
    assert "--model" in _error(capsys, "convert", "--official", official, "--out", out, "--set", "model.name=rela")
    assert main(["convert", "--official", str(official), "--out", str(out), "--set", "model.swin.pwam_heads=[1,2,2,2]",
                 "--set", "model.bert.num_attention_heads=2"]) == 0
    converted = CGFormer.from_pretrained(out)
    assert converted.config.swin.pwam_heads == (1, 2, 2, 2)
    theirs, ours = converted.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


# ----------------------------------------------------------------------------- sentences cut or unknown
def test_long_and_unknown_sentences_warn_once_with_the_words(tiny_cgformer_run):
    from rexfast.data.tokenize import TextTruncatedWarning, UnknownWordsWarning, load_tokenizer, tokenize

    tok = load_tokenizer(tiny_cgformer_run["root"] / "vocab.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenize(tok, "the red circle " * 700, 20)
        tokenize(tok, "le cœur vert 🐶", 20)
        tokenize(tok, "the red circle.", 20)  # known words, short: silent
        tokenize(tok, "the red circle " * 700, 20, warn=False)  # a dataset: silent
    assert [w.category for w in caught] == [TextTruncatedWarning, UnknownWordsWarning]
    assert "2102 tokens" in str(caught[0].message) and "reads 20" in str(caught[0].message)
    assert str(caught[0].message).endswith("'the red circle the red circle the red circle the red circle the red "
                                           "circle the red circle the'")
    assert "4 of the sentence's 4 words" in str(caught[1].message) and "'🐶'" in str(caught[1].message)


def test_the_cli_prints_rexfast_warnings_as_one_line(tiny_cgformer_run, tmp_path, capsys):
    run = tiny_cgformer_run
    assert main(["predict", "--checkpoint", str(run["best"]), "--image", str(run["image"]), "--text",
                 "le cœur vert 🐶", "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rexfast: warning: 4 of the sentence's 4 words are unknown"), err


# ----------------------------------------------------------------------------- help
def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    assert "``" not in parser.format_help()
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"rexfast {name} {action.option_strings[0]} has no help"
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            shown = isinstance(action.default, (int, float, str)) and not isinstance(action.default, bool)
            if action.option_strings and shown and action.default != "==SUPPRESS==":
                assert f"(default: {action.default})" in text or "default" in action.help, (name, action.dest)


def test_verbose_and_no_progress_where_a_user_puts_them():
    parser = build_parser()
    for command in (["info"], ["eval", "--checkpoint", "x"], ["demo"]):
        assert parser.parse_args(command).verbose is False
        assert parser.parse_args(["-v", *command]).verbose is True
        assert parser.parse_args([*command, "-v"]).verbose is True
        assert parser.parse_args([*command, "--verbose"]).verbose is True
    assert parser.parse_args(["eval", "--checkpoint", "x", "--no-progress"]).no_progress is True


# ----------------------------------------------------------------------------- the demo's figures
def test_demo_examples_show_one_several_and_no_target_on_different_scenes(tiny_cgformer_run, tmp_path):
    import numpy as np
    from PIL import Image

    from rexfast.data import original_image, original_mask
    from rexfast.engine import builders
    from rexfast.engine.config import DataConfig
    from rexfast.engine.demo import _target_count, pick_examples
    from rexfast.engine.plots import example_figure

    cfg = DataConfig(dataset="synthetic", root=str(tiny_cgformer_run["root"]), image_size=32)
    ds = builders.build_dataset(cfg, "train", train=False, tokenizer=builders.build_tokenizer(cfg))
    picked = pick_examples(ds, 6)
    kinds = [min(_target_count(ds, i), 2) for i in picked]
    assert kinds[:3] == [1, 2, 0] and kinds[3:] == [1, 2, 0], kinds  # one, several, none, in turns
    images = [ds.refs[ds.samples[i][0]]["image_id"] for i in picked]
    assert len(set(images[:3])) == 3, images  # each kind on another scene
    item = ds.get(picked[1])
    image = original_image(item)
    truth = original_mask(item).numpy().astype(bool)
    path = example_figure(image, truth, truth, item["sentence"], "2 targets", "IoU 1.00", tmp_path / "f.png")
    with Image.open(path) as png:
        assert png.size == (960, 390)  # 9.6 x 3.9 in at 100 dpi: the fonts (11-14 pt) stay readable
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
    cyan = (np.abs(pixels - [0, 230, 255]) <= 12).all(1).sum()
    assert cyan > 100  # the outline and the legend are drawn in the one colour no scene uses
    from rexfast.data.synthetic import COLORS

    assert all(np.abs(np.array(c) - [0, 230, 255]).max() > 60 for c in COLORS.values())


# ----------------------------------------------------------------------------- pytest benchmarks/
def _collected(*args) -> set[str]:
    """The rows ``pytest args`` collects (``benchmarks/`` unless ``args`` name another)."""
    import sys

    repo = Path(__file__).resolve().parents[2]
    args = args if args and not args[0].startswith("-") else ("benchmarks/", *args)
    proc = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {line for line in proc.stdout.splitlines() if line.startswith("benchmarks/") and "::" in line}


def test_plain_pytest_benchmarks_is_the_quick_set():
    plain, every, slow = _collected(), _collected("-m", "slow or not slow"), _collected("-m", "slow")
    assert slow and plain == every - slow, sorted(plain & slow)
    assert any("full_size" in row for row in slow)
    one = sorted(slow)[0]
    assert _collected(one) == {one}  # a slow row named by its id still runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs a CUDA benchmark where a GPU is present")
def test_each_benchmark_row_announces_itself():
    import sys

    repo = Path(__file__).resolve().parents[2]
    row = "benchmarks/test_bench_rela.py::test_rela_cuda_released_b8_480_bf16"  # skipped at once without a GPU
    proc = subprocess.run([sys.executable, "-m", "pytest", row, "-q", "-p", "no:cacheprovider"], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert f"[bench 1/1] measuring {row}" in proc.stdout, proc.stdout[-2000:]


# ----------------------------------------------------------------------------- tiny images
def test_an_image_below_the_minimum_side_is_refused_before_the_model_loads(tiny_cgformer_run, tmp_path, capsys,
                                                                            monkeypatch):
    import numpy as np
    from PIL import Image

    import rexfast.engine.predictor as predictor
    from rexfast.data.datasets import MIN_IMAGE_SIDE, preprocess_image

    # why: a 1x1 image reaches the model as a uniform field, whatever its input size
    one = Image.new("RGB", (1, 1), (215, 40, 40))
    field = preprocess_image(one, 32)
    assert torch.equal(field, field[:, :1, :1].expand_as(field))
    tiny = tmp_path / "one.png"
    one.save(tiny)
    monkeypatch.setattr(predictor.Segmenter, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    line = _error(capsys, "predict", "--checkpoint", tiny_cgformer_run["best"], "--image", tiny, "--text",
                  "the red circle", "--out-dir", tmp_path / "pred")
    assert f"image {tiny} is 1x1 pixels; rexfast segments images of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}" in line
    Image.fromarray(np.full((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE + 3, 3), 128, np.uint8)).save(tmp_path / "ok.png")
    monkeypatch.undo()
    assert main(["predict", "--checkpoint", str(tiny_cgformer_run["best"]), "--image", str(tmp_path / "ok.png"),
                 "--text", "the red circle", "--out-dir", str(tmp_path / "pred")]) == 0
    assert not (tmp_path / "pred" / "one_mask.png").exists()
