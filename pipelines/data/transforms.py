"""SPEC section 2 pre-processing: CLIP normalisation, train/eval image transforms, caption cleaning.

A horizontal flip must not make a caption false, so the train transform swaps the words
"left" and "right" in the caption whenever it flips the image.
"""
from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from pipelines.data.text import clean_caption, swap_left_right  # noqa: F401 (re-exported)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def normalize_bytes(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W), as `TF.pil_to_tensor` gives them -> CLIP-normalised floats (one image or a whole
    batch at once: the same float operations, so the same bits)."""
    return TF.normalize(pixels.float().div(255), CLIP_MEAN, CLIP_STD)


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    return normalize_bytes(TF.pil_to_tensor(image))  # (3, H, W)


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float] = (0.5, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with aspect in `ratio` (RandomResizedCrop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)  # fallback: central square crop
    return (height - side) // 2, (width - side) // 2, side, side


class TrainTransform:
    """RandomResizedCrop(size, scale=(0.5, 1), bicubic) + horizontal flip (caption words swapped)."""

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.5, 1.0), flip_p: float = 0.5):
        self.image_size = image_size
        self.scale = scale
        self.flip_p = flip_p

    def __call__(self, image: Image.Image, caption: str, rng: random.Random) -> tuple[torch.Tensor, str]:
        top, left, h, w = random_resized_crop_box(image.width, image.height, rng, self.scale)
        image = TF.resized_crop(image, top, left, h, w, [self.image_size, self.image_size],
                                interpolation=InterpolationMode.BICUBIC)
        if rng.random() < self.flip_p:
            image = TF.hflip(image)
            caption = swap_left_right(caption)
        return to_normalized_tensor(image), caption


class EvalTransform:
    """Bicubic resize to a square, no crop, no flip."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image, caption: str, rng: random.Random | None = None) -> tuple[torch.Tensor, str]:
        image = TF.resize(image, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC)
        return to_normalized_tensor(image), caption
