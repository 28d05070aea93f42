"""Check (not a speed claim): `blip2 eval retrieval`'s own function on one stage-1 checkpoint on the GPU (frozen
encoder fp16, Q-Former fp32) and on the CPU (fp32), same test shards; prints both metrics, their largest
difference and the times. Run on a machine with a GPU, e.g. on the demo's outputs copied into the repository:

    python3 benchmarks/eval_device_parity.py --checkpoint CKPT_DIR --shards TEST_SHARDS [--devices cuda cpu]

The checkpoint's config must name an image encoder reachable there (e.g. `local-dir:<relative path>`).
MLflow, Ray and Prefect are not needed (blocked, so that a machine without them runs it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

for blocked in ("mlflow", "ray", "prefect"):
    sys.modules[blocked] = None
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.evaluate import EvalConfig, evaluate_retrieval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    args = parser.parse_args()
    out = {}
    for device in args.devices:
        cfg = EvalConfig(checkpoint=args.checkpoint, shards=args.shards, device=device)
        started = time.perf_counter()
        report = evaluate_retrieval(cfg, f"/tmp/eval_device_parity_{device}")
        out[device] = {"wall_s": round(time.perf_counter() - started, 2), "seconds": report["seconds"],
                       "metrics": {k: round(v, 2) for k, v in report["metrics"].items()}}
        print(device, json.dumps(out[device]), flush=True)
    if len(out) == 2:
        first, second = (out[d]["metrics"] for d in args.devices)
        print(f"largest metric difference {args.devices[0]} vs {args.devices[1]}:",
              round(max(abs(first[k] - second[k]) for k in first), 3))


if __name__ == "__main__":
    main()
