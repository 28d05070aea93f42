"""Export to / import from transformers' BLIP-2 classes, checked numerically against transformers itself."""
import dataclasses
import json

import open_clip
import pytest
import torch
from PIL import Image
from timm.models.eva import Eva
from transformers import (AutoTokenizer, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor,
                          Blip2VisionConfig, Blip2VisionModel, BlipImageProcessor)

from blip2.checkpoint import load_model, save_model
from blip2.config import VisionConfig, eva_vit_g_14, preset, vit_l_14
from blip2.hf_interop import (EXTRAS_FILE, META_FILE, NOTE_FILE, export_stage1, export_stage2, export_vision,
                              import_stage1, import_stage2)
from blip2.llm import tiny_llm_model, tiny_llm_tokenizer
from blip2.stage1 import Blip2Stage1
from blip2.stage2 import Blip2Stage2, end_token_ids, opt_lm_batch, prompt_batch, t5_prefix_lm_batch
from blip2.tokenizer import build_qformer_tokenizer, shapes_vocabulary
from blip2.vision import EvaImageEncoder, build_image_encoder
from tiny_models import make_batch

TOL = dict(rtol=1e-5, atol=1e-5)
TINY_TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
VIT_PRE = "blip2-test-export-vit-ln-pre"  # open_clip ViT with ln_pre (like OpenAI CLIP): refused
VIT_NO_PRE = "blip2-test-export-vit-no-ln-pre"  # open_clip ViT without ln_pre, QuickGELU: exportable
CAPTIONS = ["a red circle on the left", "two blue squares"]


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Noise on every parameter (LayerNorm weights, biases, the key bias...): no mapping passes by luck."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_stage1_model(visual=None, vision_cfg=None, seed=0) -> Blip2Stage1:
    cfg = preset("tiny")
    if vision_cfg is not None:
        cfg = dataclasses.replace(cfg, vision=vision_cfg)
    torch.manual_seed(seed)
    model = Blip2Stage1(cfg, visual=visual)
    perturb(model, seed + 100)
    with torch.no_grad():
        model.temp.fill_(0.05)
    return model.eval()


def images(batch=3, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def loaded(model_class, directory):
    hf, info = model_class.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return hf.eval()


# ------------------------------------------------------------------------------------------ stage 1
def assert_retrieval_matches(model: Blip2Stage1, hf, size=32, tol=TOL):
    """HF's ITM logits (both classes) and ITC similarity (max over queries, not / temp) equal ours."""
    image, ids, mask = make_batch(3)
    image = images(3, size)
    with torch.no_grad():
        itm = hf(pixel_values=image, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        ours_itm = model.itm_pass(model.qformer.image_kv(model.encode_image(image)), ids, mask)
        torch.testing.assert_close(itm.logits_per_image, ours_itm, **tol)
        itc = hf(pixel_values=image, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        feats, _ = model.image_embeddings(image)
        torch.testing.assert_close(itc.logits_per_image, model.itc_similarity(feats, model.text_embeddings(ids, mask)),
                                   **tol)


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory):
    model = tiny_stage1_model()
    directory = tmp_path_factory.mktemp("stage1") / "hf"
    notes = export_stage1(model, directory)
    return model, directory, notes


def test_stage1_export_loads_cleanly_and_matches(stage1_export):
    model, directory, notes = stage1_export
    hf = loaded(Blip2ForImageTextRetrieval, directory)
    assert hf.vision_model.post_layernorm.eps == model.ln_vision.eps == 1e-5  # tiny: exact
    assert_retrieval_matches(model, hf)
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["temp"] == pytest.approx(0.05) and meta["exact_vision_features"] is True
    note = (directory / NOTE_FILE).read_text()
    assert "temp = 0.05" in note and "ITG head" in note and EXTRAS_FILE in note
    assert any("temp" in n for n in notes)


def test_stage1_round_trip_is_identical(stage1_export):
    model, directory, _ = stage1_export
    back = import_stage1(directory)
    assert back.import_report.missing == []
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    for key, value in own.items():
        assert torch.equal(back.state_dict()[key], value), key
    assert back.ln_vision.eps == model.ln_vision.eps and back.dec_token_id == model.dec_token_id
    image, ids, mask = make_batch(4)
    with torch.no_grad():
        torch.manual_seed(0)
        want = model(image, ids, mask)
        torch.manual_seed(0)
        got = back(image, ids, mask)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6)


def test_stage1_import_without_our_extras_reports_itg_and_temp(stage1_export, tmp_path):
    _, directory, _ = stage1_export
    for path in directory.iterdir():
        if path.name not in (EXTRAS_FILE, META_FILE):  # what a published checkpoint has
            (tmp_path / path.name).write_bytes(path.read_bytes())
    back = import_stage1(tmp_path)
    assert set(back.import_report.missing) == {"temp"} | {k for k in back.state_dict() if k.startswith("itg_head.")}
    assert back.temp.item() == pytest.approx(0.07) and back.ln_vision.eps == 1e-5  # SPEC's ln_vision eps
    assert_retrieval_matches(back, loaded(Blip2ForImageTextRetrieval, tmp_path))


def test_an_imported_model_saves_and_reloads_in_our_format(stage1_export, tmp_path):
    """Our checkpoint of an imported model names the HF directory as its frozen tower (vision kind "hf")."""
    _, directory, _ = stage1_export
    imported = import_stage1(directory)
    assert imported.cfg.vision.kind == "hf" and imported.cfg.vision.name == str(directory.absolute())
    save_model(imported, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    image, ids, mask = make_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(back.image_embeddings(image)[0], imported.image_embeddings(image)[0], rtol=0, atol=0)
        torch.testing.assert_close(back.itm_scores(back.encode_image(image), ids, mask),
                                   imported.itm_scores(imported.encode_image(image), ids, mask), rtol=0, atol=0)


def test_the_qformer_tokenizer_and_image_processor_are_saved(stage1_export, tmp_path):
    model, _, _ = stage1_export
    tokenizer = build_qformer_tokenizer(vocab_words=shapes_vocabulary())
    export_stage1(model, tmp_path / "out", tokenizer=tokenizer)
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.bos_token == "[DEC]" and len(saved) == len(tokenizer)
    assert saved("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    processor = BlipImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"height": 32, "width": 32} and processor.image_std[0] == pytest.approx(0.26862954)


def test_export_is_atomic_and_refuses_foreign_encoders(stage1_export, tmp_path):
    model, _, _ = stage1_export
    target = tmp_path / "out"
    export_stage1(model, target)
    before = sorted(p.name for p in target.iterdir())

    class Unknown(torch.nn.Module):
        pass

    broken = tiny_stage1_model()
    broken.visual = Unknown()
    with pytest.raises(ValueError, match="cannot export a Unknown"):
        export_stage1(broken, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


# ---------------------------------------------------------------------------- open_clip and EVA towers
@pytest.fixture(scope="module")
def open_clip_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    vision = {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 12}
    for name, extra in ((VIT_PRE, {}), (VIT_NO_PRE, {"no_ln_pre": True})):
        config = {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {**vision, **extra}, "text_cfg": TINY_TEXT}
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return folder


def open_clip_vision_cfg(name):
    return VisionConfig(kind="open_clip", name=name, width=48, layers=2, heads=4, mlp_dim=192, patch_size=8,
                        image_size=32)


def test_open_clip_with_ln_pre_is_refused(open_clip_configs, tmp_path):
    model = tiny_stage1_model(vision_cfg=open_clip_vision_cfg(VIT_PRE))
    with pytest.raises(ValueError, match="ln_pre"):
        export_stage1(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_open_clip_without_ln_pre_matches(open_clip_configs, tmp_path):
    model = tiny_stage1_model(vision_cfg=open_clip_vision_cfg(VIT_NO_PRE))
    bias = model.visual.visual.transformer.resblocks[0].attn.in_proj_bias
    assert bias[48:96].abs().min() > 0  # a real key bias, dropped by the export
    notes = export_stage1(model, tmp_path / "out")
    hf = loaded(Blip2ForImageTextRetrieval, tmp_path / "out")
    assert hf.config.vision_config.hidden_act == "quick_gelu" and not any("eps" in n for n in notes)
    with torch.no_grad():
        torch.testing.assert_close(hf.vision_model(images()).last_hidden_state, model.encode_image(images()), **TOL)
    assert_retrieval_matches(model, hf)


def test_dropping_the_key_bias_is_exact():
    """A constant key bias adds q_i . b_k to every logit of query i: softmax over the keys does not change."""
    torch.manual_seed(0)
    config = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8, initializer_range=0.02)
    tower = Blip2VisionModel(config).eval()
    perturb(tower, 1, scale=0.5)
    image = images(2)
    with torch.no_grad():
        with_key_bias = tower(image).last_hidden_state
        for layer in tower.encoder.layers:
            assert layer.self_attn.qkv.bias[48:96].abs().min() > 0
            layer.self_attn.qkv.bias[48:96] = 0
        without = tower(image).last_hidden_state
        torch.testing.assert_close(without, with_key_bias, **TOL)  # fp32 rounding only
        tower.encoder.layers[0].self_attn.qkv.bias[:48] = 0  # control: the query bias does matter
        assert (tower(image).last_hidden_state - without).abs().max() > 1e-2


def tiny_eva(**kwargs) -> EvaImageEncoder:
    """An EVA01-style timm trunk (fused qkv with q/v biases, GELU MLP, LayerNorm eps 1e-6), cut like
    blip2.vision.build_eva_clip_encoder: last block dropped, no final norm or head."""
    torch.manual_seed(0)
    trunk = Eva(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0, qkv_bias=True,
                num_classes=0, **kwargs)
    trunk.blocks = trunk.blocks[:-1]
    trunk.norm, trunk.fc_norm, trunk.head = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
    return EvaImageEncoder(trunk)


@pytest.mark.parametrize("fused", [True, False])
def test_eva_export_matches_up_to_the_ln_vision_eps(tmp_path, fused):
    vision_cfg = VisionConfig(kind="eva_clip", name="tiny-eva", width=48, layers=2, heads=4, mlp_dim=96,
                              patch_size=8, image_size=32, layer_norm_eps=1e-6, ln_vision_eps=1e-5)
    model = tiny_stage1_model(visual=tiny_eva(qkv_fused=fused), vision_cfg=vision_cfg)
    notes = export_stage1(model, tmp_path / "out")
    assert any("ln_vision eps" in n for n in notes)
    assert json.loads((tmp_path / "out" / META_FILE).read_text())["exact_vision_features"] is False
    hf = loaded(Blip2ForImageTextRetrieval, tmp_path / "out")
    assert hf.vision_model.post_layernorm.eps == 1e-6  # HF: one eps for the blocks and post_layernorm
    with torch.no_grad():
        tokens = hf.vision_model.encoder(inputs_embeds=hf.vision_model.embeddings(images())).last_hidden_state
        torch.testing.assert_close(tokens, model.visual(images()), **TOL)  # the trunk itself is exact
    assert_retrieval_matches(model, hf, tol=dict(rtol=1e-2, atol=1e-2))  # only the eps differs
    back = import_stage1(tmp_path / "out")  # our importer restores ln_vision's eps: exact again
    assert back.ln_vision.eps == 1e-5
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(images()), model.encode_image(images()), **TOL)


def test_paper_towers_on_meta():
    """EVA ViT-g/14 maps onto transformers' default (ViT-g) Blip2VisionConfig; CLIP ViT-L/14 has ln_pre: refused."""
    vitg = build_image_encoder(eva_vit_g_14(), device="meta")
    export = export_vision(vitg, torch.nn.LayerNorm(1408, eps=1e-5, device="meta"))
    default = Blip2VisionConfig()  # hidden 1408, 39 layers, 16 heads, mlp 6144, eps 1e-6, gelu, 224/14
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias")
    assert {f: getattr(export.config, f) for f in fields} == {f: getattr(default, f) for f in fields}
    with torch.device("meta"):
        keys = {f"vision_model.{k}" for k in Blip2VisionModel(default).state_dict()}
    assert set(export.state) == keys
    assert not export.exact and "1e-06" in export.notes[0]
    vitl = build_image_encoder(vit_l_14(weights=None), device="meta")
    with pytest.raises(ValueError, match="ln_pre.*OpenAI CLIP ViT-L/14"):
        export_vision(vitl, torch.nn.LayerNorm(1024, device="meta"))


@pytest.mark.parametrize("kwargs, words", [
    (dict(use_rot_pos_emb=True, ref_feat_shape=(4, 4)), "rotary"),
    (dict(swiglu_mlp=True), "SwiGLU"),
    (dict(init_values=0.1), "layer scale"),
])
def test_eva_variants_hf_cannot_hold_are_refused(kwargs, words):
    encoder = tiny_eva(**kwargs)
    with pytest.raises(ValueError, match=words):
        export_vision(encoder, torch.nn.LayerNorm(48))


# ------------------------------------------------------------------------------------------ stage 2
def tiny_stage2_model(kind: str, spare_rows: int, seed: int = 0) -> Blip2Stage2:
    """Tiny stage 2; `spare_rows` embedding rows past the tokenizer (OPT-2.7b has 7, FlanT5 28)."""
    cfg = preset("tiny" if kind == "opt" else "tiny-t5")
    tokenizer = tiny_llm_tokenizer(kind)
    torch.manual_seed(seed)
    llm = tiny_llm_model(dataclasses.replace(cfg.llm, vocab_size=len(tokenizer) + spare_rows))
    model = Blip2Stage2(cfg, visual=build_image_encoder(cfg.vision, seed=seed), llm=llm, llm_tokenizer=tokenizer)
    perturb(torch.nn.ModuleList([model.ln_vision, model.qformer, model.language_projection]), seed + 1)
    return model.eval()


def caption_batch(model: Blip2Stage2):
    if model.kind == "opt":
        return opt_lm_batch(model.tokenizer, CAPTIONS)
    return t5_prefix_lm_batch(model.tokenizer, CAPTIONS, torch.Generator().manual_seed(0))


def hf_inputs(hf, ids, mask, num_queries):
    """HF's input_ids start with num_queries <image> placeholders."""
    batch = ids.shape[0]
    image_ids = torch.full((batch, num_queries), hf.config.image_token_index)
    return torch.cat([image_ids, ids], 1), torch.cat([torch.ones(batch, num_queries, dtype=mask.dtype), mask], 1)


def compare_stage2(model: Blip2Stage2, hf, exact_loss: bool):
    """Logits (ours over our vocabulary), loss and greedy generation of HF's model against ours."""
    q, vocab = model.query_tokens.shape[1], model.language_model.get_input_embeddings().weight.shape[0]
    image, batch = images(2), caption_batch(model)
    ids, mask = hf_inputs(hf, batch["input_ids"], batch["attention_mask"], q)
    # OPT labels cover the placeholders too (-100): HF slices the logits to the labels' length and then
    # calls .view on the non-contiguous slice, which fails for a batch > 1 (transformers 5.23)
    labels = torch.cat([torch.full((2, q), -100), batch["labels"]], 1) if model.kind == "opt" else batch["labels"]
    with torch.no_grad():
        out = hf(pixel_values=image, input_ids=ids, attention_mask=mask, labels=labels)
        ours = model(image, batch["input_ids"], batch["attention_mask"], batch["labels"])
        embeds, our_mask = model.llm_inputs(image, batch["input_ids"], batch["attention_mask"])
        extra = {} if model.kind == "opt" else {
            "decoder_input_ids": model.language_model.prepare_decoder_input_ids_from_labels(batch["labels"])}
        logits = model.language_model(inputs_embeds=embeds, attention_mask=our_mask, **extra).logits
    torch.testing.assert_close(out.logits[..., :vocab], logits, **TOL)
    assert torch.all(out.logits[..., vocab:] == 0)  # appended zero rows only
    if exact_loss:
        torch.testing.assert_close(out.loss, ours.loss, **TOL)
    prompts = prompt_batch(model.tokenizer, ["a photo of", "a photo of"])
    options = dict(num_beams=1, max_new_tokens=6, min_new_tokens=0)
    with torch.no_grad():
        want = model.generate_ids(image, prompts["input_ids"], prompts["attention_mask"], **options)
        hf_ids, hf_mask = hf_inputs(hf, prompts["input_ids"], prompts["attention_mask"], q)
        got = hf.generate(pixel_values=image, input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                          eos_token_id=end_token_ids(model.tokenizer, model.kind),
                          pad_token_id=model.tokenizer.pad_token_id, **options)
    got = got[:, hf_ids.shape[1]:] if model.kind == "opt" else got[:, 1:]  # OPT echoes input_ids, T5 a start id
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_export_with_a_spare_row_is_exact(kind, tmp_path):
    model = tiny_stage2_model(kind, spare_rows=3)
    notes = export_stage2(model, tmp_path / "out")
    hf = loaded(Blip2ForConditionalGeneration, tmp_path / "out")
    assert hf.config.image_token_index == len(model.tokenizer) and any("spare embedding row" in n for n in notes)
    if kind == "t5":
        assert hf.language_model.lm_head.weight.data_ptr() != hf.language_model.shared.weight.data_ptr()
    compare_stage2(model, hf, exact_loss=True)
    # the saved processor builds the same inputs: <image> x Q, then the prompt as our tokenizer encodes it
    processor = Blip2Processor.from_pretrained(tmp_path / "out")
    inputs = processor(images=[Image.new("RGB", (40, 50), (200, 30, 30))], text=["a photo of"], return_tensors="pt")
    q, prompt = model.query_tokens.shape[1], prompt_batch(model.tokenizer, ["a photo of"])["input_ids"][0].tolist()
    assert inputs["input_ids"][0].tolist() == [hf.config.image_token_index] * q + prompt
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)  # resized to the tower's square, CLIP-normalised
    red = (200 / 255 - 0.48145466) / 0.26862954
    torch.testing.assert_close(inputs["pixel_values"][0, 0], torch.full((32, 32), red), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=["opt", "t5"])
def appended_export(request, tmp_path_factory):
    model = tiny_stage2_model(request.param, spare_rows=0)
    directory = tmp_path_factory.mktemp(f"stage2-{request.param}") / "hf"
    notes = export_stage2(model, directory)
    return model, directory, notes


def test_stage2_export_without_a_spare_row_appends_a_zero_row(appended_export):
    model, directory, notes = appended_export
    hf = loaded(Blip2ForConditionalGeneration, directory)
    vocab = len(model.tokenizer)
    assert hf.config.image_token_index == vocab
    assert hf.language_model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert any("1 zero row(s) appended" in n for n in notes)
    assert "1 zero row(s) appended" in (directory / NOTE_FILE).read_text()
    compare_stage2(model, hf, exact_loss=False)  # HF's softmax has the one extra (zero) logit


def test_stage2_round_trip_is_identical(appended_export):
    model, directory, _ = appended_export
    back = import_stage2(directory)
    rows = model.language_model.get_input_embeddings().weight.shape
    assert back.language_model.get_input_embeddings().weight.shape == rows  # our appended row removed
    mine, theirs = model.state_dict(), back.state_dict()
    assert set(mine) == set(theirs)
    unused = "visual.hf_model.post_layernorm."  # the frozen tower's own, never run (after import: = ln_vision)
    for key in (k for k in mine if not k.startswith(unused)):
        assert torch.equal(theirs[key], mine[key]), key
    assert back.ln_vision.eps == model.ln_vision.eps and back.kind == model.kind
    assert back.tokenizer("a red circle")["input_ids"] == model.tokenizer("a red circle")["input_ids"]
    batch, image = caption_batch(model), images(2)
    with torch.no_grad():
        torch.testing.assert_close(back(image, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss,
                                   model(image, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss,
                                   rtol=0, atol=0)
    options = dict(num_beams=2, max_new_tokens=5, min_new_tokens=2)
    assert back.caption(image, **options) == model.caption(image, **options)


def test_the_wrong_import_is_refused(appended_export, stage1_export):
    _, stage2_dir, _ = appended_export
    _, stage1_dir, _ = stage1_export
    with pytest.raises(ValueError, match="Blip2ForImageTextRetrieval"):
        import_stage1(stage2_dir)
    with pytest.raises(ValueError, match="Blip2ForConditionalGeneration"):
        import_stage2(stage1_dir)
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_stage1(stage1_dir / "missing")


def test_the_callers_tokenizer_is_not_changed(tmp_path):
    model = tiny_stage2_model("opt", spare_rows=0)
    size = len(model.tokenizer)
    export_stage2(model, tmp_path / "out")
    assert len(model.tokenizer) == size and "<image>" not in model.tokenizer.get_vocab()
    assert "<image>" in AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
