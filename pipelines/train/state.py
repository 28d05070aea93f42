"""Training checkpoints: everything needed to resume a run exactly where it stopped.

    <output>/checkpoints/step-00001000/
        model.safetensors   trainable weights           (blip2.checkpoint.save_model)
        config.json         the model's architecture    (blip2.checkpoint.save_model)
        optimizer.pt        optimizer.state_dict()      (loaded with torch.load(weights_only=True))
        scheduler.pt        scheduler.state_dict()      (numbers only; weights_only as well)
        state.json          step, samples_seen, config_hash, seed(s), per-rank data positions, ...
        rng.pt              state["rng"]: per-rank RNG states from `capture_rng_state` (not JSON-able)

The directory is written in one atomic step (a temporary sibling renamed into place), so a crash leaves
either the previous checkpoints or a complete new one, never half of one; `list_checkpoints` only
reports directories holding all the files above (minus rng.pt, which is optional), so a leftover
temporary directory or a damaged step directory is never resumed from.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from blip2.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_into, save_model

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"
RNG_FILE = "rng.pt"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE, OPTIMIZER_FILE)
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A training checkpoint cannot be resumed from."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint belongs to a different config or does not fit the model/optimizer built now."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file is missing, truncated or unreadable (the message names the file)."""


# ------------------------------------------------------------------------------------ locating
def checkpoint_path(output_dir: str | os.PathLike, step: int) -> str:
    """`{output_dir}/checkpoints/step-{step:08d}`."""
    return os.path.join(os.fspath(output_dir), CHECKPOINTS, f"step-{step:08d}")


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` holds every file a checkpoint needs (see REQUIRED_FILES)."""
    return all(os.path.isfile(os.path.join(path, name)) for name in REQUIRED_FILES)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir/checkpoints`, as (step, path) sorted by step. Temporary
    directories of an interrupted write (`.step-*.tmp-*`) and incomplete step directories are ignored."""
    root = os.path.join(os.fspath(output_dir), CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.fullmatch(name)
        path = os.path.join(root, name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint, or None when there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


# ------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, every visible CUDA device, numpy's global, python `random`)
    as tensors and plain numbers, so the result pickles across ranks and loads with weights_only=True."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned. CUDA states are restored for the devices both runs see
    (a warning names a difference in device count, or CUDA states with no CUDA now)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["internal"].tolist()),
                     python_state["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is None:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(cuda):
        log.warning("RNG state saved for %d CUDA device(s), %d visible now: restoring the first %d",
                    len(cuda), available, min(available, len(cuda)))
    for index in range(min(available, len(cuda))):
        torch.cuda.set_rng_state(cuda[index], device=index)


# ------------------------------------------------------------------------------------------ save
def save_checkpoint(output_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any], keep: int = 3) -> str:
    """Write the checkpoint of `step` atomically and keep only the newest `keep` complete ones.

    state: JSON-able run state that must hold "config_hash" (e.g. step, samples_seen, seeds, per-rank
    data positions); an optional "rng" entry (per-rank `capture_rng_state()` results) goes to rng.pt.
    "step" is set to `step`. Checkpoints of LATER steps are deleted too: they belong to a run this one
    has superseded (it resumed from an earlier checkpoint), and must not be resumed from.
    """
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be at least 1, got {keep}")
    if "config_hash" not in state:
        raise ValueError("save_checkpoint: state needs a 'config_hash' (it is checked when resuming)")
    plain = {key: value for key, value in state.items() if key != "rng"}
    plain["step"] = step
    try:
        json.dumps(plain)
    except (TypeError, ValueError) as error:
        raise TypeError(f"save_checkpoint: state must be JSON-able apart from 'rng' ({error})") from error
    extra: dict[str, Any] = {OPTIMIZER_FILE: optimizer.state_dict(), SCHEDULER_FILE: scheduler.state_dict(),
                             STATE_FILE: plain}
    if state.get("rng") is not None:
        extra[RNG_FILE] = state["rng"]
    path = checkpoint_path(output_dir, step)
    save_model(model, path, extra_state=extra)
    prune_checkpoints(output_dir, step, keep)
    return path


def prune_checkpoints(output_dir: str | os.PathLike, current_step: int, keep: int) -> list[str]:
    """Delete complete checkpoints after `current_step` and all but the newest `keep` up to it, and the
    temporary directories that other (crashed) processes left behind. Returns the deleted paths."""
    checkpoints = list_checkpoints(output_dir)
    later = [path for step, path in checkpoints if step > current_step]
    upto = [path for step, path in checkpoints if step <= current_step]
    doomed = later + upto[:-keep]
    for path in later:
        log.warning("deleting %s: a later step than the checkpoint just written (from a superseded run)", path)
    root = os.path.join(os.fspath(output_dir), CHECKPOINTS)
    own_tag = f".tmp-{os.getpid()}-"
    doomed += [os.path.join(root, name) for name in os.listdir(root)
               if name.startswith(".step-") and ".tmp-" in name and own_tag not in name]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------ load
def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpoint(f"{path}: unreadable or truncated JSON ({error})") from error
    if not isinstance(value, dict):
        raise CorruptCheckpoint(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_torch(path: str) -> Any:
    """torch.load(weights_only=True) on the CPU; any failure (truncation, a pickled object that is not
    plain data) -> CorruptCheckpoint naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CorruptCheckpoint(f"{path}: unreadable or truncated, or not plain tensors/data "
                                f"(loaded with weights_only=True): {error}") from error


def _check_files(path: str) -> None:
    """Every required file exists; config.json parses; model.safetensors' header covers the file."""
    for name in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise CorruptCheckpoint(f"{os.path.join(path, name)}: missing (an incomplete checkpoint)")
    try:
        load_config(path)
    except (OSError, ValueError) as error:
        raise CorruptCheckpoint(f"{os.path.join(path, CONFIG_FILE)}: {error}") from error
    weights = os.path.join(path, WEIGHTS_FILE)
    try:
        with safe_open(weights, "pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise CorruptCheckpoint(f"{weights}: corrupt or truncated safetensors file ({error})") from error


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, config_hash: str) -> dict[str, Any]:
    """Load a `save_checkpoint` directory into `model`, `optimizer` and `scheduler`; return its state.

    Every file is read and checked before anything is changed. The returned state is state.json plus
    "rng" (the per-rank RNG states from rng.pt, or None); RNG is NOT restored here: call
    `restore_rng_state(state["rng"][rank])`.
    Raises CheckpointMismatch (another config hash, or weights/optimizer that do not fit) and
    CorruptCheckpoint (a missing, truncated or unreadable file, named).
    """
    path = os.fspath(path)
    _check_files(path)
    state = _read_json(os.path.join(path, STATE_FILE))
    if state.get("config_hash") != config_hash:
        raise CheckpointMismatch(
            f"{path} was written with config hash {state.get('config_hash')!r}, the current config hashes to "
            f"{config_hash!r}: the config changed but the output directory was kept. Use a new output "
            f"directory, or delete its checkpoints/ folder to start over in this one")
    optimizer_state = _read_torch(os.path.join(path, OPTIMIZER_FILE))
    scheduler_file = os.path.join(path, SCHEDULER_FILE)
    scheduler_state = _read_torch(scheduler_file) if os.path.isfile(scheduler_file) else None
    rng_file = os.path.join(path, RNG_FILE)
    state["rng"] = _read_torch(rng_file) if os.path.isfile(rng_file) else None
    _check_param_names(path, optimizer, optimizer_state)
    try:
        load_into(model, path)
    except ValueError as error:
        raise CheckpointMismatch(f"{path}: the weights do not fit the model: {error}") from error
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as error:
        raise CheckpointMismatch(f"{os.path.join(path, OPTIMIZER_FILE)} does not fit the optimizer: {error}") from error
    if scheduler_state is None:
        log.warning("%s has no %s: the lr schedule restarts from its first step", path, SCHEDULER_FILE)
    else:
        scheduler.load_state_dict(scheduler_state)
    return state


def _check_param_names(path: str, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """The saved optimizer's groups hold the same parameters (by name, in order) as `optimizer`'s."""
    file = os.path.join(path, OPTIMIZER_FILE)
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise CorruptCheckpoint(f"{file}: not an optimizer state dict")
    saved_names = [group.get("param_names") for group in saved["param_groups"]]
    names = [group.get("param_names") for group in optimizer.param_groups]
    if None in saved_names or None in names:
        return  # groups built without names: torch's own size checks apply
    if saved_names != names:
        flat_saved = {n for group in saved_names for n in group}
        flat_now = {n for group in names for n in group}
        raise CheckpointMismatch(
            f"{file}: parameter groups differ from the optimizer's; only in the checkpoint: "
            f"{sorted(flat_saved - flat_now)[:10]}, only in the optimizer: {sorted(flat_now - flat_saved)[:10]}"
            f"{'' if flat_saved != flat_now else ' (same parameters, other grouping or order)'}")
