"""The `foundation` step: tiny offline stand-ins for the pretrained models BLIP-2 builds on (issue 5).

No pretrained weights can be downloaded here, so the platform trains its own small "off-the-shelf" models
on the shapes world's `curated` split and saves each in its library's NATIVE format; the rest of the
pipeline loads them exactly as it would load the real ones:

* `clip/`       open_clip CLIP (`clip.py`): `open_clip.create_model_and_transforms("local-dir:<dir>")`. The frozen
                image encoder of stage 1 (`vision_config`) and the CapFilt ranker (image-text cosine).
* `captioner/`  transformers BlipForConditionalGeneration + BlipProcessor (`captioner.py`), the CapFilt
                captioner: `from_pretrained(<dir>)` of both, like Salesforce/blip-image-captioning-large.
* `opt/`, `t5/` transformers OPTForCausalLM / T5ForConditionalGeneration + AutoTokenizer (`language.py`), the
                frozen LLMs of stage 2 through blip2.llm.build_llm (`llm_config`).

`run(cfg, output)` trains what `cfg.models` names, writes each model to a temp dir and renames it, then
`foundation.json` and `_SUCCESS.json` (last, pipelines.runroot); the same config and shard bytes return the
recorded result at once. Layout: `config.py` (FoundationConfig, FoundationResult), `common.py` (samples,
batches, the training loop), one file per model, `step.py` (run, the overrides, the command line).

    python -m pipelines.foundation --curated SHARDS --output DIR [clip.steps=600 ...]
"""
from pipelines.foundation.config import (MODELS, CaptionerConfig, ClipConfig, FoundationConfig, FoundationResult,
                                         LanguageModelConfig, OptConfig, T5Config)
from pipelines.foundation.step import llm_config, main, run, vision_config

__all__ = ["MODELS", "CaptionerConfig", "ClipConfig", "FoundationConfig", "FoundationResult", "LanguageModelConfig",
           "OptConfig", "T5Config", "llm_config", "main", "run", "vision_config"]
