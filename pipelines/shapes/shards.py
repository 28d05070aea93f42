"""Pack a synthesised split straight into webdataset shards in img2dataset's layout (no download).

For tests and benchmarks that need training shards fast; the real path is `blip2 download`.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack_split(synth_dir: str | Path, split: str, out_dir: str | Path, per_shard: int = 256) -> list[Path]:
    """`{synth_dir}/{split}.parquet` + its images -> `{out_dir}/{00000..}.tar` (jpg, txt, json per sample)."""
    synth_dir, out_dir = Path(synth_dir), Path(out_dir)
    rows = pq.read_table(synth_dir / f"{split}.parquet").to_pylist()
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(rows), per_shard):
        path = out_dir / f"{start // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for row in rows[start:start + per_shard]:
                meta = {k: row[k] for k in ("url", "caption", "scene", "captions", "questions", "noise") if k in row}
                _add(tar, f"{row['key']}.jpg", (synth_dir / "images" / split / f"{row['key']}.jpg").read_bytes())
                _add(tar, f"{row['key']}.txt", row["caption"].encode())
                _add(tar, f"{row['key']}.json", json.dumps(meta).encode())
        shards.append(path)
    return shards
