"""The training loader: webdataset shards from several sources, mixed by declared ratios.

How the data is split so that no two readers see the same sample:
- Each reader (a data-loader worker of a Ray worker) has a global id g in [0, G), with
  G = world_size * max(1, num_workers) and g = rank * max(1, num_workers) + worker_id.
- Per source and epoch the shards are shuffled with a seed shared by all readers; reader g takes
  shards g, g+G, g+2G, ... of that order. With fewer shards than readers it reads every shard and
  keeps samples g, g+G, ... instead (slower, still duplicate-free).
- Each source stream passes a shuffle buffer; at each draw a source is picked with probability
  proportional to its weight, from a generator seeded by (seed, g).

Position: every batch carries its reader's position (per source: epoch and the number of samples read
from the stream in that epoch; draws made). `TrainLoader.state_dict()` keeps the latest position per
reader; a loader built with that state skips what each reader had read and continues with unseen data.
Samples that sat in a shuffle buffer at checkpoint time are dropped for that epoch, never repeated.

Memory cache (`cache_mb` > 0, for datasets that fit, such as the demo's): a reader keeps each shard it read
whole, its samples decoded on first use (resized already and held as a uint8 tensor when the image transform is
deterministic: a batch is then normalised at once), and reads it from memory in later epochs: the batches are the
same as without it, and a skipped sample is counted once rather than once per epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import threading
import zlib
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode

from pipelines.config import ConfigError, StepConfig
from pipelines.data.shards import (SkipCounter, decode_sample, expand_shards, iter_raw_samples,
                                   kept_captions)
from pipelines.data.transforms import TrainTransform, clean_caption, normalize_bytes

log = logging.getLogger(__name__)


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shards: str | list[str] = Field(description="directory of .tar shards, glob, brace pattern or list")
    weight: float = Field(1.0, gt=0, description="sampling ratio relative to the other sources")


class LoaderConfig(StepConfig):
    sources: list[SourceConfig] = Field(min_length=1)
    image_size: int = Field(224, gt=0)
    batch_size: int = Field(32, gt=0)
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    max_words: int = Field(50, gt=0)
    train_transform: bool = True
    cache_mb: float = Field(0, ge=0, description="per reader: MiB of shards kept in memory once read (decoded on "
                            "first use; 0: every epoch reads and decodes the shards again)")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return sources


def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def _uniform(*parts: Any) -> float:
    """A uniform number in [0, 1) that is a pure function of `parts` (counter-based, resumable)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class Item:
    """One raw sample of a shard; `sample()` decodes it (None: skipped, counted), once when its shard is cached."""

    __slots__ = ("raw", "decoded", "cache")

    def __init__(self, raw: dict):
        self.raw, self.decoded, self.cache = raw, None, None

    def sample(self, decode: Callable[[dict, SkipCounter], dict | None], skipped: SkipCounter) -> dict | None:
        if self.raw is None:  # decoded before (None: skipped before)
            return self.decoded
        sample = decode(self.raw, skipped)
        if self.cache is not None and self.cache.swap(self.raw, sample):
            self.raw, self.decoded = None, sample
        return sample


class ShardCache:
    """One reader's shards kept in memory once read whole, up to `budget` bytes (raw, then decoded, sizes)."""

    def __init__(self, budget_mb: float):
        self.budget, self.used = budget_mb * 2**20, 0
        self.shards: dict[str, list[Item]] = {}

    def keep(self, url: str, items: list[Item]) -> None:
        """Keep a shard read whole (its items raw; each holds its decoded sample from its next use on)."""
        size = sum(_raw_bytes(item.raw) for item in items)
        if self.used + size <= self.budget:
            self.shards[url], self.used = items, self.used + size
            for item in items:
                item.cache = self

    def swap(self, raw: dict, sample: dict | None) -> bool:
        """Whether a cached item may hold `sample` in place of `raw` (the budget allows it)."""
        change = _sample_bytes(sample) - _raw_bytes(raw)
        if self.used + change > self.budget:
            return False
        self.used += change
        return True


def _raw_bytes(raw: dict | None) -> int:
    return sum(len(v) for v in (raw or {}).values() if isinstance(v, bytes))


def _sample_bytes(sample: dict | None) -> int:
    if sample is None:
        return 0
    if "pixels" in sample:  # the deterministic transform's uint8 tensor stands in for the PIL image
        image = sample["pixels"].nbytes
    else:
        width, height = sample["image"].size
        image = width * height * len(sample["image"].getbands())
    return image + len(json.dumps(sample["meta"])) + len(sample["text"])


class SourceStream:
    """One source's endless, reader-split, shuffled sample stream (of `Item`s) with a resumable position."""

    def __init__(self, name: str, shards: list[str], seed: int, g: int, G: int,
                 epoch: int = 0, offset: int = 0, shuffle_buffer: int = 0, cache: ShardCache | None = None):
        self.name, self.shards, self.seed, self.g, self.G = name, shards, seed, g, G
        self.epoch, self.offset = epoch, offset  # samples of `epoch` read by this reader
        self.shuffle_buffer = shuffle_buffer
        self.cache = cache
        self.skipped = SkipCounter()
        self.rng = random.Random(_seed(seed, name, g, epoch, offset))

    def _shard_items(self, url: str) -> Iterator[Item]:
        """The shard's items: from the cache, or read (and offered to the cache when read without a shard error)."""
        if self.cache is not None and url in self.cache.shards:
            yield from self.cache.shards[url]
            return
        items, errors_before = [], self.skipped.counts["truncated_or_unreadable_shard"]
        for raw in iter_raw_samples(url, self.skipped):
            items.append(Item(raw))
            yield items[-1]
        if self.cache is not None and self.skipped.counts["truncated_or_unreadable_shard"] == errors_before:
            self.cache.keep(url, items)

    def _epoch_samples(self) -> Iterator[Item]:
        order = np.random.default_rng(_seed(self.seed, self.name, self.epoch)).permutation(len(self.shards))
        split_by_shard = len(self.shards) >= self.G
        mine = order[self.g::self.G] if split_by_shard else order
        index = 0  # this epoch's sample index among the shards read (for split by sample)
        for shard_index in mine:
            for item in self._shard_items(self.shards[shard_index]):
                index += 1
                if split_by_shard or (index - 1) % self.G == self.g:
                    yield item

    def _read(self) -> Iterator[Item]:
        while True:
            read_this_epoch = 0
            for raw in self._epoch_samples():
                read_this_epoch += 1
                if read_this_epoch <= self.offset:
                    continue  # seen before the resume
                self.offset = read_this_epoch
                yield raw
            if read_this_epoch == 0:
                raise RuntimeError(f"source {self.name!r}: reader {self.g}/{self.G} found no readable "
                                   f"samples in {len(self.shards)} shard(s); skipped: {dict(self.skipped.counts)}")
            self.epoch, self.offset = self.epoch + 1, 0

    def __iter__(self) -> Iterator[Item]:
        buffer: list[Item] = []
        for raw in self._read():
            if self.shuffle_buffer <= 1:
                yield raw
                continue
            buffer.append(raw)
            if len(buffer) >= self.shuffle_buffer:
                pick = self.rng.randrange(len(buffer))
                buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                yield buffer.pop()


class MixedStream(IterableDataset):
    """Batches of decoded, transformed samples mixed from all sources (runs inside each worker)."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 state: dict[str, Any] | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.readers_per_rank = max(1, cfg.num_workers)
        self.G = world_size * self.readers_per_rank
        self.shards = {s.name: expand_shards(s.shards, f"source {s.name!r}") for s in cfg.sources}
        weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.cumulative[-1] = 1.0
        self.state = _usable_state(state, self.G)

    def _decode(self, raw: dict, skipped: SkipCounter) -> dict | None:
        """The decoded sample; with the deterministic transform its image is resized already (as the transform
        would: resizing to the same size again is a copy) and kept as a uint8 tensor instead of the PIL image
        ("pixels", normalised per batch by `_collate`): a cached sample is stored at the model's size, in the
        image's own bytes, and is not converted again at every use."""
        sample = decode_sample(raw, skipped)
        if sample is not None and not self.cfg.train_transform:
            resized = TF.resize(sample.pop("image"), [self.cfg.image_size] * 2, interpolation=InterpolationMode.BICUBIC)
            sample["pixels"] = TF.pil_to_tensor(resized)  # (3, H, W) uint8
        return sample

    def _reader_id(self) -> int:
        info = get_worker_info()
        return self.rank * self.readers_per_rank + (info.id if info is not None else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        g = self._reader_id()
        start = self.state.get(g, {})
        cache = ShardCache(self.cfg.cache_mb) if self.cfg.cache_mb > 0 else None
        sources = [
            SourceStream(s.name, self.shards[s.name], self.cfg.seed, g, self.G,
                         **start.get("sources", {}).get(s.name, {}), shuffle_buffer=self.cfg.shuffle_buffer,
                         cache=cache)
            for s in self.cfg.sources
        ]
        iterators = [iter(s) for s in sources]
        draws = start.get("draws", 0)
        drawn = Counter(start.get("drawn", {}))
        sample_rng = random.Random(_seed(self.cfg.seed, "sample", g, draws))
        transform = TrainTransform(self.cfg.image_size) if self.cfg.train_transform else None  # else: "pixels"
        batch: list[dict] = []
        while True:
            which = int(np.searchsorted(self.cumulative, _uniform(self.cfg.seed, "mix", g, draws), side="right"))
            draws += 1
            sample = next(iterators[which]).sample(self._decode, sources[which].skipped)
            if sample is None:
                continue
            drawn[sources[which].name] += 1
            batch.append(_prepare(sample, sources[which].name, transform, sample_rng, self.cfg.max_words))
            if len(batch) == self.cfg.batch_size:
                position = {"draws": draws, "drawn": dict(drawn),
                            "sources": {s.name: {"epoch": s.epoch, "offset": s.offset} for s in sources}}
                skipped = {s.name: dict(s.skipped.counts) for s in sources}
                yield _collate(batch, g, position, skipped)
                batch = []


def _prepare(sample: dict, source: str, transform, rng: random.Random, max_words: int) -> dict:
    kept = kept_captions(sample["meta"])
    caption = rng.choice(kept) if kept else sample["text"]  # CapFilt: one of the kept two per draw
    if "pixels" in sample:  # the deterministic transform's input as a tensor, from `_decode` (normalised by `_collate`)
        image, caption = sample["pixels"], clean_caption(caption, max_words)
    else:
        image, caption = transform(sample["image"], clean_caption(caption, max_words), rng)
    image_id = sample["meta"].get("url") or sample["meta"].get("key") or f"{sample['url']}#{sample['key']}"
    return {"image": image, "text": caption, "source": source, "key": sample["key"], "image_id": str(image_id)}


def _collate(batch: list[dict], g: int, position: dict, skipped: dict) -> dict[str, Any]:
    images = torch.stack([b["image"] for b in batch])  # (B, 3, H, W)
    return {
        "image": normalize_bytes(images) if images.dtype == torch.uint8 else images,
        "text": [b["text"] for b in batch],
        "source": [b["source"] for b in batch],
        "key": [b["key"] for b in batch],
        "image_id": [b["image_id"] for b in batch],
        "reader": g,
        "position": position,
        "skipped": skipped,
    }


def _usable_state(state: dict[str, Any] | None, G: int) -> dict[int, dict]:
    if not state:
        return {}
    if state.get("readers") != G:
        raise ConfigError(f"loader state: saved with {state.get('readers')} readers (world size x workers), "
                          f"this run has {G}; resume with the same world size and num_workers")
    return {int(g): pos for g, pos in state["positions"].items()}


def _forked_worker_init(worker_id: int) -> None:
    """A forked data worker drops what it inherited from the parent's threads and signal handlers: none of
    those threads exist in the child. Inside a Prefect task the parent holds Prefect's log and event workers,
    whose thread-exit hooks fail in the child (an AssertionError while the worker exits, reported by the
    parent as 'DataLoader worker exited unexpectedly with exit code 1'), and Prefect's SIGTERM handler, which
    would raise instead of letting the DataLoader stop a busy worker."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    inherited = getattr(threading, "_threading_atexits", None)  # CPython's list of thread-exit hooks
    if inherited is not None:
        inherited.clear()


class TrainLoader:
    """Iterable of batches that remembers, per reader, the position of the last batch handed out."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 state: dict[str, Any] | None = None):
        self.dataset = MixedStream(cfg, rank, world_size, state)
        self.positions: dict[int, dict] = dict(self.dataset.state)
        self.skipped: dict[int, dict] = {}
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=cfg.num_workers,
                                 persistent_workers=cfg.num_workers > 0,
                                 prefetch_factor=2 if cfg.num_workers > 0 else None,
                                 worker_init_fn=_forked_worker_init)  # only called in workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.positions[batch["reader"]] = batch["position"]
            self.skipped[batch["reader"]] = batch["skipped"]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"readers": self.dataset.G, "positions": {str(g): p for g, p in self.positions.items()}}

    def report(self) -> dict[str, Any]:
        """Samples drawn per source and samples skipped per source and reason, over this rank's readers."""
        drawn: Counter = Counter()
        for pos in self.positions.values():
            drawn.update(pos.get("drawn", {}))
        skipped: dict[str, Counter] = {}
        for per_source in self.skipped.values():
            for name, counts in per_source.items():
                skipped.setdefault(name, Counter()).update(counts)
        return {"drawn": dict(drawn), "skipped": {k: dict(v) for k, v in skipped.items()},
                "skipped_total": sum(sum(c.values()) for c in skipped.values())}
