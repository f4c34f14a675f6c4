"""``rexfast serve`` end to end through ``gradio_client``, as Gradio tests its own apps: a page for two
tiny models runs on 127.0.0.1 (``launch(prevent_thread_lock=True)``); every answer equals the
Segmenter's; every bad request gets a message and the next request is answered."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rexfast.engine.segmenter import Segmenter
from rexfast.serve.checks import RequestError, check_sentence, check_threshold, open_image, sentence_cut
from rexfast.serve.examples import demo_data_root, demo_examples, folder_examples

from serve_helpers import free_port, require

MAX_PIXELS = 5000  # a 64×64 scene passes, a 100×100 image does not
MAX_UPLOAD = 200 * 1024


@pytest.fixture(scope="module")
def served(demo_layout, tmp_path_factory):
    require("gradio")
    require("gradio_client")
    from gradio_client import Client

    from rexfast.serve import ServeLimits, build_app, launch

    folders = demo_layout["folders"]
    segmenters = {name: Segmenter.from_pretrained(folders[key], device="cpu", precision="fp32")
                  for name, key in (("ReLA", "rela"), ("CGFormer", "cgformer"))}
    examples = demo_examples(demo_data_root(folders["rela"]))
    limits = ServeLimits(max_pixels=MAX_PIXELS, max_file_size=MAX_UPLOAD, concurrency=1, max_queue=16)
    app = build_app(segmenters, examples=examples, limits=limits, sources=[str(folders["rela"]),
                                                                           str(folders["cgformer"])])
    _, url, _ = launch(app, port=free_port(), block=False, quiet=True)
    try:
        # downloads go to their own folder, not Gradio's cache, which this process's server serves from
        client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
        yield {"url": url, "client": client, "segmenters": segmenters, "app": app,
               "images": demo_layout["images"], "examples": examples}
    finally:
        app.close()


def _handle(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def _check_answer(outputs, segmenters, image, text, threshold):
    """The 4 outputs per model (overlay, verdict, JSON, mask PNG) against the model's Segmenter."""
    assert len(outputs) == 4 * len(segmenters)
    for (name, seg), (overlay, verdict, answer, mask_png) in zip(segmenters.items(),
                                                                  zip(*[iter(outputs)] * 4)):
        expected = seg(image, text, mask_threshold=threshold)
        base = np.asarray(Image.open(overlay["image"]).convert("RGB"))
        np.testing.assert_array_equal(base, np.asarray(Image.open(image).convert("RGB")))  # the image, as sent
        (annotation,) = overlay["annotations"]
        assert annotation["label"] == name
        rgba = np.asarray(Image.open(annotation["image"]))
        np.testing.assert_array_equal(rgba[..., 3] > 0, expected.mask)  # the overlay's mask is the Segmenter's
        assert (rgba[expected.mask][:, :3] == (255, 0, 255)).all()
        np.testing.assert_array_equal(np.asarray(Image.open(mask_png)) > 127, expected.mask)
        assert answer["no_target"] == expected.no_target
        assert answer["no_target_prob"] == pytest.approx(expected.no_target_prob, abs=1e-6) \
            if expected.no_target_prob is not None else answer["no_target_prob"] is None
        assert answer["pixels"] == int(expected.mask.sum()) and answer["mask_threshold"] == threshold
        if expected.no_target:
            assert verdict.startswith("no target")
        else:
            assert re.match(r"\d+\.\d% of the image segmented", verdict)


def test_importing_the_page_writes_nothing_beside_it(served):
    import rexfast.serve.app as app_module

    # Gradio writes a .pyi stub for every component subclass it sees defined, unless stopped
    assert not Path(app_module.__file__).with_suffix(".pyi").exists()


def test_api_predict_takes_image_text_threshold(served):
    api = served["client"].view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in api["/predict"]["parameters"]] == ["image", "text", "mask_threshold"]
    assert len(api["/predict"]["returns"]) == 8  # overlay, verdict, JSON, mask PNG per model
    assert [p["parameter_name"] for p in api["/explain"]["parameters"]] == ["image", "text", "mask_threshold"]


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_predict_answers_equal_the_segmenters(served, threshold):
    client, images = served["client"], served["images"]
    for image, text in ((images[0], "the red circle"), (images[1], "all shapes except the blue square")):
        outputs = client.predict(_handle(image), text, threshold, api_name="/predict")
        _check_answer(outputs, served["segmenters"], image, text, threshold)


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width``×``height`` pixels, with a few bytes of data: what a
    decompression bomb looks like before it is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_bad_requests_get_a_message_and_the_server_keeps_serving(served, tmp_path):
    from gradio_client.exceptions import AppError

    client, image = served["client"], served["images"][0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is a text file, not a picture\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    large = tmp_path / "large.png"
    Image.new("RGB", (100, 100), (120, 30, 200)).save(large)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(image).read_bytes()[:200])
    cases = [
        ((not_image, "the red circle", 0.5), r"notes\.png is not an image this page can read"),
        ((empty, "the red circle", 0.5), r"empty\.png is empty \(0 bytes\)"),
        ((large, "the red circle", 0.5), r"large\.png is 100×100 = 0\.0 MP; this server takes images of at most"),
        ((_bomb_png(tmp_path / "bomb.png", 100_000, 100_000), "the red circle", 0.5),
         r"bomb\.png is (refused|100000×100000)"),
        ((truncated, "the red circle", 0.5), r"truncated\.png could not be decoded"),
        ((image, "", 0.5), r"the sentence is empty"),
        ((image, "   ", 0.5), r"the sentence is empty"),
        ((image, "the red circle " * 667, 0.5),
         r"the sentence is 10,004 characters long; this page takes at most 1,000; the model would read only its "
         r"first 19 word pieces, “the red circle the red circle"),
        ((image, "the red circle", 1.5), r"greater than maximum"),
    ]
    for (upload, text, threshold), message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(_handle(upload), text, threshold, api_name="/predict")
        # the next request is answered as if nothing had happened
        outputs = client.predict(_handle(image), "the red circle", 0.5, api_name="/predict")
        _check_answer(outputs, served["segmenters"], image, "the red circle", 0.5)


def test_an_upload_over_the_size_limit_is_refused_and_the_next_works(served, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(MAX_UPLOAD + 1024))
    with pytest.raises(Exception, match=r"(?i)(too large|maximum|size)"):
        served["client"].predict(_handle(big), "the red circle", 0.5, api_name="/predict")
    image = served["images"][0]
    _check_answer(served["client"].predict(_handle(image), "the red circle", 0.5, api_name="/predict"),
                  served["segmenters"], image, "the red circle", 0.5)


def test_a_sentence_longer_than_the_tokenizer_reads_is_answered_and_the_cut_stated(served):
    image = served["images"][0]
    text = " ".join(["the red circle left of the blue square and"] * 4) + " the green star"
    outputs = served["client"].predict(_handle(image), text, 0.5, api_name="/predict")
    _check_answer(outputs, served["segmenters"], image, text, 0.5)
    verdict, answer = outputs[1], outputs[2]
    assert "the tokenizer cut the sentence: the model reads its first 19 of 39 word pieces" in verdict
    assert (answer["sentence_pieces"], answer["pieces_read"]) == (39, 19)
    outputs = served["client"].predict(_handle(image), "the red dog", 0.5, api_name="/predict")
    assert "the model's vocabulary lacks dog (read as [UNK])" in outputs[1]


def test_explain_endpoint_returns_each_models_figure(served):
    image = served["images"][0]
    figures = served["client"].predict(_handle(image), "the red circle", 0.5, api_name="/explain")
    assert len(figures) == 2
    for path in figures:
        figure = Image.open(path)
        assert figure.format == "PNG" and figure.width > 400 and figure.height > 300


def test_the_page_lists_the_demo_scenes_as_examples(served, demo_layout):
    examples = served["examples"]
    assert 1 < len(examples) <= 12
    images = [Path(image) for image, _ in examples]
    assert all(p.is_file() and p.name.startswith("test_") for p in images)  # the held-out split
    assert len(set(images)) == len(images) and all(text.strip() for _, text in examples)
    grefs = json.loads((demo_layout["data"] / "synthetic" / "grefs(unc).json").read_text())
    sentences = {(g["file_name"], s["sent"]) for g in grefs for s in g["sentences"]}
    assert all((p.name, text) in sentences for p, (_, text) in zip(images, examples))
    config = served["app"].get_config_file()
    dataset = [c for c in config["components"] if c.get("type") == "dataset"]
    assert dataset and len(dataset[0]["props"]["samples"]) == len(examples)


def test_example_rows_from_a_folder(tmp_path):
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("the cat on the mat\nsecond line\n")
    (tmp_path / "notes.md").write_text("not an image")
    assert folder_examples(tmp_path) == [(str(tmp_path / "a.jpg"), "the cat on the mat"), (str(tmp_path / "b.png"), "")]
    with pytest.raises(ValueError, match="holds no image"):
        folder_examples(_empty_dir(tmp_path))
    with pytest.raises(FileNotFoundError, match="--examples folder not found"):
        folder_examples(tmp_path / "missing")
    assert demo_data_root(tmp_path / "a.jpg") is None  # not a demo's model: no rows from it


def _empty_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


# ----------------------------------------------------------------------------- the checks alone
def test_open_image_follows_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    opened = open_image(tmp_path / "phone.jpg")
    assert opened.size == (20, 40) and opened.mode == "RGB"  # as a browser shows it: upright


def test_open_image_refuses_an_upload_that_vanished_or_cannot_be_read(tmp_path, monkeypatch):
    """The file is checked, then opened: what goes wrong in between (the upload removed, no
    permission to read it) is a RequestError with its own message, not a raw OSError. (Tests may
    run as root, where chmod 000 does not stop a read: the two cases are made directly.)"""
    import rexfast.io
    import rexfast.serve.checks as checks

    gone = tmp_path / "gone.png"
    monkeypatch.setattr(checks.os.path, "isfile", lambda path: True)  # it was there when checked
    with pytest.raises(RequestError, match="the upload gone.png did not arrive as a file: upload it again"):
        open_image(gone)
    monkeypatch.undo()

    Image.new("RGB", (8, 8)).save(tmp_path / "locked.png")

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rexfast.io, "ClampedReader", refuse)
    with pytest.raises(RequestError, match=r"the upload locked.png could not be read \(Permission denied\)"):
        open_image(tmp_path / "locked.png")


def test_sentence_checks_and_the_tokenizers_cut(served):
    tokenizer = served["segmenters"]["ReLA"].tokenizer
    cut = sentence_cut(tokenizer, "the red circle", 20)
    assert (cut.pieces, cut.read, cut.cut, cut.describe()) == (3, 3, False, "")
    cut = sentence_cut(tokenizer, "red " * 30, 20)
    assert (cut.pieces, cut.read, cut.cut) == (30, 19, True) and cut.read_text == " ".join(["red"] * 19)
    # words outside the vocabulary, as the tokenizer splits them (the synthetic vocabulary has no comma)
    assert sentence_cut(tokenizer, "The Zebra, the red circle", 20).unknown == ("zebra", ",")
    assert check_sentence("  the red circle \n") == "the red circle"
    for bad, message in ((None, "type a sentence"), (3, "must be text"), ("", "empty"), ("x" * 1001, "1,001")):
        with pytest.raises(RequestError, match=message):
            check_sentence(bad)
    for bad in (0, 1, -0.5, "0.5", True, float("nan")):
        with pytest.raises(RequestError):
            check_threshold(bad)


def test_build_app_refuses_bad_arguments(served):
    from rexfast.serve import ServeLimits, build_app

    seg = served["segmenters"]["ReLA"]
    with pytest.raises(ValueError, match="segmenters is empty"):
        build_app({})
    with pytest.raises(TypeError, match="must be a rexfast Segmenter"):
        build_app({"a": object()})
    with pytest.raises(ValueError, match="concurrency must be a positive int"):
        ServeLimits(concurrency=0)
    with pytest.raises(TypeError, match="limits must be a ServeLimits"):
        build_app(seg, limits={"concurrency": 2})


# ----------------------------------------------------------------------------- the command
def test_serve_cli_refuses_bad_arguments_in_one_line_before_loading(demo_layout, tmp_path, capsys):
    require("gradio")
    from rexfast.cli import main

    folder = str(demo_layout["folders"]["rela"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cases = [
            (["serve", folder, "--port", str(port)], rf"cannot listen on 127\.0\.0\.1:{port} .*pick another --port"),
            (["serve", folder, "--examples", str(tmp_path / "none")], r"--examples folder not found"),
            (["serve", folder, "--port", "70000"], r"--port must lie in 1\.\.65535"),
            (["serve", str(tmp_path / "missing_model"), "--port", str(free_port())], r"missing_model"),
        ]
        for argv, message in cases:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("rexfast: error: ") and re.search(message, err[0]), err


def test_serve_cli_serves_a_demo_model_with_its_scenes(demo_layout, tmp_path):
    """``rexfast serve FOLDER`` as a user runs it: the page answers on 127.0.0.1 with the demo's
    scenes as examples, and Ctrl+C stops it."""
    require("gradio")
    require("gradio_client")
    from gradio_client import Client

    folder = demo_layout["folders"]["rela"]
    downloads = tmp_path / "downloads"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "rexfast", "serve", str(folder), "--port", str(port),
                             "--precision", "fp32", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the models are loaded, before it listens
        assert line.startswith(f"rexfast: serving ReLA at http://localhost:{port} (6 example rows"), \
            line + proc.stderr.read() if proc.poll() is not None else line
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(downloads))
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        image = demo_layout["images"][2]
        outputs = client.predict(_handle(image), "the red circle", 0.5, api_name="/predict")
        expected = Segmenter.from_pretrained(folder, device="cpu", precision="fp32")(image, "the red circle")
        rgba = np.asarray(Image.open(outputs[0]["annotations"][0]["image"]))
        np.testing.assert_array_equal(rgba[..., 3] > 0, expected.mask)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130)
