"""Loader check: draw a few batches from shards, save a contact sheet, report draws and skips.

`blip2 loader-check --source web=runs/demo/raw/web --source curated=runs/demo/raw/curated:2 --batches 3`
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from pipelines.data.loader import LoaderConfig, SourceConfig, TrainLoader
from pipelines.data.transforms import CLIP_MEAN, CLIP_STD


def check_loader(cfg: LoaderConfig, batches: int, sheet_path: str | None = None) -> dict[str, Any]:
    """Draw `batches` batches; return shapes, example captions, draws and skips per source, images/s."""
    loader = TrainLoader(cfg)
    start, seen, first = time.perf_counter(), 0, None
    for i, batch in enumerate(loader):
        first = first or batch
        seen += len(batch["text"])
        if i + 1 == batches:
            break
    seconds = time.perf_counter() - start
    report = loader.report()
    if sheet_path and first is not None:
        contact_sheet(first["image"], first["text"]).save(sheet_path)
    return {
        "batches": batches, "batch_shape": list(first["image"].shape) if first else None,
        "examples": first["text"][:4] if first else [], "images": seen,
        "images_per_s": round(seen / seconds, 1), "drawn": report["drawn"],
        "skipped": report["skipped"], "skipped_total": report["skipped_total"], "contact_sheet": sheet_path,
    }


def contact_sheet(images: torch.Tensor, captions: list[str], columns: int = 4, limit: int = 8) -> Image.Image:
    """A grid of (de-normalised) images with their captions underneath, for a quick look."""
    images, captions = images[:limit], captions[:limit]
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    size = images.shape[-1]
    cell_w, cell_h = max(size, 160), size + 30
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        pixels = ((image * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(Image.fromarray(pixels), (x, y))
        draw.text((x + 2, y + size + 2), caption[:30], fill="black")
        draw.text((x + 2, y + size + 14), caption[30:60], fill="black")
    return sheet


def parse_source(text: str) -> SourceConfig:
    """NAME=SHARDS[:WEIGHT]"""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--source {text!r}: expected NAME=SHARDS[:WEIGHT]")
    name, shards = text.split("=", 1)
    weight = 1.0
    head, _, tail = shards.rpartition(":")
    if head and re.fullmatch(r"[0-9.]+", tail):
        shards, weight = head, float(tail)
    return SourceConfig(name=name, shards=shards, weight=weight)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2 loader-check")
    parser.add_argument("--source", action="append", type=parse_source, required=True,
                        help="NAME=SHARDS[:WEIGHT]; SHARDS is a directory, glob or brace pattern")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--sheet", default=None, help="write a PNG contact sheet of the first batch here")
    args = parser.parse_args(argv)
    cfg = LoaderConfig(sources=args.source, batch_size=args.batch_size, image_size=args.image_size,
                       num_workers=args.num_workers, shuffle_buffer=100)
    if args.sheet:
        Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(check_loader(cfg, args.batches, args.sheet), indent=2))
    return 0
