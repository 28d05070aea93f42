"""Launching the training loop: Ray Train's TorchTrainer (local Ray, or the cluster in RAY_ADDRESS), or one
plain process (`scaling.workers=0`). Shared by both stages and their command lines."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Callable

from pipelines import io, runroot
from pipelines.config import ConfigError, load_config
from pipelines.data.shards import expand_shards
from pipelines.train.config import TrainConfig
from pipelines.train.inputs import INPUTS_FILE, StaleOutput, input_hashes, stale_reason
from pipelines.train.loop import StageParts, train_loop_per_worker
from pipelines.train import storage

log = logging.getLogger(__name__)
BuildStage = Callable[[TrainConfig, Any], StageParts]


def validate(cfg: TrainConfig, output: str) -> None:
    """Input checks before any worker starts: shards exist, stage 2 has a stage-1 checkpoint, a remote output
    has a tracking server every node can reach."""
    for source in cfg.data.sources:
        expand_shards(source.shards, f"data.sources[{source.name}]")
    if cfg.stage == "stage2":
        init = cfg.model.init_from
        if not init or not io.exists(io.join(init, "model.safetensors")):
            raise ConfigError(f"model.init_from={init!r}: stage 2 starts from a stage-1 checkpoint directory or "
                              "URI (with model.safetensors and config.json)")
    if storage.is_remote(output):
        if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise ConfigError(f"output {output} is remote: set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow "
                              "server every node reaches; the embedded SQLite default needs a local output")
    elif os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"output {output}: exists and is not a directory")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute on the driver: Ray workers do not run in the driver's directory."""
    def absolute(spec):
        if isinstance(spec, list):
            return [absolute(s) for s in spec]
        return spec if "://" in spec or os.path.isabs(spec) else os.path.abspath(spec)

    data = cfg.data.model_copy(update={"sources": [s.model_copy(update={"shards": absolute(s.shards)})
                                                   for s in cfg.data.sources]})
    init = cfg.model.init_from
    model = cfg.model.model_copy(update={"init_from": stage1_checkpoint(absolute(init)) if init else None})
    return cfg.model_copy(update={"data": data, "model": model})


def stage1_checkpoint(init: str) -> str:
    """`model.init_from` as given when it is a checkpoint directory; for a stage-1 training output, its latest
    complete checkpoint."""
    if io.exists(io.join(init, "model.safetensors")):
        return init
    found = storage.latest(init) if io.exists(init) else None
    return found[1] if found else init


def run(cfg: TrainConfig, output_uri: str, build_stage: BuildStage, replace_stale: bool = False) -> dict[str, Any]:
    """Train to `cfg.optim.total_steps` into `output_uri` (a local directory or an object-store URI), resuming
    from its latest checkpoint. A finished run with the same config and input files returns its recorded result.
    An output holding another run's checkpoints (another config, or other input files) raises StaleOutput before
    any worker starts; with `replace_stale` a local one is renamed aside (`set_aside`) and training starts over."""
    output = storage.normalise(output_uri)
    cfg = absolute_paths(cfg)
    validate(cfg, output)
    inputs = input_hashes(cfg)
    record = runroot.completed(output, cfg.identity_hash(), inputs)
    if record is not None:
        return record["result"]
    latest = storage.latest(output) if io.exists(output) else None
    reason = stale_reason(output, latest[1] if latest else None, cfg.identity_hash(), inputs)
    if reason and replace_stale and not storage.is_remote(output):
        log.warning("%s: %s; moved it to %s, training from the start", output, reason, set_aside(output))
    elif reason:
        raise StaleOutput(f"{output}: {reason}. Train into a new output directory, or delete this one (or its "
                          "checkpoints/ folder) to start over")
    io.makedirs(output)
    fs, path = io.fs_and_path(io.join(output, "train_config.yaml"))
    fs.pipe_file(path, cfg.to_yaml().encode())
    io.write_json_atomic(io.join(output, INPUTS_FILE), inputs)
    started = time.time()
    loop_config = {"cfg": cfg.model_dump(mode="json"), "output": output, "build_stage": build_stage}
    if cfg.scaling.workers == 0:
        train_loop_per_worker(loop_config)
    else:
        fit_with_ray(cfg, output, loop_config)
    step, path = storage.latest(output) or (0, None)
    metrics_path = io.join(output, "train_metrics.json")
    metrics = io.read_json(metrics_path) if io.exists(metrics_path) else {}
    result = {"stage": cfg.stage, "steps": step, "checkpoint": path, "output": output,
              "mlflow_run_id": _run_id(output), "seconds": round(time.time() - started, 1),
              "first": metrics.get("first"), "last": metrics.get("last")}
    runroot.write_success(output, step=f"train-{cfg.stage}", config_hash=cfg.identity_hash(), input_hashes=inputs,
                          result=result, started=started)
    return result


def set_aside(output: str) -> str:
    """Rename a local output directory to `<output>.replaced-<time>` (kept, not deleted); returns the new name."""
    kept = f"{output}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(output, kept)
    return kept


def fit_with_ray(cfg: TrainConfig, output: str, loop_config: dict[str, Any]) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    started_here = not ray.is_initialized()
    if started_here:  # the cluster in RAY_ADDRESS (ray job submit), else a local one on loopback
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    try:
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=RunConfig(name=f"{cfg.stage}-{cfg.identity_hash()}-{int(time.time())}",
                                 storage_path=os.path.join(storage.work_dir(output), "ray"),
                                 failure_config=FailureConfig(max_failures=cfg.scaling.max_failures)),
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        )
        trainer.fit()
    finally:
        if started_here:
            ray.shutdown()


def _run_id(output: str) -> str | None:
    path = io.join(output, "mlflow_run.json")
    return io.read_json(path).get("run_id") if io.exists(path) else None


def main(argv: list[str] | None, stage: str, build_stage: BuildStage) -> int:
    parser = argparse.ArgumentParser(prog=f"blip2 train {stage}")
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig fields")
    parser.add_argument("--output", required=True, help="output directory or object-store URI, e.g. s3://bucket/run "
                        "(checkpoints, config, MLflow run id)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 scaling.workers=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, [f"stage={stage}", *args.overrides])
        result = run(cfg, args.output, build_stage)
    except (ConfigError, StaleOutput) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
