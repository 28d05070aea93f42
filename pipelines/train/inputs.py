"""What a training run reads besides its config, and whether an output directory still belongs to this run.

A run's results depend on files its config only names by path: the data shards, the frozen models' local
directories, the tokenizer and, for stage 2, the stage-1 checkpoint it starts from. When those change under the
same paths (the stand-ins retrained, stage 1 trained again, CapFilt run again), a finished run must not be reused
and its checkpoints must not be resumed from. `input_hashes` fingerprints them cheaply (file names, sizes and
modification times, no bytes read); the runner records them in `train_inputs.json` when it starts and in
`_SUCCESS.json` when it ends, and `stale_reason` compares an output directory with the run about to start.
"""
from __future__ import annotations

import os

from pipelines import io, runroot
from pipelines.data.shards import expand_shards
from pipelines.train.config import TrainConfig
from pipelines.train.state import STATE_FILE, CheckpointMismatch

INPUTS_FILE = "train_inputs.json"


class StaleOutput(CheckpointMismatch):
    """The output directory holds checkpoints of another run (another config, or other input files)."""


def _local_model_dir(name: str | None) -> str | None:
    """The directory a model field names (open_clip's "local-dir:" prefix dropped), or None for a hub id."""
    if not name:
        return None
    path = name.removeprefix("local-dir:")
    return path if "://" in path or os.path.isdir(path) else None


def input_hashes(cfg: TrainConfig) -> dict[str, str]:
    """Fingerprints of the run's input files: "data" always; "init_from", "vision", "llm", "tokenizer" when the
    config names local (or object-store) files for them. Expects `runner.absolute_paths(cfg)`."""
    shards = [url for source in cfg.data.sources
              for url in expand_shards(source.shards, f"data.sources[{source.name}]")]
    hashes = {"data": io.files_fingerprint(shards)}
    model = cfg.model
    named = {"init_from": model.init_from, "vision": _local_model_dir(model.vision.get("name")),
             "llm": _local_model_dir(model.llm.get("name")), "tokenizer": _local_model_dir(model.tokenizer)}
    hashes.update({key: io.files_fingerprint([uri]) for key, uri in named.items() if uri and io.exists(uri)})
    return hashes


def recorded_inputs(output: str) -> dict[str, str] | None:
    """The input fingerprints an output's run started with (train_inputs.json, else its _SUCCESS.json), or None
    for an output that recorded none."""
    path = io.join(output, INPUTS_FILE)
    if io.exists(path):
        return io.read_json(path)
    record = runroot.read_success(output)
    return record.get("input_hashes") if record else None


def stale_reason(output: str, latest_checkpoint: str | None, identity_hash: str, inputs: dict[str, str]
                 ) -> str | None:
    """Why the checkpoints in `output` belong to another run than this one (another config, or the same config
    on other input files), or None when they can be resumed from (or there are none)."""
    if latest_checkpoint is None:
        return None
    written_with = io.read_json(io.join(latest_checkpoint, STATE_FILE)).get("config_hash")
    if written_with != identity_hash:
        return (f"its checkpoints were written with config hash {written_with!r}, the current config hashes to "
                f"{identity_hash!r}")
    recorded = recorded_inputs(output)
    if recorded is None or recorded == inputs:  # None: an interrupted run of an older version, resumable
        return None
    if not recorded:
        return "it was finished by an older version that recorded no version stamps of its input files"
    changed = sorted(key for key in set(recorded) | set(inputs) if recorded.get(key) != inputs.get(key))
    return f"it was trained on other input files than the current ones: {', '.join(changed)} changed"
