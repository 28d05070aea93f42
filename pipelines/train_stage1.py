"""Stage 1 training job: the Q-Former learns ITC + ITM + ITG against a frozen image encoder.

    blip2 train stage1 --config FILE --output DIR [dotted overrides]
    python -m pipelines.train_stage1 --config FILE --output DIR [dotted overrides]
"""
from __future__ import annotations

import sys

import torch

from blip2.stage1 import Blip2Stage1, image_ids_tensor
from blip2.tokenizer import build_qformer_tokenizer, dec_token_id, shapes_vocabulary, tokenize
from blip2.vision import build_image_encoder
from pipelines.train.config import TrainConfig
from pipelines.train.loop import StageParts
from pipelines.train.runner import main as run_main
from pipelines.train.runner import run as run_training


def build_tokenizer(cfg: TrainConfig):
    """BERT uncased + [DEC] from a local directory, or the offline shapes-world vocabulary."""
    if cfg.model.tokenizer:
        return build_qformer_tokenizer(path=cfg.model.tokenizer)
    return build_qformer_tokenizer(vocab_words=shapes_vocabulary())


def build_stage1(cfg: TrainConfig, device: torch.device) -> StageParts:
    tokenizer = build_tokenizer(cfg)
    model_cfg = cfg.model.resolve(vocab_size=len(tokenizer))
    model = Blip2Stage1(model_cfg, visual=build_image_encoder(model_cfg.vision, device),
                        dec_token_id=dec_token_id(tokenizer))

    def inputs(batch: dict) -> dict:
        ids, mask = tokenize(tokenizer, batch["text"], cfg.max_text_length)  # (B, L)
        return {"image": batch["image"].to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device),
                "image_ids": image_ids_tensor(batch["image_id"], device)}

    def losses(out) -> dict:
        width = torch.tensor(float(out.sim_i2t.shape[1]))  # ITC logits' width: the global batch
        return {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_itg": out.loss_itg,
                "itc_width": width}

    def samples(model: Blip2Stage1, batch: dict) -> list[dict]:
        images = batch["image"][: cfg.samples_to_generate].to(device)
        generated = model.generate_captions(images, sep_token_id=tokenizer.sep_token_id, max_length=30)
        return [{"key": key, "reference": ref, "generated": tokenizer.decode(ids)}
                for key, ref, ids in zip(batch["key"], batch["text"], generated)]

    def extra(model: Blip2Stage1) -> dict:
        return {"temperature": float(model.temp.detach())}

    return StageParts(model=model, inputs=inputs, losses=losses, samples=samples, extra_metrics=extra)


def run(cfg: TrainConfig, output_uri: str, replace_stale: bool = False) -> dict:
    return run_training(cfg.model_copy(update={"stage": "stage1"}), output_uri, build_stage1, replace_stale)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, "stage1", build_stage1)


if __name__ == "__main__":
    sys.exit(main())
