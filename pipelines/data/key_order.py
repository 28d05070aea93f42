"""Put a downloaded shard's samples in key order, so that the same URL list always gives the same shards.

img2dataset writes a shard's samples in the order their downloads finish (its thread pool hands them back
unordered), so two downloads of one URL list hold the same samples in different orders, and a loader that
is deterministic given its shards still sees another sequence after each download. A key is the shard id
and the row's place in the URL list (`000000003`), so key order is the URL list's order. A shard already in
key order is left untouched (checked from the tar headers alone); one that is not is rewritten member by
member (the data is copied through, never decoded) into a temporary sibling that is then renamed into
place, so a crash leaves the old shard or the new one, never half of one. The parquet beside it gets its
rows sorted by key the same way.
"""
from __future__ import annotations

import tarfile

import pyarrow.parquet as pq

from pipelines import io


def member_key(name: str) -> str:
    """`000000003.jpg` -> `000000003` (webdataset's rule: the key ends at the first dot of the file name)."""
    directory, _, base = name.rpartition("/")
    return f"{directory}/{base.split('.', 1)[0]}" if directory else base.split(".", 1)[0]


def in_key_order(members: list[tarfile.TarInfo]) -> bool:
    """Each key's files together, and the keys ascending."""
    keys = [member_key(m.name) for m in members if m.isfile()]
    firsts = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    return firsts == sorted(set(keys))


def order_tar(uri: str) -> bool:
    """Rewrite the tar at `uri` in key order (a key's files keep their order). Returns whether it changed."""
    fs, path = io.fs_and_path(uri)
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        members = tar.getmembers()  # headers only: the reader seeks past the data
        if in_key_order(members):
            return False
        files = [m for m in members if m.isfile()]
        files.sort(key=lambda m: member_key(m.name))  # a stable sort: each key's files stay in their order

        def write(out_handle) -> None:
            with tarfile.open(fileobj=out_handle, mode="w") as out:
                for member in files:
                    out.addfile(member, tar.extractfile(member))

        io.write_atomic(uri, write)
    return True


def order_parquet(uri: str) -> bool:
    """Sort the rows of img2dataset's per-shard parquet by `key`. Returns whether it changed."""
    fs, path = io.fs_and_path(uri)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    if "key" not in table.column_names:
        return False
    keys = table.column("key").to_pylist()
    if keys == sorted(keys, key=lambda k: (k is None, k or "")):
        return False
    ordered = table.sort_by("key")
    io.write_atomic(uri, lambda handle: pq.write_table(ordered, handle))
    return True


def order_shards(base_uris: list[str]) -> int:
    """`order_tar` and `order_parquet` for each shard `BASE.tar` / `BASE.parquet`; returns how many shards
    were rewritten (those already in order cost one pass over their headers)."""
    changed = 0
    for base in base_uris:
        tar_changed = order_tar(base + ".tar")
        parquet_changed = io.exists(base + ".parquet") and order_parquet(base + ".parquet")
        changed += tar_changed or parquet_changed
    return changed
