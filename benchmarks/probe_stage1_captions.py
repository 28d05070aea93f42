"""Diagnostic (issue 7): what stage 1's own caption decoder (the Q-Former's ITG head) says about the test images,
scored by the shapes world's caption checker like stage 2's captions in `blip2 eval caption`.

Stage 2 reads the image only through stage 1's query outputs. If the Q-Former's own decoder, which sees the same
queries, names the objects no better than stage 2 does, the caption limit is in what the queries carry (stage 1),
not only in the frozen LLM.

    .venv/bin/python benchmarks/probe_stage1_captions.py --run-root runs/demo [--beams 1 5] [--show 4]
"""
from __future__ import annotations

import argparse
import json

import torch

from pipelines.evaluate import EvalConfig, checker_scores, image_batches, load_stage1, load_test_set


def stage1_captions(run_root: str, beams: int, max_length: int = 40) -> tuple[dict[str, str], list]:
    cfg = EvalConfig(checkpoint=f"{run_root}/stage1", shards=f"{run_root}/raw/test", device="cpu")
    model, tokenizer, _ = load_stage1(cfg, torch.device("cpu"))
    samples, _ = load_test_set(cfg.shards)
    predictions: dict[str, str] = {}
    with torch.inference_mode():
        for start, images in image_batches(samples, model.cfg.vision.image_size, cfg.batch_size, torch.device("cpu"),
                                           f"stage-1 captions, beam {beams}"):
            ids = model.generate_captions(images, tokenizer.sep_token_id, max_length=max_length, min_length=5,
                                          num_beams=beams)
            for i, sequence in enumerate(ids):
                predictions[samples[start + i].key] = tokenizer.decode(sequence, skip_special_tokens=True)
    return predictions, samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-root", default="runs/demo", help="a demo run root (stage1/ and raw/test/ in it)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--show", type=int, default=4, help="example captions to print per setting")
    args = parser.parse_args()
    results = {}
    for beams in args.beams:
        predictions, samples = stage1_captions(args.run_root, beams)
        scenes = {s.key: s.scene for s in samples if s.scene}
        if not scenes:
            raise SystemExit(f"{args.run_root}/raw/test: no scene descriptions to check captions against")
        results[f"beams_{beams}"] = {k: round(v, 4) for k, v in checker_scores(predictions, scenes).items()}
        for sample in samples[:args.show]:
            print(f"  beam {beams}: {predictions[sample.key]!r}  (reference: {sample.captions[0]!r})")
    print(json.dumps({"run_root": args.run_root, "images": len(samples), **results}, indent=2))


if __name__ == "__main__":
    main()
