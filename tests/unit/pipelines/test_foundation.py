"""The foundation step on a tiny curated split: every model reloads through its own library's loader and plugs
into the platform (build_image_encoder, build_llm, Blip2Stage2); caching, retraining, input errors, falling losses.
The quality figures at default settings are measured by hand (see the step's report), not here."""
import json
import typing

import open_clip
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, BlipForConditionalGeneration,
                          BlipProcessor)

from blip2.config import LLMConfig, VisionConfig, preset
from blip2.llm import build_llm
from blip2.stage2 import Blip2Stage2, opt_lm_batch, t5_prefix_lm_batch
from blip2.vision import build_image_encoder
from pipelines import foundation
from pipelines.config import ConfigError
from pipelines.foundation.captioner import load_clip_vision, scene_odds, training_caption
from pipelines.foundation.clip import object_regions
from pipelines.data.shards import expand_shards
from pipelines.foundation.common import draw_batch, load_curated, training_views
from pipelines.shapes.captions import STYLES, reading_order
from pipelines.shapes.checker import check_caption, parse_caption
from pipelines.shapes.scene import Obj, Scene, sample_scene
from pipelines.shapes.shards import pack_split
from pipelines.shapes.synth import SynthConfig
from pipelines.shapes.synth import run as synth

TINY = {
    "held_out": 8, "views": 1,
    "clip": {"width": 32, "heads": 4, "text_width": 32, "text_heads": 4, "embed_dim": 16, "region_steps": 25,
             "steps": 6, "batch": 16, "hard_negatives": 1, "spam_negatives": 2},
    "captioner": {"text_width": 32, "text_layers": 1, "steps": 30, "batch": 8, "samples": 2},
    "opt": {"hidden_size": 32, "layers": 1, "ffn_dim": 64, "steps": 30, "batch": 16},
    "t5": {"hidden_size": 32, "layers": 1, "ffn_dim": 64, "steps": 30, "batch": 16},
}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curated")
    synth(SynthConfig(split="curated", images=40, image_size=64), root / "synth", progress=False)
    pack_split(root / "synth", "curated", root / "shards", per_shard=16)
    return str(root / "shards")


@pytest.fixture(scope="module")
def trained(curated, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("foundation")
    cfg = foundation.FoundationConfig(curated=curated, **TINY)
    return cfg, foundation.run(cfg, out, progress=False)


def _gray():
    return Image.new("RGB", (64, 64), (128, 128, 128))


# --------------------------------------------------------------------------------------- the folders
def test_clip_folder_loads_with_open_clip_and_ranks(trained):
    _, result = trained
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{result.clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{result.clip_dir}")
    assert isinstance(tokenizer, open_clip.SimpleTokenizer) and tokenizer.context_length == 32
    image = preprocess(_gray()).unsqueeze(0)  # (1, 3, 64, 64)
    with torch.no_grad():
        cosine = model.encode_image(image, normalize=True) @ model.encode_text(
            tokenizer(["a red circle", "buy now"]), normalize=True).T  # (1, 2)
    assert cosine.shape == (1, 2) and torch.isfinite(cosine).all()
    figures = result.metrics["clip"]
    assert {"rank_vs_wrong_attribute", "rank_vs_spam", "rank_vs_partial", "seconds"} <= set(figures)
    assert figures["region_loss_last"] < figures["region_loss_first"]
    for attribute in ("shape", "color", "size", "position"):  # held-out, from the block stage 1 reads
        assert 0.0 <= figures[f"region_{attribute}_accuracy"] <= 1.0


def test_training_views_rerender_or_add_new_scenes(curated):
    samples, _ = load_curated(expand_shards(curated, what="curated"), 64)
    train = samples[:10]
    same = training_views(train, 2, 64, seed=0)
    assert len(same.images) == len(same.scenes) == 30
    assert same.scenes[10:20] == same.scenes[20:] == [s.scene for s in train]  # the curated scenes, rendered anew
    assert np.asarray(same.images[10]).tobytes() != np.asarray(same.images[20]).tobytes()  # new jitter and noise
    new = training_views(train, 2, 64, seed=0, new_scenes=True)
    assert len(new.images) == 30 and new.scenes[:10] == [s.scene for s in train]  # the shards' images come first
    assert len(set(new.scenes[10:]) - set(s.scene for s in samples)) == 20  # then 20 scenes the shards do not hold
    again = training_views(train, 2, 64, seed=0, new_scenes=True)
    assert again.scenes == new.scenes  # seeded
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(again.images, new.images))


def test_vision_config_builds_the_stage1_encoder(trained):
    _, result = trained
    overrides = foundation.vision_config(result)
    assert overrides == foundation.vision_config(result.output_dir) == foundation.vision_config(result.clip_dir)
    assert overrides["kind"] == "open_clip" and overrides["name"] == f"local-dir:{result.clip_dir}"
    assert (overrides["width"], overrides["layers"], overrides["patch_size"]) == (32, 2, 8)  # 3 blocks, last dropped
    encoder = build_image_encoder(VisionConfig(**overrides))
    tokens = encoder(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 65, 32) and encoder.num_blocks == 2


def test_captioner_folder_loads_with_transformers_and_generates(trained):
    cfg, result = trained
    model = BlipForConditionalGeneration.from_pretrained(result.captioner_dir).eval()
    processor = BlipProcessor.from_pretrained(result.captioner_dir)
    assert processor.tokenizer.convert_ids_to_tokens(model.config.text_config.bos_token_id) == "[DEC]"
    pixel_values = processor(images=[_gray()], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    ids = model.generate(pixel_values=pixel_values, do_sample=True, top_p=0.9, num_return_sequences=3,
                         max_new_tokens=8)
    assert len(processor.batch_decode(ids, skip_special_tokens=True)) == 3
    figures = result.metrics["captioner"]
    assert 0.0 <= figures["sampled_correct"] <= 1.0 and 0.0 <= figures["greedy_correct"] <= 1.0
    assert figures["loss_last"] < figures["loss_first"]


def test_captioner_vit_starts_as_the_clip_vit_and_is_fine_tuned(trained):
    """open_clip's ViT without ln_pre and transformers' BLIP ViT compute the same tokens after the copy; the saved
    captioner's ViT has moved from there (fine-tuned with the captioning loss, `captioner.vit_lr` > 0)."""
    _, result = trained
    clip = open_clip.create_model(f"local-dir:{result.clip_dir}").eval()
    blip = BlipForConditionalGeneration.from_pretrained(result.captioner_dir).eval()
    fresh = BlipForConditionalGeneration(blip.config).eval()
    load_clip_vision(fresh.vision_model, result.clip_dir)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = clip.visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC",
                                                output_extra_tokens=True, intermediates_only=True)
        expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        assert torch.allclose(fresh.vision_model(pixel_values=images).last_hidden_state, expected, atol=1e-5)
        tuned = blip.vision_model(pixel_values=images).last_hidden_state
        assert tuned.shape == expected.shape and not torch.allclose(tuned, expected, atol=1e-3)


def test_position_embeddings_resize_to_a_finer_grid():
    from pipelines.foundation.captioner import resize_positions

    positions = torch.randn(1 + 8 * 8, 16)
    assert resize_positions(positions, 65) is positions
    finer = resize_positions(positions, 1 + 12 * 12)
    assert finer.shape == (145, 16) and torch.equal(finer[0], positions[0])  # [CLS] kept as it is
    flat = resize_positions(torch.cat([positions[:1], torch.full((64, 16), 0.5)]), 145)
    assert torch.allclose(flat[1:], torch.full((144, 16), 0.5), atol=1e-6)  # a constant grid stays constant
    grid = resize_positions(positions, 145)[1:].T.reshape(16, 12, 12)
    coarse = positions[1:].T.reshape(16, 8, 8)
    assert torch.corrcoef(torch.stack([grid[:, ::3, ::3].flatten(), coarse[:, ::2, ::2].flatten()]))[0, 1] > 0.8


def test_captioner_at_a_larger_image_size_than_the_clip(trained, curated, tmp_path):
    """`captioner.image_size` 96 over the CLIP's 64: its ViT reads a 12 x 12 grid, starts from the CLIP's weights
    (position embeddings resized) and its processor resizes images to 96."""
    cfg, result = trained
    sized = cfg.model_copy(update={"models": ["clip", "captioner"],
                                   "captioner": cfg.captioner.model_copy(update={"image_size": 96, "steps": 3})})
    out = foundation.run(sized, tmp_path, progress=False)
    blip = BlipForConditionalGeneration.from_pretrained(out.captioner_dir).eval()
    processor = BlipProcessor.from_pretrained(out.captioner_dir)
    assert blip.config.vision_config.image_size == 96
    assert blip.vision_model.embeddings.position_embedding.shape[1] == 1 + 12 * 12
    pixels = processor(images=[_gray()], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 96, 96)
    with torch.no_grad():
        assert blip.generate(pixel_values=pixels, max_new_tokens=5).shape[0] == 1
    clip = open_clip.create_model(f"local-dir:{out.clip_dir}")
    assert clip.visual.positional_embedding.shape[0] == 1 + 8 * 8  # the CLIP keeps its own size
    with pytest.raises(ValueError, match="captioner.image_size 100"):
        foundation.FoundationConfig(curated="x", captioner={"image_size": 100})
    with pytest.raises(ValueError, match="vit_frozen_blocks=4: the ViT has clip.layers=3"):
        foundation.FoundationConfig(curated="x", captioner={"vit_frozen_blocks": 4})


@pytest.mark.parametrize("vit_lr,frozen_blocks", [(0.0, 0), (2e-3, 0), (2e-3, 2)])
def test_captioner_vit_is_frozen_at_vit_lr_zero_and_learns_otherwise(trained, curated, vit_lr, frozen_blocks):
    """At `vit_lr` 0 no ViT weight moves; otherwise the blocks above `vit_frozen_blocks` (and the final layer
    norm) learn while the patch embedding and the blocks below stay as the CLIP's."""
    from pipelines.foundation.captioner import build_captioner, captioner_processor, train_captioner

    cfg, result = trained
    samples, _ = load_curated([f"{curated}/{name}" for name in ("00000.tar", "00001.tar")], 64)
    processor = captioner_processor(64)
    model = build_captioner(cfg, processor.tokenizer)
    load_clip_vision(model.vision_model, result.clip_dir)
    before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    decoder_before = model.text_decoder.bert.embeddings.word_embeddings.weight.clone()
    captioner_cfg = cfg.captioner.model_copy(update={"steps": 3, "vit_lr": vit_lr, "vit_frozen_blocks": frozen_blocks})
    losses = train_captioner(model, processor, [s.image for s in samples], [s.scene for s in samples],
                             captioner_cfg, 0, progress=False)
    assert len(losses) == 3
    moved = [k for k, v in model.vision_model.state_dict().items() if not torch.equal(v, before[k])]
    if vit_lr == 0:
        assert moved == []
    elif frozen_blocks == 0:
        assert len(moved) > 10 and "embeddings.patch_embedding.weight" in moved
    else:
        assert moved and all(k.startswith(("encoder.layers.2.", "post_layernorm.")) for k in moved), moved
    assert not torch.equal(model.text_decoder.bert.embeddings.word_embeddings.weight, decoder_before)


def test_fused_vit_attention_computes_what_blip_attention_does(trained):
    """`fuse_vision_attention` swaps BLIP's written-out ViT attention for torch's fused one: same tokens, same
    gradients, and the model still saves and reloads as a plain transformers BLIP."""
    from pipelines.foundation.captioner import FusedBlipAttention, fuse_vision_attention

    _, result = trained
    plain = BlipForConditionalGeneration.from_pretrained(result.captioner_dir).eval()
    fused = fuse_vision_attention(BlipForConditionalGeneration.from_pretrained(result.captioner_dir).eval())
    assert all(type(layer.self_attn) is FusedBlipAttention for layer in fused.vision_model.encoder.layers)
    images = torch.randn(3, 3, 64, 64)
    outputs = [model.vision_model(pixel_values=images).last_hidden_state for model in (plain, fused)]
    assert not torch.equal(outputs[0], torch.zeros_like(outputs[0]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    grads = [model.vision_model.encoder.layers[0].self_attn.qkv.weight.grad for model in (plain, fused)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_llm_folders_load_with_auto_classes_and_build_llm(trained, kind):
    _, result = trained
    directory = getattr(result, f"{kind}_dir")
    loader = AutoModelForCausalLM if kind == "opt" else AutoModelForSeq2SeqLM
    model, tokenizer = loader.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    if kind == "opt":
        assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 2)
        assert tokenizer("\n", add_special_tokens=False)["input_ids"] == [2]
    else:
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.decoder_start_token_id) == (0, 1, 0)
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # FlanT5's own head
    assert tokenizer.unk_token_id not in tokenizer("a red circle on the left")["input_ids"]
    overrides = foundation.llm_config(result, kind)
    assert overrides["name"] == directory and overrides["hidden_size"] == 32
    llm, llm_tokenizer = build_llm(LLMConfig(**overrides))
    assert not any(p.requires_grad for p in llm.parameters()) and len(llm_tokenizer) == overrides["vocab_size"]
    figures = result.metrics[kind]
    assert figures["loss_last"] < figures["loss_first"] and figures["held_out_perplexity"] > 1.0
    assert 0.0 <= figures["answer_accuracy"] <= 1.0 and 0.0 <= figures["context_answer_accuracy"] <= 1.0


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_lm_texts_state_the_scene_first_at_the_context_share(curated, share):
    """With context, every text opens with a true caption of its scene, then either another true caption (all
    of it the target) or a VQA prompt whose answer that scene settles; without, none opens with a caption."""
    from pipelines.foundation.language import lm_texts

    samples, _ = load_curated(expand_shards(curated), 64)
    sample = next(s for s in samples if s.questions)
    pairs = lm_texts([sample], np.random.default_rng(0), 200, "opt", context_share=share)
    with_context = [(source, target) for source, target in pairs if " . " in f"{source} "]
    if share == 0.0:
        assert with_context == []
        return
    assert len(with_context) == len(pairs)
    answers = {q["answer"] for q in sample.questions}
    asked = 0
    for source, target in pairs:
        opening, _, rest = f"{source} ".partition(" . ")
        assert check_caption(opening, sample.scene).correct, opening
        if rest.strip():
            asked += 1
            assert rest.strip().startswith("Question:") and source.endswith("Answer:") and target in answers
        else:
            assert check_caption(target, sample.scene).correct, target
    assert 80 < asked < 160  # 60% questions



@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_runs_on_the_stand_ins(trained, kind):
    _, result = trained
    base = preset("tiny" if kind == "opt" else "tiny-t5")
    cfg = base.__class__(name="foundation", vision=VisionConfig(**foundation.vision_config(result)),
                         qformer=base.qformer, llm=LLMConfig(**foundation.llm_config(result, kind)))
    model = Blip2Stage2(cfg)
    tokenizer = model.tokenizer
    captions = ["a red circle on the left", "two shapes: a blue square and a green star"]
    batch = opt_lm_batch(tokenizer, captions) if kind == "opt" else \
        t5_prefix_lm_batch(tokenizer, captions, torch.Generator().manual_seed(0))
    out = model(torch.randn(2, 3, 64, 64), batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.query_tokens.grad is not None
    assert len(model.caption(torch.randn(1, 3, 64, 64), num_beams=1, max_new_tokens=4)) == 1


# ------------------------------------------------------------------------------------------ the step
def test_result_files_and_cache(trained):
    cfg, result = trained
    out = result.output_dir
    recorded = json.loads(open(f"{out}/foundation.json").read())
    assert recorded == result.model_dump(mode="json") and not result.reused
    assert json.loads(open(f"{out}/_SUCCESS.json").read())["config_hash"] == cfg.config_hash()
    again = foundation.run(cfg, out, progress=False)
    assert again.reused and again.metrics == result.metrics and again.clip_dir == result.clip_dir
    assert result.samples == {"train": 32, "held_out": 8, "skipped": 0}


def test_changed_config_retrains_only_that(curated, tmp_path):
    cfg = foundation.FoundationConfig(curated=curated, **{**TINY, "models": ["opt"]})
    first = foundation.run(cfg, tmp_path, progress=False)
    changed = foundation.run(cfg.model_copy(update={"seed": 1}), tmp_path, progress=False)
    assert not first.reused and not changed.reused
    assert changed.metrics["opt"]["loss_first"] != first.metrics["opt"]["loss_first"]
    assert changed.clip_dir is None and sorted(p.name for p in tmp_path.iterdir()) == [
        "_SUCCESS.json", "foundation.json", "opt"]  # no temp or old folders left behind
    assert foundation.run(cfg.model_copy(update={"seed": 1}), tmp_path, progress=False).reused


def test_missing_shards_name_the_field(tmp_path):
    cfg = foundation.FoundationConfig(curated=str(tmp_path / "nowhere" / "{00000..00001}.tar"))
    with pytest.raises(ConfigError, match="curated"):
        foundation.run(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_captioner_learns_its_own_styles_only():
    """Its training captions are true and complete, in its styles, stating sizes / positions at the given shares."""
    assert set(typing.get_args(foundation.config.CaptionStyle)) == set(STYLES)
    cfg = foundation.CaptionerConfig()  # the default: 'plain', every size, no position
    rng, scenes = np.random.default_rng(0), [sample_scene(np.random.default_rng(i)) for i in range(40)]
    for scene in scenes:
        caption = training_caption(scene, rng, cfg)
        mentions = parse_caption(caption).mentions
        assert check_caption(caption, scene).correct and caption.startswith(("a ", "an "))
        assert len(mentions) == len(scene.objects) and all(m.sizes and not m.positions for m in mentions)

    def named(caption: str) -> list[tuple[str, str]]:
        return [("".join(m.colors), m.shape) for m in parse_caption(caption).mentions]

    def in_reading_order(scene: Scene) -> list[tuple[str, str]]:
        return [(o.color, o.shape) for o in reading_order(scene.objects)]

    assert all(named(training_caption(scene, rng, cfg)) == in_reading_order(scene) for scene in scenes)  # default
    shuffled = foundation.CaptionerConfig(order="shuffled")
    assert sum(named(training_caption(scene, rng, shuffled)) != in_reading_order(scene) for scene in scenes) > 5
    mixed = foundation.CaptionerConfig(styles=["there_is", "count"], size_share=0.0)
    captions = [training_caption(scene, rng, mixed) for scene in scenes]
    assert all(c.startswith(("there is", "we can see", "this image shows", "the picture contains", "one ", "two ",
                             "three ")) for c in captions)
    assert not any(word in c.split() for c in captions for word in ("small", "little", "large", "big"))
    with pytest.raises(ValueError, match="captioner.styles is empty"):
        foundation.CaptionerConfig(styles=[])
    with pytest.raises(ValueError):
        foundation.CaptionerConfig(styles=["haiku"])


def test_captioner_draws_crowded_scenes_more_often():
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(300)]
    counts = np.array([len(scene.objects) for scene in scenes])
    assert scene_odds(scenes, 0.0) is None
    odds = scene_odds(scenes, 1.0)
    assert odds.sum() == pytest.approx(1.0) and odds[counts == 3][0] == pytest.approx(3 * odds[counts == 1][0])
    rng, drawn = np.random.default_rng(0), []
    for _ in range(200):
        index, flips, seen = draw_batch(rng, scenes, 16, odds)
        assert len(set(index.tolist())) == 16 and [len(s.objects) for s in seen] == counts[index].tolist()
        drawn += counts[index].tolist()
    share = {n: np.mean(np.array(drawn) == n) for n in (1, 2, 3)}
    expected = {n: (counts == n).sum() * n / counts.sum() for n in (1, 2, 3)}
    assert all(abs(share[n] - expected[n]) < 0.03 for n in (1, 2, 3)), (share, expected)
    assert share[3] > 2 * share[1]


def test_config_is_validated():
    with pytest.raises(ValueError, match="clip.heads"):
        foundation.FoundationConfig(curated="x", clip={"width": 30, "heads": 4})
    with pytest.raises(ValueError, match="'clip' must be trained"):
        foundation.FoundationConfig(curated="x", models=["captioner"])
    with pytest.raises(ValueError, match="extra"):
        foundation.FoundationConfig(curated="x", clip={"stepz": 3})


def test_too_few_samples_for_the_held_out_images(curated, tmp_path):
    with pytest.raises(ConfigError, match="held_out=40"):
        foundation.run(foundation.FoundationConfig(curated=curated, held_out=40, models=["opt"]), tmp_path,
                       progress=False)


def test_main_prints_the_result_and_reports_bad_input(trained, curated, capsys):
    cfg, result = trained
    overrides = [f"{section}.{key}={value}" for section, fields in TINY.items() if isinstance(fields, dict)
                 for key, value in fields.items()] + ["held_out=8", "views=1"]
    assert foundation.main(["--curated", curated, "--output", result.output_dir, "--no-progress", *overrides]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reused"] and printed["clip_dir"] == result.clip_dir
    assert foundation.main(["--curated", "/nowhere/{0..1}.tar", "--output", "/tmp/x", "--no-progress"]) == 2
    assert "curated" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the parts
def test_object_regions_cover_each_object():
    scene = Scene(objects=(Obj("circle", "red", "small", "left"), Obj("star", "blue", "large", "centre")))
    rows, weights, labels = object_regions([scene], grid=8, image_size=64)
    assert rows.tolist() == [0, 0] and torch.allclose(weights.sum(1), torch.ones(2))
    left = weights[0].view(8, 8).nonzero().tolist()
    assert left == [[3, 1], [3, 2], [4, 1], [4, 2]]  # the 2x2 patches around (16, 32)
    assert (weights[1].view(8, 8) > 0).sum() == 16  # a large object: 4x4 patches around (32, 32)
    assert labels.tolist() == [[0, 0, 0, 0], [3, 2, 1, 4]]  # shape, colour, size, position indices


def test_load_curated_reads_scenes_and_texts(curated):
    from pipelines.data.shards import expand_shards
    samples, skipped = load_curated(expand_shards(curated), 64)
    assert len(samples) == 40 and skipped.total() == 0
    assert samples[0].key < samples[-1].key and samples[0].captions and samples[0].questions
    assert samples[0].image.size == (64, 64)


def test_overriding_one_language_model_field_keeps_the_stand_ins_other_defaults():
    cfg = foundation.FoundationConfig(curated="x", opt={"layers": 4}, t5={"layers": 3})
    opt, t5, base = foundation.OptConfig(), foundation.T5Config(), foundation.LanguageModelConfig()
    assert (opt.steps, opt.batch, opt.context_share) != (base.steps, base.batch, base.context_share)
    assert cfg.opt == opt.model_copy(update={"layers": 4}) and cfg.t5 == t5.model_copy(update={"layers": 3})
    assert foundation.FoundationConfig(curated="x").config_hash() == foundation.FoundationConfig(
        curated="x", opt={"steps": opt.steps}).config_hash()
