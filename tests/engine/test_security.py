"""Nothing a user loads runs code: hostile checkpoints, model folders and dataset
files are refused with a clear error before any of their content runs.

Each hostile file, when unpickled, would create a marker file (through
``os.system``). The tests give it to every CLI command and API that reads a
checkpoint, a model folder or a dataset file, and assert that the marker was
never created and that the error says what happened.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rexfast.engine.checkpoint import CheckpointError, load
from rexfast.engine.loading import load_model


class Hostile:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile file ran code"


def _rexfast(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "rexfast", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _one_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexfast: error:"), proc.stderr
    return lines[0]


def _in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``rexfast ARGS`` through cli.main in this process: a hostile file unpickled here would
    run its code here, and leave the marker as in a subprocess, without an interpreter start-up
    per command (the model folder and the REFER pickle below go through real processes)."""
    from rexfast.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["rexfast", *map(str, args)], code, out, err)


@pytest.fixture
def genuine(tiny_cgformer_run):
    """A genuine training checkpoint of a tiny CGFormer on synthetic data (shared, read-only)."""
    return tiny_cgformer_run


def _hostile_checkpoint(tmp_path, marker) -> Path:
    path = tmp_path / "hostile.pt"
    torch.save({"format": "rexfast-checkpoint-v1", "payload": Hostile(marker)}, path)
    return path


def _poisoned_genuine(genuine, tmp_path, marker, which="best") -> Path:
    """An otherwise genuine checkpoint with one hostile value inside."""
    ckpt = load(genuine[which])
    ckpt["train_state" if which == "last" else "metrics"] = {"innocent": Hostile(marker)}
    path = tmp_path / f"poisoned_{which}.pt"
    torch.save(ckpt, path)
    return path


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["hostile", "poisoned"])
def test_cli_refuses_hostile_checkpoints_before_anything_runs(genuine, tmp_path, marker, kind, capsys):
    path = _hostile_checkpoint(tmp_path, marker) if kind == "hostile" else _poisoned_genuine(genuine, tmp_path, marker)
    resume = _hostile_checkpoint(tmp_path, marker) if kind == "hostile" else _poisoned_genuine(
        genuine, tmp_path, marker, "last")
    for args in (
        ("predict", "--checkpoint", path, "--image", genuine["image"], "--text", "the red circle", "--out-dir",
         tmp_path / "out"),
        ("eval", "--checkpoint", path),
        ("train", "--set", f"data.root={genuine['root']}", "--set", "data.image_size=32", "--set",
         "model.preset=tiny", "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "train.device=cpu",
         "--resume", resume),
        ("convert", "--official", path, "--out", tmp_path / "converted"),
        ("export", "--checkpoint", path, "--out", tmp_path / "exported.onnx"),
    ):
        line = _one_error(_in_process(capsys, *args))
        assert "refusing" in line and "posix.system" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists() and not (tmp_path / "converted").exists()
    assert not (tmp_path / "exported.onnx").exists()


def test_apis_refuse_hostile_checkpoints(genuine, tmp_path, marker):
    from rexfast import CGFormer
    from rexfast.engine.evaluator import evaluate_checkpoint
    from rexfast import Segmenter

    hostile = _hostile_checkpoint(tmp_path, marker)
    poisoned = _poisoned_genuine(genuine, tmp_path, marker)
    for path in (hostile, poisoned):
        with pytest.raises(CheckpointError, match="refusing"):
            load(path)
        with pytest.raises(CheckpointError, match="refusing"):
            load_model(path)
        with pytest.raises(CheckpointError, match="refusing"):
            Segmenter.from_pretrained(path)
        with pytest.raises(CheckpointError, match="refusing"):
            evaluate_checkpoint(path)
        with pytest.raises(ValueError, match="weights_only=True"):
            CGFormer.from_official(path)


def test_genuine_checkpoints_load_with_weights_only(genuine):
    for which in ("best", "last"):
        ckpt = torch.load(genuine[which], weights_only=True)  # raises if anything unsafe is inside
        assert ckpt["format"] == "rexfast-checkpoint-v1"


# ----------------------------------------------------------------------------- model folders
def test_model_folders_run_no_code(genuine, tmp_path, marker):
    from rexfast import CGFormer

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text((genuine["folder"] / "config.json").read_text())
    with open(folder / "model.safetensors", "wb") as f:  # a pickle where the safetensors file should be
        pickle.dump(Hostile(marker), f)
    with pytest.raises(ValueError, match="cannot read"):
        CGFormer.from_pretrained(folder)
    line = _one_error(_rexfast("predict", "--checkpoint", folder, "--tokenizer", genuine["root"] / "vocab.txt",
                               "--image", genuine["image"], "--text", "the red circle", "--out-dir", tmp_path / "o"))
    assert "cannot read" in line
    (folder / "config.json").write_text(json.dumps({"model_type": "unet"}))
    with pytest.raises(ValueError, match="holds a 'unet' model"):
        CGFormer.from_pretrained(folder)


# ----------------------------------------------------------------------------- dataset files
def _hostile_refs(root: Path, marker: Path) -> Path:
    refs = root / "synthetic" / "refs(unc).p"
    with open(refs, "wb") as f:
        pickle.dump([{"ref_id": 1, "payload": Hostile(marker)}], f, protocol=2)
    return refs


def test_refer_pickles_are_read_by_a_restricted_unpickler(genuine, tmp_path, marker):
    import shutil

    from rexfast.data import ReferringDataset

    root = tmp_path / "data"
    shutil.copytree(genuine["root"], root)
    refs = _hostile_refs(root, marker)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*refs\(unc\)\.p.*posix\.system"):
        ReferringDataset(root, "synthetic_res", "train")
    line = _one_error(_rexfast("train", "--set", "data.dataset=synthetic_res", "--set", f"data.root={root}",
                               "--set", "data.image_size=32", "--set", "model.preset=tiny", "--set",
                               f"train.out_dir={tmp_path / 'run'}"))
    assert "refusing to unpickle" in line and str(refs) in line
    assert not (tmp_path / "run").exists()


def test_real_refer_contents_still_load(tmp_path):
    """Builtin containers and scalars, Python 2 byte strings (latin-1) and sets pass the restricted unpickler."""
    from rexfast.data.refer import _read_pickle

    refs = [{"ref_id": 3, "sentences": [{"raw": "the man", "sent": "the man", "tokens": ["the", "man"]}],
             "ann_id": 7, "split": "testA", "category_id": 1, "tags": {"a", "b"}, "ratio": 0.5, "flag": None}]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert _read_pickle(path, "refs file") == refs
    py2 = b"\x80\x02]q\x00}q\x01(U\x03rawq\x02U\x0ccaf\xe9 au laitq\x03U\x06ref_idq\x04K\x05ua."
    path.write_bytes(py2)  # a Python 2 pickle of [{'raw': 'café au lait' (latin-1 bytes), 'ref_id': 5}]
    assert _read_pickle(path, "refs file") == [{"raw": "café au lait", "ref_id": 5}]


def test_bert_weights_from_a_hostile_file_are_refused(tmp_path, marker):
    from rexfast.models.text import build_bert

    path = tmp_path / "pytorch_model.bin"
    torch.save({"embeddings.word_embeddings.weight": Hostile(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load BERT weights .*posix.system"):
        build_bert("tiny", path)
