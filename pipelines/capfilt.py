"""The CapFilt step (SPEC section 6): synthetic captions for web images, filtered by CLIP.

    python -m pipelines.capfilt --shards SPEC --captioner X --ranker Y --output DIR [--config FILE] [key=value ...]

For every image a captioner writes `num_captions` captions by nucleus sampling (top_p 0.9); a CLIP ranker
scores them and the web caption (image-text cosine); the top `keep` (two) distinct captions are kept, and
at every training step the loader samples one of them. With `captioner_weight` > 0 (not in the paper) the
captioner's own log-likelihood of each of its captions joins CLIP's score in the ranking.

Output, per input shard `NAME.tar` (img2dataset layout, same keys, same order):
    NAME.tar       KEY.jpg (the input bytes), KEY.txt (the top kept caption), KEY.json (the input meta plus
                   "capfilt": {"web_caption", "candidates": [{"text", "score", "source"(, "loglik")}], "kept": [...]})
    NAME.parquet   one row per candidate: key, caption, source ("web" | "synthetic"), index, score (CLIP), loglik
                   (the captioner's, with `captioner_weight`; else null), rank,
                   kept, correct (the shapes world's checker; null without a scene) -- every candidate and
                   score on disk, so a filter can be re-run without re-captioning
and `capfilt_config.yaml`, `summary.json`, `capfilt_scores.png` (score histograms) and, last, `_SUCCESS.json`.

Each shard is written atomically (temp name, then rename), the parquet before the tar. A rerun skips every
shard whose tar and parquet exist and whose parquet records the same output-deciding config and input
bytes (counted as reused). A corrupt input shard (e.g. a truncated tar) is reported and skipped.

Executors: `local` (one process, batched) or `ray` (Ray Data: an actor pool per model, shards written from
the results grouped back by shard); `auto` picks ray above `ray_min_images` images. Both give the same kept
captions: the captioner's sampling depends only on (seed, image key, model).
"""
from __future__ import annotations

import argparse
import hashlib
import io as _io
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, Field, model_validator
from tqdm import tqdm

from blip2.utils import looks_like_local_path
from pipelines import io, runroot
from pipelines.capfilt_models import (STAGE2_PREFIX, CaptionActor, Candidate, Captioner, RankActor, Ranker, Sampling,
                                      kept_texts, rank_candidates)
from pipelines.config import ConfigError, StepConfig, load_config
from pipelines.data.shards import IMAGE_EXTENSIONS, SkipCounter, decode_sample, expand_shards, iter_raw_samples

log = logging.getLogger(__name__)

STEP = "capfilt"
CONFIG_FILE = "capfilt_config.yaml"
SUMMARY_FILE = "summary.json"
HISTOGRAM_FILE = "capfilt_scores.png"
# the config fields that decide what an output shard holds (executor, batch size, device do not)
OUTPUT_FIELDS = ("captioner", "ranker", "ranker_weights", "prompt", "num_captions", "top_p", "max_new_tokens",
                 "min_new_tokens", "keep", "seed", "captioner_weight")
CORRUPT = "truncated_or_unreadable_shard"


# ------------------------------------------------------------------------------------------ config
class CapfiltConfig(StepConfig):
    """CapFilt settings (SPEC: k=10 captions, top_p 0.9, CLIP ViT-L/14 ranker, keep the top 2)."""

    shards: str | list[str] = Field(description="input webdataset shards (img2dataset layout): dir, glob, braces")
    captioner: str = Field(description="HF BLIP / BLIP-2 captioner dir or hub id, or stage2:<checkpoint dir>")
    ranker: str = Field(description='open_clip name: "local-dir:/path", "hf-hub:org/repo" or e.g. ViT-L-14-quickgelu')
    ranker_weights: str | None = Field(None, description="built-in ranker only: pretrained tag or local file")
    prompt: str | None = Field(None, description='text the captioner continues (None: its default)')
    num_captions: int = Field(10, ge=1)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(30, ge=1)
    min_new_tokens: int = Field(5, ge=0)
    keep: int = Field(2, ge=1)
    captioner_weight: float = Field(0.0, ge=0.0, description="0: CLIP's cosine alone ranks (the paper). > 0: add "
                                    "this x the captioner's mean token log-likelihood of each synthetic caption (BLIP "
                                    "captioners; the web caption gets its image's synthetic mean), so that among one "
                                    "image's candidates the ones the captioner was sure of rank higher")
    batch_size: int = Field(32, ge=1)
    seed: int = Field(0, ge=0)
    executor: Literal["auto", "local", "ray"] = "auto"
    ray_min_images: int = Field(2000, ge=0, description="auto: Ray Data above this many images")
    ray_actors: int = Field(1, ge=1, description="actor pool size per model")
    ray_actor_cpus: float = Field(0.5, gt=0.0)
    ray_actor_gpus: float | None = Field(None, ge=0.0, description="None: 0.5 when the cluster has GPUs")
    device: str = Field("auto", description='"auto" (cuda when present), "cpu", "cuda", "cuda:1" ...')

    @model_validator(mode="after")
    def _check_counts(self) -> "CapfiltConfig":
        if self.keep > self.num_captions + 1:
            raise ValueError(f"keep={self.keep}: at most num_captions + 1 = {self.num_captions + 1} captions "
                             "(the synthetic ones and the web caption) can be kept")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens}: more than max_new_tokens={self.max_new_tokens}")
        return self

    def output_hash(self) -> str:
        """Hash of the fields that decide an output shard's content."""
        blob = json.dumps({name: getattr(self, name) for name in OUTPUT_FIELDS}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def sampling(self) -> Sampling:
        return Sampling(num_captions=self.num_captions, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        min_new_tokens=self.min_new_tokens, seed=self.seed, prompt=self.prompt)


class CapfiltResult(BaseModel):
    output_uri: str
    config_hash: str
    executor: str  # the one that ran ("auto" resolved)
    shards: int  # input shards
    shards_written: int  # by this run
    shards_reused: int  # complete from an earlier run with the same output-deciding config and inputs
    corrupt_shards: list[dict[str, str]]  # {"shard", "error"}: skipped, no output
    images: int  # in the output shards (written and reused)
    images_captioned: int  # by this run
    candidates: int  # synthetic captions generated by this run
    skipped_samples: int  # input samples left out (corrupt image, missing caption ...; corrupt shards' too)
    skipped: dict[str, int]
    wall_seconds: float
    images_per_second: float  # images captioned and ranked by this run / wall time
    captions_per_second: float  # synthetic captions / captioner compute seconds (summed over actors)
    images_ranked_per_second: float  # images / ranker compute seconds (summed over actors)
    web_kept_share: float | None  # share of images whose web caption is among the kept
    mean_scores: dict[str, float | None]  # web, synthetic, kept
    web_precision: float | None = None  # shapes world only (meta "scene"): share judged correct by the checker
    synthetic_precision: float | None = None
    kept_precision: float | None = None
    oracle_kept_precision: float | None = None  # what a perfect ranker would keep correct, from these candidates
    ranker_pair_accuracy: float | None = None  # P(score of a correct candidate > a wrong one, same image)
    histogram: str | None = None
    warnings: list[str] = []
    reused: bool = False  # returned from an existing _SUCCESS.json without running


# ------------------------------------------------------------------------------------- validation
def shard_name(url: str) -> str:
    """`.../00012.tar` -> `00012`."""
    return url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")


def validate(cfg: CapfiltConfig, output_uri: str) -> list[str]:
    """Every check that needs no model: input shards, model paths, output names. Returns the shard urls."""
    urls = [u if "://" in u else os.path.abspath(u) for u in expand_shards(cfg.shards, what="shards")]
    names = Counter(shard_name(u) for u in urls)
    clashes = sorted(n for n, c in names.items() if c > 1)
    if clashes:
        raise ConfigError(f"shards: several input shards are named {clashes[:3]} (CapFilt writes "
                          "<output>/<name>.tar); run one folder at a time")
    out = output_uri.rstrip("/")
    if any(u.rsplit("/", 1)[0].rstrip("/") == out for u in urls):
        raise ConfigError(f"output {output_uri}: is the folder of the input shards; choose another one")
    _check_captioner(cfg.captioner, cfg.captioner_weight)
    _check_ranker(cfg.ranker, cfg.ranker_weights)
    return urls


def _check_captioner(spec: str, captioner_weight: float) -> None:
    if captioner_weight > 0:
        config = os.path.join(os.path.expanduser(spec), "config.json")
        kind = "stage2" if spec.startswith(STAGE2_PREFIX) else None
        if kind is None and os.path.isfile(config):
            with open(config) as handle:
                kind = json.load(handle).get("model_type")
        if kind in ("stage2", "blip-2"):
            raise ConfigError(f"captioner_weight={captioner_weight}: needs the captioner's log-likelihoods, which "
                              f"only BLIP captioners give; captioner={spec!r} is a {kind} one (set captioner_weight=0)")
    if spec.startswith(STAGE2_PREFIX):
        path = os.path.expanduser(spec[len(STAGE2_PREFIX):])
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"captioner={spec!r}: no stage-2 checkpoint there (expected {path}/config.json "
                              "and model.safetensors, written by blip2.checkpoint.save_model)")
    elif looks_like_local_path(spec) and not os.path.isfile(os.path.join(os.path.expanduser(spec), "config.json")):
        raise ConfigError(f"captioner={spec!r}: no such model directory (expected a transformers BLIP / BLIP-2 "
                          "captioner saved with save_pretrained: config.json, weights, processor files)")


def _check_ranker(name: str, weights: str | None) -> None:
    import open_clip

    if name.startswith("local-dir:"):
        path = os.path.expanduser(name[len("local-dir:"):])
        if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
            raise ConfigError(f"ranker={name!r}: no open_clip model folder there (expected {path}/"
                              "open_clip_config.json and its weights)")
    elif not name.startswith("hf-hub:") and name not in open_clip.list_models():
        raise ConfigError(f"ranker={name!r}: not an open_clip model name (use local-dir:/path, hf-hub:org/repo "
                          "or a built-in name such as ViT-L-14-quickgelu)")
    if weights and looks_like_local_path(weights) and not os.path.isfile(os.path.expanduser(weights)):
        raise ConfigError(f"ranker_weights={weights!r}: no such file")


# ----------------------------------------------------------------------------------------- reading
@dataclass
class Sample:
    """One input image: its bytes as they are, the web caption and the input meta."""

    key: str
    image_ext: str
    image_bytes: bytes
    web_caption: str
    meta: dict[str, Any]

    def image(self) -> Image.Image:
        return Image.open(_io.BytesIO(self.image_bytes)).convert("RGB")


@dataclass
class ShardInput:
    url: str
    name: str
    samples: list[Sample] = field(default_factory=list)
    skipped: SkipCounter = field(default_factory=SkipCounter)
    error: str | None = None  # set when the tar is corrupt or unreadable: the shard is skipped


def read_shard(url: str) -> ShardInput:
    """Every usable sample of one tar; a truncated / unreadable tar gives `error` (its samples are skipped)."""
    shard = ShardInput(url, shard_name(url))
    for raw in iter_raw_samples(url, shard.skipped):
        decoded = decode_sample(raw, shard.skipped)
        if decoded is not None:
            ext = next(e for e in IMAGE_EXTENSIONS if e in raw)
            shard.samples.append(Sample(decoded["key"], ext, raw[ext], decoded["text"], decoded["meta"]))
    if shard.skipped.counts[CORRUPT]:
        shard.error = shard.skipped.examples[CORRUPT]
        shard.skipped.counts["in_corrupt_shard"] += len(shard.samples)
        shard.samples = []
    return shard


def input_sha(url: str) -> str:
    """sha256 of an input shard's bytes ("unreadable: ..." when it cannot be read; read_shard reports it)."""
    try:
        return io.file_sha256(url)
    except OSError as error:
        return f"unreadable: {error!r}"[:200]


def count_images(url: str) -> int:
    """Images in a shard, cheaply: img2dataset's `NAME_stats.json` when present, else the tar's headers."""
    stats = url.removesuffix(".tar") + "_stats.json"
    if io.exists(stats):
        try:
            return int(io.read_json(stats)["successes"])
        except (KeyError, ValueError, TypeError):
            pass
    count = 0
    fs, path = io.fs_and_path(url)
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:  # headers only: the reader seeks past the data
                count += member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
    except (tarfile.TarError, OSError, EOFError):
        pass  # counted as far as it reads; read_shard reports the damage
    return count


# ------------------------------------------------------------------------------------ captioning
def caption_and_score(captioner: Captioner, ranker: Ranker, samples: list[Sample], loglik: bool = False
                      ) -> tuple[list[list[str]], list[list[float]], list[list[float]] | None, float, float]:
    """(synthetic captions, scores of [web, *synthetic], the captioner's log-likelihoods of the synthetic ones
    (with `loglik`, else None), captioner seconds, ranker seconds) for a batch."""
    images = [s.image() for s in samples]
    started = time.perf_counter()
    synthetic = captioner.generate(images, [s.key for s in samples])
    logliks = captioner.log_likelihood(images, synthetic) if loglik else None
    captioned = time.perf_counter()
    scores = ranker.score(images, [[s.web_caption, *c] for s, c in zip(samples, synthetic)])
    return synthetic, scores, logliks, captioned - started, time.perf_counter() - captioned


# ----------------------------------------------------------------------------------------- writing
def _correctness(meta: dict[str, Any]):
    """A caption -> correct? function from the meta's shapes-world scene, or None without one."""
    scene = meta.get("scene")
    if not scene:
        return None
    from pipelines.shapes.checker import check_caption
    from pipelines.shapes.scene import Scene

    scene = Scene.from_json(scene if isinstance(scene, str) else json.dumps(scene))
    return lambda text: check_caption(text, scene).correct


def sample_records(sample: Sample, candidates: list[Candidate]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(output meta, parquet rows) of one image."""
    kept = kept_texts(candidates)
    capfilt = {"web_caption": sample.web_caption,
               "candidates": [{"text": c.text, "score": c.score, "source": c.source,
                               **({} if c.loglik is None else {"loglik": c.loglik})} for c in candidates],
               "kept": kept}
    correct = _correctness(sample.meta)
    rows = [{"key": sample.key, "caption": c.text, "source": c.source, "index": c.index, "score": c.score,
             "loglik": c.loglik, "rank": c.rank, "kept": c.kept, "correct": None if correct is None else bool(correct(c.text))}
            for c in candidates]
    return {**sample.meta, "capfilt": capfilt}, rows


SCORE_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("source", pa.string()),
                          ("index", pa.int32()), ("score", pa.float64()), ("loglik", pa.float64()),
                          ("rank", pa.int32()),
                          ("kept", pa.bool_()), ("correct", pa.bool_())])


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, _io.BytesIO(data))


def write_shard(output_uri: str, name: str, samples: list[Sample], ranked: list[list[Candidate]],
                provenance: dict[str, str]) -> None:
    """`NAME.parquet` (scores; provenance in its metadata), then `NAME.tar`: each atomically."""
    metas, rows = [], []
    for sample, candidates in zip(samples, ranked):
        meta, sample_rows = sample_records(sample, candidates)
        metas.append(meta)
        rows += sample_rows
    table = pa.Table.from_pylist(rows, schema=SCORE_SCHEMA).replace_schema_metadata(
        {f"capfilt_{k}": v for k, v in provenance.items()})
    io.write_atomic(io.join(output_uri, f"{name}.parquet"), lambda f: pq.write_table(table, f))

    def write_tar(handle) -> None:
        with tarfile.open(fileobj=handle, mode="w") as tar:
            for sample, meta, candidates in zip(samples, metas, ranked):
                _add_member(tar, f"{sample.key}.{sample.image_ext}", sample.image_bytes)
                _add_member(tar, f"{sample.key}.txt", (kept_texts(candidates) or [""])[0].encode())
                _add_member(tar, f"{sample.key}.json", json.dumps(meta).encode())

    io.write_atomic(io.join(output_uri, f"{name}.tar"), write_tar)


def models_version(cfg: CapfiltConfig) -> str:
    """Version stamp of the local model files CapFilt reads (captioner folder, ranker folder, ranker weights file):
    a model retrained under the same path makes every shard be done again."""
    specs = (cfg.captioner.removeprefix(STAGE2_PREFIX), cfg.ranker.removeprefix("local-dir:"), cfg.ranker_weights)
    paths = [os.path.expanduser(spec) for spec in specs
             if spec and looks_like_local_path(spec) and os.path.exists(os.path.expanduser(spec))]
    return io.files_fingerprint(paths)


def shard_provenance(cfg: CapfiltConfig, models: str, input_sha: str, skipped: SkipCounter) -> dict[str, str]:
    return {"output_hash": cfg.output_hash(), "models": models, "input_sha256": input_sha,
            "skipped": json.dumps(dict(skipped.counts))}


def read_provenance(output_uri: str, name: str) -> dict[str, str] | None:
    """The provenance of a complete output shard (tar and parquet present), else None."""
    parquet, tar = io.join(output_uri, f"{name}.parquet"), io.join(output_uri, f"{name}.tar")
    if not (io.exists(parquet) and io.exists(tar)):
        return None
    fs, path = io.fs_and_path(parquet)
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.read_schema(handle).metadata or {}
    except Exception as error:  # noqa: BLE001 - an unreadable parquet means: redo the shard
        log.warning("capfilt: %s unreadable (%s); redoing that shard", parquet, error)
        return None
    return {k.decode().removeprefix("capfilt_"): v.decode() for k, v in metadata.items()
            if k.decode().startswith("capfilt_")}


# ------------------------------------------------------------------------------- per-shard reports
@dataclass
class ShardReport:
    name: str
    images: int = 0
    candidates: int = 0
    caption_seconds: float = 0.0
    rank_seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def finish_shard(cfg: CapfiltConfig, models: str, output_uri: str, shard: ShardInput, input_sha: str,
                 synthetic: list[list[str]], scores: list[list[float]], logliks: list[list[float]] | None,
                 seconds: tuple[float, float]) -> ShardReport:
    """Rank, write, report one shard whose captions and scores (and log-likelihoods, with `captioner_weight`) are
    done (`models`: `models_version`, taken once by the driver)."""
    logliks = logliks or [None] * len(synthetic)
    ranked = [rank_candidates(s.web_caption, c, sc, cfg.keep, ll, cfg.captioner_weight)
              for s, c, sc, ll in zip(shard.samples, synthetic, scores, logliks)]
    write_shard(output_uri, shard.name, shard.samples, ranked, shard_provenance(cfg, models, input_sha, shard.skipped))
    return ShardReport(shard.name, len(shard.samples), sum(len(c) for c in synthetic), seconds[0], seconds[1],
                       dict(shard.skipped.counts))


def corrupt_report(output_uri: str, shard: ShardInput) -> ShardReport:
    """Log a corrupt input shard and remove what an earlier run wrote for it (made from other bytes)."""
    log.error("capfilt: input shard %s is corrupt or unreadable (%s); skipped", shard.url, shard.error)
    for suffix in (".tar", ".parquet"):
        stale = io.join(output_uri, shard.name + suffix)
        if io.exists(stale):
            fs, path = io.fs_and_path(stale)
            fs.rm(path)
    return ShardReport(shard.name, skipped=dict(shard.skipped.counts), error=shard.error)


# ---------------------------------------------------------------------------------- local executor
def run_local(cfg: CapfiltConfig, models: str, output_uri: str, pending: dict[str, str], total_images: int
              ) -> list[ShardReport]:
    """In-process: read a shard, caption and rank it in batches, write it; next shard."""
    from pipelines.capfilt_models import ClipRanker, load_captioner

    captioner = load_captioner(cfg.captioner, cfg.sampling(), cfg.device)
    ranker = ClipRanker(cfg.ranker, cfg.ranker_weights, cfg.device)
    reports = []
    with tqdm(total=total_images, desc="capfilt", unit="img") as bar:
        for url, input_sha in pending.items():
            shard = read_shard(url)
            if shard.error:
                reports.append(corrupt_report(output_uri, shard))
                continue
            synthetic, scores, logliks, seconds = [], [], [], [0.0, 0.0]
            for start in range(0, len(shard.samples), cfg.batch_size):
                batch = shard.samples[start:start + cfg.batch_size]
                captions, batch_scores, batch_logliks, t_caption, t_rank = caption_and_score(
                    captioner, ranker, batch, loglik=cfg.captioner_weight > 0)
                synthetic += captions
                scores += batch_scores
                logliks += batch_logliks or []
                seconds[0] += t_caption
                seconds[1] += t_rank
                bar.update(len(batch))
            reports.append(finish_shard(cfg, models, output_uri, shard, input_sha, synthetic, scores,
                                        logliks or None, tuple(seconds)))
            log.info("capfilt: wrote %s (%d images)", shard.name, len(shard.samples))
    return reports


# ------------------------------------------------------------------------------------ Ray executor
def _rows_to_samples(batch: dict[str, Any]) -> list[Sample]:
    """A Ray Data batch (numpy columns) of sample rows -> Samples."""
    return [Sample(str(key), str(ext), bytes(data), str(web), json.loads(meta)) for key, ext, data, web, meta in
            zip(batch["key"], batch["image_ext"], batch["image"], batch["web_caption"], batch["meta"])]


def _scan_shard(item: dict[str, Any]) -> dict[str, Any]:
    shard = read_shard(item["url"])
    return {**item, "name": shard.name, "samples": len(shard.samples), "error": shard.error or "",
            "skipped": json.dumps(dict(shard.skipped.counts))}


def _shard_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    shard = read_shard(item["url"])
    return [{"shard": item["url"], "index": i, "key": s.key, "image_ext": s.image_ext, "image": s.image_bytes,
             "web_caption": s.web_caption, "meta": json.dumps(s.meta)} for i, s in enumerate(shard.samples)]


def _write_group(batch: dict[str, Any], cfg_json: str, models: str, output_uri: str, scans: dict[str, dict]
                 ) -> dict[str, Any]:
    """One shard's rows (any order) -> its output files; returns the shard's report as one JSON row."""
    order = sorted(range(len(batch["index"])), key=lambda i: int(batch["index"][i]))
    batch = {name: [column[i] for i in order] for name, column in batch.items()}
    scan = scans[str(batch["shard"][0])]
    shard = ShardInput(scan["url"], scan["name"], _rows_to_samples(batch), _counter(scan["skipped"]))
    seconds = (float(sum(batch["caption_seconds"])), float(sum(batch["rank_seconds"])))
    report = finish_shard(CapfiltConfig.model_validate_json(cfg_json), models, output_uri, shard, scan["sha"],
                          [json.loads(c) for c in batch["synthetic"]], [json.loads(s) for s in batch["scores"]],
                          [json.loads(v) for v in batch["loglik"]] if "loglik" in batch else None, seconds)
    return {"report": [json.dumps(report.__dict__)]}


def _counter(skipped_json: str) -> SkipCounter:
    counter = SkipCounter()
    counter.counts.update(json.loads(skipped_json))
    return counter


def _actor_resources(cfg: CapfiltConfig) -> tuple[dict[str, float], str]:
    """Ray resources of one model actor and the device it uses."""
    import ray

    gpus = cfg.ray_actor_gpus
    if gpus is None:
        gpus = 0.5 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    return {"num_cpus": cfg.ray_actor_cpus, "num_gpus": gpus}, device


def run_ray(cfg: CapfiltConfig, models: str, output_uri: str, pending: dict[str, str]) -> list[ShardReport]:
    """Ray Data: scan the shards (tasks), then samples -> captioner actors -> ranker actors -> grouped back by
    shard -> written. Actors get fractional CPUs (a whole CPU each starves the read tasks on a small box)."""
    import ray

    started_ray = _ensure_ray()
    try:
        scans = ray.data.from_items([{"url": u, "sha": sha} for u, sha in pending.items()]).map(
            _scan_shard, num_cpus=cfg.ray_actor_cpus).take_all()
        reports, todo = _reports_before_captioning(cfg, models, output_uri, scans)
        if todo:
            reports += _caption_rank_write(cfg, models, output_uri, todo)
        return reports
    finally:
        if started_ray:
            ray.shutdown()


def _reports_before_captioning(cfg: CapfiltConfig, models: str, output_uri: str, scans: list[dict]
                               ) -> tuple[list, dict]:
    """Corrupt shards are reported, shards without a usable sample written empty; the rest returned by url."""
    reports, todo = [], {}
    for scan in scans:
        shard = ShardInput(scan["url"], scan["name"], skipped=_counter(scan["skipped"]), error=scan["error"] or None)
        if shard.error:
            reports.append(corrupt_report(output_uri, shard))
        elif scan["samples"] == 0:
            reports.append(finish_shard(cfg, models, output_uri, shard, scan["sha"], [], [], None, (0.0, 0.0)))
        else:
            todo[scan["url"]] = scan
    return reports, todo


def _caption_rank_write(cfg: CapfiltConfig, models: str, output_uri: str, todo: dict[str, dict]) -> list[ShardReport]:
    import ray

    resources, device = _actor_resources(cfg)
    common = dict(device=device, threads=max(1, int(cfg.ray_actor_cpus)))
    pool = dict(compute=ray.data.ActorPoolStrategy(size=cfg.ray_actors), batch_size=cfg.batch_size,
                batch_format="numpy", **resources)
    samples = ray.data.from_items([{"url": url} for url in todo], override_num_blocks=len(todo)).flat_map(
        _shard_rows, num_cpus=cfg.ray_actor_cpus)
    captioned = samples.map_batches(CaptionActor, fn_constructor_kwargs=dict(
        spec=cfg.captioner, sampling=cfg.sampling(), loglik=cfg.captioner_weight > 0, **common), **pool)
    ranked = captioned.map_batches(RankActor, fn_constructor_kwargs=dict(
        name=cfg.ranker, weights=cfg.ranker_weights, **common), **pool)
    written = ranked.groupby("shard", num_partitions=len(todo)).map_groups(
        _write_group, fn_kwargs={"cfg_json": cfg.model_dump_json(), "models": models, "output_uri": output_uri,
                                "scans": todo},
        batch_format="numpy", num_cpus=cfg.ray_actor_cpus)
    return [ShardReport(**json.loads(row["report"])) for row in written.take_all()]


def _ensure_ray() -> bool:
    """Start a local Ray (loopback, no dashboard) unless one is running or RAY_ADDRESS names a cluster;
    True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False)
    return True


# ------------------------------------------------------------------------------------------ summary
GROUPS = ("web", "synthetic", "kept")
HIST_BINS = np.linspace(-1.0, 1.0, 201)  # cosines


@dataclass
class ScoreStats:
    """Running figures over the score tables of many shards (one shard's rows in memory at a time)."""

    images: int = 0
    web_kept: int = 0
    count: Counter = field(default_factory=Counter)  # group -> candidates
    score_sum: Counter = field(default_factory=Counter)
    judged: Counter = field(default_factory=Counter)  # group -> candidates with a checker verdict
    correct: Counter = field(default_factory=Counter)
    histogram: dict[str, np.ndarray] = field(default_factory=lambda: {g: np.zeros(200, np.int64) for g in GROUPS})
    kept_judged: int = 0  # kept captions of images whose every candidate has a verdict
    oracle_correct: int = 0  # per such image: min(distinct correct captions, captions kept)
    ranked_pairs: int = 0  # (correct, wrong) candidate pairs of one image
    ranked_right: float = 0.0  # of those, the correct one scored higher (a tie counts one half)

    def add(self, table: pa.Table) -> None:
        self._add_groups(table)
        self._add_per_image(table)

    def _add_per_image(self, table: pa.Table) -> None:
        """Where CapFilt loses precision: the candidates themselves (a perfect ranker keeps min(distinct correct
        captions, kept) correct captions per image) or the ranker (how often it scores a correct candidate of an
        image above a wrong one)."""
        columns = ["key", "caption", "score", "kept", "correct"]
        for _, rows in table.select(columns).to_pandas().groupby("key", sort=False):
            if rows["correct"].isna().any():
                continue
            correct = rows["correct"].to_numpy(dtype=bool)
            score = rows["score"].to_numpy(dtype=np.float64)
            kept = int(rows["kept"].sum())
            self.kept_judged += kept
            self.oracle_correct += min(rows["caption"][correct].nunique(), kept)
            right, wrong = score[correct][:, None], score[~correct][None, :]
            self.ranked_pairs += right.size * wrong.size
            self.ranked_right += float((right > wrong).sum() + 0.5 * (right == wrong).sum())

    def _add_groups(self, table: pa.Table) -> None:
        source = np.asarray(table["source"].to_pylist(), dtype=object)
        kept = table["kept"].to_numpy(zero_copy_only=False).astype(bool)
        score = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
        verdict = table["correct"].to_pylist()
        judged = np.array([v is not None for v in verdict], dtype=bool)
        correct = np.array([bool(v) for v in verdict], dtype=bool)
        self.images += int((source == "web").sum())
        self.web_kept += int((kept & (source == "web")).sum())
        for group, rows in (("web", source == "web"), ("synthetic", source == "synthetic"), ("kept", kept)):
            self.count[group] += int(rows.sum())
            self.score_sum[group] += float(score[rows].sum())
            self.judged[group] += int((rows & judged).sum())
            self.correct[group] += int((rows & judged & correct).sum())
            self.histogram[group] += np.histogram(np.clip(score[rows], -1.0, 1.0), bins=HIST_BINS)[0]

    def figures(self) -> dict[str, Any]:
        """images, web_kept_share, mean_scores and the precision figures (None where undefined)."""
        def ratio(num: float, den: int) -> float | None:
            return round(num / den, 6) if den else None

        precision = {f"{g}_precision": ratio(self.correct[g], self.judged[g]) for g in GROUPS}
        return {"images": self.images, "web_kept_share": ratio(self.web_kept, self.count["web"]),
                "mean_scores": {g: ratio(self.score_sum[g], self.count[g]) for g in GROUPS}, **precision,
                "oracle_kept_precision": ratio(self.oracle_correct, self.kept_judged),
                "ranker_pair_accuracy": ratio(self.ranked_right, self.ranked_pairs)}


def read_stats(output_uri: str, names: Sequence[str]) -> ScoreStats:
    stats = ScoreStats()
    for name in names:
        fs, path = io.fs_and_path(io.join(output_uri, f"{name}.parquet"))
        with fs.open(path, "rb") as handle:
            stats.add(pq.read_table(handle, columns=["key", "caption", "source", "score", "kept", "correct"]))
    return stats


def write_histogram(output_uri: str, stats: ScoreStats) -> str | None:
    """Score histograms (densities) of the web, synthetic and kept captions as a PNG."""
    if not stats.images:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = np.flatnonzero(sum(stats.histogram.values()))
    low, high = used[0], used[-1] + 1  # the range of bins that hold any score
    fig, ax = plt.subplots(figsize=(7, 4))
    for group in GROUPS:
        counts = stats.histogram[group][low:high]
        ax.stairs(counts / max(1, counts.sum()), HIST_BINS[low:high + 1], fill=True, alpha=0.4,
                  label=f"{group} ({stats.count[group]})")
    ax.set_xlabel("CLIP image-text cosine")
    ax.set_ylabel("share of captions")
    ax.set_title("CapFilt scores")
    ax.legend()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    uri = io.join(output_uri, HISTOGRAM_FILE)
    io.write_atomic(uri, lambda f: f.write(buffer.getvalue()))
    return uri


# ---------------------------------------------------------------------------------------------- run
def pick_executor(cfg: CapfiltConfig, images: int) -> str:
    if cfg.executor != "auto":
        return cfg.executor
    return "ray" if images > cfg.ray_min_images else "local"


def split_done(cfg: CapfiltConfig, models: str, output_uri: str, input_shas: dict[str, str]
               ) -> tuple[dict[str, str], list[str]]:
    """(pending url -> input sha, names of the shards already complete for this config, models and input)."""
    pending, reused = {}, []
    for url, sha in input_shas.items():
        provenance = read_provenance(output_uri, shard_name(url))
        wanted = {"output_hash": cfg.output_hash(), "models": models, "input_sha256": sha}
        if provenance and all(provenance.get(k) == v for k, v in wanted.items()):
            reused.append(shard_name(url))
        else:
            pending[url] = sha
    return pending, reused


def run(cfg: CapfiltConfig, output_uri: str) -> CapfiltResult:
    """Caption, rank and filter every input shard into `output_uri` (idempotent, resumable)."""
    started = time.time()
    output_uri = output_uri if "://" in output_uri else os.path.abspath(output_uri)  # Ray workers write there too
    urls = validate(cfg, output_uri)  # before any model is loaded or anything is written
    input_shas = {url: input_sha(url) for url in urls}
    models = models_version(cfg)  # once, here: every shard written by this run carries this stamp
    input_hashes = {shard_name(u): sha for u, sha in input_shas.items()} | {"captioner+ranker": models}
    record = runroot.completed(output_uri, cfg.config_hash(), input_hashes)
    if record is not None:
        log.info("capfilt: %s already holds this result (config %s); not running again", output_uri,
                 cfg.config_hash())
        return CapfiltResult.model_validate({**record["result"], "reused": True})
    runroot.clear_success(output_uri)
    io.makedirs(output_uri)
    fs, config_path = io.fs_and_path(io.join(output_uri, CONFIG_FILE))
    fs.pipe_file(config_path, cfg.to_yaml().encode())

    pending, reused = split_done(cfg, models, output_uri, input_shas)
    total = sum(count_images(url) for url in pending)
    executor = pick_executor(cfg, total)
    log.info("capfilt: %d shards (%d done before, %d to do, ~%d images) with the %s executor",
             len(urls), len(reused), len(pending), total, executor)
    t0 = time.perf_counter()
    if not pending:
        reports = []
    elif executor == "ray":
        reports = run_ray(cfg, models, output_uri, pending)
    else:
        reports = run_local(cfg, models, output_uri, pending, total)
    wall = time.perf_counter() - t0
    result = summarize(cfg, output_uri, executor, urls, reused, reports, wall)
    io.write_json_atomic(io.join(output_uri, SUMMARY_FILE), result.model_dump(mode="json"))
    runroot.write_success(output_uri, step=STEP, config_hash=cfg.config_hash(), input_hashes=input_hashes,
                          result=result.model_dump(mode="json"), started=started)
    return result


def summarize(cfg: CapfiltConfig, output_uri: str, executor: str, urls: list[str], reused: list[str],
              reports: list[ShardReport], wall: float) -> CapfiltResult:
    written = [r for r in reports if r.error is None]
    corrupt = [{"shard": r.name, "error": r.error} for r in reports if r.error is not None]
    done = sorted({*reused, *(r.name for r in written)})
    skipped: Counter = Counter()
    for name in reused:
        skipped.update(json.loads((read_provenance(output_uri, name) or {}).get("skipped", "{}")))
    for report in reports:
        skipped.update(report.skipped)
    skipped.pop(CORRUPT, None)  # a shard-level event, listed in corrupt_shards
    stats = read_stats(output_uri, done)
    images = sum(r.images for r in written)
    candidates = sum(r.candidates for r in written)
    caption_s, rank_s = sum(r.caption_seconds for r in written), sum(r.rank_seconds for r in written)
    warnings = [f"input shard {c['shard']} is corrupt or unreadable ({c['error']}); skipped" for c in corrupt]
    return CapfiltResult(
        output_uri=output_uri, config_hash=cfg.config_hash(), executor=executor, shards=len(urls),
        shards_written=len(written), shards_reused=len(reused), corrupt_shards=corrupt, images_captioned=images,
        candidates=candidates, skipped_samples=sum(skipped.values()), skipped=dict(skipped),
        wall_seconds=round(wall, 3), images_per_second=round(images / wall, 3) if wall > 0 else 0.0,
        captions_per_second=round(candidates / caption_s, 3) if caption_s > 0 else 0.0,
        images_ranked_per_second=round(images / rank_s, 3) if rank_s > 0 else 0.0,
        histogram=write_histogram(output_uri, stats), warnings=warnings, **stats.figures())


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.capfilt", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", help="input shards: folder, glob or brace pattern (overrides the config's)")
    parser.add_argument("--captioner", help="HF BLIP / BLIP-2 dir or hub id, or stage2:<checkpoint dir>")
    parser.add_argument("--ranker", help='open_clip name, e.g. "local-dir:/path/clip"')
    parser.add_argument("--output", required=True, help="output folder or URI")
    parser.add_argument("--config", help="YAML file with CapfiltConfig fields")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. num_captions=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = {k: v for k, v in (("shards", args.shards), ("captioner", args.captioner), ("ranker", args.ranker)) if v}
    try:
        cfg = load_config(CapfiltConfig, args.config, args.overrides, **given)
        cfg = cfg.model_copy(update=given)  # flags win over the config file
        result = run(CapfiltConfig.model_validate(cfg.model_dump()), args.output)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.model_dump(mode="json"), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
