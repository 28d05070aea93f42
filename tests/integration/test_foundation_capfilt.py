"""The offline stand-ins feeding the rest of the pipeline: each reloads through its own library, plugs into
the model library's builders, drives CapFilt, and the CLIP stand-in ranks a correct caption above spam."""
import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, BlipForConditionalGeneration,
                          BlipProcessor)

from blip2.config import LLMConfig, VisionConfig
from blip2.llm import build_llm
from blip2.vision import build_image_encoder
from pipelines import capfilt, foundation
from pipelines.config import ConfigError
from pipelines.shapes import synth
from pipelines.shapes.captions import noisy_caption
from pipelines.shapes.scene import Scene
from pipelines.shapes.shards import pack_split

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    synth.run(synth.SynthConfig(split="curated", images=160, seed=0, image_size=64), str(root / "c"), progress=False)
    synth.run(synth.SynthConfig(split="web", images=24, seed=0, image_size=64, noise_rate=0.4), str(root / "w"),
              progress=False)
    pack_split(root / "c", "curated", root / "curated", per_shard=80)
    pack_split(root / "w", "web", root / "web", per_shard=12)
    return root


def small(world, **extra) -> foundation.FoundationConfig:
    return foundation.FoundationConfig.model_validate({
        "curated": str(world / "curated"), "image_size": 64, "held_out": 16, "views": 0,
        "clip": {"steps": 30, "region_steps": 20, "batch": 32}, "captioner": {"steps": 20, "batch": 16},
        "opt": {"steps": 20}, "t5": {"steps": 20}, **extra})


@pytest.fixture(scope="module")
def models(world, tmp_path_factory):
    return foundation.run(small(world), str(tmp_path_factory.mktemp("foundation")), progress=False)


def test_every_stand_in_reloads_through_its_own_library(models):
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{models.clip_dir}")
    assert preprocess is not None and clip.visual.image_size[0] == 64
    BlipForConditionalGeneration.from_pretrained(models.captioner_dir)
    BlipProcessor.from_pretrained(models.captioner_dir)
    AutoModelForCausalLM.from_pretrained(models.opt_dir), AutoTokenizer.from_pretrained(models.opt_dir)
    AutoModelForSeq2SeqLM.from_pretrained(models.t5_dir), AutoTokenizer.from_pretrained(models.t5_dir)
    encoder = build_image_encoder(VisionConfig(**foundation.vision_config(models)))
    tokens = encoder(torch.zeros(2, 3, 64, 64))
    assert tokens.shape[0] == 2 and tokens.shape[-1] == foundation.vision_config(models)["width"]
    for kind in ("opt", "t5"):
        llm, tokenizer = build_llm(LLMConfig(**foundation.llm_config(models, kind)))
        assert tokenizer is not None and llm.get_input_embeddings().embedding_dim == \
            foundation.llm_config(models, kind)["hidden_size"]
    for name in ("clip", "captioner", "opt", "t5"):
        assert "loss_last" in models.metrics[name] and models.metrics[name]["loss_last"] < \
            models.metrics[name]["loss_first"], name


def test_the_same_config_is_reused_and_missing_shards_are_named(world, models, tmp_path):
    again = foundation.run(small(world), models.output_dir, progress=False)
    assert again.reused and again.clip_dir == models.clip_dir
    with pytest.raises(ConfigError, match="curated"):
        foundation.run(small(world, curated=str(tmp_path / "nothing-here")), str(tmp_path / "out"), progress=False)


def test_the_clip_stand_in_ranks_a_correct_caption_above_spam(world, models):
    ranker = capfilt_ranker(models)
    table = pq.read_table(world / "c" / "curated.parquet").to_pylist()[:16]
    rng = np.random.default_rng(0)
    wins = 0
    for row in table:
        scene = Scene.from_json(row["scene"])
        image = Image.open(world / "c" / "images" / "curated" / f"{row['key']}.jpg").convert("RGB")
        correct, spam = row["caption"], noisy_caption(scene, rng, "spam")
        scores = ranker.score([image], [[correct, spam]])[0]
        wins += scores[0] > scores[1]
    assert wins >= 12, f"the correct caption outranked spam for only {wins} of 16 images"


def capfilt_ranker(models):
    from pipelines.capfilt_models import ClipRanker

    return ClipRanker(f"local-dir:{models.clip_dir}", None, "cpu")


def test_capfilt_with_the_stand_ins_writes_kept_captions(world, models, tmp_path):
    result = capfilt.run(capfilt.CapfiltConfig(shards=str(world / "web"), captioner=models.captioner_dir,
                                               ranker=f"local-dir:{models.clip_dir}", num_captions=4,
                                               executor="local"), str(tmp_path / "capfilt"))
    assert result.images == 24 and result.candidates == 24 * 4
    assert 0.0 <= result.web_precision <= 1.0 and 0.0 <= result.kept_precision <= 1.0
    assert (tmp_path / "capfilt" / "00000.tar").exists() and (tmp_path / "capfilt" / "00001.parquet").exists()
