"""Engine building blocks: data order, config parsing, atomic checkpoints."""

import os

import pytest
import torch

from rexfast.engine import checkpoint, sampling
from rexfast.engine.config import Config, load_config


def test_two_ranks_see_the_micro_batches_of_one_process_with_accumulation():
    kw = dict(seed=3, epoch=2, micro_batch=4)
    single = sampling.rank_micro_batches(50, world=1, rank=0, accum=2, **kw)
    rank0 = sampling.rank_micro_batches(50, world=2, rank=0, accum=1, **kw)
    rank1 = sampling.rank_micro_batches(50, world=2, rank=1, accum=1, **kw)
    assert len(single) == 2 * len(rank0) == 2 * len(rank1) == 12
    for step in range(len(rank0)):
        assert single[2 * step] == rank0[step]
        assert single[2 * step + 1] == rank1[step]


def test_epochs_are_distinct_permutations_and_reproducible():
    a = sampling.epoch_permutation(100, seed=1, epoch=0)
    b = sampling.epoch_permutation(100, seed=1, epoch=1)
    assert sorted(a) == list(range(100)) and a != b
    assert a == sampling.epoch_permutation(100, seed=1, epoch=0)
    assert sampling.sample_seed(1, 0, 5) == sampling.sample_seed(1, 0, 5) != sampling.sample_seed(1, 1, 5)


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        sampling.steps_per_epoch(5, micro_batch=4, world=2, accum=1)


def test_config_file_and_overrides_with_a_typed_model_section(tmp_path):
    from rexfast.models import CGFormerConfig

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  epochs: 3\nmodel:\n  preset: tiny\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.image_size=96", "model.num_tokens=4"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 3 and cfg.data.image_size == 96
    assert cfg.model.name == "cgformer" and cfg.model.preset == "tiny"
    assert isinstance(cfg.model.config, CGFormerConfig)
    assert cfg.model.config == CGFormerConfig.tiny(num_tokens=4, image_size=96)  # image_size follows data
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown keys in config section 'model' for cgformer: \['options'\]"):
        load_config(None, ["model.options.num_tokens=4"])
    with pytest.raises(ValueError, match="model.num_tokens: expected int"):
        load_config(None, ["model.num_tokens=many"])
    with pytest.raises(ValueError, match="unknown cgformer preset 'huge'"):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        load_config(None, ["model.name=unet"])


@pytest.mark.parametrize(
    "text, overrides, words",
    [
        ("train:\n  lr: 0.1\n", ["lr=3"], "section.key=value"),
        ("train:\n  nope: 1\n", [], "unknown keys in config section 'train'"),
        ("other: {}\n", [], "unknown config sections"),
        ("train: [1, 2\n", [], "cannot parse config"),
    ],
)
def test_config_errors(tmp_path, text, overrides, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        load_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def _payload(x):
    return {"format": checkpoint.FORMAT, "config": {}, "vocab": ["[PAD]"], "model": {}, "x": x}


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    checkpoint.atomic_save(_payload(1), target)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save(_payload(2), target)
    monkeypatch.undo()
    assert checkpoint.load(target)["x"] == 1  # the old checkpoint survives intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temporary file is left


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask, mode):
    from rexfast.io import atomic_write_text

    old = os.umask(umask)
    try:
        checkpoint.atomic_save(_payload(1), tmp_path / "ckpt.pt")
        atomic_write_text(tmp_path / "note.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    for name in ("ckpt.pt", "note.txt", "plain.txt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name
    # replacing a file keeps the permissions its owner gave it
    os.chmod(tmp_path / "note.txt", 0o640)
    atomic_write_text(tmp_path / "note.txt", "y")
    assert os.stat(tmp_path / "note.txt").st_mode & 0o777 == 0o640
    assert (tmp_path / "note.txt").read_text() == "y"


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(junk)
    torch.save({"format": checkpoint.FORMAT, "config": [], "vocab": [], "model": {}}, tmp_path / "bad.pt")
    with pytest.raises(checkpoint.CheckpointError, match="malformed rexfast checkpoint"):
        checkpoint.load(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a rexfast checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    np.random.seed(5)
    np.random.randn()  # a cached Gaussian in numpy's state
    state = checkpoint.rng_state()
    a, b, c = torch.rand(3), np.random.rand(3), random.random()
    torch.save({"rng": [state]}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0]
    checkpoint.set_rng_state(loaded)
    assert torch.equal(torch.rand(3), a) and np.array_equal(np.random.rand(3), b) and random.random() == c
