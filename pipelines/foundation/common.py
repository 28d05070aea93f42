"""What the four trainers share: the curated samples, their training views, batches, the loop, atomic dirs."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipelines.config import ConfigError
from pipelines.data.shards import SkipCounter, decode_sample, iter_raw_samples
from pipelines.shapes.render import render
from pipelines.shapes.scene import Scene, sample_scene

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions without a loss
GRAD_CLIP = 1.0  # gradient norm clip of every training loop


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Sample:
    """One curated image with its scene and texts."""

    key: str
    image: Image.Image
    scene: Scene
    captions: list[str]
    questions: list[dict[str, str]]


def _json_field(meta: dict[str, Any], name: str) -> Any:
    value = meta.get(name) or []
    return json.loads(value) if isinstance(value, str) else value


def load_curated(urls: Sequence[str], image_size: int) -> tuple[list[Sample], SkipCounter]:
    """Every decodable sample with a scene, sorted by key; images resized to `image_size` if they differ."""
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
            captions = _json_field(meta, "captions") or [sample["text"]]
            samples.append(Sample(sample["key"], image, Scene.from_json(meta["scene"]), captions,
                                  _json_field(meta, "questions")))
    if skipped.total():
        log.warning("curated shards: skipped %d samples %s", skipped.total(), dict(skipped.counts))
    return sorted(samples, key=lambda s: s.key), skipped


def split_held_out(samples: list[Sample], held_out: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): the last `held_out` samples by key are kept out of training, for the figures."""
    if len(samples) < held_out + 8:
        raise ConfigError(f"held_out={held_out}: the curated shards hold {len(samples)} usable samples (with a "
                          "scene), expected at least held_out + 8")
    return samples[:-held_out], samples[-held_out:]


@dataclass
class TrainingImages:
    """The image models' training set: images and the scene each one shows."""

    images: list[Image.Image]
    scenes: list[Scene]


def training_views(train: Sequence[Sample], views: int, image_size: int, seed: int,
                   new_scenes: bool = False) -> TrainingImages:
    """The shards' training images, then `views` x as many rendered by the shapes world's renderer: re-renderings
    of every training scene (same scene and background, new position jitter and pixel noise) or, with `new_scenes`,
    as many newly sampled scenes (an off-the-shelf model has seen far more than the pipeline's own data)."""
    images, scenes = [s.image for s in train], [s.scene for s in train]
    for view in range(views):
        for index, sample in enumerate(train):
            rng = np.random.default_rng([seed, 5, view, index])
            scene = sample_scene(rng) if new_scenes else sample.scene
            images.append(render(scene, image_size, rng))
            scenes.append(scene)
    return TrainingImages(images, scenes)


def draw_batch(rng: np.random.Generator, scenes: Sequence[Scene], batch: int, odds: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """A random batch: image indices, which images to mirror, and the scenes as seen (left/right swapped).
    `odds`: each image's probability of being drawn (None: all alike)."""
    index = rng.choice(len(scenes), size=min(batch, len(scenes)), replace=False, p=odds)
    flips = rng.random(len(index)) < 0.5
    return index, flips, [scenes[i].flipped() if flip else scenes[i] for i, flip in zip(index, flips)]


def batch_images(pixels: torch.Tensor, index: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    """Rows `index` of the preprocessed images, mirrored where `flips`.  (B, 3, H, W)"""
    images = pixels[torch.as_tensor(index)]
    return torch.where(torch.as_tensor(flips)[:, None, None, None], images.flip(-1), images)


# ------------------------------------------------------------------------------------------- training
def train_loop(params: list, loss_at: Callable[[int], torch.Tensor], steps: int, lr: float, desc: str,
               progress: bool) -> list[float]:
    """AdamW with linear warmup (5%) and cosine decay to 10% of `lr`; returns the loss of every step.
    `params`: tensors, or optimizer parameter groups (dicts, each may set its own "lr")."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # all of them, for the clip
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def loss_summary(losses: list[float], prefix: str = "") -> dict[str, float]:
    """Mean loss over the first and over the last tenth of training."""
    tenth = max(1, len(losses) // 10)
    return {f"{prefix}loss_first": round(float(np.mean(losses[:tenth])), 4),
            f"{prefix}loss_last": round(float(np.mean(losses[-tenth:])), 4)}


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
