"""Our checkpoint format: trainable weights only, strict loading with clear errors, atomic writes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, load_config, load_extra, load_into, load_model,
                              load_trainable, save_model, trainable_state_dict)
from blip2.config import preset, tiny_vision
from blip2.stage1 import Blip2Stage1
from blip2.stage2 import Blip2Stage2
from blip2.vision import build_image_encoder
from tiny_models import make_batch


def stage1(name="tiny", seed=0) -> Blip2Stage1:
    torch.manual_seed(seed)
    model = Blip2Stage1(preset(name))  # the tiny encoder is built with seed 0 whatever the global seed
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.05)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = stage1()
    directory = tmp_path / "step-10"
    save_model(model, directory, extra_state={"state.json": {"step": 10}, "optimizer.pt": {"m": torch.ones(3)}})
    return model, directory


def test_stage1_round_trip(saved):
    model, directory = saved
    weights = load_file(str(directory / WEIGHTS_FILE))
    assert set(weights) == set(trainable_state_dict(model)) and not any(k.startswith("visual.") for k in weights)
    cfg, meta = load_config(directory)
    assert cfg == model.cfg and meta["model_class"] == "stage1" and meta["dec_token_id"] == model.dec_token_id
    back = load_model(directory)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    image, ids, mask = make_batch(3)
    with torch.no_grad():
        torch.manual_seed(0)
        want = model(image, ids, mask).loss
        torch.manual_seed(0)
        assert not back.training and torch.equal(back(image, ids, mask).loss, want)
    assert load_extra(directory, "state.json") == {"step": 10}
    assert torch.equal(load_extra(directory, "optimizer.pt")["m"], torch.ones(3))


def test_stage2_round_trip_carries_no_frozen_weights(tmp_path):
    torch.manual_seed(0)
    model = Blip2Stage2(preset("tiny-t5")).eval()
    save_model(model, tmp_path / "ckpt")
    weights = load_file(str(tmp_path / "ckpt" / WEIGHTS_FILE))
    assert set(weights) == set(model.trainable_state_dict())
    assert not any(k.startswith(("visual.", "language_model.")) for k in weights)
    back = load_model(tmp_path / "ckpt", llm=model.language_model, llm_tokenizer=model.tokenizer)
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert load_config(tmp_path / "ckpt")[1]["model_class"] == "stage2"


def test_load_trainable_is_strict():
    model = stage1()
    state = trainable_state_dict(model)
    with pytest.raises(ValueError, match=r"unexpected keys: \['extra.weight'\]"):
        load_trainable(model, {**state, "extra.weight": torch.zeros(1)})
    partial = {k: v for k, v in state.items() if not k.startswith("itg_head.")}
    with pytest.raises(ValueError, match=r"missing keys: \['itg_head\.bias'"):
        load_trainable(model, partial)
    report = load_trainable(model, partial, expected_missing=[r"itg_head\..*"])
    assert sorted(report.missing) == sorted(k for k in state if k.startswith("itg_head."))
    wrong = {**state, "vision_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"vision_proj.weight: checkpoint \(3, 3\), model \(16, 32\)"):
        load_trainable(model, wrong)
    before = model.itm_head.weight.clone()
    with pytest.raises(ValueError):
        load_trainable(model, {**state, "itm_head.weight": state["itm_head.weight"] + 1, "extra": torch.zeros(1)})
    assert torch.equal(model.itm_head.weight, before)  # nothing copied unless everything fits


def _rewrite_weights(directory, change):
    weights = load_file(str(directory / WEIGHTS_FILE))
    change(weights)
    save_file(weights, str(directory / WEIGHTS_FILE))


@pytest.mark.parametrize("change, words", [
    (lambda w: w.update({"visual.hf_model.post_layernorm.weight": torch.ones(48)}), "unexpected keys"),
    (lambda w: w.pop("temp"), r"missing keys: \['temp'\]"),
    (lambda w: w.update({"query_tokens": torch.zeros(1, 5, 32)}), r"query_tokens: checkpoint \(1, 5, 32\)"),
])
def test_broken_checkpoints_name_the_file(saved, change, words):
    _, directory = saved
    _rewrite_weights(directory, change)
    with pytest.raises(ValueError, match=words) as error:
        load_model(directory)
    assert str(directory / WEIGHTS_FILE) in str(error.value)


def test_corrupt_or_truncated_weights(saved):
    _, directory = saved
    path = directory / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated") as error:
        load_model(directory)
    assert str(path) in str(error.value)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_model(directory)


def test_config_that_does_not_match(saved):
    model, directory = saved
    with pytest.raises(ValueError, match=r"config.json: saved config differs.*name: 'tiny' != 'tiny-t5'"):
        load_into(stage1("tiny-t5"), directory)
    # a config.json from another architecture next to these weights: both files are named
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta["config"]["qformer"]["embed_dim"] = 24
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"vision_proj.weight: checkpoint \(16, 32\), model \(24, 32\)") as error:
        load_model(directory)
    assert str(directory / CONFIG_FILE) in str(error.value)
    with pytest.raises(ValueError, match="visual= given does not fit.*width: config 48, model 64"):
        load_model(directory, visual=build_image_encoder(tiny_vision(width=64)))
    meta["config"]["qformer"]["colour"] = "red"
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config.json: not a Blip2Config"):
        load_model(directory)
    (directory / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_model(directory)
    (directory / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(directory)


def test_a_failed_save_leaves_the_old_checkpoint_and_no_debris(saved):
    model, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with torch.no_grad():
        model.temp.fill_(0.2)
    with pytest.raises(TypeError):  # fails after model.safetensors was written to the temporary directory
        save_model(model, directory, extra_state={"state.json": {"step": object()}})
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]
    save_model(model, directory)  # a successful save replaces the old one whole
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert load_model(directory).temp.item() == pytest.approx(0.2)
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]
    with pytest.raises(ValueError, match="plain file name"):
        save_model(model, directory, extra_state={"../escape.json": {}})
