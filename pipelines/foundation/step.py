"""The foundation step itself: `run` (cached by config hash + shard bytes), the config overrides that point a
training config at the stand-ins (`vision_config`, `llm_config`), and the command line (`main`)."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pipelines import io, runroot
from pipelines.config import ConfigError, load_config
from pipelines.data.shards import expand_shards
from pipelines.foundation.captioner import foundation_captioner
from pipelines.foundation.clip import foundation_clip
from pipelines.foundation.common import load_curated, split_held_out, training_views
from pipelines.foundation.config import STEP, FoundationConfig, FoundationResult
from pipelines.foundation.language import foundation_lm

log = logging.getLogger(__name__)


def shards_hash(urls: Sequence[str]) -> str:
    """One hash of the shards' bytes (in order), so changed inputs retrain."""
    digest = hashlib.sha256()
    for url in urls:
        digest.update(io.file_sha256(url).encode())
    return digest.hexdigest()[:16]


def run(cfg: FoundationConfig, output_uri: str | Path, progress: bool = True) -> FoundationResult:
    """Train the models in `cfg.models` on the curated shards and save them under `output_uri` (local)."""
    started_at, started = time.time(), time.perf_counter()
    out = Path(io.local_path(str(output_uri)))
    urls = expand_shards(cfg.curated, what="curated")
    input_hashes = {"curated": shards_hash(urls)}
    record = runroot.completed(str(out), cfg.config_hash(), input_hashes)
    if record is not None:
        log.info("foundation: reusing the models in %s (same config and shards)", out)
        return FoundationResult.model_validate({**record["result"], "reused": True})
    samples, skipped = load_curated(urls, cfg.image_size)
    train, held = split_held_out(samples, cfg.held_out)
    out.mkdir(parents=True, exist_ok=True)
    runroot.clear_success(str(out))  # models are about to be replaced: the old record no longer holds
    result = FoundationResult(output_dir=str(out), samples={"train": len(train), "held_out": len(held),
                                                            "skipped": skipped.total()})
    log.info("foundation: %d training / %d held-out curated images -> %s", len(train), len(held), out)
    if "clip" in cfg.models:  # the captioner needs it too (config check)
        training = training_views(train, cfg.views, cfg.image_size, cfg.seed, cfg.new_scenes)
        result.metrics["clip"] = foundation_clip(cfg, training, held, out / "clip", progress)
        result.clip_dir = str(out / "clip")
        if "captioner" in cfg.models:
            seen, held_seen = training, held
            if cfg.captioner_image_size != cfg.image_size:  # its own images: the shards' and views at its size
                sized_train, held_seen = split_held_out(load_curated(urls, cfg.captioner_image_size)[0], cfg.held_out)
                seen = training_views(sized_train, cfg.views, cfg.captioner_image_size, cfg.seed, cfg.new_scenes)
            result.metrics["captioner"] = foundation_captioner(cfg, seen, held_seen, out / "captioner", out / "clip",
                                                               progress)
            result.captioner_dir = str(out / "captioner")
    for kind in ("opt", "t5"):
        if kind in cfg.models:
            result.metrics[kind] = foundation_lm(kind, cfg, train, held, out / kind, progress)
            setattr(result, f"{kind}_dir", str(out / kind))
    result.seconds = round(time.perf_counter() - started, 2)
    io.write_json_atomic(str(out / "foundation.json"), result.model_dump(mode="json"))
    runroot.write_success(str(out), step=STEP, config_hash=cfg.config_hash(), input_hashes=input_hashes,
                          result=result.model_dump(mode="json"), started=started_at)
    return result


def _model_dir(result_or_dir: FoundationResult | str | Path, name: str, marker: str) -> Path:
    """The folder of model `name`: from a result, a foundation output dir (foundation.json) or the folder itself."""
    if isinstance(result_or_dir, FoundationResult):
        path = getattr(result_or_dir, f"{name}_dir")
    else:
        root = Path(result_or_dir)
        if (root / marker).is_file():
            path = root
        elif (root / "foundation.json").is_file():
            path = json.loads((root / "foundation.json").read_text()).get(f"{name}_dir")
        else:
            raise FileNotFoundError(f"{root}: neither a foundation output (foundation.json) nor a {name} folder "
                                    f"({marker})")
    if path is None or not (Path(path) / marker).is_file():
        raise FileNotFoundError(f"foundation {name} model not found at {path!r} (was {name!r} in models?)")
    return Path(path).resolve()


def vision_config(result_or_dir: FoundationResult | str | Path) -> dict[str, Any]:
    """The `model.vision` override (VisionConfig fields) for the tiny CLIP's image tower, last block dropped."""
    directory = _model_dir(result_or_dir, "clip", "open_clip_config.json")
    vision = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    heads = vision["width"] // vision["head_width"]
    return {"kind": "open_clip", "name": f"local-dir:{directory}", "width": vision["width"],
            "layers": vision["layers"] - 1, "heads": heads, "mlp_dim": int(vision["width"] * vision["mlp_ratio"]),
            "patch_size": vision["patch_size"], "image_size": vision["image_size"]}


def llm_config(result_or_dir: FoundationResult | str | Path, kind: str) -> dict[str, Any]:
    """The `model.llm` override (LLMConfig fields) for the tiny OPT (kind "opt") or T5 (kind "t5")."""
    if kind not in ("opt", "t5"):
        raise ValueError(f"llm_config: kind={kind!r}, expected 'opt' or 't5'")
    directory = _model_dir(result_or_dir, kind, "config.json")
    config = json.loads((directory / "config.json").read_text())
    if kind == "opt":
        dims = {"hidden_size": config["hidden_size"], "layers": config["num_hidden_layers"],
                "heads": config["num_attention_heads"], "ffn_dim": config["ffn_dim"]}
    else:
        dims = {"hidden_size": config["d_model"], "layers": config["num_layers"], "heads": config["num_heads"],
                "ffn_dim": config["d_ff"], "d_kv": config["d_kv"]}
    return {"kind": kind, "name": str(directory), "vocab_size": config["vocab_size"], **dims}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.foundation",
                                description="Train the offline stand-ins: tiny CLIP, BLIP captioner, OPT and T5.")
    p.add_argument("--curated", required=True, help="curated shards: a dir, a glob or a brace pattern")
    p.add_argument("--output", required=True, help="output directory (local path or file:// URI)")
    p.add_argument("--config", default=None, help="YAML file of FoundationConfig fields")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. clip.steps=600 models=[clip,opt]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: prints the result as JSON; exit status 2 on a bad config or input."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(FoundationConfig, args.config, args.overrides, curated=args.curated)
        result = run(cfg, args.output, progress=not args.no_progress)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.model_dump(mode="json"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
