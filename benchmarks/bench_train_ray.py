"""Claim (issue 4): the Ray Train loop costs little over the same loop as one plain process.

One run of this script measures, on the same shapes-world shards (256 images, 32 px, 8 shards of 32),
the tiny stage-1 model, batch 8 per worker, data `num_workers=0`, one checkpoint (the final one),
Ray reports every `log_every` steps (50; 10 with --quick), no system metrics, no generated samples:

  * baseline: `scaling.workers=0`, i.e. `train_loop_per_worker` in this process, no Ray running;
  * candidate: `scaling.workers=1` under Ray Train (TorchTrainer), in a Ray session this script starts
    with `ray.init(num_cpus=2, include_dashboard=False)` and shuts down after it;
  * scaling: `scaling.workers=2` (global batch 16) against the 1-worker run, in the same Ray session.
The runs come in `--repeats` pairs (default 5): one plain run and one Ray session (1 then 2 workers), in
ABBA order (plain first in even pairs, Ray first in odd ones). The headline ratio is the median of the
pairs' plain/Ray ratios: on a 2-core cloud box two identical plain runs differ by up to 44%, and a ratio
taken inside a pair, between neighbouring runs, is what cancels most of that drift. Means are reported too.

Threads (`--threads`, default 2 = every core of this box): the plain process runs with that many torch
threads, and the 1-worker run reserves `cpus_per_worker` = the same number (Ray sets OMP_NUM_THREADS of an
actor to the CPUs it reserves); the 2-worker run reserves 1 CPU each (1 thread each). The threads each worker
actually got are recorded (`torch_threads`) from inside the worker. With 2 threads the step uses both cores
and shares them with Ray's own processes (GCS, raylet, the Train controller: ~15% of a core); with
`--threads 1` a core is left for them, as on a node with spare cores, and the ratio is Ray Train's own loop
overhead (reports, the worker process, its data) without that contention.

How the training is timed: every step's metrics carry a wall-clock timestamp (ms) in MLflow, taken when
the loop logs them. The rate is (N - s0) / (t[N] - t[s0]) with s0 = log_every: the window holds only
whole training steps (batch, forward, backward, optimizer, metrics, and one Ray report per `log_every`
steps), none of the one-off costs (Ray start, worker group start, model build, MLflow run creation, the
first step's FLOP count, the final checkpoint, model registration, shutdown). Those are reported apart,
per phase, from `run` call to the build of the model, to step 1, to step N, to `run`'s return. The
plain process pays once, at its first report, a lazy import of `ray.train` (about 1 s) that is no part
of a training step; it is paid before the baseline runs (the Ray workers paid theirs at start-up).
The end-to-end wall-time ratio is reported too. Each run also records the cores every process on the machine used
in that window (`cpu_in_window`, from /proc): with `--threads 2` the step's OpenMP threads fill both cores in
lockstep, so the CPU Ray's own processes use there (0.13-0.16 core on the 2-core box) stalls the step.

On a GPU (`--device cuda`): both runs train on the GPU (`scaling.use_gpu`, so the Ray worker holds the GPU and
its process group uses nccl; bf16 autocast as `precision: auto` gives on a GPU), Ray starts with
`num_cpus=threads + 2, num_gpus=1`, and the 2-worker run is left out where there is one GPU (two nccl ranks
may not share a device). `_cuda` ends the result's name (e.g. `train_ray_threads4_cuda`).

    .venv/bin/python benchmarks/bench_train_ray.py [--steps 200] [--log-every 50] [--repeats 5] [--threads 2]
                                                   [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from _cpu_share import CpuSampler  # noqa: E402

from pipelines.shapes import synth  # noqa: E402
from pipelines.shapes.shards import pack_split  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.loop import report_to_ray  # noqa: E402
from pipelines.train.runner import run as run_training  # noqa: E402
from pipelines.train_stage1 import build_stage1  # noqa: E402

BATCH = 8  # per worker (--batch)
IMAGE_SIZE = 32  # px (--image-size)
THREADS = 2  # torch threads of the plain process and of the 1-worker run (--threads)
DEVICE = "cpu"  # --device


def recording_build(marker_dir: str, cfg, device):
    """`build_stage1`, first noting when and with how many torch threads this worker builds its model."""
    import torch

    from blip2 import dist

    rank, world = dist.rank_and_world()
    note = {"rank": rank, "world": world, "built_at": time.time(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid()}
    Path(marker_dir, f"rank{rank}.json").write_text(json.dumps(note))
    return build_stage1(cfg, device)


def op_timings(threads: int) -> dict[str, float]:
    """Microseconds per call of three ops the step is made of (`threads` threads): the same code in a plain process
    and in a Ray task shows the share of compute a Ray worker loses on this box, apart from anything Ray Train does."""
    import torch

    torch.set_num_threads(threads)

    torch.manual_seed(0)
    a, w, h = torch.randn(256, 384), torch.randn(384, 384), torch.randn(32, 64, 256)
    ops = {"matmul_256x384x384": lambda: a @ w, "softmax_32x64x256": lambda: h.softmax(-1),
           "layer_norm_32x64x256": lambda: torch.nn.functional.layer_norm(h, (256,))}
    out = {}
    for name, op in ops.items():
        for _ in range(200):
            op()
        started = time.perf_counter()
        for _ in range(3000):
            op()
        out[name] = round((time.perf_counter() - started) / 3000 * 1e6, 1)
    return out


def make_shards(root: Path) -> Path:
    synth.run(synth.SynthConfig(split="curated", images=256, seed=0, image_size=IMAGE_SIZE), str(root),
              progress=False)
    pack_split(root, "curated", root / "shards", per_shard=32)  # 8 shards: 4 per reader with 2 workers
    return root / "shards"


def make_config(shards: Path, run_dir: Path, steps: int, log_every: int, workers: int, cpus: float) -> TrainConfig:
    return TrainConfig.model_validate({
        "stage": "stage1",
        "model": {"preset": "tiny", "qformer": {"dropout": 0.0}, "vision": {"image_size": IMAGE_SIZE}},
        "data": {"sources": [{"name": "curated", "shards": str(shards)}], "image_size": IMAGE_SIZE,
                 "batch_size": BATCH,
                 "shuffle_buffer": 32, "num_workers": 0},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "total_steps": steps, "weight_decay": 0.0},
        "scaling": {"workers": workers, "cpus_per_worker": cpus, "max_failures": 0, "use_gpu": DEVICE == "cuda"},
        "checkpoint": {"every": steps, "keep": 1},
        "tracking": {"uri": f"sqlite:///{run_dir}/mlflow.db", "system_metrics": False},
        "log_every": log_every, "samples_to_generate": 0, "max_text_length": 24,
    })


def loss_timestamps(uri: str, run_id: str) -> dict[int, float]:
    """step -> wall seconds at which the loop logged that step's metrics."""
    from mlflow.tracking import MlflowClient

    return {m.step: m.timestamp / 1000 for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")}


def train_once(label: str, shards: Path, tmp: Path, steps: int, log_every: int, workers: int,
               cpus: float = 1.0) -> dict:
    run_dir = tmp / label
    run_dir.mkdir()
    markers = run_dir / "markers"
    markers.mkdir()
    cfg = make_config(shards, run_dir, steps, log_every, workers, cpus)
    print(f"--- {label}: workers={workers} cpus_per_worker={cpus} steps={steps}", flush=True)
    called = time.time()
    with CpuSampler(every_s=1.0) as sampler:
        result = run_training(cfg, str(run_dir / "out"), functools.partial(recording_build, str(markers)))
    returned = time.time()
    assert result["steps"] == steps, result
    stamps = loss_timestamps(cfg.tracking.uri, result["mlflow_run_id"])
    assert sorted(stamps) == list(range(1, steps + 1)), f"{label}: steps logged {sorted(stamps)[:5]}..."
    notes = [json.loads(p.read_text()) for p in sorted(markers.glob("rank*.json"))]
    world = max(workers, 1)
    assert len(notes) == world, notes
    s0 = log_every if steps >= 2 * log_every else max(2, steps // 5)
    window = stamps[steps] - stamps[s0]
    steps_per_s = (steps - s0) / window
    gaps = {k: stamps[k] - stamps[k - 1] for k in range(s0 + 1, steps + 1)}
    after_report = [gaps[k + 1] for k in range(s0, steps) if k % log_every == 0]
    others = [g for k, g in gaps.items() if (k - 1) % log_every != 0]
    built = min(n["built_at"] for n in notes)
    return {
        "workers": workers, "cpus_per_worker": cpus if workers else None, "global_batch": BATCH * world,
        "torch_threads": [n["torch_threads"] for n in notes],
        "steps_per_s": round(steps_per_s, 3), "samples_per_s": round(steps_per_s * BATCH * world, 2),
        "window_steps": f"{s0}..{steps}", "window_s": round(window, 3),
        "median_step_ms": round(1000 * statistics.median(others), 1),
        "step_after_report_ms": [round(1000 * g, 1) for g in after_report],
        "report_cost_ms": round(1000 * (statistics.mean(after_report) - statistics.median(others)), 1)
        if after_report else None,
        "first_steps_ms": [round(1000 * (stamps[k] - stamps[k - 1])) for k in range(2, min(s0, 12) + 1)],
        "phases_s": {"launch_to_model_build": round(built - called, 2),
                     "model_build_to_step_1": round(stamps[1] - built, 2),
                     "step_1_to_step_N": round(stamps[steps] - stamps[1], 2),
                     "step_N_to_return": round(returned - stamps[steps], 2)},
        "end_to_end_s": round(returned - called, 2),
        "cpu_in_window": cpu_in_window(sampler.shares(stamps[s0], stamps[steps]), {n["pid"] for n in notes}),
    }


def cpu_in_window(shares: dict[int, tuple[float, str]], training: set[int]) -> dict | None:
    """Cores used in the timed window by the training process(es) and by every other process (the busiest by name):
    on a 2-core box the step's OpenMP threads run on both cores in lockstep, so any other process's CPU stalls it.
    None when the window held fewer than two samples (a --quick run) or there is no /proc."""
    if not shares:
        return None
    others: dict[str, float] = {}
    for pid, (cores, name) in shares.items():
        if pid not in training:
            others[name] = others.get(name, 0.0) + cores
    return {"training_cores": round(sum(shares[p][0] for p in training if p in shares), 3),
            "other_processes_cores": round(sum(others.values()), 3),
            "busiest_others": {k: round(v, 3) for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:8]}}


def mean_cpu_in_window(runs: list[dict]) -> dict | None:
    sampled = [r["cpu_in_window"] for r in runs if r["cpu_in_window"]]
    if not sampled:
        return None
    return {key: round(statistics.mean(c[key] for c in sampled), 3)
            for key in ("training_cores", "other_processes_cores")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved plain / Ray pairs")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, a report every 10, 1 repeat")
    parser.add_argument("--batch", type=int, default=8, help="batch per worker (a larger step: less overhead share)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in px (and the model's input)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the plain run and of the 1-worker run (on a 2-core box, 1 leaves a "
                             "core for Ray's own processes)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: both runs on the GPU, the Ray worker holding it (nccl); no 2-worker run on one GPU")
    args = parser.parse_args()
    global BATCH, IMAGE_SIZE, THREADS, DEVICE
    BATCH, IMAGE_SIZE, THREADS, DEVICE = args.batch, args.image_size, args.threads, args.device
    if not 1 <= THREADS <= (os.cpu_count() or 1):
        parser.error(f"--threads {THREADS}: this machine has {os.cpu_count()} cores")
    name = "train_ray" if (BATCH, IMAGE_SIZE) == (8, 32) else f"train_ray_b{BATCH}_px{IMAGE_SIZE}"
    name += "" if THREADS == 2 else f"_threads{THREADS}"
    name += "" if DEVICE == "cpu" else f"_{DEVICE}"
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    two_workers = DEVICE == "cpu" or torch.cuda.device_count() >= 2

    torch.set_num_threads(THREADS)  # the plain runs happen in this process
    steps, log_every, repeats = (40, 10, 1) if args.quick else (args.steps, args.log_every, args.repeats)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-train-ray-") as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "shapes")
        report_to_ray({})  # the plain process's one-off lazy import of ray.train, outside the timed window
        train_once("warm-up", shards, tmp, min(steps, 3 * log_every), log_every, workers=0)  # discarded: first
        # use of the kernels, the allocator and the page cache in this process (it ran ~20% slower than later runs)
        plain, ones, twos, pair_ratios, ray_init_s, ray_shutdown_s = [], [], [], [], [], []
        ops_plain = op_timings(THREADS)
        ops_ray = {}

        def plain_run(i: int) -> None:
            plain.append(train_once(f"plain-{i}", shards, tmp, steps, log_every, workers=0))

        def ray_session(i: int) -> None:
            """Start Ray, run 1 then 2 workers, shut it down (timed)."""
            started = time.perf_counter()
            ray.init(**({"num_cpus": 2} if DEVICE == "cpu" else {"num_cpus": THREADS + 2, "num_gpus": 1}),
                     include_dashboard=False)
            ray_init_s.append(time.perf_counter() - started)
            try:
                if not ops_ray:
                    ops_ray.update(ray.get(ray.remote(num_cpus=THREADS)(op_timings).remote(THREADS)))
                ones.append(train_once(f"ray-1-{i}", shards, tmp, steps, log_every, workers=1, cpus=float(THREADS)))
                if two_workers:
                    twos.append(train_once(f"ray-2-{i}", shards, tmp, steps, log_every, workers=2, cpus=1.0))
            finally:
                started = time.perf_counter()
                ray.shutdown()
                ray_shutdown_s.append(time.perf_counter() - started)

        for i in range(repeats):  # one pair each; the order flips every pair (ABBA) so drift cancels in the median
            for part in ((plain_run, ray_session) if i % 2 == 0 else (ray_session, plain_run)):
                part(i)
            pair_ratios.append(plain[-1]["steps_per_s"] / ones[-1]["steps_per_s"])
            print(f"pair {i}: plain {plain[-1]['steps_per_s']} steps/s, Ray 1 worker {ones[-1]['steps_per_s']} "
                  f"steps/s, ratio {pair_ratios[-1]:.3f}", flush=True)
        ray_init_s, ray_shutdown_s = statistics.median(ray_init_s), statistics.median(ray_shutdown_s)

    plain_rate = statistics.mean(p["steps_per_s"] for p in plain)
    plain_e2e = statistics.mean(p["end_to_end_s"] for p in plain)
    one_rate = statistics.mean(r["steps_per_s"] for r in ones)
    one_samples = statistics.mean(r["samples_per_s"] for r in ones)
    write_result(
        name,
        baseline={"what": "scaling.workers=0: the loop in one plain process, no Ray running (mean of "
                          f"{repeats} runs, each paired with a Ray session)", "steps_per_s": round(plain_rate, 3), "runs": plain},
        candidate={"what": f"scaling.workers=1: the same loop as one Ray Train (TorchTrainer) worker (mean of "
                           f"{repeats} runs)", "steps_per_s": round(one_rate, 3), "runs": ones},
        ratio=statistics.median(pair_ratios),
        units="steady-state steps/s ratio, plain / Ray 1 worker, median over the interleaved pairs (1.0 = no "
              f"overhead; both use {THREADS} torch thread(s))",
        goal="Ray/plain overhead < 10% at 200 steps",
        extra={
            "steps": steps, "log_every": log_every, "batch_per_worker": BATCH, "threads": THREADS,
            "plain_torch_threads": plain[0]["torch_threads"],
            "data": f"shapes-world, 256 images at {IMAGE_SIZE} px, 8 shards of 32, loader num_workers=0",
            "repeats": repeats,
            "pair_ratios": [round(r, 3) for r in pair_ratios],
            "ratio_of_means": round(plain_rate / one_rate, 3),
            "plain_spread": round(max(p["steps_per_s"] for p in plain) / min(p["steps_per_s"] for p in plain), 3),
            "end_to_end_ratio": round(statistics.mean(r["end_to_end_s"] for r in ones) / plain_e2e, 3),
            "end_to_end_note": "whole `run` wall time, Ray 1 worker / plain (start-up and teardown included; "
                               "ray.init itself is not)",
            "cpu_in_window_mean": {"plain": mean_cpu_in_window(plain), "ray_1_worker": mean_cpu_in_window(ones)},
            "cpu_in_window_note": "cores used between step log_every and the last step (from /proc, sampled every "
                                  "second): by the training process(es) and by every other process on the machine "
                                  "(Ray's own processes in a Ray run); each run's busiest others in its `runs` entry",
            "ray_init_s_median": round(ray_init_s, 2), "ray_shutdown_s_median": round(ray_shutdown_s, 2),
            "op_microseconds": {"plain_process": ops_plain, "ray_task": ops_ray,
                                "ray_over_plain": {k: round(ops_ray[k] / ops_plain[k], 3) for k in ops_plain},
                                "note": f"the same ops ({THREADS} thread(s)) timed in this process and in a Ray task "
                                        "while Ray "
                                        "runs: what a Ray worker loses on this box before Ray Train adds anything"},
            "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "workers_1_vs_2": None if not twos else {
                "one_worker": {"samples_per_s": round(one_samples, 2), "torch_threads": ones[0]["torch_threads"]},
                "two_workers": {"samples_per_s": round(statistics.mean(r["samples_per_s"] for r in twos), 2),
                                "torch_threads": twos[0]["torch_threads"], "runs": twos},
                "scaling_ratio": round(statistics.mean(r["samples_per_s"] for r in twos) / one_samples, 3),
                "note": "samples/s, 2 workers x batch 8 (global 16) over 1 worker x batch 8; on this "
                        f"{os.cpu_count()}-core box the 1 worker gets {THREADS} thread(s) "
                        f"(cpus_per_worker={THREADS}) and each of "
                        "the 2 workers 1 thread (cpus_per_worker=1, so Ray sets OMP_NUM_THREADS=1): the same "
                        "cores, shared also with Ray's own processes and the gloo all-reduce",
            },
        })


if __name__ == "__main__":
    main()
