"""Claim (issue 7): running the pipeline as a Prefect flow costs little over calling the same steps directly.

One run of this script runs the same shapes-world profile twice from scratch, each in a fresh process and a
fresh run root, one after the other on this machine:

  * baseline: `blip2 demo` (pipeline.run_all: every step called in order, MLflow parent run,
    summary.json; no Prefect);
  * candidate: `python -m flows` (what `make demo` runs: the `full-pretrain` flow in-process, against Prefect's
    ephemeral API app started by the run as a child process (flows/local_api.py), one task per step with its
    cache policy, result persistence, artifacts).

Both get the same knobs (`--knob k=v`, DemoConfig fields; default: the `tiny` profile's) and print the
end-to-end wall time (process start to exit, imports included) and the ratio candidate / baseline
(goal: under 1.1). `--order flow-first` swaps the order to check for drift.

    .venv/bin/python benchmarks/bench_orchestration.py [--size tiny|demo] [--knob stage1_steps=300 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import write_result  # noqa: E402

from pipelines.profiles import TINY  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:3])} failed ({done.returncode}); see {log}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "demo"), default="tiny", help="base knobs: the tiny or demo profile's")
    parser.add_argument("--knob", action="append", default=[], help="DemoConfig override for both runs")
    parser.add_argument("--order", choices=("direct-first", "flow-first"), default="direct-first")
    parser.add_argument("--workdir", default=None, help="where the two run roots go (default: a temp dir)")
    args = parser.parse_args()
    knobs = (flatten(TINY) if args.size == "tiny" else []) + args.knob
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-orch-"))
    py = sys.executable
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    runs = {
        "direct": [str(Path(py).parent / "blip2"), "demo", "--run-root", str(work / "direct"), *knobs, f"port={free_port()}"],
        "flow": [py, "-m", "flows", "--profile", "demo", "--run-root", str(work / "flow"),
                 *(f"--knob={k}" for k in knobs), f"--knob=port={free_port()}"],
    }
    order = ["direct", "flow"] if args.order == "direct-first" else ["flow", "direct"]
    seconds = {}
    for name in order:
        run_env = {**env, "PREFECT_HOME": str(work / name / ".prefect")}
        (work / name / ".prefect").mkdir(parents=True, exist_ok=True)
        seconds[name] = timed(runs[name], run_env, work / f"{name}.log")
        print(f"{name:<7} {seconds[name]:8.1f} s   ({work / f'{name}.log'})", flush=True)
    summaries = {n: json.loads((work / n / "summary.json").read_text()) for n in runs}
    same = all(summaries["direct"][k]["succeeded"] == summaries["flow"][k]["succeeded"] for k in ("download",))
    ratio = seconds["flow"] / seconds["direct"]
    print(f"orchestration overhead: flow / direct = {ratio:.3f} (goal < 1.10; {seconds['flow'] - seconds['direct']:+.1f} s)"
          f"; same download counts: {same}; size {args.size}, order {args.order}")
    write_result("orchestration", baseline={"what": "blip2 demo (steps called directly)",
                                            "seconds": round(seconds["direct"], 1)},
                 candidate={"what": "python -m flows (Prefect flow, local ephemeral API child process)",
                            "seconds": round(seconds["flow"], 1)},
                 ratio=ratio, units="wall seconds, flow / direct", goal="< 1.10",
                 extra={"size": args.size, "order": args.order, "knobs": knobs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
