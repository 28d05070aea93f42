"""Export to / import from transformers' BLIP-2 formats (SPEC sections 1 and 8).

    ours (Blip2Stage1 / Blip2Stage2)        transformers (Blip2ForImageTextRetrieval / ...ForConditionalGeneration)
    visual (frozen trunk)                   vision_model.embeddings.*, vision_model.encoder.*
    ln_vision                               vision_model.post_layernorm
    query_tokens                            query_tokens
    qformer.embeddings.*   (stage 1)        embeddings.*
    qformer.qformer.*                       qformer.*
    vision_proj / text_proj / itm_head      vision_projection / text_projection / itm_head   (stage 1)
    language_projection / language_model    language_projection / language_model.*            (stage 2)

What the HF formats cannot hold, and what we do about it (also written into every exported directory as
BLIP2_EXPORT_NOTE.md and blip2_export.json):
- the learned ITC temperature `temp` and the ITG head (stage 1): kept in `blip2_extras.safetensors`, a
  file transformers ignores and `import_stage1` restores (HF's retrieval ITC output is the plain
  max-over-queries cosine, not divided by temp);
- ln_vision's eps: HF's post_layernorm takes the vision config's `layer_norm_eps`, which every vision
  block uses too. We write the blocks' eps; when ln_vision's differs (ViT-g: blocks 1e-6, ln_vision 1e-5)
  HF's vision features differ slightly from ours (recorded); our importer restores ln_vision's eps;
- the vision tower must be EVA-shaped (HF's Blip2VisionModel): transformers' own tower, a timm EVA (EVA01
  style: no rotary embeddings, layer scale or SwiGLU), or an open_clip ViT WITHOUT `ln_pre`. An open_clip
  tower with ln_pre (OpenAI CLIP ViT-L/14) is refused: a LayerNorm before the first block has no place
  in HF's tower and cannot be folded into the embeddings;
- stage 2: HF's model finds the visual prompts' places through Q `<image>` placeholder tokens in
  input_ids; the token is added to the LLM tokenizer, using a spare embedding row when there is one
  (OPT-2.7b, FlanT5) or appending a zero row (then recorded; our importer removes it again).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from timm.models.eva import EvaBlock
from torch import Tensor, nn
from transformers import (AddedToken, AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration,
                          Blip2ForImageTextRetrieval, Blip2Processor, Blip2VisionConfig, BlipImageProcessor, OPTConfig,
                          PreTrainedTokenizerBase)

from blip2 import config as ours
from blip2.checkpoint import atomic_directory, load_trainable
from blip2.qformer import hf_qformer_config
from blip2.vision import EvaImageEncoder, HFImageEncoder, OpenClipImageEncoder

log = logging.getLogger(__name__)

NOTE_FILE = "BLIP2_EXPORT_NOTE.md"
META_FILE = "blip2_export.json"
EXTRAS_FILE = "blip2_extras.safetensors"
EXPORT_FORMAT = "blip2-hf-export/1"
IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPEC_LN_VISION_EPS = 1e-5  # LAVIS's ln_vision (SPEC section 8)

# (our prefix, transformers' prefix); a key equal to a prefix is a whole tensor
STAGE1_NAMES = (("ln_vision.", "vision_model.post_layernorm."), ("query_tokens", "query_tokens"),
                ("qformer.embeddings.", "embeddings."), ("qformer.qformer.", "qformer."),
                ("vision_proj.", "vision_projection."), ("text_proj.", "text_projection."), ("itm_head.", "itm_head."))
STAGE1_EXTRAS = ("itg_head.", "temp")  # ours only
STAGE2_NAMES = (("ln_vision.", "vision_model.post_layernorm."), ("query_tokens", "query_tokens"),
                ("qformer.qformer.", "qformer."), ("language_projection.", "language_projection."))


@dataclass
class VisionExport:
    config: Blip2VisionConfig
    state: dict[str, Tensor]  # "vision_model.*", post_layernorm = ln_vision
    notes: list[str] = field(default_factory=list)
    exact: bool = True  # False when ln_vision's eps could not be carried


def rename(state: dict[str, Tensor], names: tuple[tuple[str, str], ...], to_hf: bool) -> dict[str, Tensor]:
    """Rename keys by prefix (ours -> HF with to_hf, else HF -> ours); keys matching no prefix stay as they are."""
    out = {}
    for key, value in state.items():
        for mine, theirs in names:
            src, dst = (mine, theirs) if to_hf else (theirs, mine)
            if key == src or (src.endswith(".") and key.startswith(src)):
                key = dst + key[len(src):]
                break
        out[key] = value
    return out


def _host(tensor: Tensor) -> Tensor:
    """Detached, on the CPU (meta tensors stay on meta: exports of meta-built models check structure only)."""
    return tensor.detach() if tensor.is_meta else tensor.detach().cpu()


def _tensors(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {prefix + key: _host(value) for key, value in module.state_dict().items()}


# ------------------------------------------------------------------------------------- vision
def export_vision(visual: nn.Module, ln_vision: nn.LayerNorm) -> VisionExport:
    """The frozen trunk as a transformers Blip2VisionModel (+ ln_vision as its post_layernorm)."""
    if isinstance(visual, HFImageEncoder):
        config = Blip2VisionConfig.from_dict(visual.hf_model.config.to_dict())
        state = {key: _host(value) for key, value in visual.hf_vision_state_dict().items()}
    elif isinstance(visual, EvaImageEncoder):
        config, state = eva_vision(visual)
    elif isinstance(visual, OpenClipImageEncoder):
        config, state = open_clip_vision(visual)
    else:
        raise ValueError(f"cannot export a {type(visual).__name__} vision tower: transformers' Blip2VisionModel "
                         "holds an HF, timm EVA or open_clip ViT (without ln_pre) tower only")
    state["vision_model.post_layernorm.weight"] = _host(ln_vision.weight)
    state["vision_model.post_layernorm.bias"] = _host(ln_vision.bias)
    export = VisionExport(config=config, state=state)
    if ln_vision.eps != config.layer_norm_eps:
        export.exact = False
        export.notes.append(
            f"ln_vision eps: ours {ln_vision.eps:g}, HF's post_layernorm uses the vision config's layer_norm_eps "
            f"({config.layer_norm_eps:g}, the blocks' eps, written unchanged): HF's ln_vision outputs, and so its "
            "features and scores, differ slightly from ours (SPEC section 8 measured ~3e-3 relative on a tiny "
            "random model); import_stage1/2 restore our eps")
    return export


def _refuse_if(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"cannot export this {what} to transformers' Blip2VisionModel: " + "; ".join(problems))


def _common_eps(norms: list[nn.LayerNorm], what: str) -> float:
    values = sorted({float(n.eps) for n in norms})
    _refuse_if([f"its LayerNorms use several eps {values} (HF has one layer_norm_eps)"] if len(values) > 1 else [],
               what)
    return values[0]


def _activation(module: nn.Module, what: str) -> str:
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_pytorch_tanh"
    _refuse_if([f"activation {type(module).__name__} (HF: gelu, quick_gelu)"], what)
    return ""


def _vision_config(width: int, blocks: int, heads: int, mlp: int, image: int, patch: int, act: str,
                   eps: float) -> Blip2VisionConfig:
    return Blip2VisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=blocks,
                             num_attention_heads=heads, image_size=image, patch_size=patch, hidden_act=act,
                             layer_norm_eps=eps, qkv_bias=True)


def _qkv_bias(q: Tensor | None, v: Tensor | None, weight: Tensor) -> Tensor:
    """HF's fused qkv bias = [q_bias; 0; v_bias]. HF's vision attention has no key bias. Dropping one is
    exact: a key bias b_k adds q_i . b_k to every logit of query i, the same for every key j, and softmax
    over j ignores a per-row constant. (The export tests check it numerically.)"""
    zero = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
    return _host(torch.cat([zero if q is None else q.detach().to(zero.dtype), zero,
                            zero if v is None else v.detach().to(zero.dtype)]))


def _block_state(prefix: str, parts: dict[str, nn.Module], qkv_weight: Tensor, qkv_bias: Tensor) -> dict[str, Tensor]:
    state = {f"{prefix}self_attn.qkv.weight": _host(qkv_weight), f"{prefix}self_attn.qkv.bias": qkv_bias}
    for hf_name, module in parts.items():
        state.update(_tensors(module, f"{prefix}{hf_name}."))
    return state


def _embeddings_state(patch: nn.Conv2d, cls: Tensor, pos: Tensor) -> dict[str, Tensor]:
    width = patch.out_channels
    bias = patch.bias if patch.bias is not None else \
        torch.zeros(width, dtype=patch.weight.dtype, device=patch.weight.device)  # open_clip's conv1 has none
    return {"vision_model.embeddings.patch_embedding.weight": _host(patch.weight),
            "vision_model.embeddings.patch_embedding.bias": _host(bias),
            "vision_model.embeddings.class_embedding": _host(cls).reshape(1, 1, width),
            "vision_model.embeddings.position_embedding": _host(pos).reshape(1, -1, width)}


def open_clip_vision(encoder: OpenClipImageEncoder) -> tuple[Blip2VisionConfig, dict[str, Tensor]]:
    visual, what = encoder.visual, "open_clip ViT"
    _refuse_if(["it has ln_pre, a LayerNorm before the first block: HF's Blip2VisionModel has no place for it "
                "and it cannot be folded into the embeddings (OpenAI CLIP ViT-L/14 is such a tower)"]
               if not isinstance(visual.ln_pre, nn.Identity) else [], what)
    blocks = list(visual.transformer.resblocks)
    problems = [f"block {i}: {p}" for i, block in enumerate(blocks) for p in _open_clip_block_problems(block)]
    _refuse_if(problems, what)
    state = _embeddings_state(visual.conv1, visual.class_embedding, visual.positional_embedding)
    width = encoder.width
    for i, block in enumerate(blocks):
        attn = block.attn
        parts = {"layer_norm1": block.ln_1, "self_attn.projection": attn.out_proj, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        bias = attn.in_proj_bias
        state.update(_block_state(f"vision_model.encoder.layers.{i}.", parts, attn.in_proj_weight,
                                  _qkv_bias(bias[:width], bias[2 * width:], attn.in_proj_weight)))
    eps = _common_eps([n for b in blocks for n in (b.ln_1, b.ln_2)], what)
    config = _vision_config(width, len(blocks), blocks[0].attn.num_heads, blocks[0].mlp.c_fc.out_features,
                            encoder.image_size, visual.patch_size[0], _activation(blocks[0].mlp.gelu, what), eps)
    return config, state


def _open_clip_block_problems(block: nn.Module) -> list[str]:
    if not isinstance(block, ResidualAttentionBlock):
        return [f"{type(block).__name__} (only open_clip's ResidualAttentionBlock maps onto HF)"]
    checks = {"layer scale (ls_1/ls_2)": isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity),
              "cross-attention norm": not hasattr(block, "ln_1_kv"),
              "separate q/k/v projections": block.attn.in_proj_weight is not None,
              "attention without bias": block.attn.in_proj_bias is not None,
              "extra key/value bias tokens": block.attn.bias_k is None and not block.attn.add_zero_attn}
    return [name for name, ok in checks.items() if not ok]


def eva_vision(encoder: EvaImageEncoder) -> tuple[Blip2VisionConfig, dict[str, Tensor]]:
    trunk, what = encoder.trunk, "timm EVA"
    _refuse_if(_eva_trunk_problems(trunk), what)
    blocks = list(trunk.blocks)
    _refuse_if([f"block {i}: {p}" for i, b in enumerate(blocks) for p in _eva_block_problems(b)], what)
    state = _embeddings_state(trunk.patch_embed.proj, trunk.cls_token, trunk.pos_embed)
    width = encoder.width
    for i, block in enumerate(blocks):
        attn = block.attn
        if attn.qkv is not None:
            weight, q_bias, v_bias = attn.qkv.weight, attn.q_bias, attn.v_bias
        else:
            weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            q_bias, v_bias = attn.q_proj.bias, attn.v_proj.bias
        parts = {"layer_norm1": block.norm1, "self_attn.projection": attn.proj, "layer_norm2": block.norm2,
                 "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}
        state.update(_block_state(f"vision_model.encoder.layers.{i}.", parts, weight, _qkv_bias(q_bias, v_bias, weight)))
    eps = _common_eps([n for b in blocks for n in (b.norm1, b.norm2)], what)
    config = _vision_config(width, len(blocks), blocks[0].attn.num_heads, blocks[0].mlp.fc1.out_features,
                            encoder.image_size, trunk.patch_embed.patch_size[0], _activation(blocks[0].mlp.act, what),
                            eps)
    return config, state


def _eva_trunk_problems(trunk: nn.Module) -> list[str]:
    checks = {"rotary position embeddings (EVA-02)": getattr(trunk, "rope", None) is None,
              "no class token, or register tokens": trunk.cls_token is not None and trunk.reg_token is None,
              "no absolute position embedding for every token": trunk.pos_embed is not None
              and not trunk.no_embed_class,
              "a norm before the blocks (norm_pre)": isinstance(trunk.norm_pre, nn.Identity),
              "a norm in the patch embedding": isinstance(getattr(trunk.patch_embed, "norm", nn.Identity()),
                                                          nn.Identity)}
    return [name for name, ok in checks.items() if not ok]


def _eva_block_problems(block: nn.Module) -> list[str]:
    if type(block) is not EvaBlock:
        return [f"{type(block).__name__} (only pre-norm EvaBlock maps onto HF)"]
    attn = block.attn
    checks = {"layer scale (gamma_1/gamma_2)": block.gamma_1 is None and block.gamma_2 is None,
              "q/k norms or attention sub-norm": all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity)
                                                      for n in ("q_norm", "k_norm", "norm")),
              "gated attention": getattr(attn, "gate", None) is None,
              "head_dim * heads != width": attn.head_dim * attn.num_heads == attn.proj.out_features,
              "grouped key/value heads": attn.qkv is not None or attn.k_proj.weight.shape == attn.q_proj.weight.shape,
              "SwiGLU/GLU MLP or MLP norm": isinstance(block.mlp, Mlp) and isinstance(block.mlp.norm, nn.Identity)}
    return [name for name, ok in checks.items() if not ok]


# ------------------------------------------------------------------------------------- writing
def save_hf(model_class: type, config: Blip2Config, state: dict[str, Tensor], directory: Path) -> None:
    """Check `state` against the HF class's own keys (the model is built on meta: nothing is allocated), then
    `save_pretrained` it, so the files are exactly what transformers writes and reads."""
    with torch.device("meta"):
        hf = model_class(config)
    expected = set(hf.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"export does not fill {model_class.__name__}: missing {missing}, unexpected {unexpected}")
    hf.load_state_dict(state, strict=True, assign=True)
    hf.save_pretrained(directory)


def image_processor(image_size: int) -> BlipImageProcessor:
    """SPEC section 2's eval pre-processing: bicubic resize to a square, CLIP mean/std."""
    return BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=3, do_convert_rgb=True,
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def write_note(directory: Path, meta: dict[str, Any], notes: list[str]) -> None:
    (directory / META_FILE).write_text(json.dumps({**meta, "notes": notes}, indent=2), encoding="utf-8")
    source = meta["source_config"]
    lines = ["# BLIP-2 export: what transformers' format does not hold", "",
             f"Exported from our {meta['model_class']} model (preset {source['name']!r}) for "
             f"`transformers.{meta['hf_class']}`. Machine-readable: {META_FILE}.", ""]
    (directory / NOTE_FILE).write_text("\n".join(lines + [f"- {note}" for note in notes]) + "\n", encoding="utf-8")


def _placeholder_text_config() -> OPTConfig:
    """Blip2Config always carries a text_config (default: a full-size OPT); the retrieval model uses none."""
    return OPTConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, ffn_dim=8, num_attention_heads=1,
                     word_embed_proj_dim=8, max_position_embeddings=8)


def _blip2_config(model, vision: VisionExport, text_input: bool, text_config, **extra) -> Blip2Config:
    qformer = hf_qformer_config(model.cfg.qformer, model.cfg.vision.width, text_input=text_input)
    return Blip2Config(vision_config=vision.config.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text_config.to_dict(), num_query_tokens=model.query_tokens.shape[1], **extra)


def _export_meta(model, kind: str, hf_class: type, vision: VisionExport, **extra) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "model_class": kind, "hf_class": hf_class.__name__,
            "source_config": dataclasses.asdict(model.cfg), "ln_vision_eps": model.ln_vision.eps,
            "vision_layer_norm_eps": vision.config.layer_norm_eps, "exact_vision_features": vision.exact, **extra}


# ------------------------------------------------------------------------------------- stage 1
def export_stage1(model, directory: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None) -> list[str]:
    """Write `directory` for `Blip2ForImageTextRetrieval.from_pretrained` (atomically); returns the notes on
    what the format cannot hold (also in BLIP2_EXPORT_NOTE.md). `tokenizer`: the Q-Former tokenizer, saved
    with an image processor when given."""
    vision = export_vision(model.visual, model.ln_vision)
    config = _blip2_config(model, vision, True, _placeholder_text_config(),
                           image_text_hidden_size=model.cfg.qformer.embed_dim)
    own = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(("visual.", "ln_vision."))}
    extras = {k: v.contiguous() for k, v in own.items() if k.startswith(STAGE1_EXTRAS)}
    state = {**vision.state, **rename({k: v for k, v in own.items() if k not in extras}, STAGE1_NAMES, to_hf=True)}
    temp = float(model.temp.detach())
    notes = [f"ITC temperature: temp = {temp:.6g} is not part of transformers' format (its retrieval ITC output, "
             "use_image_text_matching_head=False, is the max-over-queries cosine NOT divided by temp; our training "
             f"logits are that / temp); kept in {EXTRAS_FILE}",
             f"ITG head (itg_head.dense, itg_head.layer_norm, itg_head.bias; its decoder is the tied Q-Former word "
             f"embeddings) is not part of transformers' format; kept in {EXTRAS_FILE}, which transformers ignores "
             "and blip2.hf_interop.import_stage1 restores",
             "ITM: HF returns both class logits (mean over queries); retrieval re-ranking uses class 1",
             "text_config is a placeholder: Blip2ForImageTextRetrieval has no language model",
             f"[DEC] token id {model.dec_token_id} (the ITG decoder's bos; not used by transformers)"] + vision.notes
    meta = _export_meta(model, "stage1", Blip2ForImageTextRetrieval, vision, temp=temp,
                        dec_token_id=model.dec_token_id, extras_file=EXTRAS_FILE, extras_keys=sorted(extras))
    with atomic_directory(directory) as tmp:
        save_hf(Blip2ForImageTextRetrieval, config, state, tmp)
        save_file(extras, str(tmp / EXTRAS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            image_processor(model.cfg.vision.image_size).save_pretrained(tmp)
        write_note(tmp, meta, notes)
    for note in notes:
        log.info("export_stage1: %s", note)
    return notes


# ------------------------------------------------------------------------------------- stage 2
def image_token_tokenizer(tokenizer: PreTrainedTokenizerBase | None, rows: int
                          ) -> tuple[PreTrainedTokenizerBase | None, int]:
    """A copy of the LLM tokenizer with `<image>` added (the caller's is untouched) and that token's id; with
    no tokenizer the id is the first row past the embedding matrix."""
    if tokenizer is None:
        return None, rows
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer, int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def llm_export(llm: nn.Module, image_token_id: int) -> tuple[dict[str, Tensor], Any, int]:
    """(the LLM's tensors as `language_model.*`, its config for text_config, rows appended). When the image
    token has no embedding row (a vocabulary exactly as large as its tokenizer) zero rows are appended to the
    input embeddings and, if untied, to the output embeddings."""
    text_config = copy.deepcopy(llm.config)
    embedding = llm.get_input_embeddings().weight
    output = llm.get_output_embeddings()
    output = None if output is None else output.weight
    rows = embedding.shape[0]
    appended = max(0, image_token_id + 1 - rows)
    pointer = lambda t: t.untyped_storage().data_ptr()  # noqa: E731  (tied tensors share storage)
    padded = {}
    for tensor in (embedding, output):
        if tensor is not None and appended and pointer(tensor) not in padded:
            zeros = torch.zeros(appended, tensor.shape[1], dtype=tensor.dtype)
            padded[pointer(tensor)] = torch.cat([tensor.detach().cpu(), zeros])
    state = {f"language_model.{key}": padded.get(pointer(value), value).detach().cpu()
             for key, value in llm.state_dict().items()}
    text_config.vocab_size = rows + appended
    return state, text_config, appended


def _stage2_notes(model, image_token_id: int, appended: int, tokenizer) -> list[str]:
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    row = (f"{appended} zero row(s) appended (the vocabulary had no spare row): HF's logits have "
           f"{appended} extra column(s), exactly 0 everywhere, so HF's loss (its softmax has that extra term) and, "
           "rarely, its greedy choice differ from ours; import_stage2 removes the row(s)"
           if appended else f"spare embedding row {image_token_id} of {rows} (no weights changed)")
    notes = [f"visual prompts: HF's model puts them where input_ids hold the {IMAGE_TOKEN} token (id "
             f"{image_token_id}); input_ids must start with num_query_tokens={model.query_tokens.shape[1]} of them "
             f"(Blip2Processor does it). Its embedding: {row}",
             "stage 2 has no text path: the Q-Former text embeddings and text FFNs, the ITC/ITM/ITG heads and temp "
             "are stage-1 only (export the stage-1 model for retrieval)",
             f"LLM weights saved as they are ({next(model.language_model.parameters()).dtype}, frozen)"]
    if tokenizer is None:
        notes.append("no LLM tokenizer on the model: none saved, and no processor")
    elif model.kind == "opt":
        from blip2.stage2 import end_token_ids

        notes.append(f"OPT captions end at '\\n': our generation stops at token ids {end_token_ids(tokenizer, 'opt')} "
                     "(pass eos_token_id=... to HF's generate for the same behaviour)")
        notes.append("HF's OPT loss: give labels for the whole input (-100 on the placeholders); with labels for the "
                     "text only, transformers 5.23 slices the logits and .view()s the non-contiguous slice, which "
                     "fails for a batch > 1")
    return notes


def export_stage2(model, directory: str | os.PathLike) -> list[str]:
    """Write `directory` for `Blip2ForConditionalGeneration.from_pretrained` (atomically): vision, query
    tokens, query-path Q-Former, language_projection, the frozen LLM (its config as text_config), the LLM
    tokenizer with `<image>` and a Blip2Processor. Returns the notes (also in BLIP2_EXPORT_NOTE.md)."""
    vision = export_vision(model.visual, model.ln_vision)
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    tokenizer, image_id = image_token_tokenizer(model.tokenizer, rows)
    lm_state, text_config, appended = llm_export(model.language_model, image_id)
    config = _blip2_config(model, vision, False, text_config, image_token_index=image_id)
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()
           if not k.startswith(("visual.", "ln_vision.", "language_model."))}
    state = {**vision.state, **rename(own, STAGE2_NAMES, to_hf=True), **lm_state}
    notes = _stage2_notes(model, image_id, appended, tokenizer) + vision.notes
    meta = _export_meta(model, "stage2", Blip2ForConditionalGeneration, vision, image_token_id=image_id,
                        appended_image_rows=appended, llm_vocab_size=rows)
    with atomic_directory(directory) as tmp:
        save_hf(Blip2ForConditionalGeneration, config, state, tmp)
        if tokenizer is not None:
            processor = Blip2Processor(image_processor(model.cfg.vision.image_size), tokenizer,
                                       num_query_tokens=model.query_tokens.shape[1])
            processor.save_pretrained(tmp)
        write_note(tmp, meta, notes)
    for note in notes:
        log.info("export_stage2: %s", note)
    return notes


# ------------------------------------------------------------------------------------- import
def read_export_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """blip2_export.json of a directory we exported ({} for a published checkpoint)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads {EXPORT_FORMAT!r}")
    return meta


def _from_pretrained(model_class: type, directory: str | os.PathLike):
    """A local transformers checkpoint in fp32; any missing / unexpected / mismatched key is an error."""
    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"{Path(directory) / 'config.json'} not found (expected a local transformers "
                                f"{model_class.__name__} checkpoint directory)")
    hf, info = model_class.from_pretrained(directory, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                              "error_msgs")}
    if problems:
        raise ValueError(f"{directory}: weights do not fit {model_class.__name__}: {problems}")
    return hf.eval()


def _hf_own_state(hf: nn.Module, extra_skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Everything but the vision trunk (its post_layernorm is ln_vision) and `extra_skip` prefixes."""
    return {k: v for k, v in hf.state_dict().items()
            if not (k.startswith(("vision_model.",) + extra_skip) and not k.startswith("vision_model.post_layernorm."))}


def _square(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def config_from_hf(hf_config: Blip2Config, directory: str | os.PathLike, meta: dict[str, Any],
                   llm: nn.Module | None = None) -> ours.Blip2Config:
    """Our Blip2Config for a transformers BLIP-2 checkpoint; the vision tower becomes kind "hf" pointing at
    `directory`. Names and training options come from blip2_export.json when we wrote the directory."""
    v, q = hf_config.vision_config, hf_config.qformer_config
    if q.hidden_act != "gelu":
        raise ValueError(f"{directory}: Q-Former hidden_act {q.hidden_act!r}, ours is gelu")
    vision = ours.VisionConfig(kind="hf", name=str(Path(directory).absolute()), width=v.hidden_size,
                               layers=v.num_hidden_layers, heads=v.num_attention_heads, mlp_dim=v.intermediate_size,
                               patch_size=_square(v.patch_size), image_size=_square(v.image_size),
                               layer_norm_eps=v.layer_norm_eps,
                               ln_vision_eps=meta.get("ln_vision_eps", SPEC_LN_VISION_EPS))
    qformer = ours.QFormerConfig(
        hidden_size=q.hidden_size, layers=q.num_hidden_layers, heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size, num_query_tokens=hf_config.num_query_tokens,
        cross_attention_freq=q.cross_attention_frequency, vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings, embed_dim=hf_config.image_text_hidden_size,
        dropout=q.hidden_dropout_prob, layer_norm_eps=q.layer_norm_eps,
        pad_token_id=0 if q.pad_token_id is None else q.pad_token_id)
    source = meta.get("source_config", {})
    options = {k: source[k] for k in ("max_text_length", "temp_init", "itc_gather_grad") if k in source}
    return ours.Blip2Config(name=source.get("name", f"hf:{Path(directory).name}"), vision=vision, qformer=qformer,
                            llm=None if llm is None else llm_config(llm, directory, source.get("llm")), **options)


def llm_config(llm: nn.Module, directory: str | os.PathLike, source: dict | None) -> ours.LLMConfig:
    c = llm.config
    rows = llm.get_input_embeddings().weight.shape[0]
    name = (source or {}).get("name") or getattr(c, "_name_or_path", "") or str(directory)
    if c.model_type == "opt":
        return ours.LLMConfig(kind="opt", name=name, hidden_size=c.hidden_size, layers=c.num_hidden_layers,
                              heads=c.num_attention_heads, ffn_dim=c.ffn_dim, vocab_size=rows)
    if c.model_type == "t5":
        return ours.LLMConfig(kind="t5", name=name, hidden_size=c.d_model, layers=c.num_layers, heads=c.num_heads,
                              ffn_dim=c.d_ff, vocab_size=rows, d_kv=c.d_kv)
    raise ValueError(f"{directory}: language model {c.model_type!r}; ours are OPT and (Flan)T5")


def import_stage1(directory: str | os.PathLike, dec_token_id: int | None = None):
    """A `Blip2Stage1` from a transformers `Blip2ForImageTextRetrieval` directory (published, or ours).

    Loading is strict. Not in the HF format and left at init unless our blip2_extras.safetensors is there:
    itg_head.* and temp (listed in `model.import_report.missing`, and logged)."""
    from blip2.stage1 import Blip2Stage1

    hf = _from_pretrained(Blip2ForImageTextRetrieval, directory)
    meta = read_export_meta(directory)
    cfg = config_from_hf(hf.config, directory, meta)
    dec = dec_token_id if dec_token_id is not None else meta.get("dec_token_id")
    model = Blip2Stage1(cfg, visual=HFImageEncoder(hf.vision_model), dec_token_id=dec)
    state = rename(_hf_own_state(hf), STAGE1_NAMES, to_hf=False)
    extras_path = Path(directory) / EXTRAS_FILE
    extras = load_file(str(extras_path)) if extras_path.is_file() else {}
    expected = () if extras else (r"itg_head\..*", "temp")
    model.import_report = load_trainable(model, {**state, **extras}, expected_missing=expected,
                                         source=f"{directory} (Blip2ForImageTextRetrieval)")
    if model.import_report.missing:
        log.warning("import_stage1: not in %s, left at init: %s", directory, model.import_report.missing)
    return model.eval()


@torch.no_grad()
def drop_embedding_rows(llm: nn.Module, rows: int) -> None:
    """Keep the first `rows` rows of the input and output embeddings, preserving which weights are tied.
    (Not `resize_token_embeddings`: it re-ties T5's untied FlanT5 head, transformers 5.x forcing
    tie_word_embeddings=True for T5.)"""
    output = llm.get_output_embeddings()
    weights = [llm.get_input_embeddings().weight] + ([output.weight] if output is not None else [])
    cut = {id(w): nn.Parameter(w[:rows].clone(), requires_grad=w.requires_grad) for w in weights}
    for module in llm.modules():
        if isinstance(module, (nn.Embedding, nn.Linear)) and id(module.weight) in cut:
            module.weight = cut[id(module.weight)]
            if isinstance(module, nn.Embedding):
                module.num_embeddings = rows
            else:
                module.out_features = rows
    llm.config.vocab_size = rows


def import_stage2(directory: str | os.PathLike):
    """A `Blip2Stage2` from a transformers `Blip2ForConditionalGeneration` directory (published, or ours):
    the vision trunk and the LLM are taken from it (frozen), the LLM tokenizer too when saved there."""
    from blip2.stage2 import Blip2Stage2

    hf = _from_pretrained(Blip2ForConditionalGeneration, directory)
    meta = read_export_meta(directory)
    llm = hf.language_model
    if meta.get("appended_image_rows"):  # the zero row(s) our export added for <image>
        drop_embedding_rows(llm, meta["llm_vocab_size"])
    has_tokenizer = (Path(directory) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer else None
    cfg = config_from_hf(hf.config, directory, meta, llm=llm)
    model = Blip2Stage2(cfg, visual=HFImageEncoder(hf.vision_model), llm=llm, llm_tokenizer=tokenizer)
    state = rename(_hf_own_state(hf, ("language_model.",)), STAGE2_NAMES, to_hf=False)
    model.import_report = load_trainable(model, state, source=f"{directory} (Blip2ForConditionalGeneration)")
    return model.eval()
