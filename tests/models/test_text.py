"""BERT text encoder: built from configs, weights from local files only, strict loading."""

from __future__ import annotations

import pytest
import torch

from rexfast.models import CGFormer, CGFormerConfig
from rexfast.models.text import BERT_TINY, bert_config, build_bert, load_bert_weights


def test_bert_base_config_values():
    cfg = bert_config("bert-base-uncased")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.max_position_embeddings, cfg.type_vocab_size) == (30522, 768, 12, 12, 3072, 512, 2)


def test_weights_from_folder_state_dict_and_hf_prefixes(tmp_path):
    torch.manual_seed(0)
    source = build_bert("tiny")
    source.config.save_pretrained(tmp_path)
    torch.save({"bert." + k: v for k, v in source.state_dict().items()} | {"cls.predictions.bias": torch.zeros(3)},
               tmp_path / "pytorch_model.bin")
    ids = torch.randint(0, 30522, (2, 6))
    expected = source.eval()(input_ids=ids).last_hidden_state
    for spec in (dict(config=tmp_path), dict(config="tiny", weights=tmp_path / "pytorch_model.bin"),
                 dict(config=BERT_TINY, weights=source.state_dict())):
        model = build_bert(**spec).eval()
        assert torch.equal(model(input_ids=ids).last_hidden_state, expected)


def test_strict_bert_loading_lists_bad_keys():
    model = build_bert("tiny")
    state = dict(model.state_dict())
    state.pop("encoder.layer.0.output.dense.bias")
    state["encoder.layer.9.whatever"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing: \['encoder.layer.0.output.dense.bias'\]"):
        load_bert_weights(model, state)


def test_unknown_bert_spec_is_not_downloaded():
    with pytest.raises(ValueError, match="never downloaded"):
        bert_config("bert-large-cased")


def test_cgformer_takes_bert_weights(tmp_path):
    torch.manual_seed(0)
    source = build_bert("tiny")
    torch.save(source.state_dict(), tmp_path / "bert.pt")
    model = CGFormer(CGFormerConfig.tiny(bert_weights=str(tmp_path / "bert.pt")))
    for k, v in source.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[k], v)
