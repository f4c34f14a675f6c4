"""The synthetic scene generator: determinism, real formats, exact masks, vocabulary,
and every expression checked against the scene by an independent interpreter."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from rexfast.data import ReferringDataset, generate_synthetic, load_grefer, load_refer, load_tokenizer, tokenize
from rexfast.data.masks import decode_segmentation
from rexfast.data.synthetic import COLORS, EXPR_TYPES, KINDS, SIZES

S = 64


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    summary = generate_synthetic(root, n_train=60, n_val=15, n_test=15, seed=3, image_size=S)
    return root, summary


def read_all(root):
    d = root / "synthetic"
    return (json.loads((d / "instances.json").read_text()), json.loads((d / "grefs(unc).json").read_text()),
            pickle.loads((d / "refs(unc).p").read_bytes()))


def test_summary_and_layout(syn):
    root, summary = syn
    d = root / "synthetic"
    assert summary["images"] == 90
    assert len(list((d / "images").glob("*.png"))) == 90
    for name in ("instances.json", "grefs(unc).json", "refs(unc).p"):
        assert (d / name).is_file()
    assert (root / "vocab.txt").is_file()
    inst, grefs, refs = read_all(root)
    assert len(inst["images"]) == 90 and len(grefs) == summary["grefs"] and len(refs) == summary["refs"]
    assert {c["name"] for c in inst["categories"]} == set(KINDS)
    for img in inst["images"]:
        assert (img["height"], img["width"]) == (S, S)
    per_image = {}
    for a in inst["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert set(a) >= {"id", "image_id", "segmentation", "bbox", "area", "category_id", "iscrowd"}
    assert set(per_image.values()) <= {2, 3, 4, 5} and len(per_image) == 90
    assert len(set(per_image.values())) >= 3  # varied scene sizes


def test_deterministic_and_split_independent(syn, tmp_path):
    root, _ = syn
    again = tmp_path / "again"
    generate_synthetic(again, n_train=60, n_val=15, n_test=15, seed=3, image_size=S)
    for name in ("instances.json", "grefs(unc).json", "refs(unc).p"):
        assert (root / "synthetic" / name).read_bytes() == (again / "synthetic" / name).read_bytes(), name
    for png in (root / "synthetic" / "images").glob("*.png"):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again / "synthetic" / "images" / png.name)))
    assert (root / "vocab.txt").read_bytes() == (again / "vocab.txt").read_bytes()
    # each image depends on (seed, split, index) only: fewer training images leave val unchanged
    fewer = tmp_path / "fewer"
    generate_synthetic(fewer, n_train=5, n_val=15, n_test=0, seed=3, image_size=S)
    for i in range(15):
        name = f"val_{i:06d}.png"
        assert np.array_equal(np.asarray(Image.open(root / "synthetic" / "images" / name)),
                              np.asarray(Image.open(fewer / "synthetic" / "images" / name)))
    assert not (fewer / "synthetic" / "images" / "test_000000.png").exists()
    other = tmp_path / "other"
    generate_synthetic(other, n_train=5, n_val=0, n_test=0, seed=4, image_size=S)
    assert not np.array_equal(np.asarray(Image.open(root / "synthetic" / "images" / "train_000000.png")),
                              np.asarray(Image.open(other / "synthetic" / "images" / "train_000000.png")))


def test_regenerating_removes_stale_images(tmp_path):
    generate_synthetic(tmp_path, n_train=6, n_val=0, n_test=0, seed=0)
    generate_synthetic(tmp_path, n_train=3, n_val=0, n_test=0, seed=0)
    assert sorted(p.name for p in (tmp_path / "synthetic" / "images").glob("*.png")) == [
        f"train_{i:06d}.png" for i in range(3)]


def test_masks_exact_against_rendered_pixels(syn):
    root, _ = syn
    inst, _, _ = read_all(root)
    anns_by_image = {}
    for a in inst["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    for img in inst["images"]:
        pixels = np.asarray(Image.open(root / "synthetic" / "images" / img["file_name"]).convert("RGB")).astype(int)
        grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
        union = np.zeros((S, S), bool)
        for a in anns_by_image[img["id"]]:
            m = decode_segmentation(a["segmentation"], S, S)
            assert m.any() and not (union & m).any()  # visible masks are disjoint
            union |= m
            rgb = np.array(a["rgb"])
            assert (pixels[m] == rgb).all()  # every mask pixel shows the shape's colour
            assert int((pixels == rgb).all(-1).sum()) == int(m.sum()) == a["area"]  # and no other pixel does
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            base = np.array(COLORS[a["color"]])
            assert np.abs(rgb - base).max() <= 12
        assert np.array_equal(union, ~grey)  # shapes exactly where the pixels are coloured


# ----------------------------------------------------------------------------- an independent interpreter

RELS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
NUMS = {"two": 2, "three": 3, "four": 4, "five": 5}


def parse_desc(words):
    words = list(words)
    size = words.pop(0) if words and words[0] in SIZES else None
    color = words.pop(0) if words and words[0] in COLORS else None
    assert len(words) == 1, words
    noun = words[0]
    plural = noun.endswith("s")
    noun = noun[:-1] if plural else noun
    assert noun in KINDS + ("shape",), noun
    return (size, color, None if noun == "shape" else noun), plural


def interpret(text, objs):
    """Target set (frozenset of indices) of a synthetic expression in a scene, from its words alone."""
    w = text.split()
    n = len(objs)

    def matching(desc):
        size, color, kind = desc
        return frozenset(i for i, o in enumerate(objs) if (size is None or o["size"] == size)
                         and (color is None or o["color"] == color) and (kind is None or o["kind"] == kind))

    def the_one(words):
        desc, plural = parse_desc(words)
        assert not plural
        m = matching(desc)
        return m

    if " except the " in text:
        assert w[:3] in (["every", "shape", "except"], ["all", "shapes", "except"])
        one = the_one(w[4:])
        assert len(one) == 1
        return frozenset(range(n)) - one
    if " and the " in text:
        k = w.index("and")
        a, b = the_one(w[1:k]), the_one(w[k + 2:])
        assert len(a) == 1 and len(b) == 1 and a != b
        return a | b
    for rel, (axis, sign) in RELS.items():
        if f" {rel} the " in text:
            assert w[0] == "the" and w[1] in ("shape", "shapes")
            anchor = the_one(text.split(f" {rel} the ")[1].split())
            assert len(anchor) == 1
            (a,) = anchor
            ca = objs[a]["centroid"][axis]
            return frozenset(j for j in range(n) if j != a and sign * (objs[j]["centroid"][axis] - ca) > 0)
    if len(w) == 3 and w[0] == "the" and w[2] == "shape" and w[1].endswith(("est", "most")):
        key = {"largest": lambda o: o["area"], "smallest": lambda o: -o["area"],
               "leftmost": lambda o: -o["centroid"][0], "rightmost": lambda o: o["centroid"][0],
               "topmost": lambda o: -o["centroid"][1], "lowest": lambda o: o["centroid"][1]}[w[1]]
        best = max(range(n), key=lambda i: key(objs[i]))
        return frozenset([best])
    if w[0] == "both" or (w[0] == "the" and w[1] in NUMS):
        count = 2 if w[0] == "both" else NUMS[w[1]]
        desc, plural = parse_desc(w[1:] if w[0] == "both" else w[2:])
        assert plural
        m = matching(desc)
        assert len(m) == count, (text, m)
        return m
    if w[0] in ("all", "every"):
        desc, plural = parse_desc(w[1:])
        assert plural == (w[0] == "all")
        return matching(desc)
    assert w[0] == "the"
    return the_one(w[1:])


def scene_objects(inst, image_id, cats):
    objs, ids = [], []
    for a in inst["annotations"]:
        if a["image_id"] != image_id:
            continue
        m = decode_segmentation(a["segmentation"], S, S)
        ys, xs = np.nonzero(m)
        objs.append({"color": a["color"], "size": a["size"], "kind": cats[a["category_id"]], "area": int(m.sum()),
                     "centroid": (xs.mean(), ys.mean())})
        ids.append(a["id"])
    return objs, ids


def test_every_expression_denotes_its_targets(syn):
    root, _ = syn
    inst, grefs, refs = read_all(root)
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    scenes = {img["id"]: scene_objects(inst, img["id"], cats) for img in inst["images"]}
    for g in grefs:
        objs, ids = scenes[g["image_id"]]
        truth = frozenset() if g["ann_id"] == [-1] else frozenset(ids.index(a) for a in g["ann_id"])
        assert g["no_target"] == (truth == frozenset())
        for s in g["sentences"]:
            assert interpret(s["raw"], objs) == truth, (s["raw"], g)
            assert s["tokens"] == s["raw"].split() and s["sent"] == s["raw"]
        if g["expr_type"] == "single":
            assert len(truth) == 1
        if g["expr_type"] in ("counting", "compound", "except"):
            assert len(truth) >= 2
    # the RES refs are exactly the single-target expressions of the simple kinds, with int ann_id
    single = [g for g in grefs if len(g["ann_id"]) == 1 and g["ann_id"] != [-1]
              and g["expr_type"] in ("single", "relation", "superlative")]
    assert [r["ref_id"] for r in refs] == [g["ref_id"] for g in single]
    for r, g in zip(refs, single):
        assert isinstance(r["ann_id"], int) and r["ann_id"] == g["ann_id"][0]
        assert r["sentences"] == g["sentences"]


def test_expression_kinds_and_no_target_share(syn):
    root, summary = syn
    _, grefs, _ = read_all(root)
    kinds = {g["expr_type"] for g in grefs}
    assert kinds == set(EXPR_TYPES)
    texts = [s["raw"] for g in grefs for s in g["sentences"]]
    assert any(t.startswith("all ") for t in texts) and any(t.startswith("every shape except") for t in texts)
    assert any(" left of " in t or " right of " in t for t in texts)
    assert any(t.endswith(("est shape", "most shape")) for t in texts)
    nt_sents = sum(len(g["sentences"]) for g in grefs if g["no_target"])
    assert 0.12 <= nt_sents / len(texts) <= 0.25
    assert 0.12 <= summary["no_target_fraction"] <= 0.25
    multi = [g for g in grefs if len(g["ann_id"]) >= 2]
    assert len(multi) >= 0.2 * len(grefs)
    for g in grefs:  # no duplicated sentence within an image
        same = [s["raw"] for h in grefs if h["image_id"] == g["image_id"] for s in h["sentences"]]
        assert len(same) == len(set(same))


def test_deceptive_no_target_mentions_present_attributes(syn):
    root, _ = syn
    inst, grefs, _ = read_all(root)
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    deceptive = 0
    nts = [g for g in grefs if g["no_target"]]
    for g in nts:
        objs, _ = scene_objects(inst, g["image_id"], cats)
        words = set(g["sentences"][0]["raw"].split())
        present = {o["color"] for o in objs} | {o["kind"] for o in objs} | {o["kind"] + "s" for o in objs} | {
            o["size"] for o in objs}
        mentioned = words & (set(COLORS) | set(KINDS) | {k + "s" for k in KINDS} | set(SIZES))
        deceptive += mentioned <= present
    assert deceptive >= 0.5 * len(nts)


def test_vocab_covers_every_expression(syn):
    root, _ = syn
    lines = (root / "vocab.txt").read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(lines) == len(set(lines))
    tok = load_tokenizer(root / "vocab.txt")
    _, grefs, _ = read_all(root)
    for g in grefs:
        for s in g["sentences"]:
            ids, att = tokenize(tok, s["raw"], max_tokens=20)
            real = ids[att.bool()].tolist()
            assert tok.unk_token_id not in real, s["raw"]
            assert real[0] == tok.cls_token_id and real[-1] == tok.sep_token_id  # no truncation at 20
            assert len(real) == len(s["raw"].split()) + 2  # whole words, no word pieces


def test_readable_by_the_loaders(syn):
    root, _ = syn
    gres = load_grefer(root, "synthetic")
    res = load_refer(root, "synthetic", "unc")
    assert set(gres.splits) == {"train", "val", "test"} == set(res.splits)
    for split in ("train", "val", "test"):
        ds = ReferringDataset(root, "synthetic", split, image_size=32)
        assert ds.task == "gres" and len(ds) == sum(len(r["sentences"]) for r in gres.refs_for_split(split))
        tr = ReferringDataset(root, "synthetic", split, image_size=32, train=True)
        assert len(tr) == len(gres.refs_for_split(split))
        rd = ReferringDataset(root, "synthetic_res", split, image_size=32)
        assert rd.task == "res" and len(rd) == sum(len(r["sentences"]) for r in res.refs_for_split(split))
    ds = ReferringDataset(root, "synthetic", "val", image_size=32)
    seen_nt = seen_t = False
    for i in range(len(ds)):
        item = ds.get(i)
        assert item["image"].shape == (3, 32, 32) and item["orig_mask"].shape == (S, S)
        assert item["image_path"].startswith(str(root / "synthetic" / "images"))
        assert item["no_target"] == (not item["orig_mask"].any())
        seen_nt |= item["no_target"]
        seen_t |= not item["no_target"]
    assert seen_nt and seen_t
    item = ReferringDataset(root, "synthetic_res", "test", image_size=S).get(0)
    assert not item["no_target"] and item["orig_mask"].any()
    assert torch.equal(item["target"][0].bool(), item["orig_mask"])  # same size: nearest resize is the identity


def test_argument_checks(tmp_path):
    out = generate_synthetic(tmp_path, n_train=300, n_val=0, n_test=0, seed=1)
    assert out["images"] == 300
    with pytest.raises(ValueError, match="n_val"):
        generate_synthetic(tmp_path, n_train=1, n_val=-1, n_test=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic(tmp_path, n_train=1, n_val=0, n_test=0, image_size=8)
