"""The BERT tokenizer the text encoders read: loaded from local files only, stored in
model folders and training checkpoints.

A tokenizer is a lower-casing ``transformers.BertTokenizer`` over a ``vocab.txt``. It
lives with the models (not the data pipeline) because a model is useless without the
vocabulary its text encoder was trained on: the one loader
(:mod:`rexfast.models.loading`) and ``save_pretrained`` both need it. Nothing is ever
downloaded: a folder is read with ``local_files_only=True``.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Union

from ..io import atomic_write_json, atomic_write_text

VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _bert_from_vocab_file(path: Path):
    from transformers import BertTokenizer

    with open(path, encoding="utf-8") as f:
        tokens = {line.rstrip("\n") for line in f}
    # BertTokenizer would silently append missing special tokens as "added tokens"
    for special in SPECIAL_TOKENS:
        if special not in tokens:
            raise ValueError(f"tokenizer vocabulary {path} lacks the special token {special}")

    params = inspect.signature(BertTokenizer.__init__).parameters
    # transformers 5: `vocab_file=` is silently ignored (everything → [UNK]); `vocab=` takes the path.
    if "vocab" in params:
        tok = BertTokenizer(vocab=str(path), do_lower_case=True)
    else:  # transformers 4.x
        tok = BertTokenizer(vocab_file=str(path), do_lower_case=True)
    return tok


def load_tokenizer(path: Union[str, os.PathLike]):
    """A lower-casing ``transformers.BertTokenizer`` from a local ``vocab.txt``
    file or a local folder that holds one (or a saved tokenizer).

    Raises FileNotFoundError when the path does not exist or holds no vocabulary,
    ValueError when the vocabulary lacks the BERT special tokens.
    """
    if path is None:
        raise FileNotFoundError("no tokenizer path given (expected a vocab.txt file or a local BERT folder)")
    p = Path(path)
    if p.is_dir():
        vocab = p / VOCAB_FILE
        if vocab.is_file():
            tok = _bert_from_vocab_file(vocab)
        elif (p / "tokenizer.json").is_file() or (p / TOKENIZER_CONFIG_FILE).is_file():
            from transformers import BertTokenizer

            tok = BertTokenizer.from_pretrained(str(p), local_files_only=True, do_lower_case=True)
        else:
            raise FileNotFoundError(f"tokenizer folder {p} holds no vocab.txt (tokenizers are never downloaded)")
    elif p.is_file():
        tok = _bert_from_vocab_file(p)
    else:
        raise FileNotFoundError(
            f"tokenizer vocabulary not found: {p} (give a local vocab.txt or a folder holding one; "
            "nothing is downloaded)"
        )
    unk = tok.unk_token_id
    for special in ("[CLS]", "[SEP]", "[PAD]"):
        if tok.convert_tokens_to_ids(special) in (None, unk):
            raise ValueError(f"tokenizer vocabulary {p} lacks the special token {special}")
    if tok.pad_token_id != 0:
        # the official pipelines pad with id 0; a different [PAD] id would silently differ
        raise ValueError(f"tokenizer vocabulary {p}: [PAD] must have id 0, has {tok.pad_token_id}")
    return tok


def vocab_of(tokenizer) -> list[str]:
    """The vocabulary in id order (what checkpoints store and ``vocab.txt`` holds)."""
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise ValueError("tokenizer vocabulary ids are not contiguous from 0")
    return [token for token, _ in ordered]


def tokenizer_from_vocab(vocab: list[str]):
    """The tokenizer of a stored vocabulary (a training checkpoint's ``vocab``)."""
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise ValueError("the checkpoint's tokenizer vocabulary must be a list of strings")
    with tempfile.TemporaryDirectory(prefix="rexfast-vocab-") as tmp:
        path = Path(tmp) / VOCAB_FILE
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return load_tokenizer(path)


def save_tokenizer(tokenizer, directory: Union[str, os.PathLike]) -> list[Path]:
    """Write ``vocab.txt`` and ``tokenizer_config.json`` into ``directory`` (each atomically):
    the files ``transformers.BertTokenizer.from_pretrained(directory)`` and
    :func:`load_tokenizer` read, giving the same token ids as ``tokenizer``."""
    directory = Path(directory)
    vocab = vocab_of(tokenizer)
    # (no model_max_length: sentences are truncated to the preprocessor's max_tokens after encoding,
    # as the official pipelines do, and a smaller limit here would only make transformers warn)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
              "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"}
    if "[MASK]" in vocab:
        config["mask_token"] = "[MASK]"
    return [atomic_write_text(directory / VOCAB_FILE, "\n".join(vocab) + "\n"),
            atomic_write_json(directory / TOKENIZER_CONFIG_FILE, config)]


__all__ = ["VOCAB_FILE", "TOKENIZER_CONFIG_FILE", "load_tokenizer", "vocab_of", "tokenizer_from_vocab",
           "save_tokenizer"]
