"""The `foundation` step: tiny offline stand-ins for the pretrained models BLIP-2 builds on (issue 5).

No pretrained weights can be downloaded here, so the platform trains its own small "off-the-shelf" models
on the shapes world's `curated` split and saves each in its library's NATIVE format; the rest of the
pipeline loads them exactly as it would load the real ones:

* `clip/`       open_clip CLIP (ViT + text transformer), `open_clip.create_model_and_transforms("local-dir:clip")`
                and `open_clip.get_tokenizer("local-dir:clip")` (open_clip's own BPE tokenizer). The frozen image
                encoder of stage 1 (`vision_config`) and the CapFilt ranker (image-text cosine). Trained with
                open_clip's `ClipLoss` plus hard negatives: the same scene's caption with one wrong attribute,
                an incomplete caption and web spam, all made by the shapes world's own caption code, appended
                as extra text columns of the image->text logits.
* `captioner/`  transformers `BlipForConditionalGeneration` + `BlipProcessor` (stand-in for
                Salesforce/blip-image-captioning-large), trained with its captioning LM loss.
* `opt/`, `t5/` transformers `OPTForCausalLM` / `T5ForConditionalGeneration` (FlanT5-shaped) with a word-level
                `AutoTokenizer`, trained on the shapes world's captions and question-answer text; the frozen
                LLMs of stage 2 (`llm_config`).

Each model is written to a temp dir and renamed; `foundation.json` and `_SUCCESS.json` (last) record the
figures. A second run with the same config and the same shard bytes returns the recorded result.

    python -m pipelines.foundation --curated SHARDS --output DIR [clip.steps=600 ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, BlipConfig,
                          BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor)

from blip2.config import LLMConfig
from blip2.llm import SHAPES_WORDS, llm_architecture, tiny_llm_tokenizer
from blip2.tokenizer import build_qformer_tokenizer, shapes_vocabulary
from pipelines import io, runroot
from pipelines.config import ConfigError, StepConfig, load_config
from pipelines.data.shards import SkipCounter, decode_sample, expand_shards, iter_raw_samples
from pipelines.data.transforms import CLIP_MEAN, CLIP_STD
from pipelines.shapes.captions import caption_for, describe, noisy_caption, with_article
from pipelines.shapes.checker import check_caption
from pipelines.shapes.render import RADIUS, render
from pipelines.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene

log = logging.getLogger(__name__)

STEP = "foundation"
MODELS = ("clip", "captioner", "opt", "t5")
VQA_TEMPLATES = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}  # as blip2.stage2 prompts
IGNORE = -100
CLIP_NORM = float(os.environ.get("FND_CLIP_NORM", "1.0"))
CLIP_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (BPE vocabulary shipped with the package)


# --------------------------------------------------------------------------------------------- configs
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClipConfig(_Section):
    """Tiny open_clip CLIP: ViT image tower (`layers` blocks; stage 1 keeps layers - 1) + text transformer."""

    width: int = Field(64, ge=16)
    layers: int = Field(3, ge=2)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = 4.0
    patch_size: int = Field(8, ge=2)
    text_width: int = Field(64, ge=16)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    embed_dim: int = Field(64, ge=8)
    context_length: int = Field(32, ge=8)
    steps: int = Field(500, ge=1)
    batch: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    hard_negatives: int = Field(2, ge=0, description="wrong-attribute / partial captions per image")
    spam_negatives: int = Field(8, ge=0, description="spam captions per batch")
    region_steps: int = Field(600, ge=0, description="phase 1: image-tower steps on the region loss alone")
    region_weight: float = Field(1.0, ge=0, description="weight of the region loss next to ClipLoss in phase 2")


class CaptionerConfig(_Section):
    """Tiny BLIP captioner: a ViT shaped like the CLIP image tower (initialised from the trained CLIP when it is
    trained in the same run, as BLIP starts from a pretrained ViT) + a BERT-style decoder cross-attending to it."""

    text_width: int = Field(64, ge=16)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_length: int = Field(40, ge=8)
    steps: int = Field(600, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    samples: int = Field(10, ge=1, description="nucleus samples per held-out image for the figure")


class LanguageModelConfig(_Section):
    """A tiny OPT or FlanT5-shaped T5 (stage 2 needs hidden >= 64, ffn 128 to be steerable)."""

    hidden_size: int = Field(64, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ffn_dim: int = Field(128, ge=16)
    steps: int = Field(300, ge=1)
    batch: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)


class FoundationConfig(StepConfig):
    """Config of the foundation step."""

    curated: str | list[str] = Field(description="webdataset shards of the curated split (img2dataset layout)")
    image_size: int = Field(64, ge=16)
    seed: int = Field(0, ge=0)
    held_out: int = Field(100, ge=1, description="curated images kept out of training, for the figures")
    views: int = Field(4, ge=0, description="extra renderings of every training scene (new jitter and noise)")
    models: list[Literal["clip", "captioner", "opt", "t5"]] = Field(default_factory=lambda: list(MODELS))
    clip: ClipConfig = Field(default_factory=ClipConfig)
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    opt: LanguageModelConfig = Field(default_factory=LanguageModelConfig)
    t5: LanguageModelConfig = Field(default_factory=LanguageModelConfig)

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"models={value}: expected a non-empty list of distinct names from {MODELS}")
        return value


class FoundationResult(BaseModel):
    """What one foundation run wrote (model dirs are None for models not asked for)."""

    output_dir: str
    clip_dir: str | None = None
    captioner_dir: str | None = None
    opt_dir: str | None = None
    t5_dir: str | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    samples: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Sample:
    """One curated image with its scene and texts."""

    key: str
    image: Image.Image
    scene: Scene
    captions: list[str]
    questions: list[dict[str, str]]


def _json_field(meta: dict[str, Any], name: str, default: Any) -> Any:
    value = meta.get(name, default)
    return json.loads(value) if isinstance(value, str) else value


def load_curated(urls: Sequence[str], image_size: int) -> tuple[list[Sample], SkipCounter]:
    """Every decodable sample with a scene, sorted by key; images resized to `image_size`."""
    skipped, samples = SkipCounter(), []
    for url in urls:
        for raw in iter_raw_samples(url, skipped):
            sample = decode_sample(raw, skipped)
            if sample is None:
                continue
            meta = sample["meta"]
            if "scene" not in meta:
                skipped.add("missing_scene", sample["key"])
                continue
            image = sample["image"]
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BICUBIC)
            captions = _json_field(meta, "captions", []) or [sample["text"]]
            samples.append(Sample(sample["key"], image, Scene.from_json(meta["scene"]), captions,
                                  _json_field(meta, "questions", [])))
    if skipped.total():
        log.warning("curated shards: skipped %d samples %s", skipped.total(), dict(skipped.counts))
    return sorted(samples, key=lambda s: s.key), skipped


def split_held_out(samples: list[Sample], held_out: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): the last `held_out` samples by key are kept for the figures."""
    if len(samples) < held_out + 8:
        raise ConfigError(f"held_out={held_out}: the curated shards hold {len(samples)} usable samples, "
                          f"expected at least held_out + 8")
    return samples[:-held_out], samples[-held_out:]


def qa_pairs(samples: Sequence[Sample], kind: str) -> list[tuple[str, str]]:
    """(prompt, answer) for every question, in blip2.stage2's VQA prompt format of `kind`."""
    return [(VQA_TEMPLATES[kind].format(q["question"]), q["answer"]) for s in samples for q in s.questions]


# ---------------------------------------------------------------------------------------- training loop
def train_loop(params: list, loss_at: Callable[[int], torch.Tensor], steps: int, lr: float, desc: str,
               progress: bool) -> list[float]:
    """AdamW (parameters or parameter groups) with linear warmup (5%) and cosine decay to 10%; returns the loss
    of every step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, CLIP_NORM)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def loss_summary(losses: list[float]) -> dict[str, float]:
    """Mean loss of the first and of the last tenth of training."""
    tenth = max(1, len(losses) // 10)
    return {"loss_first": float(np.mean(losses[:tenth])), "loss_last": float(np.mean(losses[-tenth:]))}


def write_dir_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a fresh temp dir next to `final`, then put it in place by renames."""
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final




def training_views(train: Sequence[Sample], views: int, image_size: int, seed: int) -> tuple[list[Image.Image], list[Scene]]:
    """The training images and their scenes: the shards' images, then `views` re-renderings of every scene by the
    shapes world's renderer (same scene and background, new position jitter and pixel noise)."""
    images, scenes = [s.image for s in train], [s.scene for s in train]
    for view in range(views):
        for index, sample in enumerate(train):
            images.append(render(sample.scene, image_size, np.random.default_rng([seed, 5, view, index])))
            scenes.append(sample.scene)
    return images, scenes


def _draw(rng: np.random.Generator, scenes: Sequence[Scene], batch: int) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """A random batch: image indices, which images to flip, and the scenes as seen (left/right swapped)."""
    index = rng.choice(len(scenes), size=min(batch, len(scenes)), replace=False)
    flips = rng.random(len(index)) < 0.5
    return index, flips, [scenes[i].flipped() if flip else scenes[i] for i, flip in zip(index, flips)]


def _batch_images(pixels: torch.Tensor, index: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    """Rows `index` of the preprocessed images, mirrored where `flips`.  (B, 3, H, W)"""
    images = pixels[torch.as_tensor(index)]
    return torch.where(torch.as_tensor(flips)[:, None, None, None], images.flip(-1), images)


# ------------------------------------------------------------------------------------------------ CLIP
def clip_model_cfg(cfg: ClipConfig, image_size: int) -> dict[str, Any]:
    """open_clip's model_cfg (as in its model_configs/*.json) for the tiny CLIP."""
    vision = {"image_size": image_size, "patch_size": cfg.patch_size, "width": cfg.width, "layers": cfg.layers,
              "head_width": cfg.width // cfg.heads, "mlp_ratio": cfg.mlp_ratio, "no_ln_pre": True}
    text = {"context_length": cfg.context_length, "vocab_size": CLIP_VOCAB_SIZE, "width": cfg.text_width,
            "heads": cfg.text_heads, "layers": cfg.text_layers}
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}


def clip_preprocess_cfg(image_size: int) -> dict[str, Any]:
    return {"size": image_size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def clip_texts(scenes: Sequence[Scene], rng: np.random.Generator, cfg: ClipConfig) -> list[str]:
    """[one true caption per scene; `hard_negatives` per scene (3/4 wrong attribute, 1/4 partial); spam]."""
    positives = [caption_for(scene, rng) for scene in scenes]
    hard = [noisy_caption(scene, rng, "wrong_attribute" if rng.random() < 0.75 else "partial")
            for scene in scenes for _ in range(cfg.hard_negatives)]
    spam = [noisy_caption(scenes[0], rng, "spam") for _ in range(cfg.spam_negatives)]
    return positives + hard + spam


ATTRIBUTES: tuple[tuple[str, ...], ...] = (SHAPES, tuple(COLORS), SIZES)
"""What the region head predicts of every object: its shape, colour and size."""


def object_regions(scenes: Sequence[Scene], grid: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per object of the batch: its image row, pooling weights over the patch grid (the patches whose centre lies
    within the object's radius + half a patch of its nominal position) and its (shape, colour, size) indices."""
    patch = image_size / grid
    centres = (torch.arange(grid) + 0.5) * patch  # (G,)
    rows, weights, labels = [], [], []
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            x, y = (coordinate * image_size for coordinate in POSITIONS[obj.position])
            reach = RADIUS[obj.size] * image_size + patch / 2
            inside = ((centres[None, :] - x).abs() <= reach) & ((centres[:, None] - y).abs() <= reach)  # (G, G)
            rows.append(row)
            weights.append(inside.flatten().float() / inside.sum())
            labels.append([values.index(value) for values, value in zip(ATTRIBUTES, (obj.shape, obj.color, obj.size))])
    return torch.tensor(rows), torch.stack(weights), torch.tensor(labels)


def region_loss(head: torch.nn.Linear, patch_tokens: torch.Tensor, scenes: Sequence[Scene],
                image_size: int) -> torch.Tensor:
    """Dense supervision of the ViT: each object's pooled patch tokens predict its shape, colour and size."""
    grid = math.isqrt(patch_tokens.shape[1])
    rows, weights, labels = object_regions(scenes, grid, image_size)  # (O,), (O, G*G), (O, 3)
    logits = head(torch.einsum("op,opw->ow", weights, patch_tokens[rows]))  # (O, 7 + 8 + 2)
    parts = logits.split([len(values) for values in ATTRIBUTES], dim=1)
    return sum(F.cross_entropy(part, labels[:, i]) for i, part in enumerate(parts))


def _patch_tokens(visual: torch.nn.Module, images: torch.Tensor, pooled: bool = True) -> dict[str, Any]:
    """open_clip's forward_intermediates: the last block's patch tokens after ln_post (and the image features)."""
    return visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC",
                                        intermediates_only=not pooled)


def pretrain_regions(model: open_clip.CLIP, head: torch.nn.Linear, pixels: torch.Tensor, scenes_of: Sequence[Scene],
                     cfg: ClipConfig, image_size: int, seed: int, progress: bool) -> list[float]:
    """Phase 1 (image tower only): the region loss alone. A ViT learns shapes from a caption-level contrastive
    signal far too slowly for a CPU budget; from its objects' regions it learns them in a few hundred steps."""
    rng = np.random.default_rng([seed, 6])
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        index, flips, scenes = _draw(rng, scenes_of, cfg.batch)
        tokens = _patch_tokens(model.visual, _batch_images(pixels, index, flips), pooled=False)
        return region_loss(head, tokens["image_intermediates"][0], scenes, image_size)

    params = list(model.visual.parameters()) + list(head.parameters())
    return train_loop(params, loss_at, cfg.region_steps, cfg.lr, "foundation clip regions", progress)


def train_clip(model: open_clip.CLIP, head: torch.nn.Linear, pixels: torch.Tensor, scenes_of: Sequence[Scene],
               cfg: ClipConfig, image_size: int, seed: int, progress: bool) -> list[float]:
    """Phase 2: open_clip's ClipLoss with the image->text logits extended by the hard-negative and spam text
    columns, plus `region_weight` x the region loss (so the patch tokens keep their objects' attributes)."""
    rng = np.random.default_rng([seed, 1])
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    clip_loss = ClipLoss()
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        index, flips, scenes = _draw(rng, scenes_of, cfg.batch)
        out = _patch_tokens(model.visual, _batch_images(pixels, index, flips))
        image_features = F.normalize(out["image_features"], dim=-1)  # (B, E)
        text_features = model.encode_text(tokenizer(clip_texts(scenes, rng, cfg)), normalize=True)  # (B + N, E)
        logits_per_image, logits_per_text = clip_loss.get_logits(image_features, text_features,
                                                                 model.logit_scale.exp())  # (B, B + N), (B + N, B)
        labels = clip_loss.get_ground_truth(image_features.device, len(index))  # (B,)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text[:len(index)], labels)) / 2
        if cfg.region_weight > 0:
            loss = loss + cfg.region_weight * region_loss(head, out["image_intermediates"][0], scenes, image_size)
        return loss

    params = list(model.parameters()) + list(head.parameters())
    return train_loop(params, loss_at, cfg.steps, cfg.lr, "foundation clip", progress)


def save_clip(model: open_clip.CLIP, cfg: ClipConfig, image_size: int, directory: Path) -> None:
    """open_clip's local-dir layout: open_clip_config.json (model_cfg + preprocess_cfg) + safetensors weights."""
    blob = {"model_cfg": clip_model_cfg(cfg, image_size), "preprocess_cfg": clip_preprocess_cfg(image_size)}
    (directory / "open_clip_config.json").write_text(json.dumps(blob, indent=2))
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(directory / "open_clip_model.safetensors"))


@torch.no_grad()
def evaluate_clip(clip_dir: Path, held: Sequence[Sample], seed: int, draws: int = 4) -> dict[str, float]:
    """How often the held-out image's own caption has a higher cosine than a negative caption of each kind."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    rng = np.random.default_rng([seed, 11])
    image_features = model.encode_image(torch.stack([preprocess(s.image) for s in held]), normalize=True)  # (N, E)
    figures = {}
    for kind in ("wrong_attribute", "partial", "spam"):
        texts = [s.captions[0] for s in held] + [noisy_caption(s.scene, rng, kind) for s in held for _ in range(draws)]
        text_features = model.encode_text(tokenizer(texts), normalize=True)  # (N + N * draws, E)
        positive = (image_features * text_features[:len(held)]).sum(-1)  # (N,)
        negative = (image_features[:, None] * text_features[len(held):].view(len(held), draws, -1)).sum(-1)  # (N, D)
        figures[f"rank_vs_{kind}"] = float((positive[:, None] > negative).float().mean())
    return figures


def foundation_clip(cfg: FoundationConfig, train: Sequence[Sample], held: Sequence[Sample], directory: Path,
                    progress: bool) -> dict[str, float]:
    """Build, train and save the tiny CLIP; its figures on the held-out images."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = open_clip.CLIP(**clip_model_cfg(cfg.clip, cfg.image_size))
    preprocess = image_transform_v2(PreprocessCfg(**clip_preprocess_cfg(cfg.image_size)), is_train=False)
    images, scenes = training_views(train, cfg.views, cfg.image_size, cfg.seed)
    pixels = torch.stack([preprocess(image) for image in images])  # (N, 3, H, W)
    head = torch.nn.Linear(cfg.clip.width, sum(len(values) for values in ATTRIBUTES))  # discarded after training
    region_losses = pretrain_regions(model, head, pixels, scenes, cfg.clip, cfg.image_size, cfg.seed, progress)
    losses = train_clip(model, head, pixels, scenes, cfg.clip, cfg.image_size, cfg.seed, progress)
    write_dir_atomic(directory, lambda tmp: save_clip(model.eval(), cfg.clip, cfg.image_size, tmp))
    seconds = time.perf_counter() - started
    return {**evaluate_clip(directory, held, cfg.seed), **loss_summary(losses),
            "region_loss_first": loss_summary(region_losses)["loss_first"],
            "region_loss_last": loss_summary(region_losses)["loss_last"], "seconds": round(seconds, 2),
            "eval_seconds": round(time.perf_counter() - started - seconds, 2)}


# ------------------------------------------------------------------------------------------- captioner
def captioner_processor(image_size: int) -> BlipProcessor:
    """BlipImageProcessor at the model's size (CLIP mean/std) + the shapes-world word-level BERT tokenizer."""
    tokenizer = build_qformer_tokenizer(vocab_words=shapes_vocabulary())  # [DEC] is the decoder's bos, as in BLIP
    images = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD))
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def build_captioner(cfg: FoundationConfig, tokenizer) -> BlipForConditionalGeneration:
    """A small BlipForConditionalGeneration whose ViT has the CLIP image tower's dimensions."""
    clip, captioner = cfg.clip, cfg.captioner
    vision = {"hidden_size": clip.width, "intermediate_size": int(clip.width * clip.mlp_ratio),
              "num_hidden_layers": clip.layers, "num_attention_heads": clip.heads, "image_size": cfg.image_size,
              "patch_size": clip.patch_size, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    text = {"vocab_size": len(tokenizer), "hidden_size": captioner.text_width,
            "intermediate_size": 4 * captioner.text_width, "num_hidden_layers": captioner.text_layers,
            "num_attention_heads": captioner.text_heads, "max_position_embeddings": captioner.max_length,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id}
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text))
    model.generation_config.max_length = captioner.max_length
    return model


@torch.no_grad()
def load_clip_vision(blip_vision: torch.nn.Module, clip_dir: Path) -> None:
    """Copy the trained open_clip ViT (no ln_pre) into BLIP's vision model: the same computation under HF names."""
    visual = open_clip.create_model(f"local-dir:{clip_dir}").visual
    state = {"embeddings.class_embedding": visual.class_embedding.view(1, 1, -1),
             "embeddings.patch_embedding.weight": visual.conv1.weight,
             "embeddings.patch_embedding.bias": torch.zeros(visual.conv1.out_channels),
             "embeddings.position_embedding": visual.positional_embedding.unsqueeze(0),
             "post_layernorm.weight": visual.ln_post.weight, "post_layernorm.bias": visual.ln_post.bias}
    names = {"ln_1": "layer_norm1", "attn.in_proj_": "self_attn.qkv.", "attn.out_proj.": "self_attn.projection.",
             "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in visual.transformer.resblocks.state_dict().items():
        index, rest = key.split(".", 1)
        for old, new in names.items():
            rest = rest.replace(old, new)
        state[f"encoder.layers.{index}.{rest}"] = value
    blip_vision.load_state_dict(state, strict=True)


def caption_batch(tokenizer, captions: Sequence[str], bos_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """BLIP's captioning batch: "[DEC] caption [SEP]" (the tokenizer's [CLS] replaced by the decoder's bos);
    labels are the input ids with padding ignored (the decoder shifts them)."""
    batch = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    input_ids = batch["input_ids"].clone()  # (B, L)
    input_ids[:, 0] = bos_token_id
    labels = input_ids.masked_fill(batch["attention_mask"] == 0, IGNORE)  # (B, L)
    return {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "labels": labels}


@torch.no_grad()
def image_embeddings(model: BlipForConditionalGeneration, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The frozen ViT's output for every image and its mirror image.  (2, N, T, C)"""
    model.vision_model.eval()
    out = [[model.vision_model(pixel_values=part).last_hidden_state for part in view.split(chunk)]
           for view in (pixels, pixels.flip(-1))]
    return torch.stack([torch.cat(parts) for parts in out])


def train_captioner(model: BlipForConditionalGeneration, tokenizer, pixels: torch.Tensor,
                    scenes_of: Sequence[Scene], cfg: CaptionerConfig, seed: int, progress: bool) -> list[float]:
    """BLIP's captioning LM loss on (image, true caption) pairs, a fresh caption of the scene at every draw.
    The ViT (the CLIP's) stays frozen, so its outputs are computed once and only the text decoder trains."""
    rng = np.random.default_rng([seed, 2])
    bos = model.config.text_config.bos_token_id
    embeddings = image_embeddings(model, pixels)  # (2, N, T, C)
    model.vision_model.requires_grad_(False)
    model.text_decoder.train()

    def loss_at(step: int) -> torch.Tensor:
        index, flips, scenes = _draw(rng, scenes_of, cfg.batch)
        batch = caption_batch(tokenizer, [caption_for(scene, rng) for scene in scenes], bos, cfg.max_length)
        image_embeds = embeddings[torch.as_tensor(flips).long(), torch.as_tensor(index)]  # (B, T, C)
        return model.text_decoder(encoder_hidden_states=image_embeds, reduction="mean", **batch).loss

    return train_loop(list(model.text_decoder.parameters()), loss_at, cfg.steps, cfg.lr, "foundation captioner",
                      progress)


@torch.no_grad()
def evaluate_captioner(captioner_dir: Path, held: Sequence[Sample], cfg: CaptionerConfig, seed: int,
                       chunk: int = 50) -> dict[str, float]:
    """Share of correct captions (`check_caption(...).correct`) on held-out images: nucleus-sampled
    (top_p 0.9, `cfg.samples` per image, as CapFilt) and greedy."""
    model = BlipForConditionalGeneration.from_pretrained(captioner_dir).eval()
    processor = BlipProcessor.from_pretrained(captioner_dir)
    torch.manual_seed(seed)
    correct = {"sampled": [], "greedy": []}
    for start in range(0, len(held), chunk):
        part = held[start:start + chunk]
        pixel_values = processor(images=[s.image for s in part], return_tensors="pt")["pixel_values"]
        options = {"sampled": {"do_sample": True, "top_p": 0.9, "num_return_sequences": cfg.samples},
                   "greedy": {"do_sample": False, "num_beams": 1}}
        for name, kwargs in options.items():
            ids = model.generate(pixel_values=pixel_values, max_new_tokens=cfg.max_length, **kwargs)
            texts = processor.batch_decode(ids, skip_special_tokens=True)
            per_image = len(texts) // len(part)
            correct[name] += [check_caption(text, part[i // per_image].scene).correct for i, text in enumerate(texts)]
    return {"sampled_correct": float(np.mean(correct["sampled"])), "greedy_correct": float(np.mean(correct["greedy"]))}


def save_captioner(model: BlipForConditionalGeneration, processor: BlipProcessor, directory: Path) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def foundation_captioner(cfg: FoundationConfig, train: Sequence[Sample], held: Sequence[Sample], directory: Path,
                         clip_dir: Path | None, progress: bool) -> dict[str, float]:
    """Build, train and save the tiny BLIP captioner; its figures on the held-out images."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    processor = captioner_processor(cfg.image_size)
    model = build_captioner(cfg, processor.tokenizer)
    if clip_dir is not None:
        load_clip_vision(model.vision_model, clip_dir)
    else:
        log.warning("foundation captioner: no CLIP trained in this run, its ViT starts from random weights")
    images, scenes = training_views(train, cfg.views, cfg.image_size, cfg.seed)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
    losses = train_captioner(model, processor.tokenizer, pixels, scenes, cfg.captioner, cfg.seed, progress)
    write_dir_atomic(directory, lambda tmp: save_captioner(model.eval(), processor, tmp))
    seconds = time.perf_counter() - started
    return {**evaluate_captioner(directory, held, cfg.captioner, cfg.seed), **loss_summary(losses),
            "seconds": round(seconds, 2), "eval_seconds": round(time.perf_counter() - started - seconds, 2)}


# ------------------------------------------------------------------------------------------ OPT and T5
def lm_tokenizer(kind: str, texts: Sequence[str]):
    """blip2.llm's word-level tokenizer (OPT: bos/eos/pad, "\\n" -> eos; T5: pad/eos) over the shapes words
    and every word of `texts`."""
    words = {word for text in texts for word in re.findall(r"\w+|[^\w\s]+", text.lower())}
    return tiny_llm_tokenizer(kind, list(SHAPES_WORDS) + sorted(words - set(SHAPES_WORDS)))


def lm_texts(samples: Sequence[Sample], rng: np.random.Generator, count: int, kind: str) -> list[tuple[str, str]]:
    """`count` (source, target) pairs: half a caption split into prefix / rest (a fresh true caption of a
    random scene), half a VQA prompt / its one-word answer. OPT trains on source + " " + target."""
    pairs = []
    for _ in range(count):
        sample = samples[int(rng.integers(len(samples)))]
        if rng.random() < 0.5 or not sample.questions:
            words = caption_for(sample.scene, rng).split()
            split = int(rng.integers(1, max(1, len(words) // 2) + 1))
            pairs.append((" ".join(words[:split]), " ".join(words[split:])))
        else:
            question = sample.questions[int(rng.integers(len(sample.questions)))]
            pairs.append((VQA_TEMPLATES[kind].format(question["question"]), question["answer"]))
    return pairs


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def lm_batch(tokenizer, kind: str, pairs: Sequence[tuple[str, str]], max_length: int = 64) -> dict[str, torch.Tensor]:
    """OPT: "[bos] source target \\n" with labels on every token after the bos (as blip2.stage2.opt_lm_batch);
    T5: encoder "source [eos]", decoder labels "target [eos]" (as blip2.stage2.t5_prefix_lm_batch)."""
    if kind == "opt":
        rows = [tokenizer(f"{source} {target}\n")["input_ids"][:max_length] for source, target in pairs]
        input_ids = _pad(rows, tokenizer.pad_token_id)  # (B, L)
        mask = _pad([[1] * len(row) for row in rows], 0)  # (B, L)
        labels = input_ids.masked_fill(mask == 0, IGNORE)
        labels[:, 0] = IGNORE  # the bos is never predicted
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    sources = [tokenizer(source)["input_ids"][:max_length] for source, _ in pairs]
    targets = [tokenizer(target)["input_ids"][:max_length] for _, target in pairs]
    return {"input_ids": _pad(sources, tokenizer.pad_token_id),
            "attention_mask": _pad([[1] * len(row) for row in sources], 0),
            "labels": _pad(targets, IGNORE)}


def build_lm(kind: str, cfg: LanguageModelConfig, vocab_size: int):
    """OPTForCausalLM or a FlanT5-shaped T5ForConditionalGeneration (blip2.llm's architecture builder)."""
    return llm_architecture(LLMConfig(kind=kind, name="foundation", hidden_size=cfg.hidden_size, layers=cfg.layers,
                                      heads=cfg.heads, ffn_dim=cfg.ffn_dim, vocab_size=vocab_size,
                                      d_kv=cfg.hidden_size // cfg.heads))


def train_lm(model, tokenizer, kind: str, samples: Sequence[Sample], cfg: LanguageModelConfig, seed: int,
             progress: bool) -> list[float]:
    rng = np.random.default_rng([seed, 3 if kind == "opt" else 4])
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        return model(**lm_batch(tokenizer, kind, lm_texts(samples, rng, cfg.batch, kind))).loss

    return train_loop(list(model.parameters()), loss_at, cfg.steps, cfg.lr, f"foundation {kind}", progress)


@torch.no_grad()
def evaluate_lm(directory: Path, kind: str, held: Sequence[Sample], seed: int, count: int = 512) -> dict[str, float]:
    """Held-out perplexity (per target token) of the reloaded model on the held-out images' texts."""
    loader = AutoModelForCausalLM if kind == "opt" else AutoModelForSeq2SeqLM
    model, tokenizer = loader.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    pairs = lm_texts(held, np.random.default_rng([seed, 12]), count, kind)
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), 64):
        batch = lm_batch(tokenizer, kind, pairs[start:start + 64])
        targets = int((batch["labels"][:, 1:] != IGNORE).sum()) if kind == "opt" else int((batch["labels"] != IGNORE).sum())
        total += float(model(**batch).loss) * targets
        tokens += targets
    return {"held_out_loss": total / tokens, "held_out_perplexity": math.exp(total / tokens)}


def foundation_lm(kind: str, cfg: FoundationConfig, train: Sequence[Sample], held: Sequence[Sample],
                  directory: Path, progress: bool) -> dict[str, float]:
    """Build, train and save the tiny OPT or T5 with its tokenizer; held-out perplexity."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    lm_cfg = cfg.opt if kind == "opt" else cfg.t5
    corpus = [c for s in train for c in s.captions] + [q["question"] + " " + q["answer"] for s in train for q in s.questions]
    tokenizer = lm_tokenizer(kind, corpus + [VQA_TEMPLATES[kind]])
    model = build_lm(kind, lm_cfg, len(tokenizer))
    losses = train_lm(model, tokenizer, kind, train, lm_cfg, cfg.seed, progress)

    def save(tmp: Path) -> None:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(directory, save)
    seconds = time.perf_counter() - started
    return {**evaluate_lm(directory, kind, held, cfg.seed), **loss_summary(losses), "seconds": round(seconds, 2),
            "eval_seconds": round(time.perf_counter() - started - seconds, 2)}


# ------------------------------------------------------------------------------------------------ step
def shards_hash(urls: Sequence[str]) -> str:
    """One hash of the shards' bytes (in order), so changed inputs retrain."""
    digest = hashlib.sha256()
    for url in urls:
        digest.update(io.file_sha256(url).encode())
    return digest.hexdigest()[:16]


def run(cfg: FoundationConfig, output_uri: str | Path, progress: bool = True) -> FoundationResult:
    """Train the models in `cfg.models` on the curated shards and save them under `output_uri` (local)."""
    started_at, started = time.time(), time.perf_counter()
    out = Path(io.local_path(str(output_uri)))
    urls = expand_shards(cfg.curated, what="curated")
    input_hashes = {"curated": shards_hash(urls)}
    record = runroot.completed(str(out), cfg.config_hash(), input_hashes)
    if record is not None:
        log.info("foundation: reusing the models in %s (same config and shards)", out)
        return FoundationResult.model_validate({**record["result"], "reused": True})
    samples, skipped = load_curated(urls, cfg.image_size)
    train, held = split_held_out(samples, cfg.held_out)
    out.mkdir(parents=True, exist_ok=True)
    runroot.clear_success(str(out))  # models are about to be replaced: the old record no longer holds
    result = FoundationResult(output_dir=str(out), samples={"train": len(train), "held_out": len(held),
                                                            "skipped": skipped.total()})
    log.info("foundation: %d training / %d held-out curated images -> %s", len(train), len(held), out)
    if "clip" in cfg.models:
        result.metrics["clip"] = foundation_clip(cfg, train, held, out / "clip", progress)
        result.clip_dir = str(out / "clip")
    if "captioner" in cfg.models:
        clip_dir = out / "clip" if "clip" in cfg.models else None
        result.metrics["captioner"] = foundation_captioner(cfg, train, held, out / "captioner", clip_dir, progress)
        result.captioner_dir = str(out / "captioner")
    for kind in ("opt", "t5"):
        if kind in cfg.models:
            result.metrics[kind] = foundation_lm(kind, cfg, train, held, out / kind, progress)
            setattr(result, f"{kind}_dir", str(out / kind))
    result.seconds = round(time.perf_counter() - started, 2)
    io.write_json_atomic(str(out / "foundation.json"), result.model_dump(mode="json"))
    runroot.write_success(str(out), step=STEP, config_hash=cfg.config_hash(), input_hashes=input_hashes,
                          result=result.model_dump(mode="json"), started=started_at)
    return result


def _model_dir(result_or_dir: FoundationResult | str | Path, name: str, marker: str) -> Path:
    """The folder of model `name`: from a result, a foundation output dir (foundation.json) or the folder itself."""
    if isinstance(result_or_dir, FoundationResult):
        path = getattr(result_or_dir, f"{name}_dir")
    else:
        root = Path(result_or_dir)
        if (root / marker).is_file():
            path = root
        elif (root / "foundation.json").is_file():
            path = json.loads((root / "foundation.json").read_text()).get(f"{name}_dir")
        else:
            raise FileNotFoundError(f"{root}: neither a foundation output (foundation.json) nor a {name} folder ({marker})")
    if path is None or not (Path(path) / marker).is_file():
        raise FileNotFoundError(f"foundation {name} model not found at {path!r} (was {name!r} in models?)")
    return Path(path).resolve()


def vision_config(result_or_dir: FoundationResult | str | Path) -> dict[str, Any]:
    """The `model.vision` override (VisionConfig fields) for the tiny CLIP's image tower, last block dropped."""
    directory = _model_dir(result_or_dir, "clip", "open_clip_config.json")
    vision = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    heads = vision["width"] // vision["head_width"]
    return {"kind": "open_clip", "name": f"local-dir:{directory}", "width": vision["width"],
            "layers": vision["layers"] - 1, "heads": heads, "mlp_dim": int(vision["width"] * vision["mlp_ratio"]),
            "patch_size": vision["patch_size"], "image_size": vision["image_size"]}


def llm_config(result_or_dir: FoundationResult | str | Path, kind: str) -> dict[str, Any]:
    """The `model.llm` override (LLMConfig fields) for the tiny OPT (kind "opt") or T5 (kind "t5")."""
    if kind not in ("opt", "t5"):
        raise ValueError(f"llm_config: kind={kind!r}, expected 'opt' or 't5'")
    directory = _model_dir(result_or_dir, kind, "config.json")
    config = json.loads((directory / "config.json").read_text())
    if kind == "opt":
        dims = {"hidden_size": config["hidden_size"], "layers": config["num_hidden_layers"],
                "heads": config["num_attention_heads"], "ffn_dim": config["ffn_dim"]}
    else:
        dims = {"hidden_size": config["d_model"], "layers": config["num_layers"], "heads": config["num_heads"],
                "ffn_dim": config["d_ff"], "d_kv": config["d_kv"]}
    return {"kind": kind, "name": str(directory), "vocab_size": config["vocab_size"], **dims}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.foundation",
                                description="Train the offline stand-ins: tiny CLIP, BLIP captioner, OPT and T5.")
    p.add_argument("--curated", required=True, help="curated shards: a dir, a glob or a brace pattern")
    p.add_argument("--output", required=True, help="output directory (local path or file:// URI)")
    p.add_argument("--config", default=None, help="YAML file of FoundationConfig fields")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. clip.steps=600 models=[clip,opt]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: prints the result as JSON; exit status 2 on a bad config or input."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(FoundationConfig, args.config, args.overrides, curated=args.curated)
        result = run(cfg, args.output, progress=not args.no_progress)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.model_dump(mode="json"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
