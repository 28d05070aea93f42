"""Claim: on a dataset that fits in memory, the loader's cache (`cache_mb`) delivers the same batches faster.

Both loaders read the same shapes-world shards (128 px JPEGs, resized to the demo's 64 px, no crops) for
`--epochs` epochs, one process (0 workers), one torch thread: the baseline reads and decodes every shard
again each epoch (`cache_mb=0`), the candidate keeps the shards it read whole in memory and decodes each
sample once, kept as a uint8 tensor that `_collate` normalises a batch at a time, the transform being deterministic
(`cache_mb=512`). The two must yield the same keys and images; the ratio is images/s,
candidate over baseline, over all epochs (the first, read from disk, included).

    .venv/bin/python benchmarks/bench_loader_cache.py [--images 1000] [--epochs 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from bench_loader import make_shards  # noqa: E402

from pipelines.data.loader import LoaderConfig, SourceConfig, TrainLoader  # noqa: E402


def draw(shard_dir: Path, images: int, cache_mb: float, batch_size: int, image_size: int):
    """Images/s over `images` draws, and a fingerprint of what was drawn (keys, pixel sums)."""
    cfg = LoaderConfig(sources=[SourceConfig(name="curated", shards=str(shard_dir))], image_size=image_size,
                       batch_size=batch_size, shuffle_buffer=200, num_workers=0, train_transform=False,
                       cache_mb=cache_mb)
    keys, sums, done = [], [], 0
    start = time.perf_counter()
    for batch in TrainLoader(cfg):
        keys += batch["key"]
        sums.append(float(batch["image"].double().sum()))
        done += len(batch["key"])
        if done >= images:
            break
    return done / (time.perf_counter() - start), (keys, sums)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    draws = args.images * args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = make_shards(Path(tmp), args.images)
        baseline, seen = draw(shard_dir, draws, 0, args.batch_size, args.image_size)
        cached, seen_cached = draw(shard_dir, draws, 512, args.batch_size, args.image_size)
    if seen != seen_cached:
        raise SystemExit("the cached loader drew other samples or images than the plain one")
    write_result(
        "loader_cache", baseline={"what": "TrainLoader, cache_mb=0 (every epoch reads and decodes the shards)",
                                  "images_per_s": round(baseline, 1)},
        candidate={"what": "TrainLoader, cache_mb=512 (shards read, samples decoded once; batches normalised at once)",
                   "images_per_s": round(cached, 1), "same_batches": True},
        ratio=cached / baseline, units="images/s ratio, candidate / baseline (1 core each)",
        goal="ratio > 1 with the same batches",
        extra={"images": args.images, "epochs": args.epochs, "image_size": args.image_size,
               "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
