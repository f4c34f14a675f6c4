"""Pairs files (JSONL, CSV) and image folders: ids, relative paths, and every kind of bad
row found in one pass, before any model is loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rexfast.data.pairs import folder_pairs, read_pairs


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, name in enumerate(["b.png", "a.jpg", "c.PNG"]):
        Image.fromarray(np.full((5, 7, 3), 40 * k, np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_ids_default_to_the_row_position_and_paths_to_the_files_folder(images, tmp_path):
    pairs = read_pairs(_jsonl(tmp_path / "p.jsonl", [
        {"image": "imgs/a.jpg", "text": "the cat"},
        "",  # blank lines are skipped and not counted
        {"image": str(images / "b.png"), "text": "the dog", "id": "dog-1", "extra": [1, 2]},
        {"image": "imgs/a.jpg", "text": "the hat", "id": 7},
        {"image": "imgs/c.PNG", "text": "x", "id": None},
    ]))
    assert [p.id for p in pairs] == ["0", "dog-1", "7", "3"]
    assert [p.where for p in pairs] == ["line 1", "line 3", "line 4", "line 5"]
    assert pairs[0].image == images.resolve() / "a.jpg" and pairs[1].image == images / "b.png"
    assert [p.text for p in pairs] == ["the cat", "the dog", "the hat", "x"] and not pairs.bad
    assert len(pairs.digest) == 64


def test_csv_with_header_quotes_and_multiline_fields(images, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('text,image,id\n"a cat, left",imgs/a.jpg,\n"two\nlines",imgs/b.png,x\n\n"plain",imgs/c.PNG,y\n',
                    encoding="utf-8-sig")
    pairs = read_pairs(path)
    assert [(p.id, p.text, p.where) for p in pairs] == [("0", "a cat, left", "line 2"), ("x", "two\nlines", "line 3"),
                                                        ("y", "plain", "line 6")]


def test_every_bad_row_is_found_and_the_first_is_named(images, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"image": "imgs/a.jpg", "text": "good"},                  # 1
        {"image": "imgs/missing.jpg", "text": "x"},              # 2 missing image
        {"image": "imgs/broken.png", "text": "x"},               # 3 unreadable image
        {"image": "imgs/notes.txt", "text": "x"},                # 4 not an image
        {"image": "imgs/a.jpg", "text": "   "},                  # 5 empty text
        {"image": "imgs/a.jpg"},                                 # 6 missing column
        {"image": "imgs/b.png", "text": "y", "id": "0"},         # 7 repeats the default id of row 1
        '["imgs/a.jpg", "x"]',                                   # 8 not an object
        {"image": "imgs/a.jpg", "text": 5},                      # 9 text not a string
        '{"image": "imgs/a.jpg", "text": ',                      # 10 not JSON
        {"image": "imgs/a.jpg", "text": "x", "id": 1.5},         # 11 id neither string nor int
        {"image": "imgs", "text": "x"},                          # 12 a folder
        {"image": "imgs/a.jpg", "text": None},                   # 13 null text
        {"text": "x", "id": "z"},                                # 14 missing image column
    ])
    with pytest.raises(ValueError, match=r"13 of the 14 rows are bad; the first, line 2: image not found: .*missing"):
        read_pairs(path)
    pairs = read_pairs(path, skip_bad=True)
    errors = {int(p.where.split()[1]): p.error for p in pairs.bad}
    assert sorted(errors) == list(range(2, 15))
    assert "cannot read image" in errors[3] and "cannot read image" in errors[4]
    assert errors[5] == "the text is empty" and errors[6] == "the 'text' column is missing"
    assert errors[7] == "id '0' repeats the id of line 1"
    assert errors[8] == "not a JSON object (a list)" and errors[9] == "text must be a string, got 5"
    assert errors[10].startswith("not valid JSON") and "id must be a string or an integer" in errors[11]
    assert "not a file" in errors[12] and errors[13] == "text must be a string, got null"
    assert errors[14] == "the 'image' column is missing"
    assert [p.id for p in pairs][:2] == ["0", "1"] and pairs[0].error is None


def test_an_image_over_the_pixel_limit_is_a_bad_row_from_its_header(images, tmp_path, monkeypatch):
    monkeypatch.setenv("REXFAST_MAX_IMAGE_PIXELS", "34")  # the images are 7x5 = 35 pixels
    with pytest.raises(ValueError, match=r"the first, image a.jpg: image .*a.jpg is 7x5 pixels, more than 34 "
                                         r"\(REXFAST_MAX_IMAGE_PIXELS\)"):
        folder_pairs(images, "x")
    monkeypatch.setenv("REXFAST_MAX_IMAGE_PIXELS", "35")
    assert len(folder_pairs(images, "x", skip_bad=True).bad) == 1  # broken.png only


def test_csv_header_and_field_count_problems(images, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("image,caption\nimgs/a.jpg,x\n")
    with pytest.raises(ValueError, match=r"line 1: the header has no 'text' column"):
        read_pairs(path)
    path.write_text("image,text\nimgs/a.jpg,x,extra\nimgs/a.jpg\nimgs/b.png,ok\n")
    pairs = read_pairs(path, skip_bad=True)
    assert [p.error for p in pairs] == ["the row has 3 fields, the header 2", "the 'text' column is missing", None]
    with pytest.raises(ValueError, match=r"2 of the 3 rows are bad; the first, line 2: the row has 3 fields"):
        read_pairs(path)


def test_rows_that_escaped_read_pairs_are_bad_rows(images, tmp_path):
    """tests/fuzz/corpus/pairs/crash-*: a JSON row nested thousands deep (RecursionError from
    the C scanner), a 5000-digit id (int conversion's digit limit) and an image name too long
    for the file system (OSError from pathlib) each escaped read_pairs, even with skip_bad."""
    _jsonl(tmp_path / "p.jsonl", [{"image": "imgs/a.jpg", "text": "fine"}, "[" * 5000,
                                  '{"image": "imgs/a.jpg", "text": "x", "id": ' + "9" * 5000 + "}"])
    pairs = read_pairs(tmp_path / "p.jsonl", skip_bad=True)
    assert [p.error for p in pairs] == [
        None, "not usable JSON (nested too deeply)",
        "not usable JSON (Exceeds the limit (4300 digits) for integer string conversion)"]
    with pytest.raises(ValueError, match=r"2 of the 3 rows are bad; the first, line 2: not usable JSON"):
        read_pairs(tmp_path / "p.jsonl")
    (tmp_path / "p.csv").write_text("image,text\nimgs/a.jpg,fine\n" + "a" * 5000 + ",x\n")
    bad = read_pairs(tmp_path / "p.csv", skip_bad=True).bad
    assert [p.where for p in bad] == ["line 3"] and bad[0].error.endswith(": File name too long")


def test_an_image_path_with_a_nul_character_is_a_bad_row(images, tmp_path):
    """tests/fuzz/corpus/pairs/crash-tilde-path-with-nul.csv: a CSV image name "~a.pn" followed by NUL bytes
    escaped read_pairs as "ValueError: embedded null byte" (os.path.expanduser looked the user
    up), even with skip_bad; any NUL in a path is now the row's own error."""
    (tmp_path / "p.csv").write_bytes(b"image,text\nimgs/a.jpg,fine\n~a.pn\x00\x00,x\nimgs/a\x00.jpg,y\n")
    pairs = read_pairs(tmp_path / "p.csv", skip_bad=True)
    assert [p.error is None for p in pairs] == [True, False, False]
    assert pairs.bad[0].error == 'image path contains a NUL character: "~a.pn\\u0000\\u0000"'
    with pytest.raises(ValueError, match=r"2 of the 3 rows are bad; the first, line 3: image path contains a NUL"):
        read_pairs(tmp_path / "p.csv")
    _jsonl(tmp_path / "p.jsonl", [{"image": "~\u0000", "text": "x"}])
    assert read_pairs(tmp_path / "p.jsonl", skip_bad=True).bad[0].error.startswith("image path contains a NUL")
    # a lone surrogate after "~" escaped the same way (UnicodeEncodeError from expanduser; found in review)
    (tmp_path / "s.jsonl").write_text('{"image": "~\\ud800/a.png", "text": "x"}\n')
    bad = read_pairs(tmp_path / "s.jsonl", skip_bad=True).bad
    assert len(bad) == 1 and bad[0].error.startswith('image path "~\\ud800/a.png" cannot be expanded ('), bad[0].error


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a .jsonl or .csv file"):
        read_pairs(tmp_path / "p.txt")
    (tmp_path / "p.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no rows"):
        read_pairs(tmp_path / "p.jsonl")


def test_a_folder_gives_its_images_sorted_with_their_names_as_ids(images, tmp_path):
    with pytest.raises(ValueError, match=r"1 of the 4 images is bad; the first, image broken.png: cannot read"):
        folder_pairs(images, "the thing")
    pairs = folder_pairs(images, "the thing", skip_bad=True)
    assert [p.id for p in pairs] == ["a.jpg", "b.png", "broken.png", "c.PNG"]
    assert [p.error is None for p in pairs] == [True, True, False, True]
    assert {p.text for p in pairs} == {"the thing"}
    assert folder_pairs(images, "the thing", skip_bad=True).digest == pairs.digest
    assert folder_pairs(images, "another", skip_bad=True).digest != pairs.digest
    with pytest.raises(ValueError, match="the text is empty"):
        folder_pairs(images, " ")
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        folder_pairs(tmp_path / "nope", "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        folder_pairs(empty, "x")
