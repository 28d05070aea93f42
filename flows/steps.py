"""One Prefect flow per step, for running a step alone (each takes that step's own pydantic config, so the
Prefect UI shows its form, and an output location):

    download      DownloadConfig  -> webdataset shards          (retried: network and disk)
    capfilt       CapfiltConfig   -> CapFilt-ed shards
    train         TrainConfig     -> checkpoints (stage 1 or 2)  (retried: resumes from the last checkpoint)
    evaluate      EvalConfig + kind (retrieval | caption | vqa)
    index-build   IndexConfig     -> a FAISS index folder

The steps themselves are idempotent (a finished output is returned, an interrupted one resumed), so running a
step flow again with the same config costs little.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from flows.common import mlflow_link, prefect_environment, publish_table

prefect_environment()

from prefect import flow, task  # noqa: E402

from pipelines import capfilt, download, evaluate, index, train_stage1, train_stage2  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.tracking import default_tracking_uri  # noqa: E402


def _timed(function, *args) -> tuple[Any, float]:
    started = time.perf_counter()
    return function(*args), time.perf_counter() - started


@task(name="download", retries=2, retry_delay_seconds=10)
def download_task(cfg: download.DownloadConfig, output: str) -> dict[str, Any]:
    result, seconds = _timed(download.run, cfg, output)
    part = result.model_dump(mode="json")
    publish_table("download", {k: part[k] for k in ("attempted", "succeeded", "success_rate", "reasons", "shards",
                                                   "reused")}, seconds, "")
    return part


@flow(name="download")
def download_flow(cfg: download.DownloadConfig, output: str) -> dict[str, Any]:
    """img2dataset: a URL list into webdataset shards at `output`."""
    return download_task(cfg, output)


@task(name="capfilt", retries=1, retry_delay_seconds=10)
def capfilt_task(cfg: capfilt.CapfiltConfig, output: str) -> dict[str, Any]:
    result, seconds = _timed(capfilt.run, cfg, output)
    part = result.model_dump(mode="json")
    publish_table("capfilt", {k: part[k] for k in ("images", "candidates", "web_kept_share", "web_precision",
                                                  "kept_precision", "corrupt_shards", "reused")}, seconds, "")
    return part


@flow(name="capfilt")
def capfilt_flow(cfg: capfilt.CapfiltConfig, output: str) -> dict[str, Any]:
    """CapFilt: caption the shards' images, rank with CLIP, keep the top two."""
    return capfilt_task(cfg, output)


@task(name="train", retries=1, retry_delay_seconds=10)
def train_task(cfg: TrainConfig, output: str) -> dict[str, Any]:
    job = train_stage1 if cfg.stage == "stage1" else train_stage2
    result, seconds = _timed(job.run, cfg, output)
    uri = cfg.tracking.uri or default_tracking_uri(output)
    publish_table(f"train-{cfg.stage}", {k: result.get(k) for k in ("steps", "checkpoint", "last")}, seconds,
                  mlflow_link(uri, cfg.tracking.experiment, result.get("mlflow_run_id")))
    return result


@flow(name="train")
def train_flow(cfg: TrainConfig, output: str) -> dict[str, Any]:
    """Stage 1 or stage 2 (cfg.stage) on Ray Train (the cluster in RAY_ADDRESS, else a local one)."""
    return train_task(cfg, output)


@task(name="evaluate", retries=1, retry_delay_seconds=10)
def evaluate_task(kind: str, cfg: evaluate.EvalConfig, output: str) -> dict[str, Any]:
    result, seconds = _timed(evaluate.run, kind, cfg, output)
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    publish_table(f"evaluate-{kind}", {"images": result.get("images"), **metrics}, seconds, "")
    return result


@flow(name="evaluate")
def evaluate_flow(kind: Literal["retrieval", "caption", "vqa"], cfg: evaluate.EvalConfig, output: str) -> dict[str, Any]:
    """Retrieval (stage 1), captioning or zero-shot VQA (stage 2) on test shards."""
    return evaluate_task(kind, cfg, output)


@task(name="index-build", retries=1, retry_delay_seconds=10)
def index_task(cfg: index.IndexConfig, output: str) -> dict[str, Any]:
    result, seconds = _timed(index.build, cfg, output)
    publish_table("index-build", {k: result.get(k) for k in ("images", "vectors", "index_type", "recall_at_10")},
                  seconds, "")
    return result


@flow(name="index-build")
def index_build_flow(cfg: index.IndexConfig, output: str) -> dict[str, Any]:
    """A FAISS index of image shards embedded with a stage-1 checkpoint."""
    return index_task(cfg, output)
