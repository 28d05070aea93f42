"""Claim: CapFilt on a GPU (the captioner and CLIP in fp16, as `device=auto` picks there) keeps captions as good as
the CPU's fp32 run, and is faster; the Ray Data executor puts its actors on the GPU (0.5 GPU each) by itself.

Same input for all three runs: shapes-world web shards (40% noisy captions), the same models, k=10 nucleus samples
(top_p 0.9) per image, ranked with the web caption. Baseline: `executor=local device=cpu` (fp32, all host cores).
Candidates: `executor=local device=cuda` (fp16) and `executor=ray` with Ray started on the GPU host (`device=auto`,
`ray_actor_gpus` unset: the actors ask for half a GPU each and pick cuda). The sampler draws the same uniforms
per (image, sample, step) on every device, so fp16 changes a candidate only where two tokens' cumulative
probabilities straddle a uniform; the script reports how many candidates and kept pairs are the same, the
largest score difference on identical captions, and each run's checker precision (kept and web).
The ratio is GPU wall / CPU wall of the local executor.

    python3 benchmarks/capfilt_device_parity.py --models RUN/foundation [--images 512]
    (without --models: random-init models of the stand-ins' size; the precisions then mean little)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from _common import write_result  # noqa: E402

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import capfilt_support as support  # noqa: E402
from bench_capfilt import capfilt_records as samples, models  # noqa: E402
from pipelines.capfilt import CapfiltConfig, run  # noqa: E402


def agreement(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """How much of run b's output equals run a's (same keys)."""
    assert a.keys() == b.keys(), "the runs wrote different samples"
    same_candidates = total_candidates = same_kept = 0
    score_diff = 0.0
    for key, rec in a.items():
        other = b[key]
        pairs = list(zip(rec["candidates"], other["candidates"]))
        total_candidates += len(pairs)
        for x, y in pairs:
            if x["text"] == y["text"]:
                same_candidates += 1
                score_diff = max(score_diff, abs(x["score"] - y["score"]))
        same_kept += sorted(rec["kept"]) == sorted(other["kept"])
    return {"same_candidate_share": round(same_candidates / total_candidates, 4),
            "same_kept_pair_share": round(same_kept / len(a), 4),
            "max_score_diff_on_same_caption": round(score_diff, 5)}


def figures(wall: float, result) -> dict:
    return {"wall_s": round(wall, 2), "images_per_s": round(result.images / wall, 2),
            "candidate_captions_per_s": result.captions_per_second,
            "images_ranked_per_s": result.images_ranked_per_second,
            "web_precision": result.web_precision, "kept_precision": result.kept_precision,
            "oracle_kept_precision": result.oracle_kept_precision,
            "ranker_pair_accuracy": result.ranker_pair_accuracy}


def timed_run(cfg: CapfiltConfig, out: Path):
    start = time.perf_counter()
    result = run(cfg, str(out))
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", help="folder with captioner/ and clip/ (the foundation step's output)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data run")
    parser.add_argument("--device", default="cuda", help="the candidate's device (cpu: a dry run of the script)")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("capfilt_device_parity: no CUDA device here; this claim needs a GPU (--device cpu: dry run)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shards = support.web_shards(workdir / "web", images=args.images, per_shard=args.per_shard,
                                    image_size=args.image_size)
        captioner, ranker, what = models(workdir, args.models)
        base = dict(shards=str(shards[0].parent), captioner=captioner, ranker=ranker, num_captions=10,
                    max_new_tokens=30, min_new_tokens=2, batch_size=args.batch_size, seed=0)
        warm = support.web_shards(workdir / "warm", images=8, per_shard=8, image_size=args.image_size)
        for device in ("cpu", args.device):  # first calls (imports, CUDA context, kernels) before the clocks
            run(CapfiltConfig(**{**base, "shards": str(warm[0].parent)}, executor="local", device=device),
                str(workdir / f"warm-{device}"))
        cpu_wall, cpu = timed_run(CapfiltConfig(**base, executor="local", device="cpu"), workdir / "cpu")
        gpu_wall, gpu = timed_run(CapfiltConfig(**base, executor="local", device=args.device),
                                     workdir / "gpu")
        extra = {"images": cpu.images, "models": what, "host_threads": torch.get_num_threads(),
                 "gpu_vs_cpu": agreement(samples(workdir / "cpu"), samples(workdir / "gpu"))}
        print(f"local: cpu {cpu_wall:.1f} s, gpu {gpu_wall:.1f} s; kept precision cpu {cpu.kept_precision} "
              f"gpu {gpu.kept_precision}; {extra['gpu_vs_cpu']}", flush=True)
        if not args.no_ray:
            import ray

            ray.init(include_dashboard=False)
            try:
                resources = ray.cluster_resources()
                ray_wall, distributed = timed_run(CapfiltConfig(**{**base, "batch_size": args.batch_size // 2},
                                                                executor="ray", device="auto"), workdir / "ray")
            finally:
                ray.shutdown()
            extra["ray_on_gpu"] = {"cluster_gpus": resources.get("GPU", 0), **figures(ray_wall, distributed),
                                   "vs_local_gpu": agreement(samples(workdir / "gpu"), samples(workdir / "ray"))}
            print(f"ray: {ray_wall:.1f} s; {extra['ray_on_gpu']}", flush=True)
    write_result(
        "capfilt_device", baseline={"what": "CapFilt in-process on the host CPU (fp32)", **figures(cpu_wall, cpu)},
        candidate={"what": "CapFilt in-process on the GPU (captioner and CLIP fp16)", **figures(gpu_wall, gpu)},
        ratio=gpu_wall / cpu_wall, units="wall seconds, GPU / CPU (same input, same sampler uniforms)",
        goal="kept precision on the GPU within noise of the CPU's; the Ray Data actors on the GPU", extra=extra)


if __name__ == "__main__":
    main()
