"""The frozen language models of stage 2 (SPEC section 4): OPT (decoder-only) and FlanT5 (encoder-decoder).

`build_llm(cfg)` returns `(model, tokenizer)`, the model frozen: no parameter requires grad and it stays in
eval mode whatever a parent's `.train()` does (the reference leaves the LLM's dropout on; we do not).
- `cfg.name` a local directory or a hub id: `from_pretrained`. With HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE a
  hub id resolves from the local cache only and a miss fails at once, naming the local-directory option.
- `cfg.name == "tiny"`: a random model from cfg's dims and an offline word-level tokenizer over the
  shapes-world vocabulary (the model's vocabulary is the tokenizer's size).
- `device="meta"` (or building inside `with torch.device("meta"):`): the architecture from cfg's dims,
  nothing allocated or downloaded (parameter counting). The tokenizer is None then, except for "tiny".
Precision: on CUDA OPT in fp16 and T5 in bf16 (FlanT5 overflows in fp16); elsewhere fp32.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import replace

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors  # transformers' backend
from torch import nn
from transformers import (AutoConfig, AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerBase, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

from blip2.config import LLMConfig
from blip2.utils import hub_offline, looks_like_local_path

log = logging.getLogger(__name__)

SHAPES_WORDS: tuple[str, ...] = (
    # colours, shapes, sizes
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
    "circle", "square", "triangle", "star", "hexagon", "diamond", "cross",
    "circles", "squares", "triangles", "stars", "hexagons", "diamonds", "crosses",
    "small", "large", "big", "little",
    # positions and relations
    "left", "right", "top", "bottom", "centre", "center", "middle", "above", "below", "side",
    # function words and caption openers
    "a", "an", "the", "of", "to", "and", "on", "in", "at", "near", "with", "also", "is", "are", "there",
    "this", "it", "we", "can", "see", "you", "shows", "showing", "contains", "photo", "picture", "image",
    "drawing", "shape", "shapes", "object", "objects",
    # questions and answers
    "what", "which", "where", "how", "many", "color", "colour", "does", "have", "question", "answer", "short",
    "zero", "one", "two", "three", "four", "five", "yes", "no",
    # punctuation
    ".", ",", "?", ":", "!",
)

MAX_POSITIONS = 2048  # OPT's learned positions (OPT-2.7b / 6.7b)


# ------------------------------------------------------------------------------------------ freezing
def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze(model: nn.Module) -> nn.Module:
    """No grad, eval mode, and `train()` pinned to eval on this instance (a picklable partial), so a
    parent's `.train()` never switches the frozen model's dropout back on."""
    model.requires_grad_(False)
    model.eval()
    model.train = functools.partial(_stay_in_eval, model)
    return model


def llm_dtype(kind: str, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if kind == "opt" else torch.bfloat16


# ----------------------------------------------------------------------------------------- tokenizer
def tiny_llm_tokenizer(kind: str, words: tuple[str, ...] | list[str] = SHAPES_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-cased; words and punctuation split apart; unknown words -> unk).

    kind "opt": pad "<pad>"=1, bos = eos "</s>"=2 prepended to every text (as OPT's tokenizer does), unk=0;
    "\\n" becomes "</s>", so the newline that ends an OPT caption is the end-of-sequence token.
    kind "t5": pad "<pad>"=0, eos "</s>"=1 appended to every text (as T5's tokenizer does), unk=2.
    """
    if kind not in ("opt", "t5"):
        raise ValueError(f"tiny_llm_tokenizer: kind={kind!r}, expected 'opt' or 't5'")
    specials = ["<unk>", "<pad>", "</s>"] if kind == "opt" else ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    steps = [normalizers.Replace("\n", " </s> ")] if kind == "opt" else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Lowercase()])
    # like the Whitespace pre-tokenizer (\w+ | punctuation runs), keeping "</s>" whole
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"</s>|\w+|[^\w\s]+"), behavior="removed", invert=True)
    eos = ("</s>", vocab["</s>"])
    template = "</s> $A" if kind == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[eos])
    extra = {"bos_token": "</s>"} if kind == "opt" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, **extra)


# ------------------------------------------------------------------------------------------- models
def llm_architecture(cfg: LLMConfig) -> PreTrainedModel:
    """A randomly initialised OPT / FlanT5-shaped (gated-GELU, untied head) model from cfg's dims."""
    if cfg.kind == "opt":
        config = OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                           ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.heads, word_embed_proj_dim=cfg.hidden_size,
                           max_position_embeddings=MAX_POSITIONS, pad_token_id=1, bos_token_id=2, eos_token_id=2)
        return OPTForCausalLM(config)
    if cfg.kind == "t5":
        config = T5Config(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, d_kv=cfg.d_kv, d_ff=cfg.ffn_dim,
                          num_layers=cfg.layers, num_decoder_layers=cfg.layers, num_heads=cfg.heads,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0)
        return untie_lm_head(T5ForConditionalGeneration(config))
    raise ValueError(f"llm.kind={cfg.kind!r}: expected 'opt' or 't5'")


@torch.no_grad()
def tiny_llm_model(cfg: LLMConfig) -> PreTrainedModel:
    """A random model that trained visual prompts can steer, as they steer a pretrained LLM.

    With HF's inits a frozen random LLM is nearly unsteerable: OPT's tied head (std 0.02) gives logits of
    ~0.1, too flat to ever fit a caption, and T5's head (std 1.0) logits of ~sqrt(hidden). Here OPT's
    linear and embedding weights get std 1/sqrt(hidden) (logits of std ~1) and T5's own head std
    2/sqrt(hidden) (logits of std ~2; measured: a tiny T5 stage 2 then fits 4 captions ~5x faster)."""
    model = llm_architecture(cfg)
    std = cfg.hidden_size ** -0.5
    if cfg.kind == "opt":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
    else:
        model.lm_head.weight.normal_(0.0, 2 * std)
    return model


def untie_lm_head(model: T5ForConditionalGeneration) -> T5ForConditionalGeneration:
    """FlanT5 (T5 v1.1) has its own LM head, but transformers 5 always ties T5's head to the shared embedding
    (`tie_word_embeddings=False` only switches off the output scaling; `from_pretrained` unties when a
    checkpoint holds a different head). Give a freshly built model its own head, initialised like HF's."""
    head = model.lm_head.weight
    if head is model.shared.weight:
        model.lm_head.weight = nn.Parameter(torch.empty_like(head))
        if head.device.type != "meta":
            nn.init.normal_(model.lm_head.weight, std=model.config.initializer_factor)
        getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
        model.config.tie_word_embeddings = False  # so a later `tie_weights()` leaves the head alone
    return model


def build_llm(cfg: LLMConfig, device: str | torch.device = "cpu"
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The frozen LLM and its tokenizer (see the module docstring for names, devices and dtypes)."""
    device = torch.device(device)
    if device.type == "meta" or torch.empty(0).device.type == "meta":
        tokenizer = tiny_llm_tokenizer(cfg.kind) if cfg.name == "tiny" else None
        if tokenizer is not None:
            cfg = replace(cfg, vocab_size=len(tokenizer))
        with torch.device("meta"):
            return freeze(llm_architecture(cfg)), tokenizer
    dtype = llm_dtype(cfg.kind, device)
    if cfg.name == "tiny":
        tokenizer = tiny_llm_tokenizer(cfg.kind)
        model = tiny_llm_model(replace(cfg, vocab_size=len(tokenizer)))
    else:
        model, tokenizer = load_pretrained_llm(cfg, dtype)
    return freeze(model.to(device=device, dtype=dtype)), tokenizer


def load_pretrained_llm(cfg: LLMConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`from_pretrained` of a local directory, or of a hub id (offline: from the local cache only)."""
    name = os.path.expanduser(cfg.name)
    local = looks_like_local_path(name)
    if local and not os.path.isdir(name):
        raise FileNotFoundError(f"llm.name={cfg.name!r}: no such directory (expected a saved "
                                f"{'OPT' if cfg.kind == 'opt' else 'FlanT5'} model with config.json and weights)")
    offline = hub_offline() and not local
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=offline)
        expected = {"opt": "opt", "t5": "t5"}[cfg.kind]
        if config.model_type != expected:
            raise ValueError(f"llm.name={cfg.name!r} is a {config.model_type!r} model, llm.kind={cfg.kind!r} "
                             f"expects {expected!r}")
        model_class = OPTForCausalLM if cfg.kind == "opt" else T5ForConditionalGeneration
        model = model_class.from_pretrained(name, dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except OSError as error:
        where = "it is not in the local hub cache and the hub is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)" \
            if offline else f"loading failed: {error}"
        raise OSError(f"LLM {cfg.name!r}: {where}. Download it where there is network "
                      f"(huggingface-cli download {cfg.name} --local-dir DIR) and set llm.name=DIR") from error
    hidden = model.get_input_embeddings().embedding_dim
    if hidden != cfg.hidden_size:
        log.warning("LLM %s has hidden size %d, the preset says %d: using the checkpoint's", cfg.name, hidden,
                    cfg.hidden_size)
    return model, tokenizer
