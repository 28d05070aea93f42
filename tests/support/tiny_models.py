"""Tiny models and batches shared by the tests (on pytest's pythonpath: `from tiny_models import ...`)."""
import dataclasses

import torch

from blip2.config import preset
from blip2.stage1 import Blip2Stage1
from blip2.vision import build_image_encoder


def tiny_stage1(dropout: float = 0.1, seed: int = 0) -> Blip2Stage1:
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, dropout=dropout))
    torch.manual_seed(seed)
    return Blip2Stage1(cfg, visual=build_image_encoder(cfg.vision, seed=seed))


def make_batch(batch: int, seed: int = 1, length: int = 9):
    """Images (B, 3, 32, 32) and token ids with [CLS]=2 first, [SEP]=3 last, row 0 padded."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 32, 32, generator=g)
    ids = torch.randint(5, 120, (batch, length), generator=g)
    ids[:, 0] = 2
    ids[:, -1] = 3
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, -3:] = torch.tensor([3, 0, 0])
        mask[0, -2:] = 0
    return image, ids, mask
