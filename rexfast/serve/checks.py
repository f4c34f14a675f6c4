"""What the web page checks in every request before a model sees it (no gradio here).

Every upload is treated as hostile: the file is opened header-first and its pixel
count checked before a single pixel is decoded, so a decompression bomb (a small file
that decodes to billions of pixels) is refused as PIL's own guard would refuse it, only
earlier and with a limit the server chooses; a file that is not an image, or a truncated
one, is refused with a message naming what is wrong. A sentence must say something, and
one far longer than the model can read is refused with the part the model would read;
a sentence longer than the tokenizer's window is answered, and the answer says where
the tokenizer cut it. Each refusal is a :class:`RequestError` (a ValueError) whose
message is meant for the page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

DEFAULT_MAX_PIXELS = 50_000_000  # 50 megapixels: a 48 MP phone photo passes, a decompression bomb does not
DEFAULT_MAX_SENTENCE_CHARS = 1000
DEFAULT_MAX_FILE_SIZE = "50mb"


class RequestError(ValueError):
    """A request the page refuses; the message says why, for the person who sent it."""


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP"


def open_image(path, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: Optional[str] = None):
    """The RGB PIL image at ``path``, oriented as its EXIF tag says (as browsers show it).

    The size is read from the header and checked against ``max_pixels`` before the pixels
    are decoded; :class:`RequestError` for an upload that is missing or cannot be read, a file
    that is not an image, an image over the limit (PIL's DecompressionBombError included), or
    one that cannot be decoded."""
    from ..io import ClampedReader

    shown = name or os.path.basename(os.fspath(path))
    if not os.path.isfile(path):
        raise RequestError(f"the upload {shown} did not arrive as a file: upload it again")
    # no read asks for more bytes than the upload holds (a chunk may claim gigabytes); opened
    # here, so that an upload that vanished since the check above or cannot be read is refused
    # with a message like every other bad upload, not escaped as an OSError
    try:
        upload = ClampedReader(path)
    except FileNotFoundError:
        raise RequestError(f"the upload {shown} did not arrive as a file: upload it again") from None
    except OSError as exc:
        raise RequestError(f"the upload {shown} could not be read ({exc.strerror or exc}): upload it again") from None
    with upload:
        if os.fstat(upload.fileno()).st_size == 0:
            raise RequestError(f"{shown} is empty (0 bytes): upload a PNG, JPEG, WebP, BMP or GIF image")
        rgb, method = _decode_upload(upload, shown, max_pixels)
    # the upload's own image object (its stored-mode pixels, a decoder's buffer) is gone by
    # here, so turning the RGB copy holds two images of its size at most
    return rgb if method is None else rgb.transpose(method)


def _decode_upload(upload, shown: str, max_pixels: int):
    """(RGB image, EXIF orientation transpose or None) of the open upload, checked; a
    function of its own so that the decoded file's image dies when it returns."""
    from PIL import Image, UnidentifiedImageError

    from ..io import orientation_transpose

    try:
        image = Image.open(upload)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise RequestError(f"{shown} is refused: it would decode to more pixels than PIL allows ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(f"{shown} is not an image this page can read: upload a PNG, JPEG, WebP, BMP or GIF "
                           "image") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise RequestError(f"{shown} has no pixels ({width}×{height})")
        if width * height > max_pixels:
            raise RequestError(
                f"{shown} is {width}×{height} = {_megapixels(width * height)}; this server takes images of at "
                f"most {_megapixels(max_pixels)} (a decompression-bomb guard): scale it down and upload it again")
        try:
            image.load()
            method = orientation_transpose(image)
            rgb = image.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise RequestError(f"{shown} is refused: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(f"{shown} could not be decoded ({exc}): it may be truncated or damaged") from None
        finally:
            image.close()  # the stored-mode pixels go now, also when the decode failed (see io._decode_rgb)
        return rgb, method


def check_image_size(image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The pixel limit for an image already in memory (a PIL image or an (H, W, 3) array)."""
    import numpy as np

    if isinstance(image, np.ndarray):
        height, width = image.shape[:2]
    else:
        width, height = image.size
    if width * height > max_pixels:
        raise RequestError(f"the image is {width}×{height} = {_megapixels(width * height)}; this server takes images "
                           f"of at most {_megapixels(max_pixels)}")


def check_threshold(value) -> float:
    """The mask threshold from the slider (or an API caller): a number strictly inside (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"the mask threshold must be a number between 0 and 1, got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise RequestError(f"the mask threshold must lie strictly between 0 and 1, got {value}")
    return float(value)


@dataclass(frozen=True)
class SentenceCut:
    """How the tokenizer reads a sentence: ``pieces`` word pieces in all, the model reads the
    first ``read`` of them (``max_tokens`` minus [CLS] and, when it fits, [SEP]): ``read_text``;
    ``unknown``: the words its vocabulary lacks (each read as [UNK])."""

    pieces: int
    read: int
    read_text: str
    unknown: tuple

    @property
    def cut(self) -> bool:
        return self.read < self.pieces

    def describe(self) -> str:
        """One sentence for the page: where the tokenizer cut, and the words it does not know ('' when neither)."""
        parts = []
        if self.cut:
            parts.append(f"the tokenizer cut the sentence: the model reads its first {self.read} of {self.pieces} "
                         f"word pieces, “{self.read_text}”")
        if self.unknown:
            shown = ", ".join(self.unknown[:8]) + (f" and {len(self.unknown) - 8} more" if len(self.unknown) > 8 else "")
            parts.append(f"the model's vocabulary lacks {shown} (read as [UNK])")
        return "; ".join(parts)


def sentence_cut(tokenizer, text: str, max_tokens: int) -> SentenceCut:
    """Where ``tokenize(tokenizer, text, max_tokens)`` cuts ``text`` (it keeps the first
    ``max_tokens`` ids of ``[CLS] pieces… [SEP]``, as the authors' data pipelines do)."""
    pieces = tokenizer.tokenize(text)
    read = min(len(pieces), int(max_tokens) - 1)  # [CLS] takes one place; [SEP] is lost when cut
    read_text = tokenizer.convert_tokens_to_string(pieces[:read])
    unk = getattr(tokenizer, "unk_token", "[UNK]")
    words = _words(tokenizer, text)
    unknown = []
    for word in words:
        if word not in unknown and unk in tokenizer.tokenize(word):
            unknown.append(word)
    return SentenceCut(pieces=len(pieces), read=read, read_text=read_text, unknown=tuple(unknown))


def _words(tokenizer, text: str) -> list[str]:
    """The words and punctuation marks BERT splits ``text`` into before word pieces (its
    pre-tokenizer: transformers 5's backend, or 4's slow ``basic_tokenizer``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.pre_tokenizer is not None:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    basic = getattr(tokenizer, "basic_tokenizer", None)
    return basic.tokenize(text) if basic is not None else text.split()


def check_sentence(text, *, max_chars: int = DEFAULT_MAX_SENTENCE_CHARS, tokenizer=None, max_tokens: int = 20) -> str:
    """The sentence, stripped; :class:`RequestError` when it is missing, empty, or longer than
    ``max_chars`` characters (the message then says what the model would have read)."""
    if text is None:
        raise RequestError("type a sentence: say what to segment, e.g. “the red circle”")
    if not isinstance(text, str):
        raise RequestError(f"the sentence must be text, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise RequestError("the sentence is empty: say what to segment, e.g. “the red circle”")
    if len(stripped) > max_chars:
        read = ""
        if tokenizer is not None:  # what the model would read: only the head matters
            cut = sentence_cut(tokenizer, stripped[: 16 * max_tokens], max_tokens)
            read = f"; the model would read only its first {cut.read} word pieces, “{cut.read_text}”"
        raise RequestError(f"the sentence is {len(stripped):,} characters long; this page takes at most "
                           f"{max_chars:,}{read}")
    return stripped


__all__ = ["RequestError", "open_image", "check_image_size", "check_threshold", "check_sentence", "sentence_cut",
           "SentenceCut", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SENTENCE_CHARS", "DEFAULT_MAX_FILE_SIZE"]
