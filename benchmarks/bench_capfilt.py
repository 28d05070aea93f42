"""Claim: CapFilt's two executors keep the same captions; what the Ray Data path costs against the in-process
path on one box (its actors and shuffle start up once; it pays off across machines and GPUs, not here).

Same input for both: shapes-world web shards (noisy captions) in img2dataset's layout, the same models,
k=10 nucleus samples (top_p 0.9, up to 30 new tokens) per image, ranked with the web caption by CLIP.
Baseline: `executor=local` (one process, batched, `--threads` torch threads, default 1: on a busy 2-core box
two OpenMP threads spin against other processes; its captioner and ranker throughput are reported as
candidate captions/s and images ranked/s). Candidate: `executor=ray` (Ray Data: a captioner actor pool and
a ranker actor pool with fractional CPUs, shards written from the results grouped by shard), Ray started
before the clock. Both runs must keep the same captions; the ratio is Ray wall / in-process wall.

Models: random-init ones of the foundation stand-ins' size (BLIP captioner + open_clip CLIP) unless
`--models DIR` names the foundation step's stand-ins (DIR/captioner, DIR/clip).

    .venv/bin/python benchmarks/bench_capfilt.py [--images 1024] [--models RUN/foundation]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from _common import write_result  # noqa: E402

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import capfilt_support as support  # noqa: E402
from pipelines.capfilt import CapfiltConfig, run  # noqa: E402


def models(workdir: Path, given: str | None) -> tuple[str, str, str]:
    """(captioner spec, ranker spec, what they are)."""
    if given:
        root = Path(given)
        return str(root / "captioner"), f"local-dir:{root / 'clip'}", f"foundation stand-ins from {root}"
    captioner = support.tiny_blip(workdir / "blip", image_size=64, width=64, vision_layers=3, text_layers=2)
    clip = support.tiny_clip(workdir / "clip", image_size=64, width=64, layers=3)
    return (str(captioner), f"local-dir:{clip}",
            "random-init BLIP (64 px, width 64, 3+2 layers) + open_clip CLIP (64 px, width 64, 3 layers)")


def capfilt_records(out: Path) -> dict[str, dict]:
    """key -> the sample's "capfilt" record (candidates with scores, kept) in the output shards of `out`."""
    found = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    found[member.name[:-5]] = json.loads(tar.extractfile(member).read())["capfilt"]
    return found


def kept(out: Path) -> dict[str, list[str]]:
    return {key: record["kept"] for key, record in capfilt_records(out).items()}


def timed_run(cfg: CapfiltConfig, out: Path):
    start = time.perf_counter()
    result = run(cfg, str(out))
    return time.perf_counter() - start, result


def figures(wall: float, result) -> dict:
    return {"wall_s": round(wall, 2), "images_per_s": round(result.images / wall, 2),
            "candidate_captions_per_s": result.captions_per_second,
            "images_ranked_per_s": result.images_ranked_per_second}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--num-captions", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ray-actors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process run (Ray actors: 1)")
    parser.add_argument("--models", help="folder with captioner/ and clip/ (the foundation step's output)")
    args = parser.parse_args()
    import ray
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shards = support.web_shards(workdir / "web", images=args.images, per_shard=args.per_shard, image_size=64)
        captioner, ranker, what = models(workdir, args.models)
        base = dict(shards=str(shards[0].parent), captioner=captioner, ranker=ranker, num_captions=args.num_captions,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device="cpu")
        local_wall, local = timed_run(CapfiltConfig(**base, executor="local"), workdir / "local")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        try:
            ray_wall, distributed = timed_run(CapfiltConfig(**base, executor="ray", ray_actors=args.ray_actors,
                                                            ray_actor_cpus=0.5), workdir / "ray")
        finally:
            ray.shutdown()
        same = kept(workdir / "local") == kept(workdir / "ray")
    write_result(
        "capfilt", baseline={"what": f"CapFilt in-process (executor=local, {args.threads} torch thread(s))",
                             **figures(local_wall, local)},
        candidate={"what": f"CapFilt on Ray Data ({args.ray_actors} captioner + {args.ray_actors} ranker actors, "
                           "0.5 CPU each; Ray started before the clock)", **figures(ray_wall, distributed)},
        ratio=ray_wall / local_wall, units="wall seconds, Ray Data / in-process (same input, same kept captions)",
        goal="identical kept captions; the ratio is Ray Data's fixed cost on one 2-core box (for reference)",
        extra={"images": args.images, "num_captions": args.num_captions, "max_new_tokens": args.max_new_tokens,
               "batch_size": args.batch_size, "models": what, "same_kept_captions": same,
               "web_precision": local.web_precision, "kept_precision": local.kept_precision,
               "web_kept_share": local.web_kept_share})
    print(f"Ray Data / in-process wall: {ray_wall:.1f} s / {local_wall:.1f} s = {ray_wall / local_wall:.2f}; "
          f"same kept captions: {same}")


if __name__ == "__main__":
    main()
