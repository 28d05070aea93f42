"""Claim: the training loader delivers train-transformed images at close to the cost of a bare loop.

Baseline: a bare single-process loop over the same tars (tarfile read, PIL decode, SPEC train transform,
batch stack). Candidate: our `TrainLoader` (webdataset reading, reader split, mixing, shuffle buffer,
position tracking, skip accounting) with 0 workers (one core, ratio against the baseline) and with 2
workers (images/s per core). Both at 224 px from 128 px shapes-world JPEGs.

    .venv/bin/python benchmarks/bench_loader.py [--images 1024]
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from pipelines.data.loader import LoaderConfig, SourceConfig, TrainLoader  # noqa: E402
from pipelines.data.transforms import TrainTransform, clean_caption  # noqa: E402
from pipelines.shapes import synth  # noqa: E402
from pipelines.shapes.shards import pack_split  # noqa: E402


def make_shards(workdir: Path, images: int, per_shard: int = 256) -> Path:
    """Shapes-world images packed in img2dataset's webdataset layout."""
    synth.run(synth.SynthConfig(split="curated", images=images, seed=0), str(workdir), progress=False)
    pack_split(workdir, "curated", workdir / "shards", per_shard)
    return workdir / "shards"


def bare_loop(shard_dir: Path, images: int, batch_size: int, image_size: int) -> float:
    transform, rng = TrainTransform(image_size), random.Random(0)
    start, done, batch = time.perf_counter(), 0, []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                key = name[:-4]
                image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                text = clean_caption(tar.extractfile(members[f"{key}.txt"]).read().decode())
                batch.append(transform(image, text, rng))
                if len(batch) == batch_size:
                    torch.stack([b[0] for b in batch])
                    done, batch = done + batch_size, []
                if done >= images:
                    return done / (time.perf_counter() - start)
    return done / (time.perf_counter() - start)


def our_loader(shard_dir: Path, images: int, batch_size: int, image_size: int, workers: int) -> float:
    cfg = LoaderConfig(sources=[SourceConfig(name="curated", shards=str(shard_dir))], image_size=image_size,
                       batch_size=batch_size, shuffle_buffer=256, num_workers=workers)
    loader = TrainLoader(cfg)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, done = time.perf_counter(), 0
    for batch in iterator:
        done += len(batch["text"])
        if done >= images:
            break
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = make_shards(Path(tmp), args.images)
        baseline = bare_loop(shard_dir, args.images, args.batch_size, args.image_size)
        one_core = our_loader(shard_dir, args.images, args.batch_size, args.image_size, workers=0)
        two_workers = our_loader(shard_dir, args.images, args.batch_size, args.image_size, workers=2)
    write_result(
        "loader", baseline={"what": "bare loop, 1 process", "images_per_s": round(baseline, 1)},
        candidate={"what": "TrainLoader, 0 workers (1 core)", "images_per_s": round(one_core, 1),
                   "two_workers_images_per_s": round(two_workers, 1),
                   "images_per_s_per_core": round(two_workers / 2, 1)},
        ratio=one_core / baseline, units="images/s ratio, candidate / baseline (1 core each)",
        goal="ratio >= 0.9: the loader's bookkeeping costs under 10% of a bare decode+transform loop",
        extra={"images": args.images, "image_size": args.image_size, "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
