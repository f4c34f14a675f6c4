"""The one loader (:func:`rexfast.models.loading.load_model_source`) and self-contained model
folders: every kind of source, a Hub id resolved offline from a cache laid out as the Hub's,
folders written before the tokenizer was stored, and the defects of issue 33 on the
``rexfast predict`` path (the folder's input size, the two thresholds, outputs that collide)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rexfast import Segmenter
from rexfast.models.loading import CheckpointError, load_model_source
from rexfast.models.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def rexfast(capsys):
    """``rexfast ARGS`` in this process (the same main() the console script runs): much cheaper
    than a subprocess per call."""
    from rexfast.cli import main

    def run(*args, check=True) -> Run:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        if check:
            assert code == 0, err[-3000:]
        return Run(code, out, err)

    return run


def _one_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexfast: error:"), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_rela(tmp_path_factory):
    """A tiny ReLA (random weights) with a small vocabulary, saved as a complete folder at 64²."""
    from rexfast.models import registry
    from rexfast.models.text import bert_for_vocab
    from rexfast.models.tokenizer import tokenizer_from_vocab

    tokenizer = tokenizer_from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "blue",
                                      "circle", "square", "left", "of"])
    cfg = registry.get("rela").config_class.tiny()
    cfg = cfg.with_overrides({"bert": bert_for_vocab(cfg.bert, len(tokenizer.get_vocab()), has_weights=False)})
    torch.manual_seed(0)
    model = registry.get("rela").model_class(cfg).eval()
    folder = tmp_path_factory.mktemp("models") / "tiny_rela"
    model.save_pretrained(folder, tokenizer=tokenizer, preprocessing=Preprocessing(image_size=64, max_tokens=12),
                          card={"preset": "tiny", "trained_on": "nothing (random weights)",
                                "metrics": {"gIoU": 12.5}, "metrics_on": "a made-up split"})
    image = folder.parent / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(image)
    return {"model": model, "tokenizer": tokenizer, "folder": folder, "image": image}


# ----------------------------------------------------------------------------- folders
def test_folder_round_trip_with_its_tokenizer(tiny_rela):
    from transformers import BertTokenizer

    folder, tokenizer = tiny_rela["folder"], tiny_rela["tokenizer"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "preprocessor_config.json", "tokenizer_config.json",
                                                        "vocab.txt"]
    # the ecosystem's tokenizer reads the folder and gives the same ids
    theirs = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    for text in ("the red circle left of the blue square", "The RED Circle!", "unknown words here"):
        assert theirs.encode(text) == tokenizer.encode(text)
    loaded = load_model_source(folder)
    assert loaded.kind == "folder" and loaded.preprocessing == Preprocessing(image_size=64, max_tokens=12)
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    state, original = loaded.model.state_dict(), tiny_rela["model"].state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    card = (folder / "README.md").read_text()
    params = sum(p.numel() for p in tiny_rela["model"].parameters())
    for fact in ("ReLA (`model_type: rela`)", "`tiny`", f"{params:,}", "64 × 64", "gIoU", "12.50", "a made-up split",
                 "included (`vocab.txt`, 12 tokens)", f'Segmenter.from_pretrained("{folder}")'):
        assert fact in card, fact
    # a Segmenter needs nothing but the folder, and runs at its stored size
    seg = Segmenter.from_pretrained(folder, device="cpu", precision="fp32")
    item = seg.processor(tiny_rela["image"], "the red circle")
    assert item["image"].shape == (3, 64, 64) and item["input_ids"].shape == (12,)


def test_a_folder_without_tokenizer_needs_one_and_says_so(tiny_rela, tmp_path, rexfast):
    """Folders written before rexfast stored the tokenizer (and the preprocessing) still load
    with --tokenizer; without one the error says exactly that."""
    old = tmp_path / "old"
    tiny_rela["model"].save_pretrained(old)
    for name in ("preprocessor_config.json", "README.md"):
        (old / name).unlink()
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(CheckpointError, match="model folder without a tokenizer .* pass --tokenizer"):
        load_model_source(old)
    vocab = tiny_rela["folder"] / "vocab.txt"
    loaded = load_model_source(old, tokenizer=vocab)
    assert loaded.tokenizer.get_vocab() == tiny_rela["tokenizer"].get_vocab()
    assert loaded.preprocessing.image_size == 480 and loaded.notes  # ReLA's config has no size: the released 480²
    line = _one_error(rexfast("predict", "--checkpoint", old, "--image", tiny_rela["image"], "--text", "red",
                               "--out-dir", tmp_path / "out", check=False))
    assert "without a tokenizer" in line and "--tokenizer" in line
    assert not (tmp_path / "out").exists()
    proc = rexfast("predict", "--checkpoint", old, "--tokenizer", vocab, "--image", tiny_rela["image"], "--text",
                    "red", "--set", "data.image_size=64", "--out-dir", tmp_path / "out", "--precision", "fp32")
    assert len([line for line in proc.stdout.splitlines() if line.endswith(".png")]) == 2


def test_model_overrides_and_bad_overrides(tiny_rela):
    seg = Segmenter.from_pretrained(tiny_rela["folder"], device="cpu", precision="fp32",
                                    overrides=["model.decision=logits", "data.image_size=96"])
    assert seg.model.config.decision == "logits" and seg.preprocessing.image_size == 96
    with pytest.raises(ValueError, match="unknown ReLAConfig fields \\['no_such_field'\\]"):
        Segmenter.from_pretrained(tiny_rela["folder"], overrides=["model.no_such_field=1"])
    with pytest.raises(ValueError, match="multiple of 32"):
        Segmenter.from_pretrained(tiny_rela["folder"], overrides=["data.image_size=33"])
    with pytest.raises(ValueError, match="cannot change a trained model"):
        Segmenter.from_pretrained(tiny_rela["folder"], overrides=["model.preset=demo"])


# ----------------------------------------------------------------------------- the Hub
def _hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """A cache laid out as huggingface_hub writes it: blobs named by their sha256, a
    snapshot of symlinks to them, refs/main naming the snapshot's commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_id_resolves_offline_from_the_cache(tiny_rela, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "someone/tiny-rela", tiny_rela["folder"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once when huggingface_hub was imported
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    loaded = load_model_source("someone/tiny-rela")
    assert loaded.kind == "hub" and loaded.path == snapshot and loaded.preprocessing.image_size == 64
    image = tiny_rela["image"]
    from_hub = Segmenter.from_pretrained("someone/tiny-rela", device="cpu", precision="fp32")(image, "red circle")
    local = Segmenter.from_pretrained(tiny_rela["folder"], device="cpu", precision="fp32")(image, "red circle")
    assert np.array_equal(from_hub.probability, local.probability)
    with pytest.raises(FileNotFoundError, match="not in the cache while offline mode is on"):
        load_model_source("someone/not-cached")
    # the command line takes the id too, in a fresh process (huggingface_hub reads HF_HUB_CACHE at import)
    proc = subprocess.run([sys.executable, "-m", "rexfast", "predict", "--checkpoint", "someone/tiny-rela", "--image",
                           str(image), "--text", "the red circle", "--out-dir", str(tmp_path / "out"), "--precision",
                           "fp32"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("scene_the-red-circle_*.png"))) == 2, proc.stdout


def test_a_hub_id_is_downloaded_only_when_not_cached_and_online(tiny_rela, tmp_path, monkeypatch):
    """Where the download would happen, huggingface_hub is replaced by a recorder: never the network."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def recorder(repo_id, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only))
        if repo_id == "someone/cached" or not local_files_only:
            return str(tiny_rela["folder"])
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    assert load_model_source("someone/cached").kind == "hub"
    assert calls == [("someone/cached", True)]  # cached: no download attempted
    calls.clear()
    assert load_model_source("someone/fresh").kind == "hub"
    assert calls == [("someone/fresh", True), ("someone/fresh", False)]  # not cached, online: downloaded
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_model_source("someone/fresh")
    assert calls == [("someone/fresh", True)]
    # local paths are never taken for Hub ids
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_model_source("runs/best.pt")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_model_source(str(tmp_path / "missing" / "folder"))


# ----------------------------------------------------------------------------- released checkpoints
def test_a_released_checkpoint_loads_with_a_tokenizer_and_converts_to_a_complete_folder(tiny_rela, tmp_path):
    from rexfast.engine.convert import convert_official
    from rexfast.models.rela.checkpoint import to_official_state_dict

    official = tmp_path / "model_final.pth"
    torch.save({"iteration": 7, **to_official_state_dict(tiny_rela["model"])}, official)
    with pytest.raises(CheckpointError, match="released rela checkpoint, which holds no tokenizer"):
        load_model_source(official)
    vocab = tiny_rela["folder"] / "vocab.txt"
    config = tiny_rela["model"].config  # (a tiny Swin and BERT: widths the weights cannot tell the heads of)
    unknown = {k: getattr(config, k) for k in ("swin", "bert", "nheads", "enc_heads", "enc_points")}
    loaded = load_model_source(official, tokenizer=vocab, model_overrides=unknown)
    assert loaded.kind == "official" and loaded.preprocessing.image_size == 480  # the released size
    convert_official(official, tmp_path / "converted", tokenizer=vocab, model_overrides=unknown)
    converted = load_model_source(tmp_path / "converted")  # self-contained: no tokenizer given
    assert converted.tokenizer.get_vocab() == tiny_rela["tokenizer"].get_vocab()
    state = converted.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())
    assert "made from | official model_final.pth" in (tmp_path / "converted" / "README.md").read_text()


# ----------------------------------------------------------------------------- issue 33's defects
def test_the_folder_answers_as_best_pt_at_the_training_size(tiny_cgformer_run, tmp_path, rexfast, monkeypatch):
    """A model trained at 32²: its best/ folder and best.pt give identical predictions and the
    same eval table, run at 32² (the folder used to run at 480²), and export at 32² (what
    ``rexfast export`` hands the exporter; the export of best.pt at its training size itself is
    tests/export/test_cli.py's, ~30 s an export on 2 cores)."""
    folder, best = tiny_cgformer_run["folder"], tiny_cgformer_run["best"]
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}
    a = Segmenter.from_pretrained(folder, device="cpu", precision="fp32")
    b = Segmenter.from_pretrained(best, device="cpu", precision="fp32")
    assert a.preprocessing == b.preprocessing and a.preprocessing.image_size == 32
    image = Image.open(tiny_cgformer_run["image"]).convert("RGB")
    texts = ["the red circle", "a blue square left of the green circle", "the shape"]
    for x, y in zip(a(image, texts), b(image, texts)):
        assert np.array_equal(x.probability, y.probability) and np.array_equal(x.mask, y.mask)
    from rexfast.engine.evaluator import evaluate_checkpoint

    tables = [evaluate_checkpoint(source, split="val", device="cpu", overrides=[f"data.root={tiny_cgformer_run['root']}"])
              for source in (folder, best)]
    for table in tables:
        table.pop("checkpoint")
    assert tables[0] == tables[1]
    sizes = []

    def fake_export(model, path, **kwargs):
        sizes.append(kwargs["image_size"])
        raise ValueError("stopped before the export")

    monkeypatch.setattr("rexfast.export.export_onnx", fake_export)
    for source in (folder, best):
        out = tmp_path / f"{Path(source).stem}.onnx"
        assert "stopped before the export" in _one_error(rexfast("export", "--checkpoint", source, "--out", out,
                                                                 "--no-verify", check=False))
        assert not out.exists()
    assert sizes == [32, 32]


def test_predict_flags_split_thresholds_and_set():
    from rexfast.cli import build_parser

    parser = build_parser()
    predict = next(a for a in parser._actions if a.dest == "command").choices["predict"]
    helps = {opt: action.help for action in predict._actions for opt in action.option_strings}
    assert "mask probability exceeds" in helps["--mask-threshold"]
    assert "no-target head's probability exceeds" in helps["--no-target-threshold"]
    assert "deprecated" in helps["--threshold"] and "--set" in helps
    args = parser.parse_args(["predict", "--checkpoint", "m", "--image", "i", "--text", "t", "--mask-threshold",
                              "0.1", "--set", "model.eval_noise=false"])
    assert args.mask_threshold == 0.1 and args.no_target_threshold is None and args.set == ["model.eval_noise=false"]


def test_twenty_sentences_on_one_image_give_forty_files(tiny_rela, tmp_path, monkeypatch):
    """Outputs are named after the image and the sentence: no two sentences overwrite each other,
    and the same sentence lands on the same names on every run. The model loads once: each
    predict_to_files call gets it from a stand-in for Segmenter.from_pretrained, and runs the
    rest (its checks, the naming, the writing) as it would."""
    from rexfast.engine import predictor
    from rexfast.engine.predictor import output_stem, predict_to_files

    segmenter = Segmenter.from_pretrained(tiny_rela["folder"], device="cpu", precision="fp32")

    class LoadedOnce:
        @staticmethod
        def from_pretrained(source, **kwargs):
            assert source == tiny_rela["folder"] and kwargs["precision"] == "fp32", (source, kwargs)
            return segmenter

    monkeypatch.setattr(predictor, "Segmenter", LoadedOnce)

    sentences = [f"the {c} {s}" for c in ("red", "blue") for s in ("circle", "square")]
    sentences += ["The red circle", "the red circle.", "the red  circle", "the RED circle!", "左边的红色圆",
                  "the red circle left of the blue square and right of the green triangle near the top",
                  "the red circle left of the blue square and right of the green triangle near the edge",
                  "red", "blue", "a", "the shape", "the shapes", "circle left", "circle right", "x" * 300, "1 2 3"]
    assert len(sentences) == 20
    written = []
    for text in sentences:
        files, result = predict_to_files(tiny_rela["folder"], tiny_rela["image"], text, out_dir=tmp_path, device="cpu",
                                         precision="fp32")
        written += files
    assert len(set(written)) == 40 and len(list(tmp_path.glob("*.png"))) == 40
    assert output_stem(tiny_rela["image"], "the red circle") == output_stem("elsewhere/scene.jpg", "the red circle")
    stem = output_stem(tiny_rela["image"], sentences[9])
    assert len(stem) <= len("scene") + 40 + 10 and stem.startswith("scene_the-red-circle-left-of-the-blue")
    assert output_stem("scene.png", "左边的红色圆").startswith("scene_") and len(output_stem("s.png", "x" * 300)) < 60


def test_the_no_target_message_says_which_rule_decided(tiny_rela, tiny_cgformer_run, tmp_path, rexfast):
    def common(folder, image):
        return ("predict", "--checkpoint", folder, "--image", image, "--text", "the red circle", "--precision", "fp32",
                "--out-dir", tmp_path)

    rela = common(tiny_rela["folder"], tiny_rela["image"])
    head = rexfast(*rela, "--no-target-threshold", "0.01")
    assert head.stdout.startswith("no target") and "exceeds the no-target threshold 0.01" in head.stdout
    # the tiny CGFormer has no no-target head; its probabilities lie near 0.53
    cgformer = common(tiny_cgformer_run["folder"], tiny_cgformer_run["image"])
    empty = rexfast(*cgformer, "--mask-threshold", "0.9")
    assert "no pixel's mask probability exceeds the mask threshold 0.9 (this model has no no-target head" in \
        empty.stdout
    assert "no target" not in rexfast(*cgformer, "--mask-threshold", "0.1").stdout
    old = rexfast(*rela, "--threshold", "0.3")
    assert "--threshold is deprecated" in old.stderr
    assert "--threshold (deprecated) sets both" in _one_error(rexfast(*rela, "--threshold", "0.3", "--mask-threshold",
                                                                      "0.2", check=False))
    assert "--mask-threshold must lie strictly between 0 and 1" in _one_error(
        rexfast(*rela, "--mask-threshold", "1.5", check=False))
