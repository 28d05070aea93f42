"""The tiny stage-1 model the retrieval and index benchmarks embed with (random init, dropout off, eval mode)."""
from __future__ import annotations

import dataclasses

import torch

from blip2.config import preset
from blip2.stage1 import Blip2Stage1
from blip2.vision import build_image_encoder


def tiny_model(seed: int = 0, vocab_size: int | None = None) -> Blip2Stage1:
    cfg = preset("tiny")
    qformer = dataclasses.replace(cfg.qformer, dropout=0.0, vocab_size=vocab_size or cfg.qformer.vocab_size)
    cfg = dataclasses.replace(cfg, llm=None, qformer=qformer)
    torch.manual_seed(seed)
    return Blip2Stage1(cfg, visual=build_image_encoder(cfg.vision, seed=seed)).eval()
