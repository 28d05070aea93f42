"""The `synth` step: write a shapes-world split (JPEG images + a url-list parquet) to a local directory.

Layout under the output directory::

    images/{split}/{split}-{index:06d}.jpg    the images (served over HTTP by the `serve` step)
    {split}.parquet                           url, caption, key, scene, captions, questions, noise
    {split}_synth.json                        resolved config and counts

Each image is a pure function of (seed, split, index): its rng is
``numpy.random.default_rng([seed, SPLIT_CODES[split], index])``, so output is byte-identical for the same
config, order-independent, and different across splits. Which web rows get a noisy caption is decided by
a low-discrepancy sequence over the index, so the noisy share is within about 1/images of `noise_rate`.

    python -m pipelines.shapes.synth OUT --split web --images 100 --seed 0 --noise-rate 0.4
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from pipelines import runroot
from pipelines.config import StepConfig
from pipelines.shapes.captions import caption_for, noisy_caption
from pipelines.shapes.questions import questions_for
from pipelines.shapes.render import render
from pipelines.shapes.scene import sample_scene

Split = Literal["curated", "web", "test"]
SPLIT_CODES: dict[str, int] = {"curated": 1, "web": 2, "test": 3}
NOISE_MIX: dict[str, float] = {"wrong_attribute": 0.4, "partial": 0.3, "spam": 0.3}
"""Share of each noise kind among the noisy web rows (in this order along the unit interval)."""
DEFAULT_CAPTIONS = {"curated": 1, "web": 1, "test": 5}
_GOLDEN = 0.6180339887498949
COLUMNS = ("url", "caption", "key", "scene", "captions", "questions", "noise")


class SynthConfig(StepConfig):
    """Config of the synth step (one split per run)."""

    split: Split
    images: int = Field(gt=0, description="number of images to write")
    seed: int = Field(0, ge=0)
    noise_rate: float = Field(0.4, ge=0.0, le=1.0, description="share of noisy captions (web split only)")
    base_url: str = "http://127.0.0.1:8765"
    image_size: int = Field(128, ge=16, le=2048)
    captions_per_image: int | None = Field(None, ge=1, le=20, description="default 1 (curated, web), 5 (test)")
    jpeg_quality: int = Field(90, ge=1, le=100)

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url {value!r}: expected an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_captions(self) -> "SynthConfig":
        if self.split == "web" and self.captions_per_image not in (None, 1):
            raise ValueError("captions_per_image: the web split has exactly one (possibly noisy) caption per image")
        return self

    def n_captions(self) -> int:
        """Captions per image after applying the split's default."""
        return self.captions_per_image or DEFAULT_CAPTIONS[self.split]


class SynthResult(BaseModel):
    """What one synth run wrote."""

    split: str
    images: int
    output_dir: str
    parquet_path: str
    images_dir: str
    manifest_path: str
    noise_counts: dict[str, int]
    captions: int
    questions: int
    seconds: float
    reused: bool = False  # True when an identical earlier run's recorded result was returned


def noise_kind(seed: int, split: str, index: int, noise_rate: float) -> str:
    """'clean' or the noise kind of row `index`; only the web split is noisy.

    u = frac(offset(seed) + index * golden ratio) is spread evenly over [0, 1); the row is noisy iff
    u < noise_rate, and u / noise_rate picks the kind by the cumulative NOISE_MIX shares.
    """
    if split != "web" or noise_rate <= 0.0:
        return "clean"
    offset = int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "big") / 2**64
    u = (offset + index * _GOLDEN) % 1.0
    if u >= noise_rate:
        return "clean"
    position, total = u / noise_rate, 0.0
    for kind, share in NOISE_MIX.items():
        total += share
        if position < total:
            return kind
    return kind


def distinct_captions(scene, rng: np.random.Generator, count: int, max_tries: int = 500) -> list[str]:
    """`count` different clean captions of the scene."""
    found: list[str] = []
    for _ in range(max_tries):
        caption = caption_for(scene, rng)
        if caption not in found:
            found.append(caption)
            if len(found) == count:
                return found
    raise RuntimeError(f"found only {len(found)} distinct captions of {scene.to_json()} in {max_tries} tries")


def make_row(cfg: SynthConfig, index: int) -> tuple[dict[str, str], bytes]:
    """One parquet row and the JPEG bytes of image `index`; a pure function of (config, index)."""
    rng = np.random.default_rng([cfg.seed, SPLIT_CODES[cfg.split], index])
    scene = sample_scene(rng)
    image = render(scene, cfg.image_size, rng)
    noise = noise_kind(cfg.seed, cfg.split, index, cfg.noise_rate)
    if noise == "clean":
        captions = distinct_captions(scene, rng, cfg.n_captions())
    else:
        captions = [noisy_caption(scene, rng, noise)]
    key = f"{cfg.split}-{index:06d}"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
    row = {
        "url": f"{cfg.base_url}/images/{cfg.split}/{key}.jpg",
        "caption": captions[0],
        "key": key,
        "scene": scene.to_json(),
        "captions": json.dumps(captions),
        "questions": json.dumps(questions_for(scene, rng)),
        "noise": noise,
    }
    return row, buffer.getvalue()


def local_dir(output_uri: str | Path) -> Path:
    """The output directory as a local Path (plain path or file:// URI; other schemes are refused)."""
    text = str(output_uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ValueError(f"output {text!r}: synth writes local directories only (got a remote URI)")
    return Path(text)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_parquet(rows: list[dict[str, str]], path: Path) -> None:
    schema = pa.schema([(name, pa.string()) for name in COLUMNS])
    table = pa.table({name: [r[name] for r in rows] for name in COLUMNS}, schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def run(cfg: SynthConfig, output_uri: str | Path, progress: bool = True) -> SynthResult:
    """Write `cfg.images` images of `cfg.split` plus its url list and manifest under `output_uri`."""
    started, started_at = time.perf_counter(), time.time()
    out = local_dir(output_uri)
    record = runroot.completed(str(out), cfg.config_hash(), {})
    if record is not None:  # same config already written here (the output is a pure function of it)
        return SynthResult.model_validate({**record["result"], "reused": True})
    images_dir = out / "images" / cfg.split
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for index in tqdm(range(cfg.images), desc=f"synth {cfg.split}", unit="img", disable=not progress):
        row, jpeg = make_row(cfg, index)
        _write_atomic(images_dir / f"{row['key']}.jpg", jpeg)
        rows.append(row)
    parquet_path = out / f"{cfg.split}.parquet"
    _write_parquet(rows, parquet_path)
    noise_counts = {kind: 0 for kind in ("clean", *NOISE_MIX)}
    for row in rows:
        noise_counts[row["noise"]] += 1
    counts = {"images": len(rows), "noise": noise_counts,
              "captions": sum(len(json.loads(r["captions"])) for r in rows),
              "questions": sum(len(json.loads(r["questions"])) for r in rows)}
    manifest_path = out / f"{cfg.split}_synth.json"
    manifest = {"config": cfg.model_dump(mode="json"), "config_hash": cfg.config_hash(), "counts": counts}
    _write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    result = SynthResult(split=cfg.split, images=len(rows), output_dir=str(out), parquet_path=str(parquet_path),
                         images_dir=str(images_dir), manifest_path=str(manifest_path), noise_counts=noise_counts,
                         captions=counts["captions"], questions=counts["questions"],
                         seconds=round(time.perf_counter() - started, 3))
    runroot.write_success(str(out), step="synth", config_hash=cfg.config_hash(), input_hashes={},
                          result=result.model_dump(mode="json"), started=started_at)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.shapes.synth",
                                description="Write a synthetic shapes-world split (images + url-list parquet).")
    p.add_argument("output", help="output directory (local path or file:// URI)")
    p.add_argument("--split", required=True, choices=sorted(SPLIT_CODES))
    p.add_argument("--images", type=int, required=True, help="number of images (> 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-rate", type=float, default=0.4, help="share of noisy captions (web only)")
    p.add_argument("--base-url", default="http://127.0.0.1:8765")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--captions-per-image", type=int, default=None)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; exits with status 2 and a message naming the field on bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = SynthConfig(split=args.split, images=args.images, seed=args.seed, noise_rate=args.noise_rate,
                          base_url=args.base_url, image_size=args.image_size,
                          captions_per_image=args.captions_per_image, jpeg_quality=args.jpeg_quality)
        local_dir(args.output)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        parser.error(problems)
    except ValueError as err:
        parser.error(str(err))
    result = run(cfg, args.output, progress=not args.no_progress)
    print(f"wrote {result.images} {result.split} images to {result.images_dir}, url list {result.parquet_path} "
          f"(noise: {result.noise_counts}) in {result.seconds:.1f}s", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
