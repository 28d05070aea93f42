"""Where a training job's output lives: a local directory, or an object-store URI (s3://, gs://, ...) that
every node of a cluster can reach.

Training always writes into a local directory, the *work directory*: the output itself when it is local,
else a staging directory on each node (`$BLIP2_STAGING_DIR`, default `~/.cache/blip2/staging`, one
sub-directory per output URI). For a remote output:

- after rank 0 writes a checkpoint locally it is uploaded to `<output>/checkpoints/step-N/`: every file
  first, the `_COMMITTED` marker last. Object stores have no rename, so the marker is what makes a remote
  checkpoint count: an upload cut short is never resumed from (and is removed by the next prune);
- a job that starts (or restarts after a failure, on any node) first downloads the newest committed
  remote checkpoint into its node's work directory (one download per node, under a file lock) and drops
  local checkpoints the remote does not have: the remote is the truth;
- small files (train_metrics.json, mlflow_run.json, _SUCCESS.json) are written to the output URI directly.

A stage-1 checkpoint given to stage 2 as a URI is downloaded once per node into the same cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid

from filelock import FileLock

from pipelines import io
from pipelines.train.state import CHECKPOINTS, checkpoint_path, is_complete, list_checkpoints

log = logging.getLogger(__name__)

COMMITTED = "_COMMITTED"
_STEP_DIR = re.compile(r"step-(\d+)")


def is_remote(uri: str) -> bool:
    """True for a URI of another filesystem than the local one (s3://, gs://, memory://, ...)."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", str(uri))
    return bool(match) and match.group(1).lower() not in ("file", "local")


def normalise(uri: str) -> str:
    """A remote URI unchanged (minus a trailing slash); a local path or file:// URI as an absolute path."""
    return str(uri).rstrip("/") if is_remote(uri) else io.local_path(str(uri))


def staging_root() -> str:
    return os.environ.get("BLIP2_STAGING_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "blip2", "staging")


def work_dir(output: str) -> str:
    """The local directory training writes into: `output` itself when local, else this node's staging dir."""
    if not is_remote(output):
        return output
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", output.split("://", 1)[1])[-60:]
    digest = hashlib.sha256(output.encode()).hexdigest()[:12]
    return os.path.join(staging_root(), f"{name}-{digest}")


# ------------------------------------------------------------------------------------ remote side
def remote_checkpoints(output: str) -> list[tuple[int, str]]:
    """Committed checkpoints under `<output>/checkpoints`, as (step, uri) sorted by step."""
    fs, root = io.fs_and_path(io.join(output, CHECKPOINTS))
    fs.invalidate_cache()  # another process (a worker, another node) may have written since
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _STEP_DIR.fullmatch(name)
        if match and fs.exists(f"{entry.rstrip('/')}/{COMMITTED}"):
            found.append((int(match.group(1)), io.join(output, CHECKPOINTS, name)))
    return sorted(found)


def latest(output: str) -> tuple[int, str] | None:
    """(step, path or URI) of the newest complete checkpoint of a local or remote output, or None."""
    checkpoints = remote_checkpoints(output) if is_remote(output) else list_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def push_checkpoint(local_path: str, output: str, step: int, keep: int) -> str:
    """Upload one local checkpoint directory (marker last), then prune the remote to the newest `keep` up to
    `step` (later steps belong to a superseded run; uncommitted uploads are leftovers). Returns its URI."""
    uri = io.join(output, CHECKPOINTS, f"step-{step:08d}")
    fs, path = io.fs_and_path(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # an earlier, uncommitted upload of the same step
    for name in sorted(os.listdir(local_path)):
        fs.put_file(os.path.join(local_path, name), f"{path}/{name}")
    with fs.open(f"{path}/{COMMITTED}", "w") as handle:
        handle.write(str(step))
    _prune_remote(output, step, keep)
    return uri


def _prune_remote(output: str, current_step: int, keep: int) -> None:
    fs, root = io.fs_and_path(io.join(output, CHECKPOINTS))
    fs.invalidate_cache()
    committed = {step for step, _ in remote_checkpoints(output)}
    upto = sorted(step for step in committed if step <= current_step)
    kept = set(upto[-keep:])
    for entry in fs.ls(root, detail=False):
        match = _STEP_DIR.fullmatch(entry.rstrip("/").rsplit("/", 1)[-1])
        if match and int(match.group(1)) not in kept:
            fs.rm(entry, recursive=True)


def push_file(local_file: str, output: str, name: str) -> None:
    fs, path = io.fs_and_path(io.join(output, name))
    fs.put_file(local_file, path)


# ------------------------------------------------------------------------------------- local side
def pull_latest(output: str, work: str) -> int | None:
    """Make `work/checkpoints` match the remote: the newest committed remote checkpoint downloaded (once per
    node: a file lock serialises the ranks of one node), local checkpoints the remote lacks removed.
    Returns the step pulled, or None when the remote has no checkpoint yet."""
    os.makedirs(work, exist_ok=True)
    with FileLock(os.path.join(work, ".pull.lock")):
        newest = latest(output)
        remote_step = newest[0] if newest else None
        for step, path in list_checkpoints(work):
            if step != remote_step:
                shutil.rmtree(path, ignore_errors=True)
        if newest is None:
            return None
        target = checkpoint_path(work, remote_step)
        if not is_complete(target):
            _download_dir(newest[1], target)
            log.info("downloaded checkpoint %s to %s", newest[1], target)
        return remote_step


def localize(uri: str) -> str:
    """A local directory holding what `uri` holds: `uri` itself when local, else a per-node cached download
    (a stage-1 checkpoint given to stage 2 as a URI)."""
    if not is_remote(uri):
        return uri
    target = os.path.join(work_dir(uri), "copy")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, ".complete")):
            _download_dir(uri, target)
            open(os.path.join(target, ".complete"), "w").close()
    return target


def _download_dir(uri: str, target: str) -> None:
    """Download the files directly under `uri` into `target`, atomically (a temporary sibling renamed)."""
    fs, path = io.fs_and_path(uri)
    fs.invalidate_cache()
    files = [p for p in fs.ls(path, detail=False) if not p.rstrip("/").endswith(COMMITTED)]
    if not files:
        raise FileNotFoundError(f"{uri}: no files to download")
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        for remote in files:
            fs.get_file(remote, os.path.join(tmp, remote.rstrip("/").rsplit("/", 1)[-1]))
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
