"""The frozen LLMs: tiny builds and tokenizers, the eval lock, local-directory loading, offline errors, meta."""
import copy
import pickle

import pytest
import torch
from torch import nn

from blip2.config import LLMConfig, flan_t5, opt, tiny_llm
from blip2.llm import build_llm, tiny_llm_tokenizer


def test_tiny_tokenizers():
    tok = tiny_llm_tokenizer("opt")
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id) == ("<pad>", 1, "</s>", 2)
    assert tok.bos_token_id == 2
    encoded = tok("A Red circle?\n")["input_ids"]
    assert encoded[0] == 2 and encoded[-1] == 2  # bos first; "\n" is the eos
    assert tok.convert_ids_to_tokens(encoded[1:-1]) == ["a", "red", "circle", "?"]
    assert tok("zebra")["input_ids"] == [2, tok.unk_token_id]
    assert tok.decode(encoded, skip_special_tokens=True) == "a red circle ?"
    t5 = tiny_llm_tokenizer("t5", ["one", "two"])
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id, len(t5)) == (0, 1, 2, 5)
    assert t5("two one")["input_ids"] == [4, 3, 1]  # eos appended
    with pytest.raises(ValueError, match="kind"):
        tiny_llm_tokenizer("gpt")


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_tiny_llm_is_frozen_and_stays_in_eval(kind):
    model, tok = build_llm(tiny_llm(kind))
    assert model.config.vocab_size == len(tok) and model.dtype == torch.float32
    assert model.config.is_encoder_decoder == (kind == "t5")
    assert not any(p.requires_grad for p in model.parameters())
    parent = nn.ModuleDict({"llm": model, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training and not any(m.training for m in model.modules())
    model.train()
    assert not model.training
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert not any(m.training for m in clone.modules())
    if kind == "t5":
        cfg = model.config
        assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and not cfg.scale_decoder_outputs
        assert model.lm_head.weight is not model.shared.weight  # FlanT5's head is its own


def test_offline_hub_name_fails_at_once_naming_the_local_dir_option():
    with pytest.raises(OSError, match=r"offline.*set llm.name=DIR"):
        build_llm(opt("2.7b"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        build_llm(LLMConfig(kind="opt", name="./no/such/opt"))


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_local_directory_round_trip(tmp_path, kind):
    model, tok = build_llm(tiny_llm(kind))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = build_llm(LLMConfig(kind=kind, name=str(tmp_path), hidden_size=32))
    assert type(loaded) is type(model) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded_tok("a red circle\n")["input_ids"] == tok("a red circle\n")["input_ids"]
    other = "t5" if kind == "opt" else "opt"
    with pytest.raises(ValueError, match=f"'{kind}' model"):
        build_llm(LLMConfig(kind=other, name=str(tmp_path)))


@pytest.mark.parametrize("cfg, billions", [(opt("2.7b"), 2.65), (opt("6.7b"), 6.66), (flan_t5("xl"), 2.85),
                                           (flan_t5("xxl"), 11.14)])
def test_meta_builds_paper_sizes(cfg, billions):
    model, tok = build_llm(cfg, device="meta")
    assert tok is None and next(model.parameters()).device.type == "meta"
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 0.01
