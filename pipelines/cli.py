"""`blip2`: the platform's one console script. Each sub-command is a step module's own `main`.

`blip2 download ...` and `python -m pipelines.download ...` are the same program, so a step runs alike
from a shell, under `ray job submit`, or from a Prefect task.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# command -> (module whose main(argv) runs it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipelines.shapes.synth", "write a shapes-world split: images + URL list (parquet)"),
    "serve": ("pipelines.serve", "serve a directory over HTTP on 127.0.0.1, with optional fault injection"),
    "download": ("pipelines.download", "URL list -> webdataset shards with img2dataset"),
    "loader-check": ("pipelines.data.check", "draw batches from shards and report counts and skips"),
    "foundation": ("pipelines.foundation", "train the offline stand-ins (tiny CLIP, BLIP captioner, OPT, T5)"),
    "capfilt": ("pipelines.capfilt", "CapFilt: caption web images, rank with CLIP, keep the top two"),
    "eval": ("pipelines.evaluate", "evaluate a checkpoint: retrieval | caption | vqa"),
    "index": ("pipelines.index", "FAISS index of image shards: build | add | query"),
    "demo": ("pipelines.demo", "the whole pipeline on the embedded shapes-world default"),
}
TRAIN_STAGES = {"stage1": "pipelines.train_stage1", "stage2": "pipelines.train_stage2"}
# Steps of the pipeline that later issues build; named here so `blip2 --help` shows the whole product.
NOT_BUILT: dict[str, str] = {}


def _setup_environment() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    logging.basicConfig(level=os.environ.get("BLIP2_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="blip2", description="BLIP-2 pretraining platform")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    sub.add_parser("train", help="train stage1|stage2 on Ray Train (or one process with scaling.workers=0)",
                   add_help=False)
    for name, where in NOT_BUILT.items():
        sub.add_parser(name, help=f"(not built yet: {where})", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in NOT_BUILT:
        raise NotImplementedError(f"`blip2 {command}` is not built yet: {NOT_BUILT[command]}")
    if command == "train":
        if not rest or rest[0] not in TRAIN_STAGES:
            parser.error("usage: blip2 train stage1|stage2 --config FILE --output DIR [dotted overrides]")
        _setup_environment()
        return int(importlib.import_module(TRAIN_STAGES[rest[0]]).main(rest[1:]) or 0)
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    _setup_environment()
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
