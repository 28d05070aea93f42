"""The whole pipeline as plain steps over one config (SPEC section 1):

    download -> stand-ins (offline only) -> CapFilt -> stage 1 -> stage 2 -> evaluation -> index

`PipelineConfig` holds every step's own pydantic config, resolved to concrete paths under one run root, so it
is a typed Prefect flow parameter as it is. `flows/full_pretrain.py` runs the step functions below as Prefect
tasks; `blip2 demo` calls them directly (`run_all`). Each step function takes the config (and the MLflow
parent run) and returns the objects it adds to `<run root>/summary.json`. Profiles (`demo`, `tiny`, the
paper's) live in `pipelines/profiles.py`.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from pipelines import capfilt, download, evaluate, foundation, index, io, runroot, train_stage1, train_stage2
from pipelines.capfilt import CapfiltConfig
from pipelines.config import ConfigError, StepConfig
from pipelines.download import DownloadConfig
from pipelines.evaluate import EvalConfig
from pipelines.foundation import FoundationConfig
from pipelines.index import IndexConfig
from pipelines.data.check import check_loader
from pipelines.data.loader import LoaderConfig
from pipelines.serve import FaultConfig, ImageServer
from pipelines.shapes import synth
from pipelines.train.config import TrainConfig

log = logging.getLogger("blip2.pipeline")

STAND_IN = "stand-in"  # a model field with this value is filled from the foundation step's output


class WorldConfig(StepConfig):
    """The shapes world: generated under `<run root>/data/<split>` and served on 127.0.0.1 during the download."""

    seed: int = 0
    images: dict[str, int] = Field(default_factory=lambda: {"curated": 1000, "web": 1000, "test": 200},
                                   description="images per split")
    noise_rate: float = Field(0.4, ge=0, le=1, description="share of noisy alt-texts in the web split")
    image_size: int = Field(128, gt=0, description="size the images are drawn at")
    port: int = Field(8765, ge=0, description="the image server's port on 127.0.0.1 (0: any free port)")
    faults: FaultConfig = Field(default_factory=FaultConfig)


class LoaderCheckConfig(StepConfig):
    batches: int = Field(3, gt=0)
    loader: LoaderConfig


class PipelineConfig(StepConfig):
    profile: str = Field(description="the profile this config was built from (demo, tiny, vitg-opt2.7b, ...)")
    run_root: str = Field(description="every output lives under it: a local dir or an object-store URI")
    tracking_uri: str | None = Field(None, description="MLflow; None: $MLFLOW_TRACKING_URI or sqlite:///<run root>/mlflow.db")
    experiment: str = "blip2-pretrain"
    world: WorldConfig | None = Field(None, description="the shapes world; None: `downloads` name real URL lists")
    downloads: dict[str, DownloadConfig] = Field(description="split -> its download (to raw/<split>)")
    foundation: FoundationConfig | None = Field(
        None, description=f"offline stand-ins; model fields set to {STAND_IN!r} are filled from them")
    capfilt: CapfiltConfig | None = Field(None, description="None: train on the web captions as downloaded")
    loader_check: LoaderCheckConfig | None = None
    stage1: TrainConfig
    stage2: TrainConfig
    retrieval: EvalConfig | None = None
    generation: EvalConfig | None = Field(None, description="captioning and VQA (stage 2)")
    index: IndexConfig | None = None
    index_query: str = "a red circle on the left"

    def path(self, *parts: str) -> str:
        return io.join(self.run_root, *parts)

    def tracking(self) -> str:
        from pipelines.train.tracking import default_tracking_uri
        return self.tracking_uri or default_tracking_uri(io.local_path(self.run_root))


# ---------------------------------------------------------------------------------------------- steps


def step_download(cfg: PipelineConfig) -> dict[str, Any]:
    """The shapes world generated and served with faults, or the real URL lists; every split into raw/<split>."""
    out: dict[str, Any] = {}
    if cfg.world is None:
        per_split = {split: download.run(d, cfg.path("raw", split)).model_dump(mode="json")
                     for split, d in cfg.downloads.items()}
        return {"download": summarize_downloads(per_split)}
    world, data_dir = cfg.world, Path(io.local_path(cfg.path("data")))
    data_dir.mkdir(parents=True, exist_ok=True)
    with ImageServer(str(data_dir), port=server_port(world.port), faults=world.faults) as server:
        results = {}
        for split, count in world.images.items():
            split_cfg = synth.SynthConfig(split=split, images=count, seed=world.seed, noise_rate=world.noise_rate,
                                          base_url=f"{server.url}/{split}", image_size=world.image_size)
            results[split] = synth.run(split_cfg, str(data_dir / split))
        out["synth"] = {split: {"images": r.images, "captions": r.captions, "noise": r.noise_counts,
                                "reused": r.reused} for split, r in results.items()}
        log.info("serving %s at %s with faults %s", data_dir, server.url, world.faults.model_dump())
        per_split = {split: download.run(d, cfg.path("raw", split)).model_dump(mode="json")
                     for split, d in cfg.downloads.items()}
    out["download"] = summarize_downloads(per_split)
    return out


def step_foundation(cfg: PipelineConfig) -> dict[str, Any]:
    models = foundation.run(cfg.foundation, cfg.path("foundation"))
    return {"foundation": {"seconds": models.seconds, "reused": models.reused, "metrics": models.metrics,
                           "output": models.output_dir}}


def step_capfilt(cfg: PipelineConfig) -> dict[str, Any]:
    result = capfilt.run(bind_stand_ins(cfg).capfilt, cfg.path("capfilt"))
    data = result.model_dump(mode="json")
    keys = ("web_precision", "kept_precision", "synthetic_precision", "oracle_kept_precision", "ranker_pair_accuracy",
            "web_kept_share", "images", "candidates",
            "captions_per_second", "images_ranked_per_second", "corrupt_shards", "skipped_samples", "wall_seconds",
            "executor", "histogram", "reused")
    return {"capfilt": {key: data[key] for key in keys}}


def step_loader_check(cfg: PipelineConfig) -> dict[str, Any]:
    check = cfg.loader_check
    return {"loader_check": check_loader(check.loader, check.batches, cfg.path("loader_check.png"))}


def step_train(cfg: PipelineConfig, stage: str, parent_run_id: str | None = None) -> dict[str, Any]:
    train_cfg = getattr(bind_stand_ins(cfg), stage)
    tracking = train_cfg.tracking.model_copy(update={"uri": train_cfg.tracking.uri or cfg.tracking(),
                                                     "parent_run_id": parent_run_id})
    train_cfg = train_cfg.model_copy(update={"tracking": tracking})
    # the run root is the pipeline's own: another config's (or other inputs') checkpoints there are set aside
    result = (train_stage1 if stage == "stage1" else train_stage2).run(train_cfg, cfg.path(stage), replace_stale=True)
    last, first = result.get("last") or {}, result.get("first") or {}
    keys = [k for k in ("loss", "loss_itc", "loss_itm", "loss_itg") if k in last]
    return {f"train_{stage}": {"steps": result["steps"], "checkpoint": result["checkpoint"],
                               "mlflow_run_id": result["mlflow_run_id"], "seconds": result["seconds"],
                               "first": {k: round(first[k], 4) for k in keys if k in first},
                               "last": {k: round(last[k], 4) for k in keys}}}


def step_evaluate(cfg: PipelineConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Retrieval on the test split (stage 1), captioning and VQA (stage 2)."""
    out: dict[str, Any] = {}
    tracked = {"tracking_uri": cfg.tracking(), "experiment": cfg.experiment, "parent_run_id": parent_run_id}
    if cfg.retrieval is not None:
        result = evaluate.run("retrieval", cfg.retrieval.model_copy(update=tracked), cfg.path("eval"))
        keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "chance_r1", "itc_txt_r1",
                "itc_img_r1", "itc_r_mean")
        out["retrieval"] = {**{k: round(result["metrics"][k], 2) for k in keys}, "images": result["images"],
                            "texts": result["texts"], "seconds": result["wall_seconds"]}
    if cfg.generation is not None:
        generation = cfg.generation.model_copy(update=tracked)
        caption = evaluate.run("caption", generation, cfg.path("eval"))
        out["caption"] = {"cider": round(caption["metrics"]["cider"], 4),
                          **{k: round(caption["metrics"].get(k) or 0.0, 4)
                             for k in ("accuracy", "object_recall", "mention_precision")},
                          "examples": caption["examples"][:3]}
        vqa = evaluate.run("vqa", generation, cfg.path("eval"))
        out["vqa"] = {k: round(v, 4) for k, v in vqa["metrics"].items() if isinstance(v, (int, float))}
    return out


def step_index(cfg: PipelineConfig) -> dict[str, Any]:
    where = cfg.path("index")
    built = index.build(cfg.index, where)
    hits = index.query(where, text=cfg.index_query, k=8)
    page = index.gallery(hits, cfg.index_query, io.join(where, "gallery.html"))
    keep = ("images", "vectors", "index_type", "recall_at_10", "build_seconds")
    return {"index": {k: built[k] for k in keep} | {"path": where, "gallery": page}}


# ---------------------------------------------------------------------------------------- plumbing


def bind_stand_ins(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with every model field set to STAND_IN pointed at the foundation step's models (which must exist:
    the step runs first; a finished one returns at once)."""
    if cfg.foundation is None:
        return cfg
    models = foundation.run(cfg.foundation, cfg.path("foundation"), progress=False)
    update: dict[str, Any] = {}
    if cfg.capfilt is not None:
        fields = {}
        if cfg.capfilt.captioner == STAND_IN:
            fields["captioner"] = models.captioner_dir
        if cfg.capfilt.ranker == STAND_IN:
            fields["ranker"] = f"local-dir:{models.clip_dir}"
        update["capfilt"] = cfg.capfilt.model_copy(update=fields)
    for stage in ("stage1", "stage2"):
        train_cfg: TrainConfig = getattr(cfg, stage)
        model = train_cfg.model
        fields = {}
        if model.vision.get("name") == STAND_IN:
            fields["vision"] = foundation.vision_config(models)
        if model.llm.get("name") == STAND_IN:
            fields["llm"] = foundation.llm_config(models, model.llm.get("kind", "opt"))
        update[stage] = train_cfg.model_copy(update={"model": model.model_copy(update=fields)})
    return cfg.model_copy(update=update)


def server_port(preferred: int) -> int:
    """The preferred port if it is free (URLs in the lists name it, so a rerun must keep it); 0 = any."""
    import socket
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            raise ConfigError(f"world.port={preferred}: 127.0.0.1:{preferred} is in use; stop what uses it or pick "
                              "another port (the URL lists name the port, so a run root keeps the port it started "
                              "with)") from None
        return sock.getsockname()[1]


def summarize_downloads(per_split: dict[str, Any]) -> dict[str, Any]:
    attempted = sum(r["attempted"] for r in per_split.values())
    succeeded = sum(r["succeeded"] for r in per_split.values())
    reasons: dict[str, int] = {}
    for r in per_split.values():
        for reason, count in r["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    return {"attempted": attempted, "succeeded": succeeded,
            "success_rate": round(succeeded / attempted, 4) if attempted else 0.0,
            "failure_reasons": reasons,
            "splits": {split: {k: r[k] for k in ("attempted", "succeeded", "success_rate", "reasons", "shards",
                                                  "wall_seconds", "images_per_second", "reused")}
                       for split, r in per_split.items()}}


def validate(cfg: PipelineConfig) -> None:
    """Checks across steps, before any work: every model field left at STAND_IN has a foundation step."""
    if cfg.foundation is not None:
        return
    named = [("capfilt.captioner", cfg.capfilt.captioner if cfg.capfilt else None),
             ("capfilt.ranker", cfg.capfilt.ranker if cfg.capfilt else None),
             *((f"{s}.model.{part}.name", getattr(getattr(cfg, s).model, part).get("name"))
               for s in ("stage1", "stage2") for part in ("vision", "llm"))]
    for field, value in named:
        if value == STAND_IN:
            raise ConfigError(f"{field}={STAND_IN!r} needs the foundation step (foundation is None): name a model")


def start_parent_run(cfg: PipelineConfig, label: str, tags: dict[str, str] | None = None) -> str:
    """The MLflow parent run of one pipeline run: its steps' runs are its children."""
    from pipelines.train.tracking import Tracker
    record_dir = cfg.path("mlflow_runs", f"{_safe(label)}-{time.strftime('%Y%m%d-%H%M%S')}")  # never resumed
    tracker = Tracker(cfg.tracking(), cfg.experiment, f"full-pretrain-{cfg.profile}-{label}", record_dir,
                      system_metrics=False)
    tracker.set_tags({"profile": cfg.profile, "run_root": cfg.run_root, **(tags or {})})
    tracker.log_params({"profile": cfg.profile, "capfilt": cfg.capfilt is not None,
                        "stand_ins": cfg.foundation is not None, "config_hash": cfg.config_hash()})
    tracker.log_dict(cfg.model_dump(mode="json"), "pipeline_config.json")
    tracker.flush()  # the run stays RUNNING until finish_parent_run
    return tracker.run_id


def finish_parent_run(cfg: PipelineConfig, run_id: str, summary: dict[str, Any], status: str = "FINISHED") -> None:
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=cfg.tracking())
    metrics = flat_numbers(summary)
    now = int(time.time() * 1000)
    from mlflow.entities import Metric
    batch = [Metric(key, value, now, 0) for key, value in metrics.items()]
    for start in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[start:start + 500])
    client.log_dict(run_id, summary, "summary.json")
    client.set_terminated(run_id, status=status)


def log_step_run(cfg: PipelineConfig, parent_run_id: str | None, step: str, part: dict[str, Any]) -> str | None:
    """A child MLflow run for a step that keeps no run of its own (download, stand-ins, CapFilt, index)."""
    if parent_run_id is None:
        return None
    from pipelines.train.tracking import Tracker
    tracker = Tracker(cfg.tracking(), cfg.experiment, step, cfg.path("mlflow_runs", parent_run_id, step),
                      parent_run_id=parent_run_id, system_metrics=False)
    tracker.log_params({"step": step, "config_hash": cfg.config_hash()})
    tracker.log_metrics(flat_numbers(part), step=0)
    tracker.log_dict(part, f"{step}.json")
    tracker.finish()
    return tracker.run_id


def flat_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as `a.b.c` -> float (booleans and strings left out)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{_safe(str(key))}"
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]+", "_", text)


# The steps in order: (name, function, whether it takes the MLflow parent run, whether the config asks for it).
STEPS: list[tuple[str, Callable[..., dict[str, Any]], bool, Callable[[PipelineConfig], bool]]] = [
    ("download", step_download, False, lambda c: True),
    ("foundation", step_foundation, False, lambda c: c.foundation is not None),
    ("capfilt", step_capfilt, False, lambda c: c.capfilt is not None),
    ("loader_check", step_loader_check, False, lambda c: c.loader_check is not None),
    ("stage1", lambda c, p: step_train(c, "stage1", p), True, lambda c: True),
    ("stage2", lambda c, p: step_train(c, "stage2", p), True, lambda c: True),
    ("evaluate", step_evaluate, True, lambda c: c.retrieval is not None or c.generation is not None),
    ("index", step_index, False, lambda c: c.index is not None),
]


def run_step(cfg: PipelineConfig, name: str, parent_run_id: str | None) -> tuple[dict[str, Any], str | None]:
    """Step `name`: the objects it adds to summary.json, and its MLflow run (its own, or a child run logged here
    for the steps that keep none)."""
    _, function, tracked, _ = next(step for step in STEPS if step[0] == name)
    if tracked:
        part = function(cfg, parent_run_id)
        run_id = next((v["mlflow_run_id"] for v in part.values() if isinstance(v, dict) and v.get("mlflow_run_id")),
                      None)
        return part, run_id
    part = function(cfg)
    return part, log_step_run(cfg, parent_run_id, name, part)


def run_all(cfg: PipelineConfig, label: str | None = None) -> dict[str, Any]:
    """Every step in order, without Prefect (the baseline the orchestration benchmark compares against)."""
    validate(cfg)
    io.makedirs(cfg.run_root)
    parent = start_parent_run(cfg, label or time.strftime("%Y%m%d-%H%M%S"), {"orchestrator": "none"})
    summary: dict[str, Any] = {}
    try:
        for name, _, _, wanted in STEPS:
            if not wanted(cfg):
                continue
            started = time.perf_counter()
            part, _ = run_step(cfg, name, parent)
            for key, value in part.items():
                summary = runroot.update_summary(cfg.run_root, key, value)
            log.info("step %s done in %.1f s", name, time.perf_counter() - started)
    except BaseException:
        finish_parent_run(cfg, parent, summary, status="FAILED")
        raise
    summary = runroot.update_summary(cfg.run_root, "mlflow", mlflow_summary(cfg, parent))
    finish_parent_run(cfg, parent, summary)
    return summary


def mlflow_summary(cfg: PipelineConfig, parent_run_id: str) -> dict[str, Any]:
    uri = cfg.tracking()
    ui = (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite:")
          else f"open {uri}")
    return {"tracking_uri": uri, "experiment": cfg.experiment, "parent_run_id": parent_run_id, "ui": ui}
