"""The one place that touches storage: local paths and fsspec URIs (file://, s3://, gs://...)."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)  # an object store's listing cache may predate another process's write
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = fs_and_path(uri)
    fs.makedirs(path, exist_ok=True)


def read_json(uri: str) -> Any:
    fs, path = fs_and_path(uri)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json_atomic(uri: str, obj: Any) -> None:
    """Write JSON so that a reader never sees half a file (temp name, then rename)."""
    fs, path = fs_and_path(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    fs.mv(tmp, path)


def write_atomic(uri: str, write) -> None:
    """`write(binary file)` into a temporary sibling of `uri`, then rename it into place: a reader sees the old
    file or the new one, never half of one; a failure leaves no temporary behind."""
    fs, path = fs_and_path(uri)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as handle:
            write(handle)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def list_files(uri: str, suffix: str) -> list[str]:
    """Sorted full URIs/paths of the files directly under `uri` that end with `suffix`."""
    fs, path = fs_and_path(uri)
    if not fs.exists(path):
        return []
    names = [p for p in fs.ls(path, detail=False) if p.endswith(suffix)]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return sorted(prefix + p for p in names)


def file_sha256(uri: str, chunk: int = 1 << 20) -> str:
    fs, path = fs_and_path(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


_VERSION_KEYS = ("size", "mtime", "LastModified", "ETag", "etag", "created")


def files_fingerprint(uris: list[str]) -> str:
    """A cheap version stamp of files and folders (local or remote): every file's name, size and modification
    time (ETag on object stores), hashed; no bytes are read. Changes when a file is rewritten, added or removed.
    One listing per parent folder (not one request per file: thousands of shards on an object store)."""
    rows, listings = [], {}
    for uri in uris:
        if str(uri).startswith(("http://", "https://")):  # a web server's listing and dates are not reliable
            rows.append([str(uri)])
            continue
        fs, path = fs_and_path(uri)
        parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
        if (fs.protocol, parent) not in listings:
            fs.invalidate_cache(parent)
            listings[(fs.protocol, parent)] = ({e["name"].rstrip("/"): e for e in fs.ls(parent, detail=True)}
                                               if fs.isdir(parent) else {})
        info = listings[(fs.protocol, parent)].get(path.rstrip("/")) or fs.info(path)
        infos = fs.find(path, detail=True) if info.get("type") == "directory" else {path: info}
        for name, entry in sorted(infos.items()):
            rows.append([name] + [str(entry[key]) for key in _VERSION_KEYS if entry.get(key) is not None])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def local_path(uri: str) -> str:
    """A plain filesystem path for a local URI (file:// or bare path); error for remote ones."""
    fs, path = fs_and_path(uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        raise ValueError(f"{uri}: a local path is needed here, got a {protocol}:// URI")
    return os.path.abspath(path)
