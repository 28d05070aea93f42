"""BERT-base initialisation of the Q-Former, checked against transformers' BERT on a tiny random BERT."""
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from blip2.bert_init import init_from_bert
from blip2.qformer import padding_mask
from tiny_models import make_batch, tiny_stage1

V_BERT = 127  # + [DEC] = 128, the tiny preset's vocabulary


def tiny_bert_config(**overrides) -> BertConfig:
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  vocab_size=V_BERT, max_position_embeddings=512, layer_norm_eps=1e-12)
    return BertConfig(**{**fields, **overrides})


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    bert = BertForMaskedLM(tiny_bert_config())
    randomize(bert, seed=1)  # LayerNorms, biases, token types: nothing at its trivial init
    bert.tie_weights()
    path = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(path)
    return path


def test_text_pass_is_the_bert_encoder_and_itg_head_is_the_mlm_head(bert_dir):
    model = tiny_stage1(seed=3).eval()
    dec_row = model.qformer.embeddings.word_embeddings.weight[V_BERT].clone()
    report = init_from_bert(model, str(bert_dir))
    bert = BertForMaskedLM.from_pretrained(bert_dir).eval()
    _, ids, mask = make_batch(3, length=9)
    with torch.no_grad():
        want = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        got, _ = model.qformer(model.qformer.embed(None, ids), 0, padding_mask(mask))  # (B, L, D)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.text_pass(ids, mask), want[:, 0], rtol=1e-5, atol=1e-5)
        # our ITG head on the same hidden states: transform + decoder tied to the word embeddings + bias
        logits = model.itg_head(got, model.qformer.embeddings.word_embeddings.weight)  # (B, L, 128)
        torch.testing.assert_close(logits[..., :V_BERT], bert(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(model.qformer.embeddings.word_embeddings.weight[V_BERT], dec_row)  # [DEC] row random
    for layer in model.qformer.layers:  # query FFN = text FFN
        assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
        assert torch.equal(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)
    assert any("crossattention" in k for k in report.left_random)
    assert not any("crossattention" in k for k in report.loaded)
    assert {"query_tokens"} & set(report.left_random) == set()  # only Q-Former / ITG keys are reported
    assert "itg_head.dense.weight" in report.loaded and report.ignored == []
    assert any("rows 64..511 not used" in n for n in report.notes)  # BERT has 512 positions, tiny 64
    assert any("folded" in n for n in report.notes)


def test_a_bert_model_without_mlm_head_leaves_itg_random(tmp_path):
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(tmp_path)
    model = tiny_stage1()
    before = model.itg_head.dense.weight.clone()
    report = init_from_bert(model, str(tmp_path))
    assert torch.equal(model.itg_head.dense.weight, before)
    assert "itg_head.dense.weight" in report.left_random
    assert any("no MLM head" in n for n in report.notes)
    assert "pooler.dense.weight" in report.ignored
    bert = BertModel.from_pretrained(tmp_path)
    positions = model.qformer.embeddings.position_embeddings.weight
    torch.testing.assert_close(positions, bert.embeddings.position_embeddings.weight[:64]
                               + bert.embeddings.token_type_embeddings.weight[0])
    report = init_from_bert(model, str(tmp_path), fold_token_type=False)  # the reference's choice: dropped
    assert torch.equal(positions, bert.embeddings.position_embeddings.weight[:64])
    assert "embeddings.token_type_embeddings.weight" in report.ignored


@pytest.mark.parametrize("change, words", [
    (dict(hidden_size=48, num_attention_heads=4), "hidden_size"),
    (dict(num_hidden_layers=3), "num_hidden_layers"),
    (dict(intermediate_size=96), "intermediate_size"),
])
def test_architecture_mismatch_is_refused(tmp_path, change, words):
    BertForMaskedLM(tiny_bert_config(**change)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=words):
        init_from_bert(tiny_stage1(), str(tmp_path))


def test_shapes_checked_without_config_and_bin_weights_read(tmp_path):
    bert = BertForMaskedLM(tiny_bert_config(vocab_size=200))
    torch.save(bert.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="word_embeddings"):  # 200 rows > our 128
        init_from_bert(tiny_stage1(), str(tmp_path))
    bert = BertForMaskedLM(tiny_bert_config())
    torch.save(bert.state_dict(), tmp_path / "pytorch_model.bin")
    report = init_from_bert(tiny_stage1(), str(tmp_path))
    assert any("config.json not found" in n for n in report.notes)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_bert_config().to_dict(), "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        init_from_bert(tiny_stage1(), str(tmp_path))


def test_missing_weights_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        init_from_bert(tiny_stage1(), str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        init_from_bert(tiny_stage1(), str(tmp_path))


def test_config_bert_weights_initialise_a_new_model(bert_dir):
    import dataclasses

    from blip2.config import preset
    from blip2.stage1 import Blip2Stage1
    from blip2.vision import build_image_encoder

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, bert_weights=str(bert_dir)))
    model = Blip2Stage1(cfg, visual=build_image_encoder(cfg.vision))
    bert = BertModel.from_pretrained(bert_dir)
    torch.testing.assert_close(model.qformer.embeddings.word_embeddings.weight[:V_BERT],
                               bert.embeddings.word_embeddings.weight)
    assert model.bert_init_report.loaded
