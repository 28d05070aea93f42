"""Stage 2: vision-to-language generative learning with a frozen LLM (SPEC section 4).

The stage-1 query path (ln_vision + Q-Former queries, no text parts) turns an image into Q query outputs;
`language_projection` maps them to Q soft visual prompts in the LLM's embedding space.
- OPT (decoder-only): [visual prompts; text] -> LM loss on the caption, "\\n" ending it.
- FlanT5 (encoder-decoder): [visual prompts; caption prefix] -> encoder, caption suffix -> decoder target.
The forward takes token tensors (built by `opt_lm_batch` / `t5_prefix_lm_batch`), never strings.

Batched generation packs each row's real positions together: for OPT [pads; visual prompts; prompt]
(left padding, so every row's next token is appended right after its own prompt; OPT's positions come
from the attention mask's cumulative sum, so they match an unpadded row), for T5 [visual prompts; prompt;
pads]. Any padding of the prompt ids (left or right) is accepted and repacked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blip2.config import Blip2Config
from blip2.llm import build_llm, freeze
from blip2.qformer import QFormer

IGNORE = -100

VQA_PROMPTS = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}
VQA_LENGTH_PENALTY = {"opt": 0.0, "t5": -1.0}

# stage-1 keys that stage 2 does not use (the text-only parts, the stage-1 heads, the frozen encoder)
STAGE1_DROPPED = tuple(re.compile(p) for p in (
    r"^qformer\.embeddings\.",
    r"^qformer\.qformer\.encoder\.layer\.\d+\.(intermediate|output)\.",  # text FFNs (query FFNs are *_query)
    r"^(vision_proj|text_proj|itm_head|itg_head)\.",
    r"^temp$",
    r"^visual\.",
))
STAGE2_NEW = (re.compile(r"^language_projection\."),)  # trained from scratch in stage 2


@dataclass
class Stage2Output:
    loss: torch.Tensor  # mean cross-entropy over the target tokens
    num_targets: int  # target tokens in the batch (labels != -100)


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # stage-2 keys copied from stage 1
    dropped: list[str] = field(default_factory=list)  # stage-1 keys not used by stage 2 (expected)
    left_at_init: list[str] = field(default_factory=list)  # stage-2 trainable keys not in stage 1 (expected)


class Blip2Stage2(nn.Module):
    def __init__(self, cfg: Blip2Config, visual: nn.Module | None = None, llm: PreTrainedModel | None = None,
                 llm_tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        if llm is None and cfg.llm is None:
            raise ValueError(f"preset {cfg.name!r} has no LLM (cfg.llm is None): stage 2 needs one")
        self.cfg = cfg
        q = cfg.qformer
        device = torch.get_default_device()  # "meta" inside `with torch.device("meta"):`
        if visual is None:
            from blip2.vision import build_image_encoder

            visual = build_image_encoder(cfg.vision, device=device)
        if llm is None:
            llm, llm_tokenizer = build_llm(cfg.llm, device=device)
        self.visual = visual.requires_grad_(False)  # frozen, eval-locked
        self.ln_vision = nn.LayerNorm(cfg.vision.width, eps=cfg.vision.ln_vision_eps)
        self.qformer = QFormer(q, cfg.vision.width, text_input=False)  # query path only
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query_tokens, q.hidden_size) * 0.02)
        llm_width = llm.get_input_embeddings().embedding_dim
        self.language_projection = nn.Linear(q.hidden_size, llm_width)
        self.language_model = freeze(llm)
        self.tokenizer = llm_tokenizer
        self.kind = "t5" if llm.config.is_encoder_decoder else "opt"
        self.visual.eval()

    def train(self, mode: bool = True) -> "Blip2Stage2":
        super().train(mode)
        self.visual.eval()
        self.language_model.eval()
        return self

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """name -> parameter for ln_vision, qformer, query_tokens and language_projection."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (what a stage-2 checkpoint stores); the frozen parts are left out."""
        names = self.trainable_parameters()
        return {key: value for key, value in self.state_dict().items() if key in names}

    # ------------------------------------------------------------------------------------ the model
    def visual_prompts(self, image: torch.Tensor) -> torch.Tensor:
        """Images -> soft visual prompts in the LLM's embedding space.  (B, 3, H, W) -> (B, Q, H_llm)"""
        image_embeds = self.ln_vision(self.visual(image).to(self.ln_vision.weight.dtype))  # (B, T, C)
        batch, num_queries = image.shape[0], self.query_tokens.shape[1]
        queries = self.qformer.embed(self.query_tokens.expand(batch, -1, -1), None)  # (B, Q, D)
        query_out, _ = self.qformer(queries, num_queries, image_kv=self.qformer.image_kv(image_embeds))  # (B, Q, D)
        return self.language_projection(query_out)  # (B, Q, H_llm)

    def llm_inputs(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """[visual prompts; token embeddings] and mask [ones(Q); attention_mask].  (B, Q+L, H_llm), (B, Q+L)"""
        embed = self.language_model.get_input_embeddings()
        prompts = self.visual_prompts(image).to(embed.weight.dtype)  # (B, Q, H_llm)
        text = embed(input_ids)  # (B, L, H_llm)
        ones = torch.ones(prompts.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([prompts, text], dim=1), torch.cat([ones, attention_mask], dim=1)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> Stage2Output:
        """OPT: labels align with input_ids (position t is predicted from the positions before it).
        T5: input_ids/attention_mask are the encoder's text (the caption prefix), labels the decoder targets."""
        embeds, mask = self.llm_inputs(image, input_ids, attention_mask)
        if self.kind == "opt":
            # logits of the last visual prompt and of every text position: position i predicts text token i
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                         logits_to_keep=input_ids.shape[1] + 1).logits[:, :-1]  # (B, L, V)
        else:
            decoder_ids = self.language_model.prepare_decoder_input_ids_from_labels(labels)  # (B, L')
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                         decoder_input_ids=decoder_ids).logits  # (B, L', V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return Stage2Output(loss=loss, num_targets=int((labels != IGNORE).sum()))

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(self, image: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                     prompt_mask: torch.Tensor | None = None, num_beams: int = 5, max_new_tokens: int = 30,
                     min_new_tokens: int = 8, do_sample: bool = False, top_p: float = 0.9, temperature: float = 1.0,
                     length_penalty: float = 1.0, num_return_sequences: int = 1, no_repeat_ngram_size: int = 0,
                     tokenizer: PreTrainedTokenizerBase | None = None) -> torch.Tensor:
        """Generated token ids only (no prompt, no decoder start), rows image-major.  (B*R, T)

        min_new_tokens is capped at max_new_tokens (so `caption(..., max_new_tokens=5)` just works);
        `no_repeat_ngram_size` n > 0 forbids any generated n-gram a second time (transformers' option).
        `tokenizer` (default: the model's) gives the pad, end-of-sequence and default prompt tokens."""
        tokenizer = tokenizer or self._require_tokenizer()
        min_new_tokens = min(min_new_tokens, max_new_tokens)
        if prompt_ids is None:  # OPT: just the bos after the visual prompts; T5: just the eos
            batch = prompt_batch(tokenizer, [""] * image.shape[0])
            prompt_ids, prompt_mask = batch["input_ids"].to(image.device), batch["attention_mask"].to(image.device)
        elif prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        embeds, mask = self.llm_inputs(image, prompt_ids, prompt_mask)
        embeds, mask = pack(embeds, mask, left=self.kind == "opt")
        options = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                       do_sample=do_sample, length_penalty=length_penalty, num_return_sequences=num_return_sequences,
                       no_repeat_ngram_size=no_repeat_ngram_size,
                       eos_token_id=end_token_ids(tokenizer, self.kind), pad_token_id=tokenizer.pad_token_id)
        if do_sample:
            options.update(top_p=top_p, temperature=temperature)
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **options)
        return out[:, 1:] if self.kind == "t5" else out  # T5 rows start with the decoder start token

    def generate(self, image: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 **options) -> list[str]:
        """Text continuing [visual prompts; prompt] (without the prompt); options as in `generate_ids`."""
        tokenizer = tokenizer or self._require_tokenizer()
        ids = self.generate_ids(image, prompt_ids, prompt_mask, tokenizer=tokenizer, **options)
        return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def complete(self, images: torch.Tensor, prompts: Sequence[str] | str, tokenizer=None, **options) -> list[str]:
        """Free-form (instructed) generation: one prompt per image, or one for all."""
        tokenizer = tokenizer or self._require_tokenizer()
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        batch = prompt_batch(tokenizer, prompts)
        return self.generate(images, batch["input_ids"].to(images.device),
                             batch["attention_mask"].to(images.device), tokenizer=tokenizer, **options)

    def caption(self, images: torch.Tensor, tokenizer=None, prompt: str = "a photo of", num_beams: int = 5,
                max_new_tokens: int = 30, min_new_tokens: int = 8, **options) -> list[str]:
        """Captions continuing `prompt` (SPEC: beam 5, max 30, min 8 tokens); the prompt is not repeated."""
        return self.complete(images, prompt, tokenizer, num_beams=num_beams, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, **options)

    def answer(self, images: torch.Tensor, questions: Sequence[str], tokenizer=None, num_beams: int = 5,
               max_new_tokens: int = 10, min_new_tokens: int = 1, length_penalty: float | None = None,
               **options) -> list[str]:
        """Zero-shot VQA with SPEC's prompts (OPT "Question: {} Answer:", FlanT5 "... Short answer:")."""
        prompts = [VQA_PROMPTS[self.kind].format(q) for q in questions]
        penalty = VQA_LENGTH_PENALTY[self.kind] if length_penalty is None else length_penalty
        return self.complete(images, prompts, tokenizer, num_beams=num_beams, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, length_penalty=penalty, **options)

    def chat(self, images: torch.Tensor, turns: Sequence[str] | Sequence[Sequence[str]], tokenizer=None,
             num_beams: int = 5, max_new_tokens: int = 30, min_new_tokens: int = 1, **options) -> list[str]:
        """Multi-turn chat: `turns` alternates user, model, ..., user (one list for all images, or one per
        image); the reply to the last user turn is generated from a "Question: .. Answer: .." prompt."""
        per_image = [turns] * images.shape[0] if turns and isinstance(turns[0], str) else list(turns)
        return self.complete(images, [chat_prompt(t) for t in per_image], tokenizer, num_beams=num_beams,
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, **options)

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("this Blip2Stage2 has no LLM tokenizer: pass llm_tokenizer= (or the tokenizer argument)")
        return self.tokenizer

    # ------------------------------------------------------------------------------------- stage 1
    @torch.no_grad()
    def load_stage1(self, state_dict: dict[str, torch.Tensor]) -> LoadReport:
        """Copy the query path from a `Blip2Stage1` state dict; strict (see `plan_stage1_load`)."""
        report = plan_stage1_load(state_dict, self.trainable_state_dict())
        own = self.state_dict()
        for key in report.loaded:
            own[key].copy_(state_dict[key])
        return report


def plan_stage1_load(stage1: dict[str, torch.Tensor], stage2: dict[str, torch.Tensor]) -> LoadReport:
    """Which stage-1 keys fill which stage-2 trainable keys. Raises, listing the keys, on a stage-1 key that
    is neither used nor expected-dropped, a stage-2 key missing other than language_projection.*, or a shape
    mismatch."""
    report = LoadReport()
    unexpected, mismatched = [], []
    for key, value in stage1.items():
        if key in stage2:
            if tuple(stage2[key].shape) != tuple(value.shape):
                mismatched.append(f"{key}: stage 1 {tuple(value.shape)}, stage 2 {tuple(stage2[key].shape)}")
            report.loaded.append(key)
        elif any(p.search(key) for p in STAGE1_DROPPED):
            report.dropped.append(key)
        else:
            unexpected.append(key)
    absent = [key for key in stage2 if key not in stage1]
    report.left_at_init = [key for key in absent if any(p.search(key) for p in STAGE2_NEW)]
    missing = [key for key in absent if key not in report.left_at_init]
    problems = [f"{what}: {keys}" for what, keys in (("unexpected stage-1 keys", unexpected),
                                                     ("missing stage-2 keys", missing),
                                                     ("shape mismatches", mismatched)) if keys]
    if problems:
        raise ValueError("load_stage1: " + "; ".join(problems))
    return report


# ------------------------------------------------------------------------------- batches (tensors)
def end_token_ids(tokenizer: PreTrainedTokenizerBase, kind: str) -> list[int]:
    """Tokens that end generation: OPT "\\n" (SPEC) and its eos; T5 its eos."""
    ids = [newline_token_id(tokenizer)] if kind == "opt" else []
    return list(dict.fromkeys(ids + [tokenizer.eos_token_id]))


def newline_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The single token of "\\n" (OPT: 50118 "Ċ"; the tiny word-level tokenizer maps it to "</s>")."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes '\\n' as {ids}, expected exactly one token")
    return ids[0]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def opt_lm_batch(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], prompt: str = "",
                 max_length: int = 32) -> dict[str, torch.Tensor]:
    """OPT training batch: "[bos] prompt caption \\n", right-padded; labels -100 on bos, prompt and pad.

    A caption cut at max_length keeps its closing "\\n" (it replaces the last kept token)."""
    newline = newline_token_id(tokenizer)
    prompt = prompt.strip()
    prompt_length = len(tokenizer(prompt)["input_ids"])  # incl. the bos OPT's tokenizer prepends
    if prompt_length >= max_length:
        raise ValueError(f"prompt {prompt!r} is {prompt_length} tokens, max_length={max_length} leaves no caption")
    ids, labels = [], []
    for caption in captions:
        text = " ".join(part for part in (prompt, caption.strip()) if part) + "\n"
        row = tokenizer(text)["input_ids"][:max_length]
        row[-1] = newline
        ids.append(row)
        labels.append([IGNORE] * prompt_length + row[prompt_length:])
    return {"input_ids": _pad(ids, tokenizer.pad_token_id), "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "labels": _pad(labels, IGNORE)}


def prefix_split(length: int, generator: torch.Generator) -> int:
    """Tokens kept in the prefix: uniform in [1, max(1, length // 2)] (0 for an empty caption)."""
    if length == 0:
        return 0
    return int(torch.randint(1, max(1, length // 2) + 1, (1,), generator=generator))


def t5_prefix_lm_batch(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], generator: torch.Generator,
                       max_length: int = 32) -> dict[str, torch.Tensor]:
    """FlanT5 prefix-LM batch: each caption split at `prefix_split`; input_ids = prefix + eos (encoder,
    right-padded), labels = suffix + eos (decoder targets, -100 on pad)."""
    eos = tokenizer.eos_token_id
    prefixes, suffixes = [], []
    for caption in captions:
        tokens = tokenizer(caption.strip(), add_special_tokens=False)["input_ids"][: max_length - 1]
        split = prefix_split(len(tokens), generator)
        prefixes.append(tokens[:split] + [eos])
        suffixes.append(tokens[split:] + [eos])
    return {"input_ids": _pad(prefixes, tokenizer.pad_token_id),
            "attention_mask": _pad([[1] * len(r) for r in prefixes], 0), "labels": _pad(suffixes, IGNORE)}


def prompt_batch(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Generation prompts as ids (with the tokenizer's own specials: OPT's bos, T5's eos), right-padded.
    `Blip2Stage2.generate` repacks [visual prompts; prompt] so each row's real tokens are contiguous."""
    rows = [tokenizer(p.strip())["input_ids"] for p in prompts]
    return {"input_ids": _pad(rows, tokenizer.pad_token_id), "attention_mask": _pad([[1] * len(r) for r in rows], 0)}


def chat_prompt(turns: Sequence[str]) -> str:
    """user, model, ..., user -> "Question: u1 Answer: m1. Question: u2 Answer:" (LAVIS's chat format)."""
    if len(turns) % 2 != 1:
        raise ValueError(f"chat turns must alternate user, model, ..., user (odd count), got {len(turns)}")
    parts = [f"Question: {turns[i]} Answer: {turns[i + 1]}." for i in range(0, len(turns) - 1, 2)]
    return " ".join(parts + [f"Question: {turns[-1]} Answer:"])


def pack(embeds: torch.Tensor, mask: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's masked-out positions to the left (left=True) or right end, keeping the order of the
    real ones.  (B, S, H), (B, S) -> same shapes"""
    key = mask.long() if left else 1 - mask.long()  # stable ascending sort: key 0 first
    order = torch.sort(key, dim=1, stable=True).indices  # (B, S)
    return embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order)
