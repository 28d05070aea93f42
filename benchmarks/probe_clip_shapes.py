"""How well the stand-in CLIP's frozen tokens (the block stage 1 reads) carry each object's attributes: the demo's
CLIP config against variants, trained on the same curated shards in one run.

For each config: train the CLIP (pipelines.foundation.clip), take the penultimate block's patch tokens of every
curated and test image, pool each object's patches (its nominal region, as the region loss does) and fit one linear
probe per attribute on the curated objects; report its accuracy on the test objects. A caption is right only when
every object's shape and colour are, so this per-object figure bounds what stage 1 and stage 2 can caption.

    .venv/bin/python benchmarks/probe_clip_shapes.py --run-root runs/demo \\
        --variant image_size=96 --variant clip.region_steps=1600

Session 9 (AMD box, demo run root): shape 77.1% at the demo's 64 px; 96 px (patch 8): 93.3%; 64 px with twice the
region steps: 83.0%; 96 px with patch 12 (same token count as 64 px): 69.7%; colour 99-100% everywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from pipelines.config import deep_merge, parse_overrides  # noqa: E402
from pipelines.data.shards import expand_shards  # noqa: E402
from pipelines.foundation.clip import ATTRIBUTES, foundation_clip, object_regions  # noqa: E402
from pipelines.foundation.common import load_curated, split_held_out, training_views  # noqa: E402
from pipelines.foundation.config import FoundationConfig  # noqa: E402

NAMES = ("shape", "colour", "size", "position")


def pooled_objects(model, preprocess, samples, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object: its region's mean penultimate-block token (after ln_post) and its attribute indices."""
    tokens = []
    with torch.no_grad():
        for start in range(0, len(samples), 100):
            pixels = torch.stack([preprocess(s.image) for s in samples[start:start + 100]])
            out = model.visual.forward_intermediates(pixels, indices=2, normalize_intermediates=True,
                                                     output_fmt="NLC", intermediates_only=True)
            tokens.append(out["image_intermediates"][0])  # the second-to-last block: what stage 1 reads
    tokens = torch.cat(tokens)
    rows, weights, labels = object_regions([s.scene for s in samples], math.isqrt(tokens.shape[1]), image_size)
    return torch.einsum("op,opw->ow", weights, tokens[rows]), labels


def probe(train_x, train_y, test_x, test_y, steps: int = 500) -> dict[str, float]:
    """One linear classifier per attribute (Adam, full batch) -> test accuracy per attribute."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    result = {}
    for index, (name, values) in enumerate(zip(NAMES, ATTRIBUTES)):
        head = torch.nn.Linear(train_x.shape[1], len(values))
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(head(train_x), train_y[:, index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            result[name] = float((head(test_x).argmax(1) == test_y[:, index]).float().mean())
    return result


def measure(run_root: Path, overrides: list[str], work: Path) -> dict:
    import open_clip

    curated = expand_shards(str(run_root / "raw" / "curated"))
    cfg = FoundationConfig.model_validate(deep_merge({"curated": curated, "image_size": 64},
                                                     parse_overrides(overrides)))
    samples, _ = load_curated(curated, cfg.image_size)
    train, held = split_held_out(samples, cfg.held_out)
    started = time.perf_counter()
    figures = foundation_clip(cfg, training_views(train, cfg.views, cfg.image_size, cfg.seed), held, work, False)
    seconds = time.perf_counter() - started
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{work}")
    test, _ = load_curated(expand_shards(str(run_root / "raw" / "test")), cfg.image_size)
    accuracy = probe(*pooled_objects(model.eval(), preprocess, samples, cfg.image_size),
                     *pooled_objects(model, preprocess, test, cfg.image_size))
    return {"overrides": overrides, "train_seconds": round(seconds, 1), "test_objects_accuracy": accuracy,
            "rank_vs_wrong_attribute": figures["rank_vs_wrong_attribute"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-root", default="runs/demo", help="a finished demo run root (raw/curated, raw/test)")
    parser.add_argument("--variant", action="append", default=[],
                        help="FoundationConfig overrides of one variant, comma-separated (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_root = Path(args.run_root)
    for split in ("curated", "test"):
        if not (run_root / "raw" / split).is_dir():
            raise SystemExit(f"--run-root {run_root}: no raw/{split} shards (run `make demo RUN_ROOT={run_root}`)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, overrides in enumerate([[]] + [v.split(",") for v in args.variant]):
            result = measure(run_root, overrides, Path(tmp) / f"clip{index}")
            results.append(result)
            print(json.dumps(result), flush=True)
    base = results[0]["test_objects_accuracy"]["shape"]
    best = max(results[1:], key=lambda r: r["test_objects_accuracy"]["shape"], default=results[0])
    for result in results[1:]:
        print(f"{result['overrides']}: shape {result['test_objects_accuracy']['shape']:.3f} vs {base:.3f} "
              f"(ratio {result['test_objects_accuracy']['shape'] / base:.2f}), "
              f"training {result['train_seconds'] / results[0]['train_seconds']:.2f}x the seconds")
    write_result("clip_shape_probe", baseline=results[0], candidate=best,
                 ratio=best["test_objects_accuracy"]["shape"] / base, units="test objects' shape accuracy",
                 goal="(diagnostic: per-object shape >= 0.95 for mostly-correct 3-object captions)",
                 extra={"run_root": str(run_root), "variants": results[1:]})


if __name__ == "__main__":
    main()
