"""Frozen image encoders: penultimate-block truncation against the full models, freezing, determinism,
structure of the paper encoders on the meta device, dtype handling, and fast offline failures."""
import json
import os
import time
from dataclasses import replace

import open_clip
import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2VisionConfig, Blip2VisionModel,
                          OPTConfig)

from blip2.config import VisionConfig, eva_vit_g_14, tiny_vision, vit_l_14
from blip2.utils import count_parameters
from blip2.vision import (EvaImageEncoder, FrozenImageEncoder, HFImageEncoder, OpenClipImageEncoder,
                          build_image_encoder, cast_for_device, hf_vision_config, load_hf_vision)

TINY_TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
TINY_VIT = "blip2-test-tiny-vit"  # 3 blocks, 2 kept
TINY_EVA = "blip2-test-tiny-eva"  # timm eva02_tiny: 12 blocks, 11 kept


@pytest.fixture(scope="module")
def tiny_open_clip_configs(tmp_path_factory):
    """Register two tiny open_clip configs (a native ViT and a timm EVA tower) like the offline demo does."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    vit = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8,
                                           "head_width": 16}, "text_cfg": TINY_TEXT}
    eva = {"embed_dim": 32, "custom_text": True, "text_cfg": TINY_TEXT,
           "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                          "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None}}
    (folder / f"{TINY_VIT}.json").write_text(json.dumps(vit))
    (folder / f"{TINY_EVA}.json").write_text(json.dumps(eva))
    open_clip.add_model_config(folder)
    return folder


def _vit_cfg(weights=None) -> VisionConfig:
    return VisionConfig(kind="open_clip", name=TINY_VIT, weights=weights, width=64, layers=2, heads=4, mlp_dim=256,
                        patch_size=8, image_size=32)


def _eva_cfg(weights=None, image_size=56) -> VisionConfig:
    return VisionConfig(kind="eva_clip", name=TINY_EVA, weights=weights, width=192, layers=11, heads=3, mlp_dim=512,
                        patch_size=14, image_size=image_size, layer_norm_eps=1e-6)


def _saved_open_clip(name, path, seed=0):
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    torch.save(model.state_dict(), path)
    return model


def _images(size, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- truncation
def test_open_clip_tokens_are_the_second_to_last_block(tiny_open_clip_configs, tmp_path):
    full = _saved_open_clip(TINY_VIT, tmp_path / "tiny.pt")
    encoder = build_image_encoder(_vit_cfg(weights=str(tmp_path / "tiny.pt")))
    assert isinstance(encoder, OpenClipImageEncoder)
    assert (encoder.width, encoder.num_tokens, encoder.num_blocks) == (64, 17, 2)
    images = _images(32)
    out = full.visual.forward_intermediates(
        images, indices=[1], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
    reference = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    manual = full.visual._embeds(images)
    for block in full.visual.transformer.resblocks[:2]:
        manual = block(manual)
    tokens = encoder(images)  # (B, T, C)
    assert tokens.shape == (2, 17, 64)
    torch.testing.assert_close(tokens, reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, manual.detach(), rtol=1e-5, atol=1e-5)
    last = full.visual.transformer.resblocks[2](manual)
    assert not torch.allclose(tokens, last, atol=1e-3), "the last block must not run"
    assert len(encoder.visual.transformer.resblocks) == 2, "the last block is dropped, not skipped"


def test_open_clip_local_dir_model(tiny_open_clip_configs, tmp_path):
    """A locally trained tiny CLIP saved as a folder (config + weights) needs no registration."""
    (tmp_path / "clip").mkdir()
    _saved_open_clip(TINY_VIT, tmp_path / "clip" / "open_clip_pytorch_model.bin")
    model_cfg = open_clip.get_model_config(TINY_VIT)
    (tmp_path / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    encoder = build_image_encoder(replace(_vit_cfg(), name=f"local-dir:{tmp_path / 'clip'}"))
    reference = build_image_encoder(_vit_cfg(weights=str(tmp_path / "clip" / "open_clip_pytorch_model.bin")))
    images = _images(32)
    torch.testing.assert_close(encoder(images), reference(images))
    assert not torch.equal(encoder.visual.conv1.weight, build_image_encoder(_vit_cfg()).visual.conv1.weight)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        build_image_encoder(replace(_vit_cfg(), name=f"local-dir:{tmp_path / 'missing'}"))
    with pytest.raises(ValueError, match="leave it empty"):
        build_image_encoder(replace(_vit_cfg(weights="x.pt"), name=f"local-dir:{tmp_path / 'clip'}"))


def test_eva_tokens_are_the_second_to_last_block_without_norm(tiny_open_clip_configs, tmp_path):
    full = _saved_open_clip(TINY_EVA, tmp_path / "eva.pt")
    encoder = build_image_encoder(_eva_cfg(weights=str(tmp_path / "eva.pt")))
    assert isinstance(encoder, EvaImageEncoder)
    assert (encoder.width, encoder.num_tokens, encoder.num_blocks) == (192, 17, 11)
    trunk = full.visual.trunk
    trunk.set_input_size(img_size=(56, 56))  # the builder resamples the position embedding the same way
    images = _images(56)
    patches, prefix = trunk.forward_intermediates(images, indices=[10], return_prefix_tokens=True, norm=False,
                                                  output_fmt="NLC", intermediates_only=True)[0]
    reference = torch.cat([prefix, patches], dim=1)  # (B, 17, 192)
    torch.testing.assert_close(encoder(images), reference.detach(), rtol=1e-5, atol=1e-5)
    assert len(encoder.trunk.blocks) == 11
    assert isinstance(encoder.trunk.norm, torch.nn.Identity)


def test_hf_tokens_are_hidden_states_minus_two_of_one_more_layer():
    cfg = tiny_vision()  # 2 layers kept
    encoder = build_image_encoder(cfg, seed=3)
    assert isinstance(encoder, HFImageEncoder) and isinstance(encoder.hf_model, Blip2VisionModel)
    full_config = hf_vision_config(replace(cfg, layers=cfg.layers + 1))
    full = Blip2VisionModel(full_config).eval()
    missing, unexpected = full.load_state_dict(encoder.hf_model.state_dict(), strict=False)
    assert set(missing) == {k for k in full.state_dict() if k.startswith(f"encoder.layers.{cfg.layers}.")}
    assert not unexpected
    images = _images(cfg.image_size)
    hidden = full(pixel_values=images, output_hidden_states=True).hidden_states
    assert len(hidden) == cfg.layers + 2  # embeddings + every layer
    # hidden_states[-2] is the output of layer L (of L + 1): our tokens, with no post_layernorm applied
    torch.testing.assert_close(encoder(images), hidden[-2].detach(), rtol=1e-5, atol=1e-5)
    assert (encoder.num_tokens, encoder.width, encoder.num_blocks) == (cfg.num_tokens, cfg.width, cfg.layers)


def test_hf_state_dict_names_map_onto_blip2():
    encoder = build_image_encoder(tiny_vision())
    names = set(encoder.hf_vision_state_dict())
    expected = {f"vision_model.{k}" for k in Blip2VisionModel(hf_vision_config(tiny_vision())).state_dict()
                if not k.startswith("post_layernorm.")}
    assert names == expected
    assert set(encoder.post_layernorm_state_dict()) == {"weight", "bias"}


def _tiny_blip2(vision: Blip2VisionConfig) -> Blip2ForConditionalGeneration:
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   encoder_hidden_size=vision.hidden_size, vocab_size=100)
    text = OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, vocab_size=100,
                     word_embed_proj_dim=32)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer, text_config=text.to_dict(),
                         num_query_tokens=4)
    return Blip2ForConditionalGeneration(config).eval()


def test_load_hf_vision_from_a_sharded_full_blip2_checkpoint(tmp_path):
    cfg = tiny_vision()
    torch.manual_seed(0)
    model = _tiny_blip2(hf_vision_config(cfg))
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.normal_()  # a trained ln_vision is not (1, 0)
    model.save_pretrained(tmp_path / "blip2", max_shard_size="50KB")
    assert (tmp_path / "blip2" / "model.safetensors.index.json").exists()
    encoder, ln_vision = load_hf_vision(str(tmp_path / "blip2"))
    images = _images(cfg.image_size)
    hidden = model.vision_model(pixel_values=images, output_hidden_states=True).hidden_states
    torch.testing.assert_close(encoder(images), hidden[-1].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ln_vision["weight"], model.vision_model.post_layernorm.weight.detach())
    built = build_image_encoder(replace(cfg, kind="hf", name=str(tmp_path / "blip2")))
    torch.testing.assert_close(built(images), hidden[-1].detach(), rtol=1e-5, atol=1e-5)


def test_load_hf_vision_from_a_saved_vision_model(tmp_path):
    encoder = build_image_encoder(tiny_vision(), seed=5)
    encoder.hf_model.save_pretrained(tmp_path / "vision")
    loaded, _ = load_hf_vision(str(tmp_path / "vision"))
    images = _images(32)
    torch.testing.assert_close(loaded(images), encoder(images))


# -------------------------------------------------------------------------------------- frozen
@pytest.mark.parametrize("kind", ["tiny", "open_clip"])
def test_frozen(kind, tiny_open_clip_configs):
    encoder = build_image_encoder(tiny_vision() if kind == "tiny" else _vit_cfg())
    assert isinstance(encoder, FrozenImageEncoder)
    assert count_parameters(encoder) > 0 and count_parameters(encoder, trainable_only=True) == 0
    parent = torch.nn.Sequential(encoder, torch.nn.Dropout(0.5))
    parent.train()
    assert parent.training and parent[1].training
    assert not encoder.training and not any(m.training for m in encoder.modules())
    encoder.train(True)
    assert not encoder.training
    images = _images(32).requires_grad_(True)
    tokens = encoder(images)
    assert not tokens.requires_grad and tokens.grad_fn is None


def test_tiny_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_image_encoder(tiny_vision(), seed=7)
    b = build_image_encoder(tiny_vision(), seed=7)
    c = build_image_encoder(tiny_vision(), seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.state_dict()["hf_model.encoder.layers.0.mlp.fc1.weight"],
                           c.state_dict()["hf_model.encoder.layers.0.mlp.fc1.weight"])
    weights = a.state_dict()["hf_model.encoder.layers.0.mlp.fc1.weight"]
    assert 0.01 < weights.std() < 0.03, "tiny towers are initialised with std 0.02, not HF's 1e-10"


def test_config_mismatch_is_reported(tiny_open_clip_configs):
    with pytest.raises(ValueError, match="width: config 65, model 64"):
        build_image_encoder(replace(_vit_cfg(), width=65))


def test_wrong_image_size_is_reported():
    encoder = build_image_encoder(tiny_vision())
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\)"):
        encoder(torch.zeros(1, 3, 64, 64))


# ----------------------------------------------------------------------------- paper structures
@pytest.mark.parametrize("cfg, width, blocks, params_millions", [
    (vit_l_14(weights=None), 1024, 23, 290.6), (eva_vit_g_14(weights=None), 1408, 39, 985.9)])
def test_paper_encoders_on_meta(cfg, width, blocks, params_millions):
    encoder = build_image_encoder(cfg, device="meta")
    assert (encoder.width, encoder.num_tokens, encoder.num_blocks) == (width, 257, blocks)
    assert all(p.is_meta for p in encoder.parameters())
    assert round(count_parameters(encoder) / 1e6, 1) == params_millions
    with torch.device("meta"):
        again = build_image_encoder(cfg)
    assert all(p.is_meta for p in again.parameters())


def test_hf_vitg_structure_on_meta(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Blip2Config().to_dict()))  # HF defaults: ViT-g, 39 layers
    cfg = replace(eva_vit_g_14(), kind="hf", name=str(tmp_path), weights=None)
    encoder = build_image_encoder(cfg, device="meta")
    assert (encoder.width, encoder.num_tokens, encoder.num_blocks) == (1408, 257, 39)


# --------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("kind", ["tiny", "open_clip"])
def test_half_weights_with_fp32_layernorms(kind, tiny_open_clip_configs):
    encoder = build_image_encoder(tiny_vision() if kind == "tiny" else _vit_cfg(), seed=2)
    images = _images(32)
    reference = encoder(images)
    cast_for_device(encoder, "cpu", dtype=torch.float16)  # what CUDA gets, emulated on the CPU
    for module in encoder.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert module.weight.dtype == torch.float32
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            assert module.weight.dtype == torch.float16
    tokens = encoder(images)
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, reference, rtol=2e-2, atol=2e-2)
    cast_for_device(encoder, "cpu")
    assert all(p.dtype == torch.float32 for p in encoder.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_weights_match_cpu():
    cpu = build_image_encoder(tiny_vision(), seed=4)
    cuda = build_image_encoder(tiny_vision(), device="cuda", seed=4)
    assert cuda.patch_weight().dtype == torch.float16
    assert cuda.hf_model.encoder.layers[0].layer_norm1.weight.dtype == torch.float32
    images = _images(32)
    tokens = cuda(images.cuda())
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens.cpu(), cpu(images), rtol=2e-2, atol=2e-2)


def test_outer_autocast_does_not_change_the_encoder():
    encoder = build_image_encoder(tiny_vision())
    images = _images(32)
    reference = encoder(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = encoder(images)
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, reference)


# ----------------------------------------------------------------------------------- failures
def _fails_fast(build, error, *words):
    start = time.perf_counter()
    with pytest.raises(error) as info:
        build()
    assert time.perf_counter() - start < 5
    for word in words:
        assert word in str(info.value), str(info.value)


def test_offline_hub_names_fail_at_once(tiny_open_clip_configs):
    _fails_fast(lambda: build_image_encoder(vit_l_14()), OSError, "ViT-L-14-quickgelu@openai", "vision.weights")
    _fails_fast(lambda: build_image_encoder(eva_vit_g_14("laion400m_s11b_b41k")), OSError, "EVA01-g-14",
                "vision.weights")
    hub = replace(eva_vit_g_14(), kind="hf", name="Salesforce/blip2-opt-2.7b")
    _fails_fast(lambda: build_image_encoder(hub), OSError, "Salesforce/blip2-opt-2.7b", "vision.weights")
    _fails_fast(lambda: build_image_encoder(replace(_vit_cfg(), name="hf-hub:org/missing-clip")), OSError,
                "hf-hub:org/missing-clip", "vision.weights")


def test_missing_local_paths_and_bad_names(tiny_open_clip_configs, tmp_path):
    missing = str(tmp_path / "nope")
    _fails_fast(lambda: build_image_encoder(_vit_cfg(weights=missing + ".pt")), FileNotFoundError, "nope.pt")
    _fails_fast(lambda: build_image_encoder(replace(tiny_vision(), kind="hf", name=missing)), FileNotFoundError,
                "nope")
    os.makedirs(missing)
    _fails_fast(lambda: build_image_encoder(replace(tiny_vision(), kind="hf", name=missing)), FileNotFoundError,
                "config.json")
    _fails_fast(lambda: build_image_encoder(_vit_cfg(weights="no-such-tag")), ValueError, "no-such-tag")
    _fails_fast(lambda: build_image_encoder(replace(_vit_cfg(), name="ViT-Q-99")), ValueError, "ViT-Q-99")
    # OpenAI weights need QuickGELU: caught before any download
    _fails_fast(lambda: build_image_encoder(replace(vit_l_14(), name="ViT-L-14")), ValueError, "ViT-L-14-quickgelu")
