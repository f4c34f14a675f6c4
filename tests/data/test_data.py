"""REFER / G-REFER loaders, mask decoding, tokenization and ReferringDataset on fixtures
written in the real formats (refs pickle, COCO instances.json, gRefCOCO grefs json)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rexfast.data import DATASETS, ReferringDataset, load_grefer, load_refer, load_tokenizer, tokenize
from rexfast.data.masks import annotations_to_mask, decode_segmentation, encode_mask

H1, W1 = 20, 30  # image 1
H2, W2 = 16, 16  # image 2
WORDS = ["the", "left", "box", "on", "a", "blob", "right", "square", "thing", "two", "boxes", "nothing", "here",
         "cat", "ring", "big", "red"]


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO uncompressed RLE written by hand: column-major run lengths, starting with a run of zeros."""
    flat = m.astype(np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(m.shape), "counts": counts}


def expected_masks():
    rect = np.zeros((H1, W1), bool)
    rect[2:8, 2:12] = True  # polygon (2,2)-(12,8)
    blob = np.zeros((H1, W1), bool)
    blob[10:15, 20:27] = True
    blob[12, 5] = True
    comp = np.zeros((H1, W1), bool)
    comp[14:19, 1:6] = True
    two = np.zeros((H2, W2), bool)
    two[1:5, 1:9] = True  # two overlapping polygons of one object
    two[3:9, 6:12] = True
    over = np.zeros((H1, W1), bool)
    over[5:10, 8:16] = True  # overlaps `rect`
    crowd = np.zeros((H1, W1), bool)
    crowd[0:4, 0:4] = True  # an iscrowd annotation: never part of a gRefCOCO target
    return {"rect": rect, "blob": blob, "comp": comp, "two": two, "over": over, "crowd": crowd}


# pycocotools' compressed RLE of masks["comp"] (written out here so that the fixtures need no pycocotools;
# test_compressed_fixture_is_pycocotools_encoding checks it)
COMP_COUNTS = "R15?0000000b>"


@pytest.fixture
def mask_utils():
    """pycocotools.mask, for the tests that rasterise polygons or compare with it."""
    return pytest.importorskip("pycocotools.mask", reason="rasterising COCO polygons needs pycocotools")


def instances(masks):
    return {
        "images": [{"id": 1, "file_name": "img1.png", "height": H1, "width": W1},
                   {"id": 2, "file_name": "img2.png", "height": H2, "width": W2}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 10, 6], "area": 60,
             "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]]},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
             "segmentation": uncompressed_rle(masks["blob"])},
            {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
             "segmentation": {"size": [H1, W1], "counts": COMP_COUNTS}},
            {"id": 13, "image_id": 2, "category_id": 2, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
             "segmentation": [[1, 1, 9, 1, 9, 5, 1, 5], [6, 3, 12, 3, 12, 9, 6, 9]]},
            {"id": 14, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
             "segmentation": [[8, 5, 16, 5, 16, 10, 8, 10]]},
            {"id": 15, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 4, 4], "area": 16,
             "segmentation": uncompressed_rle(masks["crowd"])},
        ],
        "categories": [{"id": 1, "name": "box", "supercategory": "thing"},
                       {"id": 2, "name": "blob", "supercategory": "thing"}],
    }


def sent(text, sid):
    return {"tokens": text.split(), "raw": text, "sent": text.lower(), "sent_id": sid}


REFS = [
    {"ref_id": 0, "image_id": 1, "ann_id": 10, "category_id": 1, "split": "train", "file_name": "x_0.jpg",
     "sentences": [sent("the left box", 0), sent("box on the left", 1), sent("a box", 2)], "sent_ids": [0, 1, 2]},
    {"ref_id": 1, "image_id": 1, "ann_id": 11, "category_id": 1, "split": "train", "file_name": "x_1.jpg",
     "sentences": [sent("the blob", 3)], "sent_ids": [3]},
    {"ref_id": 2, "image_id": 1, "ann_id": 12, "category_id": 2, "split": "val", "file_name": "x_2.jpg",
     "sentences": [sent("the square", 4), sent("a square thing", 5)], "sent_ids": [4, 5]},
    {"ref_id": 3, "image_id": 2, "ann_id": 13, "category_id": 2, "split": "testA", "file_name": "x_3.jpg",
     "sentences": [sent("the thing", 6)], "sent_ids": [6]},
    {"ref_id": 4, "image_id": 1, "ann_id": 14, "category_id": 1, "split": "testB", "file_name": "x_4.jpg",
     "sentences": [sent("the right box", 7)], "sent_ids": [7]},
]

GREFS = [
    {"ref_id": 0, "image_id": 1, "ann_id": [10, 14, 15], "category_id": [1], "split": "train", "no_target": False,
     "sentences": [sent("two boxes", 0), sent("the boxes", 1)], "sent_ids": [0, 1]},
    {"ref_id": 1, "image_id": 1, "ann_id": [-1], "category_id": [], "split": "train", "no_target": True,
     "sentences": [sent("the cat", 2)], "sent_ids": [2]},
    {"ref_id": 2, "image_id": 2, "ann_id": [13], "category_id": [2], "split": "val", "no_target": False,
     "sentences": [sent("the thing", 3)], "sent_ids": [3]},
    {"ref_id": 3, "image_id": 1, "ann_id": [-1], "category_id": [], "split": "val", "no_target": True,
     "sentences": [sent("nothing here", 4), sent("the big red ring", 5)], "sent_ids": [4, 5]},
]


def write_image(path: Path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path):
    masks = expected_masks()
    inst = instances(masks)
    for folder in ("refcoco", "refclef"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "instances.json").write_text(json.dumps(inst))
        with open(tmp_path / folder / "refs(unc).p", "wb") as f:
            pickle.dump(REFS, f, protocol=2)
    (tmp_path / "grefcoco").mkdir()
    (tmp_path / "grefcoco" / "instances.json").write_text(json.dumps(inst))
    (tmp_path / "grefcoco" / "grefs(unc).json").write_text(json.dumps(GREFS))
    for sub in ("images/train2014", "images/saiapr_tc-12"):
        d = tmp_path / sub
        d.mkdir(parents=True)
        write_image(d / "img1.png", H1, W1, 1)
        write_image(d / "img2.png", H2, W2, 2)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return tmp_path


@pytest.fixture
def tok(root):
    return load_tokenizer(root / "vocab.txt")


# ----------------------------------------------------------------------------- masks

def test_compressed_fixture_is_pycocotools_encoding(mask_utils):
    comp = expected_masks()["comp"]
    assert mask_utils.encode(np.asfortranarray(comp.astype(np.uint8)))["counts"].decode("ascii") == COMP_COUNTS


def test_decode_each_segmentation_form(mask_utils):
    masks = expected_masks()
    anns = {a["id"]: a for a in instances(masks)["annotations"]}
    assert np.array_equal(decode_segmentation(anns[10]["segmentation"], H1, W1), masks["rect"])
    assert np.array_equal(decode_segmentation(anns[11]["segmentation"], H1, W1), masks["blob"])  # uncompressed
    assert np.array_equal(decode_segmentation(anns[12]["segmentation"], H1, W1), masks["comp"])  # compressed str
    as_bytes = dict(anns[12]["segmentation"], counts=anns[12]["segmentation"]["counts"].encode())
    assert np.array_equal(decode_segmentation(as_bytes, H1, W1), masks["comp"])
    assert np.array_equal(decode_segmentation(anns[13]["segmentation"], H2, W2), masks["two"])  # 2 polygons, union
    out = decode_segmentation(anns[10]["segmentation"], H1, W1)
    assert out.dtype == np.bool_ and out.shape == (H1, W1)


def test_union_of_overlapping_annotations_and_encode_roundtrip(mask_utils):
    masks = expected_masks()
    anns = {a["id"]: a for a in instances(masks)["annotations"]}
    union = annotations_to_mask([anns[10], anns[14], None], H1, W1)
    assert np.array_equal(union, masks["rect"] | masks["over"])
    assert (masks["rect"] & masks["over"]).any()  # the fixture really overlaps
    assert not annotations_to_mask([None], H1, W1).any()
    rle = encode_mask(masks["blob"])
    assert isinstance(rle["counts"], str)
    assert np.array_equal(decode_segmentation(json.loads(json.dumps(rle)), H1, W1), masks["blob"])


@pytest.mark.parametrize("segm,match", [
    ({"size": [5, 5], "counts": [25]}, "does not match"),
    ({"size": [H1, W1], "counts": [3, 4]}, "sum to"),
    ([[1, 2, 3]], "odd"),
    ([[1, 1, 2, 2]], "at least 3 points"),
    ([], "empty polygon"),
    ({"counts": "abc"}, "needs 'counts' and 'size'"),
    (42, "unsupported segmentation"),
])
def test_decode_errors(segm, match):
    with pytest.raises(ValueError, match=match):
        decode_segmentation(segm, H1, W1)


# ----------------------------------------------------------------------------- loaders

def test_load_refer_index_and_splits(root, mask_utils):
    idx = load_refer(root, "refcoco", "unc")
    assert idx.task == "res" and len(idx.refs) == 5
    assert idx.splits == ["train", "val", "testA", "testB"]
    assert [r["ref_id"] for r in idx.refs_for_split("train")] == [0, 1]
    assert [r["ref_id"] for r in idx.refs_for_split("testA")] == [3]
    assert [r["ref_id"] for r in idx.refs_for_split("test")] == [3, 4]  # REFER: "test" gathers every test split
    masks = expected_masks()
    assert np.array_equal(idx.mask(idx.refs[0]), masks["rect"])
    assert np.array_equal(idx.mask(idx.refs[3]), masks["two"])
    assert idx.sentences(idx.refs[0]) == ["the left box", "box on the left", "a box"]
    with pytest.raises(ValueError, match="unknown split 'bogus'"):
        idx.refs_for_split("bogus")
    with pytest.raises(ValueError, match="no refs"):
        idx.refs_for_split("testC")


def test_load_grefer_multi_and_no_target(root, mask_utils):
    idx = load_grefer(root)
    assert idx.task == "gres"
    masks = expected_masks()
    multi, nt = idx.refs[0], idx.refs[1]
    # the ref lists annotation 15 too, an iscrowd one: left out, as the official gRefCOCO loader does
    assert idx.ann_ids(multi) == [10, 14]
    assert np.array_equal(idx.mask(multi), masks["rect"] | masks["over"])
    assert not (idx.mask(multi) & masks["crowd"] & ~masks["rect"] & ~masks["over"]).any()
    assert idx.is_no_target(nt) and not idx.mask(nt).any() and idx.mask(nt).shape == (H1, W1)
    assert not idx.is_no_target(multi)
    # "no_target": True alone marks a ref empty, as does ann_id == [-1] alone
    assert idx.is_no_target({"ann_id": [10], "no_target": True})
    assert idx.is_no_target({"ann_id": -1})
    with pytest.raises(ValueError, match="available"):
        idx.refs_for_split("testA")


def test_loader_file_errors(root):
    with pytest.raises(ValueError, match="unknown REFER dataset"):
        load_refer(root, "refcocoz", "unc")
    with pytest.raises(ValueError, match="unknown split_by 'umd'"):
        load_refer(root, "refcoco+", "umd")
    with pytest.raises(FileNotFoundError, match=r"refs\(berkeley\)\.p"):
        load_refer(root, "refclef", "berkeley")
    with pytest.raises(ValueError, match="unknown G-REFER dataset"):
        load_grefer(root, "refcoco")

    (root / "refcoco" / "refs(unc).p").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match=r"corrupt pickle .*refs\(unc\)\.p"):
        load_refer(root, "refcoco", "unc")

    (root / "refclef" / "instances.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"corrupt JSON .*refclef.*instances\.json"):
        load_refer(root, "refclef", "unc")
    (root / "refclef" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"instances\.json"):
        load_refer(root, "refclef", "unc")

    (root / "grefcoco" / "grefs(unc).json").write_text("[{]")
    with pytest.raises(ValueError, match=r"corrupt JSON .*grefs\(unc\)\.json"):
        load_grefer(root)
    (root / "grefcoco" / "grefs(unc).json").unlink()
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\)\.json"):
        load_grefer(root)


@pytest.mark.parametrize("mutate,match", [
    (lambda refs: refs[0].update(ann_id=999), "ann_id 999 is not in"),
    (lambda refs: refs[0].update(image_id=77), "image_id 77 is not in"),
    (lambda refs: refs[1].update(ref_id=0), "duplicate ref_id"),
    (lambda refs: refs[0].pop("sentences"), "lacks keys"),
    (lambda refs: refs[0].update(sentences=[]), "no sentences"),
    (lambda refs: refs[0].update(ann_id=[10, 14]), "exactly one ann_id"),
    (lambda refs: refs[3].update(ann_id=10), "belongs to image 1"),
])
def test_malformed_refs(root, mutate, match):
    refs = [dict(r) for r in REFS]
    mutate(refs)
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(ValueError, match=match):
        load_refer(root, "refcoco", "unc")


def test_refs_must_be_a_list(root):
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps({"refs": GREFS}))
    with pytest.raises(ValueError, match="must hold a list"):
        load_grefer(root)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_file_and_folder(root, tmp_path_factory):
    tok = load_tokenizer(root / "vocab.txt")
    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text((root / "vocab.txt").read_text())
    tok2 = load_tokenizer(folder)
    ids, att = tokenize(tok, "The LEFT box", max_tokens=8)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    expect = [vocab.index(t) for t in ("[CLS]", "the", "left", "box", "[SEP]")]
    assert ids.dtype == torch.int64 and att.dtype == torch.int64 and ids.shape == (8,)
    assert ids.tolist() == expect + [0, 0, 0]
    assert att.tolist() == [1] * 5 + [0] * 3
    assert torch.equal(tokenize(tok2, "the left box", 8)[0], ids)
    # truncation keeps the first max_tokens ids (the official code drops [SEP] too)
    ids5, att5 = tokenize(tok, "the left box on the right", max_tokens=5)
    assert ids5.tolist() == [vocab.index(t) for t in ("[CLS]", "the", "left", "box", "on")]
    assert att5.tolist() == [1] * 5
    assert vocab.index("[UNK]") in tokenize(tok, "zebra", 4)[0].tolist()


def test_tokenizer_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_vocab.txt"):
        load_tokenizer(tmp_path / "missing_vocab.txt")
    empty_dir = tmp_path / "empty_bert"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        load_tokenizer(empty_dir)
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="special token"):
        load_tokenizer(bad)
    tok = load_tokenizer(root / "vocab.txt")
    for text in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty"):
            tokenize(tok, text)
    with pytest.raises(TypeError):
        tokenize(tok, None)


# ----------------------------------------------------------------------------- ReferringDataset

def test_eval_dataset_one_sample_per_sentence(root, tok, mask_utils):
    ds = ReferringDataset(root, "refcoco", "train", tokenizer=tok, image_size=24)
    assert ds.task == "res" and not ds.train
    assert len(ds) == 4  # 3 + 1 sentences
    assert [ds.get(i)["sentence"] for i in range(4)] == ["the left box", "box on the left", "a box", "the blob"]
    assert [ds[i]["ref_id"] for i in range(4)] == [0, 0, 0, 1]
    # eval ignores the seed
    assert ds.get(1, seed=123)["sentence"] == "box on the left"
    with pytest.raises(IndexError):
        ds.get(4)
    assert len(ReferringDataset(root, "refcoco", "test", tokenizer=tok)) == 2


def test_dataset_images_are_read_as_stored_whatever_their_exif_orientation(root, tok, mask_utils):
    """COCO-style annotations are in the stored pixel orientation, and the authors' pipelines do
    not turn images: an image tagged "rotate 90°" is read as stored (only the user-facing
    readers, predict and the Segmenter, turn images: ``load_image(exif_transpose=True)``)."""
    from rexfast.data.batch import original_image
    from rexfast.data.datasets import preprocess_image
    from rexfast.io import load_image

    path = root / "images" / "train2014" / "img1.png"
    stored = np.asarray(Image.open(path).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    assert load_image(path, exif_transpose=True).size == (H1, W1)  # the tag is there: turned, 20 wide
    item = ReferringDataset(root, "refcoco", "train", tokenizer=tok, image_size=24).get(0)
    assert item["orig_size"] == (H1, W1) and np.array_equal(item["orig_mask"].numpy(), expected_masks()["rect"])
    assert np.array_equal(original_image(item), stored)
    assert torch.equal(item["image"], preprocess_image(stored, 24))


def test_item_contents(root, tok, mask_utils):
    S = 24
    ds = ReferringDataset(root, "refcoco", "train", tokenizer=tok, image_size=S, max_tokens=10)
    item = ds.get(0)
    masks = expected_masks()
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert item["target"].shape == (1, S, S) and item["target"].dtype == torch.float32
    assert item["input_ids"].shape == (10,) and item["input_ids"].dtype == torch.int64
    assert item["attention_mask"].dtype == torch.int64 and int(item["attention_mask"].sum()) == 5
    assert item["orig_mask"].dtype == torch.bool and np.array_equal(item["orig_mask"].numpy(), masks["rect"])
    assert item["orig_size"] == (H1, W1)
    assert item["image_path"] == str(root / "images" / "train2014" / "img1.png")
    assert item["no_target"] is False and item["ref_id"] == 0
    # image: PIL bilinear resize, /255, ImageNet normalisation
    pil = Image.open(item["image_path"]).convert("RGB").resize((S, S), Image.BILINEAR)
    manual = (torch.from_numpy(np.asarray(pil, np.float32) / 255).permute(2, 0, 1)
              - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(item["image"], manual, atol=1e-6)
    # target: nearest resize of the mask, values in {0, 1}
    near = np.asarray(Image.fromarray(masks["rect"].astype(np.uint8)).resize((S, S), Image.NEAREST))
    assert np.array_equal(item["target"][0].numpy(), near.astype(np.float32))
    assert set(np.unique(item["target"].numpy())) <= {0.0, 1.0} and item["target"].sum() > 0


def test_preprocess_image_array_and_pil_agree():
    from rexfast.data.datasets import preprocess_image

    arr = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    a = preprocess_image(arr, 5)
    assert a.shape == (3, 5, 5) and a.dtype == torch.float32
    assert torch.equal(a, preprocess_image(Image.fromarray(arr), 5))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(arr.astype(np.float32), 5)
    with pytest.raises(TypeError):
        preprocess_image("img.png", 5)


def test_train_dataset_random_sentence_reproducible(root, tok, mask_utils):
    ds = ReferringDataset(root, "refcoco", "train", tokenizer=tok, train=True, image_size=16)
    assert ds.train and len(ds) == 2  # one sample per ref
    assert ds.get(0)["sentence"] == "the left box"  # seed None: first sentence
    picks = [ds.get(0, seed=s)["sentence"] for s in range(40)]
    assert picks == [ds.get(0, seed=s)["sentence"] for s in range(40)]  # reproducible per seed
    assert set(picks) == {"the left box", "box on the left", "a box"}  # every sentence can be drawn
    assert all(ds.get(1, seed=s)["sentence"] == "the blob" for s in range(3))


def test_gres_dataset(root, tok, mask_utils):
    ds = ReferringDataset(root, "grefcoco", "train", tokenizer=tok, image_size=16)
    assert ds.task == "gres" and len(ds) == 3
    masks = expected_masks()
    multi = ds.get(0)
    assert np.array_equal(multi["orig_mask"].numpy(), masks["rect"] | masks["over"]) and not multi["no_target"]
    nt = ds.get(2)
    assert nt["no_target"] is True and not nt["orig_mask"].any() and nt["target"].sum() == 0
    assert nt["sentence"] == "the cat"
    val = ReferringDataset(root, "grefcoco", "val", tokenizer=root / "vocab.txt", train=True)
    assert len(val) == 2 and val.get(1, seed=0)["no_target"]


def test_no_target_repeat(root, tok, mask_utils):
    once = ReferringDataset(root, "grefcoco", "val", tokenizer=tok, train=True, image_size=16)
    ds = ReferringDataset(root, "grefcoco", "val", tokenizer=tok, train=True, image_size=16, no_target_repeat=3)
    assert len(once) == 2 and len(ds) == 4 and ds.no_target_repeat == 3  # 1 target ref + 3 x 1 no-target ref
    assert [ds.get(i)["no_target"] for i in range(4)] == [False, True, True, True]
    assert ds.get(0)["sentence"] == once.get(0)["sentence"] == "the thing"  # the base order is kept
    # each copy draws its own sentence per seed, from every sentence of the ref
    picks = {ds.get(i, seed=s)["sentence"] for i in (1, 2, 3) for s in range(20)}
    assert picks == {"nothing here", "the big red ring"}
    train = ReferringDataset(root, "grefcoco", "train", tokenizer=tok, train=True, no_target_repeat=2)
    assert [train.refs[i]["ref_id"] for i, _ in train.samples] == [0, 1, 1]


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(no_target_repeat=0), ValueError, "no_target_repeat must be >= 1, got 0"),
    (dict(no_target_repeat=1.5), TypeError, "no_target_repeat must be an int, got float"),
    (dict(no_target_repeat=True), TypeError, "no_target_repeat must be an int, got bool"),
    (dict(no_target_repeat=2, train=False), ValueError, r"training dataset \(train=True\) only"),
    (dict(no_target_repeat=2, dataset="refcoco"), ValueError, "refcoco is a RES dataset"),
])
def test_no_target_repeat_errors(root, tok, kwargs, err, match):
    kwargs = {"dataset": "grefcoco", "train": True, **kwargs}
    with pytest.raises(err, match=match):
        ReferringDataset(root, kwargs.pop("dataset"), "train", tokenizer=tok, **kwargs)


def test_refclef_default_image_root_and_override(root, tok, tmp_path_factory):
    ds = ReferringDataset(root, "refclef", "val", tokenizer=tok)
    assert ds.get(0)["image_path"] == str(root / "images" / "saiapr_tc-12" / "img1.png")
    other = tmp_path_factory.mktemp("imgs")
    write_image(other / "img1.png", H1, W1, 5)
    ds2 = ReferringDataset(root, "refclef", "val", tokenizer=tok, image_root=other)
    assert ds2.get(0)["image_path"] == str(other / "img1.png")
    assert not torch.equal(ds.get(0)["image"], ds2.get(0)["image"])


def test_dataset_errors(root, tok):
    with pytest.raises(ValueError, match="unknown dataset"):
        ReferringDataset(root, "coco", "train", tokenizer=tok)
    with pytest.raises(ValueError, match="unknown split_by 'google'"):
        ReferringDataset(root, "refcocog_umd", "train", split_by="google", tokenizer=tok)
    with pytest.raises(ValueError, match="unknown split"):
        ReferringDataset(root, "refcoco", "nope", tokenizer=tok)
    with pytest.raises(ValueError, match="pass a tokenizer"):
        ReferringDataset(root, "refcoco", "train")
    with pytest.raises(FileNotFoundError, match=r"refcocog.*refs\(umd\)\.p"):
        ReferringDataset(root, "refcocog_umd", "train", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"synthetic.*grefs\(unc\)\.json"):
        ReferringDataset(root, "synthetic", "train")  # <root>/vocab.txt exists, the annotations do not
    (root / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        ReferringDataset(root, "synthetic_res", "train")

    img = root / "images" / "train2014" / "img1.png"
    ds = ReferringDataset(root, "refcoco", "train", tokenizer=tok, image_size=8)
    img.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="img1.png"):
        ds.get(0)
    img.unlink()
    with pytest.raises(FileNotFoundError, match="img1.png"):
        ds.get(0)
    write_image(img, H1 + 1, W1, 0)  # wrong size vs instances.json
    with pytest.raises(ValueError, match="annotations say"):
        ds.get(0)


def test_dataset_registry():
    assert set(DATASETS) == {"refcoco", "refcoco+", "refcocog_umd", "refcocog_google", "refclef", "grefcoco",
                             "synthetic", "synthetic_res"}
    assert {k for k, v in DATASETS.items() if v.task == "gres"} == {"grefcoco", "synthetic"}
