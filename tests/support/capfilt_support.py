"""Tiny RANDOM-init models and shapes-world web shards for the CapFilt tests and benchmark.

Each model is saved in its library's native layout and loaded back by `pipelines.capfilt_models` the
way a real one would be:

* `tiny_blip(dir)`    transformers BlipForConditionalGeneration + BlipProcessor (shapes-world WordPiece
                      vocabulary with [DEC] as bos, 32 px images)
* `tiny_blip2(dir)`   transformers Blip2ForConditionalGeneration (tiny OPT text_config) + Blip2Processor
* `tiny_clip(dir)`    open_clip CLIP as `open_clip_config.json` + `open_clip_model.safetensors`
                      (load it as "local-dir:<dir>")
* `tiny_stage2(dir)`  this platform's stage-2 checkpoint (blip2.checkpoint.save_model, preset "tiny")
* `web_shards(dir)`   shapes-world web split (noisy captions) packed in img2dataset's webdataset layout
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 32


def _tiny_bert_tokenizer():
    from blip2.tokenizer import build_qformer_tokenizer, shapes_vocabulary

    return build_qformer_tokenizer(vocab_words=shapes_vocabulary())


def tiny_blip(directory: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE, width: int = 32,
              vision_layers: int = 1, text_layers: int = 1) -> Path:
    """A random BLIP captioner (default: 1 layer, hidden 32, 32 px) with its processor, saved with save_pretrained.
    `image_size=64, width=64, vision_layers=3, text_layers=2` is the size of the foundation step's stand-in."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    directory = Path(directory)
    tokenizer = _tiny_bert_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=text_layers, num_attention_heads=2,
                intermediate_size=2 * width, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=width, num_hidden_layers=vision_layers, num_attention_heads=2,
                  intermediate_size=2 * width, image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=width))
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def tiny_blip2(directory: str | Path, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """A random BLIP-2 (tiny vision, 1-layer Q-Former, 2-layer OPT, hidden 32) with its processor."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              OPTConfig)

    from blip2.llm import tiny_llm_tokenizer

    directory = Path(directory)
    tokenizer = tiny_llm_tokenizer("opt")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                     num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=IMAGE_SIZE, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=64, max_position_embeddings=64),
        text_config=text.to_dict(), num_query_tokens=num_query_tokens, image_token_index=image_token)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=num_query_tokens)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def tiny_clip(directory: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE, width: int = 32,
              layers: int = 2) -> Path:
    """A random open_clip CLIP (default: ViT 2x32 on 32 px, text 2x32, context 32) in open_clip's local-dir
    layout. `image_size=64, width=64, layers=3` is the size of the foundation step's stand-in."""
    import open_clip
    from safetensors.torch import save_file

    from pipelines.data.transforms import CLIP_MEAN, CLIP_STD

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_cfg = {"embed_dim": width,
                 "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": width, "layers": layers,
                                "head_width": 16, "mlp_ratio": 2.0},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2}}
    preprocess_cfg = {"size": image_size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(directory / "open_clip_model.safetensors"))
    return directory


def tiny_stage2(directory: str | Path, seed: int = 0) -> Path:
    """A random stage-2 model of preset "tiny" (OPT), saved as this platform's checkpoint directory."""
    from blip2.checkpoint import save_model
    from blip2.config import preset
    from blip2.stage2 import Blip2Stage2

    torch.manual_seed(seed)
    return save_model(Blip2Stage2(preset("tiny")), directory)


def web_shards(directory: str | Path, images: int = 16, per_shard: int = 8, seed: int = 0,
               image_size: int = 48) -> list[Path]:
    """Shapes-world web images (40% noisy captions) as `{directory}/shards/{00000..}.tar`."""
    from pipelines.shapes import synth
    from pipelines.shapes.shards import pack_split

    directory = Path(directory)
    synth.run(synth.SynthConfig(split="web", images=images, seed=seed, image_size=image_size),
              str(directory / "synth"), progress=False)
    return pack_split(directory / "synth", "web", directory / "shards", per_shard)


def truncate(path: str | Path, keep_fraction: float = 0.6) -> Path:
    """Cut a tar file short (what an interrupted copy leaves)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path
