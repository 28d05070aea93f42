"""Shared bits of the benchmark scripts: machine info and the results file every claim writes."""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Median wall seconds of `repeats` calls, and the last call's return value."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def write_result(name: str, *, baseline: dict, candidate: dict, ratio: float, units: str,
                 goal: str, extra: dict | None = None) -> dict[str, Any]:
    result = {
        "name": name, "baseline": baseline, "candidate": candidate, "ratio": round(ratio, 4),
        "units": units, "goal": goal, "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {}),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def run_cmd(args: list[str], env: dict | None = None) -> float:
    """Wall seconds of a subprocess that must succeed."""
    start = time.perf_counter()
    subprocess.run(args, check=True, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start
