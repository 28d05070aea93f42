"""`make demo`: the pipeline, as far as it is built, on the embedded shapes-world default.

shapes world (curated / web / test) -> local HTTP server with injected faults -> img2dataset
download into webdataset shards -> offline stand-ins trained on the curated split (tiny CLIP, BLIP
captioner, OPT, T5) -> CapFilt on the web split -> training-loader check -> stage 1 (frozen stand-in
CLIP image tower) and stage 2 (frozen stand-in OPT) on Ray Train -> retrieval, caption and VQA evaluation
on the test split -> a FAISS index of the curated split. Everything lives under one run root
(default runs/demo); `summary.json` there gets one object per step; MLflow in `<run root>/mlflow.db`.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines import capfilt, download, evaluate, foundation, index, runroot, train_stage1, train_stage2
from pipelines.config import StepConfig, load_config
from pipelines.data.check import check_loader
from pipelines.data.loader import LoaderConfig, SourceConfig
from pipelines.serve import FaultConfig, ImageServer
from pipelines.shapes import synth
from pipelines.train.config import TrainConfig

log = logging.getLogger("blip2.demo")

SPLITS = ("curated", "web", "test")


class DemoConfig(StepConfig):
    seed: int = 0
    curated_images: int = Field(1000, gt=0)
    web_images: int = Field(1000, gt=0)
    test_images: int = Field(200, gt=0)
    noise_rate: float = Field(0.4, ge=0, le=1)
    synth_image_size: int = 128
    image_size: int = Field(96, gt=0, description="size img2dataset resizes to (the models' input size)")
    port: int = Field(8765, ge=0, description="the image server's port on 127.0.0.1 (0: any free port)")
    faults: FaultConfig = FaultConfig(not_found=0.03, corrupt=0.02, slow=0.004, rate_limited=0.03,
                                      slow_seconds=6.0, seed=0)
    download_timeout: int = 3
    loader_batches: int = 3
    loader_batch_size: int = 16
    foundation: dict[str, Any] = Field(default_factory=dict, description="FoundationConfig overrides")
    capfilt: dict[str, Any] = Field(default_factory=dict, description="CapfiltConfig overrides")
    train_workers: int = Field(2, ge=0, description="Ray Train workers (0: one plain process)")
    stage1_steps: int = Field(150, gt=0)
    stage2_steps: int = Field(100, gt=0)
    train_batch_size: int = Field(16, gt=0, description="per worker")
    model_image_size: int = Field(64, gt=0, description="the stand-in models' input size (patch 8)")
    eval_k: int = Field(128, ge=1, description="retrieval: ITC candidates reranked by ITM")
    caption_prompt: str = Field("", description="captioning prompt (the demo's stage 2 trains without one)")


def server_port(preferred: int) -> int:
    """The preferred port if it is free (URLs in the lists name it, so a rerun must keep it); 0 = any."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            raise SystemExit(f"port {preferred} on 127.0.0.1 is in use: stop what uses it, or pass port=N "
                             "(the URL lists name the port, so a run root keeps the port it started with)")
        return sock.getsockname()[1]


def make_shapes_world(cfg: DemoConfig, data_dir: Path, base_url: str) -> dict[str, Any]:
    counts = {"curated": cfg.curated_images, "web": cfg.web_images, "test": cfg.test_images}
    results = {}
    for split in SPLITS:
        split_cfg = synth.SynthConfig(split=split, images=counts[split], seed=cfg.seed, noise_rate=cfg.noise_rate,
                                      base_url=f"{base_url}/{split}", image_size=cfg.synth_image_size)
        results[split] = synth.run(split_cfg, str(data_dir / split))
    return results


def download_splits(cfg: DemoConfig, data_dir: Path, raw_dir: Path) -> dict[str, Any]:
    per_split = {}
    for split in SPLITS:
        dl_cfg = download.DownloadConfig(url_list=str(data_dir / split / f"{split}.parquet"),
                                         image_size=cfg.image_size, timeout=cfg.download_timeout,
                                         number_sample_per_shard=250)
        result = download.run(dl_cfg, str(raw_dir / split))
        per_split[split] = result.model_dump(mode="json")
    return per_split


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


def run(cfg: DemoConfig, run_root: str) -> dict[str, Any]:
    root = Path(run_root).resolve()
    data_dir, raw_dir = root / "data", root / "raw"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = server_port(cfg.port)
    with ImageServer(str(data_dir), port=port, faults=cfg.faults) as server:
        world = make_shapes_world(cfg, data_dir, server.url)
        runroot.update_summary(str(root), "synth", {
            split: {"images": r.images, "captions": r.captions, "noise": r.noise_counts, "reused": r.reused}
            for split, r in world.items()})
        log.info("serving %s at %s with faults %s", data_dir, server.url, cfg.faults.model_dump())
        downloads = summarize_downloads(download_splits(cfg, data_dir, raw_dir))
    runroot.update_summary(str(root), "download", downloads)
    models = foundation.run(foundation.FoundationConfig.model_validate(
        {"curated": str(raw_dir / "curated"), "image_size": cfg.model_image_size, "seed": cfg.seed,
         **cfg.foundation}), str(root / "foundation"))
    runroot.update_summary(str(root), "foundation", {"seconds": models.seconds, "reused": models.reused,
                                                     "metrics": models.metrics, "output": models.output_dir})
    filtered = capfilt.run(capfilt.CapfiltConfig.model_validate(
        {"shards": str(raw_dir / "web"), "captioner": models.captioner_dir, "ranker": f"local-dir:{models.clip_dir}",
         "seed": cfg.seed, **cfg.capfilt}), str(root / "capfilt"))
    runroot.update_summary(str(root), "capfilt", capfilt_summary(filtered))
    sources = {"curated": raw_dir / "curated", "web": root / "capfilt"}
    loader_cfg = LoaderConfig(sources=[SourceConfig(name=name, shards=str(path)) for name, path in sources.items()],
                              image_size=cfg.image_size, batch_size=cfg.loader_batch_size,
                              shuffle_buffer=200, num_workers=2, seed=cfg.seed)
    loader = check_loader(loader_cfg, cfg.loader_batches, str(root / "loader_check.png"))
    runroot.update_summary(str(root), "loader_check", loader)
    stage1 = train_stage1.run(train_config(cfg, root, sources, models, "stage1"), str(root / "stage1"))
    runroot.update_summary(str(root), "train_stage1", training_summary(stage1))
    stage2 = train_stage2.run(train_config(cfg, root, sources, models, "stage2", init_from=stage1["checkpoint"]),
                              str(root / "stage2"))
    runroot.update_summary(str(root), "train_stage2", training_summary(stage2))
    return evaluate_and_index(cfg, root, raw_dir)


def evaluate_and_index(cfg: DemoConfig, root: Path, raw_dir: Path) -> dict[str, Any]:
    """Retrieval on the test split (stage 1), captioning and VQA (stage 2), and a FAISS index of the curated split."""
    tracking = f"sqlite:///{root}/mlflow.db"
    base = {"shards": str(raw_dir / "test"), "tracking_uri": tracking, "experiment": "blip2-demo"}
    retrieval = evaluate.run("retrieval", evaluate.EvalConfig(checkpoint=str(root / "stage1"), k=cfg.eval_k, **base),
                             str(root / "eval"))
    keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "chance_r1")
    runroot.update_summary(str(root), "retrieval", {**{k: round(retrieval["metrics"][k], 2) for k in keys},
                                                    "images": retrieval["images"], "texts": retrieval["texts"],
                                                    "seconds": retrieval["wall_seconds"]})
    stage2 = evaluate.EvalConfig(checkpoint=str(root / "stage2"), prompt=cfg.caption_prompt, min_new_tokens=2, **base)
    caption = evaluate.run("caption", stage2, str(root / "eval"))
    runroot.update_summary(str(root), "caption", {"cider": round(caption["metrics"]["cider"], 4),
                                                  "accuracy": round(caption["metrics"]["accuracy"], 4),
                                                  "examples": caption["examples"][:3]})
    vqa = evaluate.run("vqa", stage2, str(root / "eval"))
    runroot.update_summary(str(root), "vqa", {k: round(v, 4) for k, v in vqa["metrics"].items()})
    built = index.build(index.IndexConfig(checkpoint=str(root / "stage1"), shards=str(raw_dir / "curated")),
                        str(root / "index"))
    hits = index.query(str(root / "index"), text="a red circle on the left", k=8)
    gallery = index.gallery(hits, "a red circle on the left", str(root / "index" / "gallery.html"))
    return runroot.update_summary(str(root), "index", {k: built[k] for k in ("images", "vectors", "index_type",
                                                                       "recall_at_10", "build_seconds")}
                           | {"path": str(root / "index"), "gallery": gallery})


def capfilt_summary(result: capfilt.CapfiltResult) -> dict[str, Any]:
    keys = ("web_precision", "kept_precision", "synthetic_precision", "web_kept_share", "images", "candidates",
            "captions_per_second", "images_ranked_per_second", "corrupt_shards", "skipped_samples", "wall_seconds",
            "executor", "histogram", "reused")
    data = result.model_dump(mode="json")
    return {key: data[key] for key in keys}


def train_config(cfg: DemoConfig, root: Path, sources: dict[str, Path], models: foundation.FoundationResult,
                 stage: str, init_from: str | None = None) -> TrainConfig:
    """The tiny Q-Former over the stand-in CLIP's image tower (stage 2: into the stand-in OPT), on the curated
    shards and the CapFilt-ed web shards, with MLflow in the run root."""
    steps = cfg.stage1_steps if stage == "stage1" else cfg.stage2_steps
    return TrainConfig.model_validate({
        "stage": stage,
        "model": {"preset": "tiny", "vision": foundation.vision_config(models),
                  "llm": foundation.llm_config(models, "opt"), "init_from": init_from},
        "data": {"sources": [{"name": name, "shards": str(path)} for name, path in sources.items()],
                 "image_size": cfg.model_image_size, "batch_size": cfg.train_batch_size, "shuffle_buffer": 200,
                 "num_workers": 0, "seed": cfg.seed},
        "optim": {"lr": 1e-3 if stage == "stage1" else 5e-4, "min_lr": 1e-4, "warmup_steps": max(1, steps // 10),
                  "total_steps": steps},
        "scaling": {"workers": cfg.train_workers},
        "checkpoint": {"every": max(1, steps // 3)},
        "tracking": {"uri": f"sqlite:///{root.resolve()}/mlflow.db", "experiment": "blip2-demo"},
        "seed": cfg.seed, "max_text_length": 32, "log_every": 25,
    })


def training_summary(result: dict[str, Any]) -> dict[str, Any]:
    last, first = result.get("last") or {}, result.get("first") or {}
    keys = [k for k in ("loss", "loss_itc", "loss_itm", "loss_itg") if k in last]
    return {"steps": result["steps"], "checkpoint": result["checkpoint"], "mlflow_run_id": result["mlflow_run_id"],
            "seconds": result["seconds"], "first": {k: round(first[k], 4) for k in keys if k in first},
            "last": {k: round(last[k], 4) for k in keys}}


def print_summary(summary: dict[str, Any], run_root: str) -> None:
    dl = summary["download"]
    print(f"\n== download: {dl['succeeded']}/{dl['attempted']} images ({dl['success_rate']:.1%})")
    for reason, count in sorted(dl["failure_reasons"].items(), key=lambda kv: -kv[1]):
        print(f"   failed: {reason:<28} {count}")
    fd = summary["foundation"]
    how = "reused" if fd["reused"] else f"trained in {fd['seconds']:.0f} s"
    print(f"== stand-in models ({how}): {fd['output']}")
    for model, figures in fd["metrics"].items():
        print(f"   {model:<10} " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    cf = summary["capfilt"]
    print(f"== capfilt: {cf['images']} web images, {cf['candidates']} synthetic captions; correct captions: web "
          f"{cf['web_precision']:.1%} -> kept top-2 {cf['kept_precision']:.1%}; histograms {cf['histogram']}")
    lc = summary["loader_check"]
    print(f"== loader check: {lc['batches']} batches of {lc['batch_shape']}, drawn per source {lc['drawn']}, "
          f"skipped {lc['skipped_total']} {lc['skipped']}")
    for text in lc["examples"]:
        print(f"   caption: {text}")
    print(f"== contact sheet: {lc['contact_sheet']}")
    for stage in ("train_stage1", "train_stage2"):
        t = summary[stage]
        print(f"== {stage}: {t['steps']} steps in {t['seconds']} s, loss {t['first'].get('loss')} -> "
              f"{t['last'].get('loss')} ({t['last']}); checkpoint {t['checkpoint']}")
    r = summary["retrieval"]
    print(f"== retrieval ({r['images']} test images, {r['texts']} captions): image->text R@1/5/10 {r['txt_r1']:.1f}/"
          f"{r['txt_r5']:.1f}/{r['txt_r10']:.1f}, text->image {r['img_r1']:.1f}/{r['img_r5']:.1f}/{r['img_r10']:.1f}"
          f" (chance R@1 {r['chance_r1']:.1f})")
    print(f"== caption: CIDEr {summary['caption']['cider']:.3f}, checker accuracy {summary['caption']['accuracy']:.1%};"
          f" VQA accuracy {summary['vqa']['accuracy']:.1%}")
    ix = summary["index"]
    print(f"== index: {ix['images']} images ({ix['index_type']}, recall@10 {ix['recall_at_10']:.2f}) at {ix['path']};"
          f" gallery {ix['gallery']}")
    print(f"== summary: {Path(run_root) / runroot.SUMMARY}")
    print(f"== MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///{Path(run_root).resolve()}/mlflow.db "
          "--host 127.0.0.1 --port 5000")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2 demo", description=__doc__)
    parser.add_argument("--run-root", default="runs/demo")
    parser.add_argument("--config", default=None, help="YAML file of DemoConfig fields")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. web_images=500")
    args = parser.parse_args(argv)
    cfg = load_config(DemoConfig, args.config, args.overrides)
    started = time.time()
    summary = run(cfg, args.run_root)
    print_summary(summary, args.run_root)
    print(f"== demo finished in {time.time() - started:.0f} s")
    log.debug(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
