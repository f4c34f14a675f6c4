"""BERT tokenization as in the official LAVT / CGFormer data pipelines.

``tokenizer.encode(sentence_raw, add_special_tokens=True)`` → ``[CLS] … [SEP]``,
truncated to ``max_tokens`` (so a long sentence loses its ``[SEP]``, as in the
official code), zero-padded; the attention mask is 1 on real tokens.
Tokenizers come from local files only (:func:`rexfast.models.tokenizer.load_tokenizer`):
nothing is ever downloaded.
"""

from __future__ import annotations

import warnings

import torch

# Tokenizers belong to the models (a model folder and a checkpoint carry theirs); the data
# pipeline only encodes with them.
from ..models.tokenizer import load_tokenizer

__all__ = ["TextTruncatedWarning", "UnknownWordsWarning", "load_tokenizer", "tokenize"]


class TextTruncatedWarning(UserWarning):
    """A sentence longer than the model reads was cut (the CLI prints it as one ``rexfast: warning:`` line)."""


class UnknownWordsWarning(UserWarning):
    """Most of a sentence's words are not in the tokenizer's vocabulary: the model sees [UNK]s."""


def _kept_words(tokenizer, ids: list[int]) -> str:
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return tokenizer.convert_tokens_to_string([t for t in tokens if t not in tokenizer.all_special_tokens])


def _unknown_words(tokenizer, text: str) -> tuple[list[str], int]:
    """(the words the tokenizer reads as [UNK] only, the number of words), words as BERT's basic
    tokenizer splits them (punctuation apart, so "circle." is the known "circle" and ".")."""
    basic = getattr(tokenizer, "basic_tokenizer", None)
    words = basic.tokenize(text) if basic is not None else text.split()
    unk = tokenizer.unk_token
    unknown = [w for w in words if all(p == unk for p in tokenizer.tokenize(w))]
    return unknown, len(words)


def tokenize(tokenizer, text: str, max_tokens: int = 20, *, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 of shape (max_tokens,).

    With ``warn`` (one sentence from a user; a dataset passes False), a sentence cut to
    ``max_tokens`` gives a :class:`TextTruncatedWarning` naming the words kept, and one whose
    words are mostly unknown to the vocabulary (more than half read as [UNK]) an
    :class:`UnknownWordsWarning` naming them: both would otherwise change the answer silently."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("cannot tokenize an empty or whitespace-only expression")
    if int(max_tokens) < 2:
        raise ValueError(f"max_tokens must be >= 2 (room for [CLS] and [SEP]), got {max_tokens}")
    max_tokens = int(max_tokens)
    full = tokenizer.encode(text, add_special_tokens=True)
    ids = full[:max_tokens]
    if warn:
        if len(full) > max_tokens:
            warnings.warn(
                f"the sentence is {len(full)} tokens long with [CLS] and [SEP], and the model reads {max_tokens}: "
                f"it was cut to {_kept_words(tokenizer, ids)!r}", TextTruncatedWarning, stacklevel=2)
        unknown, count = _unknown_words(tokenizer, text)
        if unknown and 2 * len(unknown) > count:
            shown = ", ".join(map(repr, unknown[:8])) + (", ..." if len(unknown) > 8 else "")
            warnings.warn(
                f"{len(unknown)} of the sentence's {count} words are unknown to the model's tokenizer "
                f"({len(tokenizer)} tokens) and read as [UNK]: {shown}", UnknownWordsWarning, stacklevel=2)
    input_ids = torch.zeros(max_tokens, dtype=torch.int64)
    attention_mask = torch.zeros(max_tokens, dtype=torch.int64)
    input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    attention_mask[: len(ids)] = 1
    return input_ids, attention_mask
