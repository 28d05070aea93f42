"""Reading webdataset shards (img2dataset's layout) sample by sample, counting what had to be skipped.

A shard is a tar of `{key}.jpg`, `{key}.txt`, `{key}.json` (CapFilt shards add their captions to the
json). Corrupt images, samples with missing parts and truncated tars are counted, never raised.
"""
from __future__ import annotations

import glob
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import braceexpand
import webdataset as wds
from PIL import Image

from pipelines.config import ConfigError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class SkipCounter:
    """Per-source counts of what the reader skipped, by reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, detail[:200])

    def total(self) -> int:
        return sum(self.counts.values())


def expand_shards(spec: str | list[str], what: str = "shards") -> list[str]:
    """A directory (its *.tar), a glob, a brace pattern (`x/{00000..00009}.tar`) or a list of those."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        if os.path.isdir(item):
            urls += sorted(glob.glob(os.path.join(item, "*.tar")))
        elif "{" in item:
            urls += list(braceexpand.braceexpand(item))
        elif any(ch in item for ch in "*?["):
            urls += sorted(glob.glob(item))
        else:
            urls.append(item)
    if not urls:
        raise ConfigError(f"{what}: no .tar shards found at {spec!r}")
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise ConfigError(f"{what}: shard file(s) not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return urls


class _TailCheckingStream:
    """A read-only stream wrapper that can tell, once drained, whether the tar ended properly."""

    def __init__(self, raw):
        self.raw, self.size, self.tail = raw, 0, b""

    def read(self, n: int = -1) -> bytes:
        block = self.raw.read(n)
        self.size += len(block)
        self.tail = (self.tail + block)[-1024:]
        return block

    def intact(self) -> bool:
        """A whole tar is a multiple of 512 bytes and ends with (at least) two zero blocks."""
        while self.read(1 << 16):
            pass
        return self.size % 512 == 0 and self.size >= 1024 and self.tail == bytes(1024)

    def close(self) -> None:
        self.raw.close()


def iter_raw_samples(url: str, skipped: SkipCounter) -> Iterator[dict[str, Any]]:
    """The grouped members of one tar; a truncated or unreadable tar ends the shard and is counted."""
    def on_error(exn: Exception) -> bool:
        skipped.add("truncated_or_unreadable_shard", f"{url}: {exn!r}")
        return True

    try:
        stream = _TailCheckingStream(wds.gopen(url))
    except Exception as exn:  # missing or unreadable file: count it, carry on with the other shards
        on_error(exn)
        return
    errors_before = skipped.counts["truncated_or_unreadable_shard"]
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
        yield from wds.tariterators.group_by_keys(files, handler=on_error)
        if skipped.counts["truncated_or_unreadable_shard"] == errors_before and not stream.intact():
            on_error(EOFError(f"tar ends early after {stream.size} bytes"))
    finally:
        stream.close()


def decode_sample(raw: dict[str, Any], skipped: SkipCounter) -> dict[str, Any] | None:
    """{key, image (PIL RGB), text, meta} or None (counted) when a part is missing or corrupt."""
    key = raw.get("__key__", "?")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        skipped.add("missing_image", key)
        return None
    try:
        image = Image.open(io.BytesIO(raw[image_ext]))
        image.load()
        image = image.convert("RGB")
    except Exception as exn:  # PIL raises many types for corrupt bytes
        skipped.add("corrupt_image", f"{key}: {exn!r}")
        return None
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError as exn:
            skipped.add("corrupt_json", f"{key}: {exn!r}")
            return None
    text = raw["txt"].decode("utf-8", "replace") if "txt" in raw else meta.get("caption")
    if not text and not kept_captions(meta):
        skipped.add("missing_caption", key)
        return None
    return {"key": key, "image": image, "text": text or "", "meta": meta, "url": raw.get("__url__", "")}


def kept_captions(meta: dict[str, Any]) -> list[str]:
    """CapFilt's kept captions for this sample (empty when the shard did not go through CapFilt)."""
    capfilt = meta.get("capfilt") or {}
    kept = capfilt.get("kept") or []
    return [c for c in kept if isinstance(c, str) and c.strip()]
