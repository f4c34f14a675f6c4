"""Referring-segmentation data: REFER / G-REFER formats, synthetic scenes, tokenization."""

from .datasets import DATASETS, ReferringDataset
from .refer import ReferIndex, load_grefer, load_refer
from .synthetic import generate as generate_synthetic
from .tokenize import load_tokenizer, tokenize

__all__ = [
    "DATASETS", "ReferringDataset", "ReferIndex", "load_refer", "load_grefer", "generate_synthetic",
    "load_tokenizer", "tokenize",
]
