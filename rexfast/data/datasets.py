"""``ReferringDataset``: RefCOCO / RefCOCO+ / RefCOCOg / ReferIt / gRefCOCO / synthetic.

Samples follow the LAVT / CGFormer / ReLA pipelines: the image is resized
(bilinear, PIL) to ``image_size``², scaled to [0, 1] and ImageNet-normalised;
the mask is resized with nearest neighbour; the expression (its ``raw`` text)
is BERT-tokenized to ``max_tokens``. Evaluation uses one sample per sentence
(against the mask at the original resolution, ``orig_mask``); training uses one
sample per ref with a sentence drawn at random.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from ..io import load_image
from ..models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from .refer import ReferIndex, load_grefer, load_refer
from .tokenize import load_tokenizer, tokenize

__all__ = ["ReferringDataset", "DATASETS", "DatasetSpec", "task_of", "IMAGENET_MEAN", "IMAGENET_STD",
           "MIN_IMAGE_SIDE", "check_image_size", "load_image", "preprocess_image"]


@dataclass(frozen=True)
class DatasetSpec:
    folder: str  # <root>/<folder>/ holds the annotations
    fmt: str  # "refer" | "grefer"
    split_bys: tuple  # accepted split_by values, the first is the default
    image_dir: str  # default image root, relative to <root>
    task: str  # "res" | "gres"


MASK_RESIZES = ("nearest", "polygon")  # how a GT mask is brought to the input size
EVAL_RESOLUTIONS = ("original", "input")  # where predictions meet the GT: each image's size, or the input size

DATASETS = {
    "refcoco": DatasetSpec("refcoco", "refer", ("unc", "google"), "images/train2014", "res"),
    "refcoco+": DatasetSpec("refcoco+", "refer", ("unc",), "images/train2014", "res"),
    "refcocog_umd": DatasetSpec("refcocog", "refer", ("umd",), "images/train2014", "res"),
    "refcocog_google": DatasetSpec("refcocog", "refer", ("google",), "images/train2014", "res"),
    "refclef": DatasetSpec("refclef", "refer", ("unc", "berkeley"), "images/saiapr_tc-12", "res"),
    "grefcoco": DatasetSpec("grefcoco", "grefer", ("unc",), "images/train2014", "gres"),
    "synthetic": DatasetSpec("synthetic", "grefer", ("unc",), "synthetic/images", "gres"),
    "synthetic_res": DatasetSpec("synthetic", "refer", ("unc",), "synthetic/images", "res"),
}


def task_of(dataset: str) -> str:
    """``"res"`` or ``"gres"``: the task of ``dataset`` (a key of :data:`DATASETS`)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[dataset].task


# The smallest image side rexfast segments. Below it nothing referable fits: the synthetic
# generator counts a shape as an object only from 8 visible pixels on (rexfast.data.synthetic),
# and an image must hold one beside some background. Every image is resized to the model's
# input, so a 1x1 image reaches the model as a uniform field, and its "mask" is the model's
# answer for a blank picture of that colour (tests/engine/test_new_user.py checks both).
MIN_IMAGE_SIDE = 8


def check_image_size(image, what: str = "image") -> None:
    """ValueError naming ``what`` for an image (PIL or (H, W, 3) array) with a side below
    :data:`MIN_IMAGE_SIDE` pixels."""
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ValueError(f"{what} is {w}x{h} pixels; rexfast segments images of at least {MIN_IMAGE_SIDE}x"
                         f"{MIN_IMAGE_SIDE} (a smaller one holds no object to refer to, and reaches the model as a "
                         "nearly uniform field once resized to its input)")


def preprocess_image(image, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, box=None) -> torch.Tensor:
    """float32 (3, size, size): PIL bilinear resize, [0, 1] scaling, normalisation by
    ``mean`` and ``std`` (ImageNet's unless a model folder's preprocessor says otherwise).

    ``image`` is a PIL image or a uint8 (H, W, 3) array. PIL's bilinear resize is a
    triangle filter as wide as the reduction (it antialiases), so a downscale averages
    every source pixel. ``box``: the region of ``image`` to resize (PIL's ``resize(box=)``),
    for a JPEG decoded at reduced size (:class:`rexfast.io.DecodedImage`).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be a uint8 (H, W, 3) array, got {image.dtype} {tuple(image.shape)}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a uint8 array, got {type(image).__name__}")
    size = int(size)
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR, box=box),
                         dtype=np.float32) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((torch.from_numpy(resized).permute(2, 0, 1) - mean_t) / std_t).contiguous()


class ReferringDataset:
    """One dataset split in a referring-segmentation format.

    Args:
        root: the data root (``<root>/<dataset folder>/…``, ``<root>/images/…``).
        dataset: a key of :data:`DATASETS`.
        split: ``train``, ``val``, ``testA``, … (as the annotations define them).
        split_by: the annotation variant (``unc``, ``umd``, ``google``, ``berkeley``); default per dataset.
        image_root: overrides the dataset's default image folder.
        image_size: the square input size S.
        tokenizer: a BERT tokenizer, or a path for :func:`load_tokenizer`; for the
            synthetic datasets ``<root>/vocab.txt`` is used when None.
        max_tokens: token sequence length.
        train: one sample per ref with a random sentence (else one per sentence).
        mask_resize: how the GT mask is brought to ``image_size``² (``target``):
            ``nearest`` (the mask at the original size, resized with nearest
            neighbour) or ``polygon`` (polygons scaled and rasterised at the input
            size, as ReLA's detectron2 mapper does).
        eval_resolution: ``original`` (``eval_mask`` is the mask at the image's own
            size, CGFormer's evaluation) or ``input`` (the GT at the input size
            made by ``mask_resize``, ReLA's evaluation).
        no_target_repeat: GRES training only: each no-target ref is a sample this many
            times per epoch (each time with its own random sentence), so the no-target
            fraction of an epoch goes from f to r·f / (1 + (r − 1)·f). 1 (the default) is
            the released pipelines' one sample per ref.
        targets_only: read the annotations only, to score predictions against them
            (:meth:`target`, :meth:`sample_id`): no tokenizer is loaded and :meth:`get`,
            which makes model inputs, refuses.
    """

    def __init__(self, root, dataset: str, split: str, *, split_by: Optional[str] = None,
                 image_root=None, image_size: int = 480, tokenizer=None, max_tokens: int = 20,
                 train: bool = False, mask_resize: str = "nearest", eval_resolution: str = "original",
                 no_target_repeat: int = 1, targets_only: bool = False):
        task_of(dataset)  # a known name
        spec = DATASETS[dataset]
        if split_by is None:
            split_by = spec.split_bys[0]
        if split_by not in spec.split_bys:
            raise ValueError(f"unknown split_by {split_by!r} for {dataset}; expected one of {list(spec.split_bys)}")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if int(max_tokens) < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        if mask_resize not in MASK_RESIZES:
            raise ValueError(f"mask_resize must be one of {MASK_RESIZES}, got {mask_resize!r}")
        if eval_resolution not in EVAL_RESOLUTIONS:
            raise ValueError(f"eval_resolution must be one of {EVAL_RESOLUTIONS}, got {eval_resolution!r}")
        if isinstance(no_target_repeat, bool) or not isinstance(no_target_repeat, int):
            raise TypeError(f"no_target_repeat must be an int, got {type(no_target_repeat).__name__}")
        if no_target_repeat < 1:
            raise ValueError(f"no_target_repeat must be >= 1, got {no_target_repeat}")
        if no_target_repeat != 1 and not train:
            raise ValueError("no_target_repeat applies to a training dataset (train=True) only: "
                             "evaluation scores every sentence once")
        if no_target_repeat != 1 and spec.task != "gres":
            raise ValueError(f"no_target_repeat={no_target_repeat}: {dataset} is a RES dataset, "
                             "it has no no-target expressions to repeat")
        self.mask_resize, self.eval_resolution = mask_resize, eval_resolution
        self.root = Path(root)
        self.dataset = dataset
        self.split = split
        self.split_by = split_by
        self.task = spec.task
        self.image_size = int(image_size)
        self.max_tokens = int(max_tokens)
        self.train = bool(train)
        self.image_root = Path(image_root) if image_root is not None else self.root / spec.image_dir

        self.targets_only = bool(targets_only)
        if self.targets_only:
            tokenizer = None
        elif tokenizer is None:
            if dataset in ("synthetic", "synthetic_res"):
                tokenizer = self.root / "vocab.txt"
            else:
                raise ValueError(f"{dataset}: pass a tokenizer (or a local vocab.txt / BERT folder path)")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer

        if spec.fmt == "refer":
            self.index: ReferIndex = load_refer(self.root, spec.folder, split_by)
        else:
            self.index = load_grefer(self.root, spec.folder, split_by)
        self.refs = self.index.refs_for_split(split)
        self.no_target_repeat = no_target_repeat
        if self.train:
            self.samples = [(r, None) for r in range(len(self.refs))]
            # the extra copies go after the base samples, so their indices (and r = 1) are unchanged
            no_target = [sample for sample in self.samples if self.index.is_no_target(self.refs[sample[0]])]
            self.samples += no_target * (no_target_repeat - 1)
        else:
            self.samples = [(r, s) for r, ref in enumerate(self.refs) for s in range(len(ref["sentences"]))]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"ReferringDataset(dataset={self.dataset!r}, split={self.split!r}, split_by={self.split_by!r}, "
                f"task={self.task!r}, train={self.train}, samples={len(self)})")

    def __getitem__(self, index: int) -> dict:
        return self.get(index, None)

    def image_path(self, ref: dict) -> Path:
        return self.image_root / self.index.image_info(ref)["file_name"]

    def _input_size_mask(self, ref: dict, mask: np.ndarray) -> np.ndarray:
        """The GT at the input size S² (``target``), made as ``mask_resize`` says."""
        S = self.image_size
        if self.mask_resize == "polygon":  # ReLA's mapper: the GT rasterised at the input size
            return self.index.mask(ref, size=(S, S))
        return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((S, S), Image.NEAREST), dtype=bool)

    def _check_index(self, index: int) -> None:
        n = len(self.samples)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")

    def sample_id(self, index: int) -> str:
        """The evaluation sample's id (eval mode: one sample per sentence): the sentence's
        ``sent_id`` as a string, as the REFER / G-REFER annotations number sentences. Where a
        split's sentences lack a ``sent_id`` or repeat one, every id of the split is
        ``"<ref_id>:<sentence index>"`` instead, which is unique by construction."""
        if self.train:
            raise ValueError("sample ids name evaluation samples (one per sentence); this is a training dataset")
        self._check_index(index)
        if getattr(self, "_sample_ids", None) is None:
            sent_ids = [self.refs[r]["sentences"][k].get("sent_id") for r, k in self.samples]
            if all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in sent_ids) and \
                    len({str(i) for i in sent_ids}) == len(sent_ids):
                self._sample_ids = [str(i) for i in sent_ids]
            else:
                self._sample_ids = [f"{self.refs[r]['ref_id']}:{k}" for r, k in self.samples]
        return self._sample_ids[index]

    def target(self, index: int) -> dict:
        """What an evaluation compares a prediction of sample ``index`` with, read from the
        annotations only (no image decoding, no tokenizer): ``id``, ``eval_mask`` ((H, W)
        bool numpy, as :meth:`get` gives it), ``no_target``, ``orig_size`` (H, W),
        ``image_path`` and ``sentence``."""
        sample_id = self.sample_id(index)
        ref_idx, sent_idx = self.samples[index]
        ref = self.refs[ref_idx]
        info = self.index.image_info(ref)
        mask = self.index.mask(ref)
        eval_mask = mask if self.eval_resolution == "original" else self._input_size_mask(ref, mask)
        return {"id": sample_id, "eval_mask": eval_mask, "no_target": bool(self.index.is_no_target(ref)),
                "orig_size": (int(info["height"]), int(info["width"])), "image_path": str(self.image_path(ref)),
                "sentence": self.index.sentences(ref)[sent_idx]}

    def get(self, index: int, seed: Optional[int] = None) -> dict:
        """Sample ``index``. In training mode ``seed`` picks the sentence
        (``random.Random(seed)``); None picks the first one. Ignored in eval mode."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        if self.targets_only:
            raise ValueError("this dataset reads targets only (targets_only=True): it has no tokenizer to make "
                             "model inputs; use target(index)")
        ref_idx, sent_idx = self.samples[index]
        ref = self.refs[ref_idx]
        sentences = self.index.sentences(ref)
        if sent_idx is None:
            sent_idx = 0 if seed is None else random.Random(seed).randrange(len(sentences))
        sentence = sentences[sent_idx]

        info = self.index.image_info(ref)
        height, width = int(info["height"]), int(info["width"])
        path = self.image_path(ref)
        # decoded in full, never at a reduced size (rexfast.io.decode_image's min_side, which the
        # Segmenter uses for large JPEGs), and as stored, never turned by an EXIF orientation tag (as
        # the Segmenter turns a user's photo): the annotations are in the stored orientation, and
        # training and evaluation see the pixels the authors' pipelines saw, so scores stay comparable
        # with the published ones
        image = load_image(path, exif_transpose=False)
        if image.size != (width, height):
            raise ValueError(f"image {path} is {image.size[0]}x{image.size[1]} (WxH) but its annotations say "
                             f"{width}x{height}")
        mask = self.index.mask(ref)
        no_target = self.index.is_no_target(ref)

        S = self.image_size
        img_t = preprocess_image(image, S)
        target = self._input_size_mask(ref, mask)
        target_t = torch.from_numpy(target.astype(np.float32)).unsqueeze(0)
        input_ids, attention_mask = tokenize(self.tokenizer, sentence, self.max_tokens, warn=False)
        return {
            "image": img_t,
            "target": target_t,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "orig_mask": torch.from_numpy(mask),
            # the mask the evaluation compares with: at the original size, or at the input size (ReLA's protocol)
            "eval_mask": torch.from_numpy(mask) if self.eval_resolution == "original" else torch.from_numpy(target),
            "orig_size": (height, width),
            "image_path": str(path),
            "sentence": sentence,
            "ref_id": ref["ref_id"],
            "image_id": ref["image_id"],
            "sent_index": sent_idx,
            "no_target": bool(no_target),
        }
