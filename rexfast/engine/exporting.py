"""What ``rexfast export`` adds to the ONNX file from the run it exports: the preprocessing.

:func:`rexfast.export.export_onnx` knows the model; the image normalisation, the text length
and the tokenizer belong to the data pipeline and the run config, so they are gathered here
and written as ``metadata_props`` next to the export's own (the README's export section
lists every key), so that the file can be fed without rexfast.
"""

from __future__ import annotations

import json

__all__ = ["preprocessing_metadata"]


def preprocessing_metadata(cfg, tokenizer=None) -> dict[str, str]:
    """``metadata_props`` entries for the preprocessing of run config ``cfg``: image mean and
    std, how an image becomes the ``images`` input, the text length and the tokenizer (its
    whole vocabulary in id order, one token a line, when ``tokenizer`` is given)."""
    from rexfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD

    from rexfast.models.tokenizer import vocab_of

    props = {
        "image_preprocessing": "RGB, the whole image resized to the file's image_size (PIL bilinear; the aspect "
                               "ratio is not kept), scaled to [0, 1], then per channel minus image_mean, divided "
                               "by image_std; channels first",
        "image_mean": json.dumps(list(IMAGENET_MEAN)),
        "image_std": json.dumps(list(IMAGENET_STD)),
        "text_max_tokens": str(int(cfg.data.max_tokens)),
        "tokenizer": "BERT WordPiece, lower-cased (bert-base-uncased rules): [CLS] sentence [SEP], cut to "
                     "text_max_tokens (a longer sentence loses its [SEP], as in the released code), padded with "
                     "id 0 to the batch's length; attention_mask 1 on real tokens",
    }
    if tokenizer is not None:
        props["tokenizer_vocab"] = "\n".join(vocab_of(tokenizer))
    return props
