"""Referring-segmentation data: REFER / G-REFER formats, synthetic scenes, tokenization, batching."""

from .batch import collate, eval_mask, original_image, original_mask
from .datasets import DATASETS, ReferringDataset, task_of
from .refer import ReferIndex, load_grefer, load_refer
from .synthetic import generate as generate_synthetic
from .tokenize import load_tokenizer, tokenize

__all__ = [
    "DATASETS", "ReferringDataset", "ReferIndex", "load_refer", "load_grefer", "generate_synthetic",
    "load_tokenizer", "tokenize", "task_of", "collate", "original_mask", "eval_mask", "original_image",
]
