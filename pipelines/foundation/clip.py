"""The tiny CLIP (open_clip): the frozen image encoder of stage 1 and the CapFilt ranker.

Saved in open_clip's local-dir layout (open_clip_config.json with model_cfg + preprocess_cfg, and
open_clip_model.safetensors), so `open_clip.create_model_and_transforms("local-dir:<dir>")` and
`open_clip.get_tokenizer("local-dir:<dir>")` (open_clip's own BPE tokenizer) load it like a hub model.
The ViT has no ln_pre, so it is exactly a transformers BLIP ViT as well (the captioner starts from it).

Training, in two phases:
1. the image tower alone, on the region loss: each object's pooled patch tokens (its nominal position in
   the scene) predict its shape, colour, size and position. A ViT learns shapes from one caption-level
   signal per image far too slowly for a CPU budget; from its objects' regions it learns them in a few
   hundred steps (the patch tokens are also what the Q-Former reads in stage 1);
2. both towers, with open_clip's `ClipLoss` whose image->text logits get extra text columns: per image
   `hard_negatives` captions of the same scene with one wrong attribute (or one object left out), plus a
   few spam alt-texts, all made by the shapes world's own caption code. The region loss stays on.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import save_file

from pipelines.data.transforms import CLIP_MEAN, CLIP_STD
from pipelines.foundation.common import (Sample, TrainingImages, batch_images, draw_batch, loss_summary, train_loop,
                                         write_dir_atomic)
from pipelines.foundation.config import ClipConfig, FoundationConfig
from pipelines.shapes.captions import caption_for, noisy_caption
from pipelines.shapes.render import RADIUS
from pipelines.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, Scene

CLIP_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (its BPE vocabulary ships with the package)
REGION_BLOCKS = 2  # the region loss supervises the last two blocks' patch tokens


def clip_model_cfg(cfg: ClipConfig, image_size: int) -> dict[str, Any]:
    """open_clip's model_cfg (as in its model_configs/*.json) for the tiny CLIP."""
    vision = {"image_size": image_size, "patch_size": cfg.patch_size, "width": cfg.width, "layers": cfg.layers,
              "head_width": cfg.width // cfg.heads, "mlp_ratio": cfg.mlp_ratio, "no_ln_pre": True}
    text = {"context_length": cfg.context_length, "vocab_size": CLIP_VOCAB_SIZE, "width": cfg.text_width,
            "heads": cfg.text_heads, "layers": cfg.text_layers}
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}


def clip_preprocess_cfg(image_size: int) -> dict[str, Any]:
    """open_clip's preprocess_cfg: the platform's CLIP normalisation (pipelines.data.transforms) at the model's size."""
    return {"size": image_size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def clip_texts(scenes: Sequence[Scene], rng: np.random.Generator, cfg: ClipConfig) -> list[str]:
    """[one true caption per scene; `hard_negatives` per scene (3/4 wrong attribute, 1/4 partial); spam]."""
    positives = [caption_for(scene, rng) for scene in scenes]
    hard = [noisy_caption(scene, rng, "wrong_attribute" if rng.random() < 0.75 else "partial")
            for scene in scenes for _ in range(cfg.hard_negatives)]
    spam = [noisy_caption(scenes[0], rng, "spam") for _ in range(cfg.spam_negatives)]
    return positives + hard + spam


ATTRIBUTES: tuple[tuple[str, ...], ...] = (SHAPES, tuple(COLORS), SIZES, tuple(POSITIONS))
"""What the region heads predict of every object: its shape, colour, size and position."""


def object_regions(scenes: Sequence[Scene], grid: int, image_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per object of the batch: its image row, pooling weights over the patch grid (the patches whose centre lies
    within the object's radius + half a patch of its nominal position) and its attribute indices (ATTRIBUTES)."""
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
            values = (obj.shape, obj.color, obj.size, obj.position)
            labels.append([names.index(value) for names, value in zip(ATTRIBUTES, values)])
    return torch.tensor(rows), torch.stack(weights), torch.tensor(labels)


def region_loss(heads: torch.nn.ModuleList, block_tokens: Sequence[torch.Tensor], scenes: Sequence[Scene],
                image_size: int) -> torch.Tensor:
    """Dense supervision of the ViT: in each supervised block (the last two: the one stage 1 reads, and the one
    the captioner and the pooled embedding read), each object's pooled patch tokens predict its shape, colour,
    size and position (the position keeps "where" in the tokens, which a cross-attention needs)."""
    grid = math.isqrt(block_tokens[0].shape[1])
    rows, weights, labels = object_regions(scenes, grid, image_size)  # (O,), (O, G*G), (O, 4)
    loss = torch.zeros(())
    for head, tokens in zip(heads, block_tokens):
        parts = attribute_logits(head, tokens, rows, weights)
        loss = loss + sum(F.cross_entropy(part, labels[:, i]) for i, part in enumerate(parts))
    return loss / len(heads)


def attribute_logits(head: torch.nn.Module, tokens: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, ...]:
    """Each object's pooled patch tokens through a region head, split per attribute (ATTRIBUTES' order)."""
    logits = head(torch.einsum("op,opw->ow", weights, tokens[rows]))  # (O, 7 + 8 + 2 + 5)
    return logits.split([len(values) for values in ATTRIBUTES], dim=1)


def region_heads(cfg: ClipConfig) -> torch.nn.ModuleList:
    """One linear attribute classifier per supervised block (discarded after training)."""
    return torch.nn.ModuleList(torch.nn.Linear(cfg.width, sum(len(values) for values in ATTRIBUTES))
                               for _ in range(REGION_BLOCKS))


def _patch_tokens(visual: torch.nn.Module, images: torch.Tensor, pooled: bool = True) -> dict[str, Any]:
    """open_clip's forward_intermediates: the last REGION_BLOCKS blocks' patch tokens, each after ln_post (and the
    pooled image features unless `pooled` is False)."""
    return visual.forward_intermediates(images, indices=REGION_BLOCKS, normalize_intermediates=True,
                                        output_fmt="NLC", intermediates_only=not pooled)


def pretrain_regions(model: open_clip.CLIP, heads: torch.nn.ModuleList, pixels: torch.Tensor,
                     scenes_of: Sequence[Scene], cfg: ClipConfig, image_size: int, seed: int,
                     progress: bool) -> list[float]:
    """Phase 1 (image tower only): the region loss alone. A ViT learns shapes from a caption-level contrastive
    signal far too slowly for a CPU budget; from its objects' regions it learns them in a few hundred steps."""
    rng = np.random.default_rng([seed, 6])
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        index, flips, scenes = draw_batch(rng, scenes_of, cfg.batch)
        tokens = _patch_tokens(model.visual, batch_images(pixels, index, flips), pooled=False)
        return region_loss(heads, tokens["image_intermediates"], scenes, image_size)

    params = list(model.visual.parameters()) + list(heads.parameters())
    return train_loop(params, loss_at, cfg.region_steps, cfg.lr, "foundation clip regions", progress)


def train_clip(model: open_clip.CLIP, heads: torch.nn.ModuleList, pixels: torch.Tensor, scenes_of: Sequence[Scene],
               cfg: ClipConfig, image_size: int, seed: int, progress: bool) -> list[float]:
    """Phase 2: open_clip's ClipLoss with the image->text logits extended by the hard-negative and spam text
    columns, plus `region_weight` x the region loss (so the patch tokens keep their objects' attributes)."""
    rng = np.random.default_rng([seed, 1])
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    clip_loss = ClipLoss()
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        index, flips, scenes = draw_batch(rng, scenes_of, cfg.batch)
        out = _patch_tokens(model.visual, batch_images(pixels, index, flips))
        image_features = F.normalize(out["image_features"], dim=-1)  # (B, E)
        text_features = model.encode_text(tokenizer(clip_texts(scenes, rng, cfg)), normalize=True)  # (B + N, E)
        logits_per_image, logits_per_text = clip_loss.get_logits(image_features, text_features,
                                                                 model.logit_scale.exp())  # (B, B + N), (B + N, B)
        labels = clip_loss.get_ground_truth(image_features.device, len(index))  # (B,)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text[:len(index)], labels)) / 2
        if cfg.region_weight > 0:
            loss = loss + cfg.region_weight * region_loss(heads, out["image_intermediates"], scenes, image_size)
        return loss

    params = list(model.parameters()) + list(heads.parameters())
    return train_loop(params, loss_at, cfg.steps, cfg.lr, "foundation clip", progress)


def save_clip(model: open_clip.CLIP, cfg: ClipConfig, image_size: int, directory: Path) -> None:
    """open_clip's local-dir layout: open_clip_config.json (model_cfg + preprocess_cfg) + safetensors weights."""
    blob = {"model_cfg": clip_model_cfg(cfg, image_size), "preprocess_cfg": clip_preprocess_cfg(image_size)}
    (directory / "open_clip_config.json").write_text(json.dumps(blob, indent=2))
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(directory / "open_clip_model.safetensors"))


@torch.no_grad()
def region_accuracy(model: open_clip.CLIP, heads: torch.nn.ModuleList, held: Sequence[Sample],
                    preprocess: Any, image_size: int) -> dict[str, float]:
    """Held-out share of objects whose shape / colour / size / position the region head of the block stage 1 reads
    (the second-last) predicts from the object's pooled patch tokens: what the frozen tokens carry of each object."""
    model.eval()
    pixels = torch.stack([preprocess(s.image) for s in held])  # (N, 3, H, W)
    tokens = _patch_tokens(model.visual, pixels, pooled=False)["image_intermediates"][0]  # (N, G*G, W)
    grid = math.isqrt(tokens.shape[1])
    rows, weights, labels = object_regions([s.scene for s in held], grid, image_size)
    parts = attribute_logits(heads[0], tokens, rows, weights)
    names = ("shape", "color", "size", "position")
    return {f"region_{name}_accuracy": float((part.argmax(1) == labels[:, i]).float().mean())
            for i, (name, part) in enumerate(zip(names, parts))}


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


def foundation_clip(cfg: FoundationConfig, training: TrainingImages, held: Sequence[Sample], directory: Path,
                    progress: bool) -> dict[str, float]:
    """Build, train and save the tiny CLIP; its figures on the held-out images."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = open_clip.CLIP(**clip_model_cfg(cfg.clip, cfg.image_size))
    preprocess = image_transform_v2(PreprocessCfg(**clip_preprocess_cfg(cfg.image_size)), is_train=False)
    pixels = torch.stack([preprocess(image) for image in training.images])  # (N, 3, H, W)
    scenes = training.scenes
    heads = region_heads(cfg.clip)
    region_losses = pretrain_regions(model, heads, pixels, scenes, cfg.clip, cfg.image_size, cfg.seed, progress)
    losses = train_clip(model, heads, pixels, scenes, cfg.clip, cfg.image_size, cfg.seed, progress)
    write_dir_atomic(directory, lambda tmp: save_clip(model.eval(), cfg.clip, cfg.image_size, tmp))
    seconds = time.perf_counter() - started
    regions = region_accuracy(model, heads, held, preprocess, cfg.image_size)
    return {**evaluate_clip(directory, held, cfg.seed), **regions, **loss_summary(losses),
            **loss_summary(region_losses, prefix="region_"), "seconds": round(seconds, 2),
            "eval_seconds": round(time.perf_counter() - started - seconds, 2)}
