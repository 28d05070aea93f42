"""Stage 2 training job: the stage-1 query path learns to prompt a frozen LLM (OPT: LM loss; FlanT5:
prefix-LM loss).

    blip2 train stage2 --config FILE --output DIR model.init_from=STAGE1_CHECKPOINT [dotted overrides]
    python -m pipelines.train_stage2 ...
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
from safetensors.torch import load_file

from blip2 import checkpoint
from blip2.llm import build_llm
from blip2.stage2 import Blip2Stage2, opt_lm_batch, t5_prefix_lm_batch
from blip2.vision import build_image_encoder
from pipelines.train import storage
from pipelines.train.config import TrainConfig
from pipelines.train.loop import StageParts
from pipelines.train.runner import main as run_main
from pipelines.train.runner import run as run_training


def stage2_model_config(cfg: TrainConfig):
    """The stage-1 checkpoint's encoder and Q-Former, with this job's LLM (preset + overrides)."""
    stage1_cfg, _ = checkpoint.load_config(storage.localize(cfg.model.init_from))
    llm = cfg.model.resolve().llm
    if llm is None:
        raise ValueError(f"model.preset={cfg.model.preset!r} names no LLM; stage 2 needs an OPT or FlanT5 preset")
    return dataclasses.replace(stage1_cfg, llm=llm)


def build_stage2(cfg: TrainConfig, device: torch.device) -> StageParts:
    model_cfg = stage2_model_config(cfg)
    llm, llm_tokenizer = build_llm(model_cfg.llm, device)
    model = Blip2Stage2(model_cfg, visual=build_image_encoder(model_cfg.vision, device), llm=llm,
                        llm_tokenizer=llm_tokenizer)
    stage1 = storage.localize(cfg.model.init_from)  # a URI: downloaded once per node
    model.init_report = model.load_stage1(load_file(os.path.join(stage1, "model.safetensors")))
    split_rng = torch.Generator().manual_seed(cfg.seed)

    def inputs(batch: dict) -> dict:
        if model_cfg.llm.kind == "opt":
            text = opt_lm_batch(llm_tokenizer, batch["text"], max_length=cfg.max_text_length)
        else:
            text = t5_prefix_lm_batch(llm_tokenizer, batch["text"], split_rng, max_length=cfg.max_text_length)
        return {"image": batch["image"].to(device), **{k: v.to(device) for k, v in text.items()}}

    def losses(out) -> dict:
        return {"loss": out.loss}

    def samples(model: Blip2Stage2, batch: dict) -> list[dict]:
        images = batch["image"][: cfg.samples_to_generate].to(device)
        captions = model.caption(images, num_beams=3, max_new_tokens=20, min_new_tokens=2)
        return [{"key": key, "reference": ref, "generated": gen}
                for key, ref, gen in zip(batch["key"], batch["text"], captions)]

    return StageParts(model=model, inputs=inputs, losses=losses, samples=samples)


def run(cfg: TrainConfig, output_uri: str, replace_stale: bool = False) -> dict:
    return run_training(cfg.model_copy(update={"stage": "stage2"}), output_uri, build_stage2, replace_stale)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, "stage2", build_stage2)


if __name__ == "__main__":
    sys.exit(main())
