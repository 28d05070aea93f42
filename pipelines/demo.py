"""`blip2 demo`: the whole pipeline on the embedded shapes-world default, called directly (no Prefect).

shapes world (curated / web / test) -> local HTTP server with injected faults -> img2dataset download into
webdataset shards -> offline stand-ins trained on the curated split (tiny CLIP, BLIP captioner, OPT, T5) ->
CapFilt on the web split -> training-loader check -> stage 1 (frozen stand-in CLIP image tower) and stage 2
(frozen stand-in OPT) on Ray Train -> retrieval, caption and VQA evaluation on the test split -> a FAISS index
of the curated split. Everything lives under one run root (default runs/demo); `summary.json` there gets one
object per step; MLflow in `<run root>/mlflow.db`. `make demo` runs the same steps as one Prefect flow run
(`python -m flows --profile demo`); this entry point is the same work without the orchestrator.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipelines import pipeline, runroot
from pipelines.config import load_config
from pipelines.profiles import DemoConfig, shapes_profile

log = logging.getLogger("blip2.demo")

__all__ = ["DemoConfig", "main", "print_summary"]


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
    cf = summary.get("capfilt")
    if cf is None:
        print("== capfilt: off (training on the web captions as downloaded)")
    else:
        print(f"== capfilt: {cf['images']} web images, {cf['candidates']} synthetic captions; correct captions: web "
              f"{cf['web_precision']:.1%} -> kept top-2 {cf['kept_precision']:.1%}; histograms {cf['histogram']}")
        if cf.get("oracle_kept_precision") is not None:
            print(f"   a perfect ranker would keep {cf['oracle_kept_precision']:.1%} correct from these candidates; "
                  f"the ranker scores a correct candidate above a wrong one of the same image "
                  f"{cf['ranker_pair_accuracy']:.1%} of the time")
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
          f" (chance R@1 {r['chance_r1']:.1f}; ITC alone R@1 {r['itc_txt_r1']:.1f}/{r['itc_img_r1']:.1f})")
    c = summary["caption"]
    print(f"== caption: CIDEr {c['cider']:.3f}, checker accuracy {c['accuracy']:.1%} (objects named by colour + shape "
          f"{c.get('object_recall', 0):.1%}, true mentions {c.get('mention_precision', 0):.1%}); "
          f"VQA accuracy {summary['vqa']['accuracy']:.1%}")
    ix = summary["index"]
    print(f"== index: {ix['images']} images ({ix['index_type']}, recall@10 {ix['recall_at_10']:.2f}) at {ix['path']};"
          f" gallery {ix['gallery']}")
    print(f"== summary: {Path(run_root) / runroot.SUMMARY}")
    ml = summary.get("mlflow", {})
    print(f"== MLflow: parent run {ml.get('parent_run_id')} in experiment {ml.get('experiment')}; UI: "
          f".venv/bin/{ml.get('ui')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2 demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default="runs/demo")
    parser.add_argument("--config", default=None, help="YAML file of DemoConfig fields")
    parser.add_argument("overrides", nargs="*", help="dotted DemoConfig overrides, e.g. web_images=500")
    args = parser.parse_args(argv)
    cfg = load_config(DemoConfig, args.config, args.overrides)
    started = time.time()
    summary = pipeline.run_all(shapes_profile(cfg, args.run_root))
    print_summary(summary, args.run_root)
    print(f"== demo finished in {time.time() - started:.0f} s")
    log.debug(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
