"""BERT tokenization as in the official LAVT / CGFormer data pipelines.

``tokenizer.encode(sentence_raw, add_special_tokens=True)`` → ``[CLS] … [SEP]``,
truncated to ``max_tokens`` (so a long sentence loses its ``[SEP]``, as in the
official code), zero-padded; the attention mask is 1 on real tokens.
Tokenizers come from local files only (:func:`rexfast.models.tokenizer.load_tokenizer`):
nothing is ever downloaded.
"""

from __future__ import annotations

import torch

# Tokenizers belong to the models (a model folder and a checkpoint carry theirs); the data
# pipeline only encodes with them.
from ..models.tokenizer import load_tokenizer

__all__ = ["load_tokenizer", "tokenize"]


def tokenize(tokenizer, text: str, max_tokens: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 of shape (max_tokens,)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("cannot tokenize an empty or whitespace-only expression")
    if int(max_tokens) < 2:
        raise ValueError(f"max_tokens must be >= 2 (room for [CLS] and [SEP]), got {max_tokens}")
    max_tokens = int(max_tokens)
    ids = tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
    input_ids = torch.zeros(max_tokens, dtype=torch.int64)
    attention_mask = torch.zeros(max_tokens, dtype=torch.int64)
    input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    attention_mask[: len(ids)] = 1
    return input_ids, attention_mask
