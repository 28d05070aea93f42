"""The per-worker training loop shared by stage 1 and stage 2. It reads top to bottom:

build the stage's model -> optimizer + schedule -> resume from the latest checkpoint (weights, optimizer,
schedule, RNG, data position) -> loop: batch -> forward -> skip non-finite -> backward (accumulate) ->
clip -> step -> metrics -> checkpoint + flush metrics -> final checkpoint, generations, curves, model.

The same function runs as a Ray Train worker (a process group is set up by Ray) or as one plain process.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from blip2 import dist
from pipelines import io
from pipelines.config import ConfigError
from pipelines.data.loader import TrainLoader
from pipelines.train.config import TrainConfig
from pipelines.train.optim import build_optimizer, build_scheduler
from pipelines.train import storage
from pipelines.train.state import (capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state,
                                   save_checkpoint)
from pipelines.train.tracking import default_tracking_uri, make_tracker

log = logging.getLogger(__name__)


@dataclass
class StageParts:
    """What a stage gives the loop: its model and how to turn a loader batch into a loss."""

    model: nn.Module
    inputs: Callable[[dict], dict]  # loader batch -> model keyword arguments (on the device)
    losses: Callable[[Any], dict[str, torch.Tensor]]  # model output -> {"loss": ..., other terms}
    samples: Callable[[nn.Module, dict], list[dict]]  # (model, batch) -> generations to log
    extra_metrics: Callable[[nn.Module], dict[str, float]] = lambda model: {}


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left as it was."""


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def matmul_ceiling(device: torch.device, n: int = 1024) -> float:
    """Best fp32 matmul GFLOP/s of a few runs: the ceiling the step's FLOPs are compared with."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(4):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def all_ranks_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss).item())])
    if dist.rank_and_world()[1] > 1:
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_objects(obj: Any) -> list[Any]:
    _, world = dist.rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch_dist.all_gather_object(out, obj)
    return out


def report_to_ray(metrics: dict[str, float]) -> None:
    """Ray Train wants every worker's report; outside Ray this does nothing."""
    try:
        import ray.train

        ray.train.report(metrics)
    except (ImportError, RuntimeError, ValueError):  # not inside a Ray Train worker
        pass


def maybe_fail(cfg: TrainConfig, output: str, step: int) -> None:
    """Fault-tolerance drill: raise once at `debug.fail_once_at_step` (a marker in the output makes it once,
    whichever node the restarted worker lands on)."""
    if cfg.debug.fail_once_at_step != step:
        return
    marker = io.join(output, f".failed-once-at-{step}")
    if not io.exists(marker):
        fs, path = io.fs_and_path(marker)
        fs.pipe_file(path, b"")
        raise RuntimeError(f"injected failure at step {step} (debug.fail_once_at_step)")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`. config: {"cfg": TrainConfig (JSON), "output": the job's output
    directory or object-store URI, "build_stage": (cfg, device) -> StageParts}. Checkpoints are written to
    `work` (the output itself, or this node's staging directory for a remote output; see storage.py)."""
    cfg = TrainConfig.model_validate(config["cfg"])
    output, build_stage = config["output"], config["build_stage"]
    work = storage.work_dir(output)
    rank, world = dist.rank_and_world()
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights (and frozen random parts) on every rank
    parts = build_stage(cfg, device)
    model = parts.model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    step, samples_seen, loader_state, unwritten = resume(cfg, output, work, model, optimizer, scheduler, rank)
    loader = TrainLoader(cfg.data, rank, world, state=loader_state)
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    tracker = open_tracker(cfg, output, rank, world, device)
    tracker.recover(unwritten)  # metrics of the checkpoint's steps that a crash kept from MLflow
    ceiling = matmul_ceiling(device) if rank == 0 else 0.0
    # Not a terminal (a Ray worker's stdout goes through Ray's log monitor to the driver; a log file): redraw
    # every few seconds, not every step, so that printing progress costs the training nothing.
    progress = tqdm(total=cfg.optim.total_steps, initial=step, desc=cfg.stage, disable=rank != 0,
                    mininterval=0.1 if sys.stderr.isatty() else 5.0)
    nonfinite, saved_at, last_batch, step_flops, first_metrics, metrics = 0, step, None, None, None, {}
    batches_iter = iter(loader)
    while step < cfg.optim.total_steps:
        started = time.perf_counter()
        losses, batches, flops = train_step(cfg, parts, trained, optimizer, batches_iter, count_flops=step_flops is None)
        step_flops = step_flops or flops
        if losses is None:  # a non-finite loss on some rank: no update anywhere
            nonfinite += 1
            tracker.log_metrics({"train/nonfinite_steps": nonfinite}, step=step + 1)
            if nonfinite >= cfg.max_nonfinite:
                raise NonFiniteLoss(f"{nonfinite} consecutive non-finite losses after step {step}; the last good "
                                    f"checkpoint is step {saved_at} in {output}")
            continue
        nonfinite = 0
        scheduler.step()
        step, last_batch = step + 1, batches[-1]
        samples = sum(len(b["text"]) for b in batches) * world
        samples_seen += samples
        seconds = time.perf_counter() - started
        metrics = {**losses, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples / seconds,
                   "samples_seen": float(samples_seen), **parts.extra_metrics(model)}
        if step_flops and ceiling:
            metrics["fraction_of_peak_flops"] = step_flops / seconds / (ceiling * 1e9)
        tracker.log_metrics(metrics, step=step)
        first_metrics = first_metrics or {"step": step, **metrics}
        progress.update(1)
        progress.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)
        if rank == world - 1:
            maybe_fail(cfg, output, step)
        if step % cfg.checkpoint.every == 0 or step == cfg.optim.total_steps:
            save(cfg, output, work, step, samples_seen, model, optimizer, scheduler, loader, tracker, rank)
            saved_at = step
        if step % cfg.log_every == 0:
            report_to_ray({"step": step, "loss": losses["loss"]})
    progress.close()
    if rank == 0 and first_metrics:  # the first and last step this process ran (a resumed run starts later)
        io.write_json_atomic(io.join(output, "train_metrics.json"),
                             {"first": first_metrics, "last": {"step": step, **metrics}})
    finish(cfg, work, parts, model, last_batch, tracker, rank)


def train_step(cfg: TrainConfig, parts: StageParts, model: nn.Module, optimizer: torch.optim.Optimizer,
               batches_iter, count_flops: bool = False) -> tuple[dict[str, float] | None, list[dict], float | None]:
    """One optimizer step over `grad_accum` batches. Returns (losses, batches, FLOPs) or (None, ...) when a
    loss was not finite on some rank (then nothing is updated)."""
    optimizer.zero_grad(set_to_none=True)
    batches, totals = [], {}
    counter = FlopCounterMode(display=False) if count_flops else None
    for micro in range(cfg.optim.grad_accum):
        batch = next(batches_iter)
        batches.append(batch)
        last = micro == cfg.optim.grad_accum - 1
        sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last \
            else nullcontext()
        with sync, (counter or nullcontext()), autocast(cfg):
            losses = parts.losses(model(**parts.inputs(batch)))
            if not all_ranks_finite(losses["loss"]):
                optimizer.zero_grad(set_to_none=True)
                return None, batches, None
            (losses["loss"] / cfg.optim.grad_accum).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.item() / cfg.optim.grad_accum
    if cfg.optim.clip_grad_norm:
        totals["grad_norm"] = float(nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.optim.clip_grad_norm))
    optimizer.step()
    return totals, batches, (counter.get_total_flops() if counter else None)


def autocast(cfg: TrainConfig):
    """bf16 autocast for the trainable parts on a GPU (SPEC section 8: not fp16), nothing on the CPU."""
    device = "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    enabled = cfg.precision == "bf16" or (cfg.precision == "auto" and device == "cuda")
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def resume(cfg: TrainConfig, output: str, work: str, model: nn.Module, optimizer, scheduler, rank: int
           ) -> tuple[int, int, dict | None, list[list]]:
    """Continue from the latest complete checkpoint of the job, if any: (step, samples seen, loader state, the
    metric rows it holds that may not have reached MLflow). For a remote output every node first downloads the
    newest committed checkpoint into `work`."""
    if storage.is_remote(output):
        storage.pull_latest(output, work)
        if dist.rank_and_world()[1] > 1:
            torch_dist.barrier()
    latest = latest_checkpoint(work)
    if latest is None:
        torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # per-rank dropout / sampling streams
        return 0, 0, None, []
    step, path = latest
    state = load_checkpoint(path, model, optimizer, scheduler, cfg.identity_hash())
    if len(state["loader"]) != dist.rank_and_world()[1]:
        raise ConfigError(f"{path}: written by {len(state['loader'])} workers, this job has "
                          f"{dist.rank_and_world()[1]}; resume with scaling.workers={len(state['loader'])}")
    restore_rng_state(state["rng"][rank])
    log.info("resumed from %s (step %d)", path, step)
    return state["step"], state["samples_seen"], state["loader"][rank], state.get("unwritten_metrics", [])


def save(cfg: TrainConfig, output: str, work: str, step: int, samples_seen: int, model: nn.Module, optimizer,
         scheduler, loader: TrainLoader, tracker, rank: int) -> None:
    """Every rank hands in its data position and RNG state; rank 0 writes the checkpoint (into `work`, then
    uploads it for a remote output), then flushes the metrics up to this step (so a resume from it neither
    repeats nor loses a step's metrics). The checkpoint also holds those metrics: a crash between it and the
    flush leaves them to the resumed job (`Tracker.recover`)."""
    loader_states = gather_objects(loader.state_dict())
    rng_states = gather_objects(capture_rng_state())
    if rank == 0:
        state = {"step": step, "samples_seen": samples_seen, "config_hash": cfg.identity_hash(),
                 "seed": cfg.seed, "loader": loader_states, "rng": rng_states,
                 "data_report": loader.report(), "unwritten_metrics": tracker.unwritten(step)}
        path = save_checkpoint(work, step, model, optimizer, scheduler, state, keep=cfg.checkpoint.keep)
        if storage.is_remote(output):
            storage.push_checkpoint(path, output, step, keep=cfg.checkpoint.keep)
        tracker.flush(step)
    if dist.rank_and_world()[1] > 1:
        torch_dist.barrier()


def open_tracker(cfg: TrainConfig, output: str, rank: int, world: int, device: torch.device):
    tracker = make_tracker(rank, tracking_uri=cfg.tracking.uri or default_tracking_uri(os.path.dirname(output)),
                           experiment=cfg.tracking.experiment,
                           run_name=cfg.tracking.run_name or f"{cfg.stage}-{cfg.identity_hash()}",
                           output_uri=output, parent_run_id=cfg.tracking.parent_run_id,
                           system_metrics=cfg.tracking.system_metrics)
    backend = torch_dist.get_backend() if torch_dist.is_available() and torch_dist.is_initialized() else "none"
    tracker.log_params({**cfg.model_dump(mode="json"), "world_size": world, "identity_hash": cfg.identity_hash(),
                        "code_version": code_version(), "device": device_name(device), "distributed_backend": backend})
    tracker.log_text(cfg.to_yaml(), "config/train_config.yaml")
    return tracker


def device_name(device: torch.device) -> str:
    """What rank 0 trains on, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def code_version() -> str:
    """The git commit of the code, when it runs from a checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def finish(cfg: TrainConfig, work: str, parts: StageParts, model: nn.Module, last_batch: dict | None,
           tracker, rank: int) -> None:
    """Rank 0: sample generations, loss curves and the final checkpoint as a registered model."""
    if rank != 0:
        return
    tracker.flush()
    if last_batch is not None and cfg.samples_to_generate:
        model.eval()
        with torch.no_grad():
            tracker.log_dict(parts.samples(model, last_batch), "samples/generations.json")
    tracker.log_loss_curves(["loss", "loss_itc", "loss_itm", "loss_itg"] if cfg.stage == "stage1" else ["loss"])
    latest = latest_checkpoint(work)
    if latest is not None:
        tracker.log_checkpoint_model(latest[1], cfg.tracking.register_as or f"blip2-{cfg.stage}", cfg.tracking.alias)
    tracker.finish()
