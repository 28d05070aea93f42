"""Run-root contract: every step writes `_SUCCESS.json` last; the demo keeps `summary.json` per step.

A step that finds its `_SUCCESS.json` with the same config hash and input hashes returns the recorded
result instead of running again (idempotent steps, see DESIGN.md).
"""
from __future__ import annotations

import time
from typing import Any

from pipelines import io

SUCCESS = "_SUCCESS.json"
SUMMARY = "summary.json"


def read_success(output_uri: str) -> dict[str, Any] | None:
    uri = io.join(output_uri, SUCCESS)
    return io.read_json(uri) if io.exists(uri) else None


def completed(output_uri: str, config_hash: str, input_hashes: dict[str, str]) -> dict[str, Any] | None:
    """The recorded result of a finished step with the same config and inputs, else None."""
    record = read_success(output_uri)
    if record and record.get("config_hash") == config_hash and record.get("input_hashes") == input_hashes:
        return record
    return None


def write_success(output_uri: str, *, step: str, config_hash: str, input_hashes: dict[str, str],
                  result: dict[str, Any], started: float) -> dict[str, Any]:
    record = {
        "step": step,
        "config_hash": config_hash,
        "input_hashes": input_hashes,
        "result": result,
        "started_at": started,
        "finished_at": time.time(),
        "seconds": round(time.time() - started, 3),
    }
    io.write_json_atomic(io.join(output_uri, SUCCESS), record)
    return record


def clear_success(output_uri: str) -> None:
    uri = io.join(output_uri, SUCCESS)
    if io.exists(uri):
        fs, path = io.fs_and_path(uri)
        fs.rm(path)


def update_summary(run_root: str, step: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge one step's metrics into `<run_root>/summary.json` (one object per step)."""
    uri = io.join(run_root, SUMMARY)
    summary = io.read_json(uri) if io.exists(uri) else {}
    summary[step] = metrics
    io.write_json_atomic(uri, summary)
    return summary
