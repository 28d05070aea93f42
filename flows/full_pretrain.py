"""The `full-pretrain` Prefect flow: download -> stand-ins -> CapFilt -> stage 1 -> stage 2 -> evaluate -> index.

Each step of `pipelines.pipeline` is a task: retried on I/O and cluster failures, cached so that the flow run
again skips the steps that finished (the cache records live inside the run root, next to the step's outputs,
keyed by the step's own config and by the records of the steps before it: change a step's config, or make it
really run again, and that step and the ones after it run again) and an interrupted one resumes (training from
its last checkpoint). Each task leaves a Prefect artifact (counts, metrics, its MLflow run); the flow leaves the
summary. One MLflow parent run per flow run.

    python -m flows --profile demo --run-root runs/demo [dotted overrides]   # in-process (make demo)
    prefect deployment run 'full-pretrain/demo'                                              # server mode
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

from flows.common import cache_policy, mlflow_link, prefect_environment, publish_table, summary_markdown

prefect_environment()  # before prefect is imported: quiet, no telemetry

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from pipelines import io, pipeline, runroot  # noqa: E402
from pipelines.pipeline import PipelineConfig  # noqa: E402
from pipelines.profiles import PROFILES, build_profile  # noqa: E402

log = logging.getLogger("blip2.flows")

# Which parts of the config each step's result depends on: its cache key (the MLflow parent run and tracking
# fields are left out, so a new flow run still finds the steps an earlier one finished).
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "download": ("world", "downloads"),
    "foundation": ("world", "downloads", "foundation"),
    "capfilt": ("world", "downloads", "foundation", "capfilt"),
    "loader_check": ("world", "downloads", "foundation", "capfilt", "loader_check"),
    "stage1": ("world", "downloads", "foundation", "capfilt", "stage1"),
    "stage2": ("world", "downloads", "foundation", "capfilt", "stage1", "stage2"),
    "evaluate": ("world", "downloads", "foundation", "capfilt", "stage1", "stage2", "retrieval", "generation"),
    "index": ("world", "downloads", "foundation", "capfilt", "stage1", "index"),
}
NOT_IN_KEY = {"tracking", "tracking_uri", "parent_run_id", "experiment", "scaling", "debug", "log_every"}
RETRIES = {"download": 2, "foundation": 0, "capfilt": 1, "loader_check": 0, "stage1": 1, "stage2": 1,
           "evaluate": 1, "index": 1}
# Where each step keeps its cache records (deleting the step's outputs drops them too).
CACHE_DIR = {"download": "raw", "foundation": "foundation", "capfilt": "capfilt", "loader_check": "raw",
             "stage1": "stage1", "stage2": "stage2", "evaluate": "eval", "index": "index-cache"}


# The steps that leave outputs later steps read, with the config section that names each.
PRODUCERS = {"download": "downloads", "foundation": "foundation", "capfilt": "capfilt", "stage1": "stage1",
             "stage2": "stage2"}


def step_key(step: str, cfg: PipelineConfig) -> str:
    """Hash of what the step's result depends on (config sections, run root), without tracking fields, and of the
    records (`_SUCCESS.json`) of the steps before it whose outputs it reads: a step that really ran again (new
    code, files deleted) rewrites its record, so the steps after it run again too instead of returning results
    made from its old outputs (each step's own records then decide what is really redone)."""
    data = cfg.model_dump(mode="json")
    parts = {name: _strip(data.get(name)) for name in DEPENDS_ON[step]}
    records = [uri for producer in upstream(step) for uri in success_records(producer, cfg) if io.exists(uri)]
    blob = json.dumps({"step": step, "run_root": cfg.run_root, "parts": parts,
                       "upstream": io.files_fingerprint(records)}, sort_keys=True).encode()
    return f"{step}-{hashlib.sha256(blob).hexdigest()[:24]}"


def upstream(step: str) -> list[str]:
    """The earlier steps whose outputs `step` reads (those whose config section it depends on)."""
    return [producer for producer, section in PRODUCERS.items() if producer != step and section in DEPENDS_ON[step]]


def success_records(step: str, cfg: PipelineConfig) -> list[str]:
    """Where a producing step writes its `_SUCCESS.json` (one per split for the download)."""
    if step == "download":
        return [cfg.path("raw", split, runroot.SUCCESS) for split in cfg.downloads]
    return [cfg.path(step, runroot.SUCCESS)]


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in NOT_IN_KEY}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


@task(name="pipeline-step", task_run_name="{step}", persist_result=True)
def run_step(step: str, cfg: PipelineConfig, parent_run_id: str | None) -> dict[str, Any]:
    """One step of the pipeline; its result is the objects it adds to summary.json."""
    logger = get_run_logger()
    started = time.perf_counter()
    part, run_id = pipeline.run_step(cfg, step, parent_run_id)
    seconds = time.perf_counter() - started
    logger.info("step %s finished in %.1f s", step, seconds)
    publish_table(step, part, seconds, mlflow_link(cfg.tracking(), cfg.experiment, run_id))
    return part


@flow(name="full-pretrain", log_prints=True, validate_parameters=True)
def full_pretrain(profile: str = "demo", run_root: str = "runs/demo", overrides: list[str] | None = None,
                  knobs: dict[str, Any] | None = None, config: PipelineConfig | None = None,
                  refresh: bool = False, step_retries: int | None = None) -> dict[str, Any]:
    """The whole pipeline. `profile` (demo, tiny, vitg-opt2.7b, vitg-flant5xl) under `run_root`, changed by
    `knobs` (the shapes-world profiles' DemoConfig fields) and dotted `overrides` of the resulting config; or a
    complete `config`. `refresh=True` runs every step again (the steps themselves still reuse finished outputs
    where their own records match). `step_retries`: retries of every step (None: per-step defaults, e.g. 2 for
    the download, 1 for training, which resumes from its last checkpoint)."""
    logger = get_run_logger()
    cfg = config or build_profile(profile, os.path.abspath(run_root) if "://" not in run_root else run_root,
                                  overrides or [], knobs)
    pipeline.validate(cfg)
    label = flow_run.get_name() or time.strftime("%Y%m%d-%H%M%S")
    parent = pipeline.start_parent_run(cfg, label, {"orchestrator": "prefect", "prefect_flow_run_id":
                                                    str(flow_run.get_id() or "")})
    logger.info("profile %s, run root %s, MLflow parent run %s (%s)", cfg.profile, cfg.run_root, parent,
                cfg.tracking())
    summary: dict[str, Any] = {}
    try:
        for name, _, _, wanted in pipeline.STEPS:
            if not wanted(cfg):
                continue
            retries = RETRIES[name] if step_retries is None else step_retries
            step_task = run_step.with_options(
                cache_policy=cache_policy(step_key(name, cfg), cfg.path(CACHE_DIR[name], ".prefect-cache")),
                retries=retries, retry_delay_seconds=5, refresh_cache=refresh)
            part = step_task(name, cfg, parent)
            for key, value in part.items():
                summary = runroot.update_summary(cfg.run_root, key, value)
    except BaseException:
        pipeline.finish_parent_run(cfg, parent, summary, status="FAILED")
        raise
    summary = runroot.update_summary(cfg.run_root, "mlflow", pipeline.mlflow_summary(cfg, parent))
    pipeline.finish_parent_run(cfg, parent, summary)
    create_markdown_artifact(key="full-pretrain-summary", markdown=summary_markdown(summary),
                             description=f"full-pretrain {cfg.profile} at {cfg.run_root}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=PROFILES)
    parser.add_argument("--run-root", default="runs/demo")
    parser.add_argument("--knob", action="append", default=[], help="shapes-world knob, e.g. --knob web_images=500")
    parser.add_argument("--refresh", action="store_true", help="run every step again")
    parser.add_argument("overrides", nargs="*", help="dotted PipelineConfig overrides, e.g. stage1.optim.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("BLIP2_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.config import parse_overrides
    from pipelines.demo import print_summary
    started = time.time()
    summary = full_pretrain(profile=args.profile, run_root=args.run_root, overrides=args.overrides,
                            knobs=parse_overrides(args.knob), refresh=args.refresh)
    if args.profile in ("demo", "tiny"):
        print_summary(summary, args.run_root)
    print(f"== full-pretrain ({args.profile}) finished in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
