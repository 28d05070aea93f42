"""The tiny frozen LLMs of stage 2: transformers' OPTForCausalLM and a FlanT5-shaped T5ForConditionalGeneration
(stand-ins for OPT-2.7B / FlanT5-XL), each saved with a word-level tokenizer that `AutoTokenizer` reloads.

The architectures and tokenizers are blip2/llm.py's (`llm_architecture`, `tiny_llm_tokenizer`: OPT pad 1,
bos = eos 2 prepended and "\\n" -> eos; T5 pad 0 = decoder start, eos 1 appended), so `build_llm(LLMConfig(
kind, name=<dir>, ...))` loads them. Training text: true captions of the curated scenes (OPT: the whole
caption; T5: prefix -> rest, as stage 2's prefix-LM) and the curated questions in stage 2's VQA prompt format,
a `context_share` of them (T5: half; OPT: all) after a caption of the same scene, so that the model learns to answer
from the text before it, as a real LLM does (held-out figure: `context_answer_accuracy` against `answer_accuracy`).
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from blip2.config import LLMConfig
from blip2.llm import SHAPES_WORDS, llm_architecture, tiny_llm_tokenizer
from pipelines.foundation.common import IGNORE, Sample, loss_summary, train_loop, write_dir_atomic
from pipelines.foundation.config import VQA_TEMPLATES, FoundationConfig, LanguageModelConfig
from pipelines.shapes.captions import caption_for


def lm_tokenizer(kind: str, texts: Sequence[str]):
    """blip2.llm's word-level tokenizer (OPT: bos/eos/pad, "\\n" -> eos; T5: pad/eos) over the shapes words
    and every word of `texts`."""
    words = {word for text in texts for word in re.findall(r"\w+|[^\w\s]+", text.lower())}
    return tiny_llm_tokenizer(kind, list(SHAPES_WORDS) + sorted(words - set(SHAPES_WORDS)))


def lm_texts(samples: Sequence[Sample], rng: np.random.Generator, count: int, kind: str,
             context_share: float = 0.0) -> list[tuple[str, str]]:
    """`count` (source, target) pairs: half a caption split into prefix / rest (a fresh true caption of a
    random scene), half a VQA prompt / its one-word answer. A `context_share` of them first state the scene in
    a caption: "caption . " + another caption of it, or "caption . " + VQA prompt / answer, so that the model
    learns to take what it says from the text before (as stage 2's visual prompts come before the text).
    OPT trains on source + " " + target."""
    pairs = []
    for _ in range(count):
        sample = samples[int(rng.integers(len(samples)))]
        context = caption_for(sample.scene, rng) + " . " if rng.random() < context_share else ""
        if sample.questions and rng.random() < (0.6 if context else 0.5):
            question = sample.questions[int(rng.integers(len(sample.questions)))]
            pairs.append((context + VQA_TEMPLATES[kind].format(question["question"]), question["answer"]))
        else:
            words = caption_for(sample.scene, rng).split()
            split = 0 if context else int(rng.integers(1, max(1, len(words) // 2) + 1))
            pairs.append(((context + " ".join(words[:split])).strip(), " ".join(words[split:])))
    return pairs


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def lm_batch(tokenizer, kind: str, pairs: Sequence[tuple[str, str]], max_length: int = 64) -> dict[str, torch.Tensor]:
    """OPT: "[bos] source target \\n" with labels on every token after the bos (as blip2.stage2.opt_lm_batch);
    T5: encoder "source [eos]", decoder labels "target [eos]" (as blip2.stage2.t5_prefix_lm_batch)."""
    if kind == "opt":
        rows = [tokenizer(f"{source} {target}\n")["input_ids"][:max_length] for source, target in pairs]
        input_ids = _pad(rows, tokenizer.pad_token_id)  # (B, L)
        mask = _pad([[1] * len(row) for row in rows], 0)  # (B, L)
        labels = input_ids.masked_fill(mask == 0, IGNORE)
        labels[:, 0] = IGNORE  # the bos is never predicted
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    sources = [tokenizer(source)["input_ids"][:max_length] for source, _ in pairs]
    targets = [tokenizer(target)["input_ids"][:max_length] for _, target in pairs]
    return {"input_ids": _pad(sources, tokenizer.pad_token_id),
            "attention_mask": _pad([[1] * len(row) for row in sources], 0),
            "labels": _pad(targets, IGNORE)}


@torch.no_grad()
def build_lm(kind: str, cfg: LanguageModelConfig, vocab_size: int) -> PreTrainedModel:
    """OPTForCausalLM or a FlanT5-shaped T5ForConditionalGeneration (blip2.llm's architecture builder); T5's own
    LM head starts at std 1/sqrt(hidden) rather than HF's 1.0 (logits of ~sqrt(hidden) train slowly)."""
    model = llm_architecture(LLMConfig(kind=kind, name="foundation", hidden_size=cfg.hidden_size, layers=cfg.layers,
                                       heads=cfg.heads, ffn_dim=cfg.ffn_dim, vocab_size=vocab_size,
                                       d_kv=cfg.hidden_size // cfg.heads))
    if kind == "t5":
        model.lm_head.weight.normal_(0.0, cfg.hidden_size ** -0.5)
    return model


def train_lm(model: PreTrainedModel, tokenizer, kind: str, samples: Sequence[Sample], cfg: LanguageModelConfig,
             seed: int, progress: bool) -> list[float]:
    """The model's own LM loss (labels given) on batches of `lm_texts`."""
    rng = np.random.default_rng([seed, 3 if kind == "opt" else 4])
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        return model(**lm_batch(tokenizer, kind, lm_texts(samples, rng, cfg.batch, kind, cfg.context_share))).loss

    return train_loop(list(model.parameters()), loss_at, cfg.steps, cfg.lr, f"foundation {kind}", progress)


@torch.no_grad()
def evaluate_lm(directory: Path, kind: str, held: Sequence[Sample], seed: int, count: int = 512) -> dict[str, float]:
    """Held-out perplexity (per target token) of the reloaded model on the held-out images' texts."""
    loader = AutoModelForCausalLM if kind == "opt" else AutoModelForSeq2SeqLM
    model, tokenizer = loader.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    pairs = lm_texts(held, np.random.default_rng([seed, 12]), count, kind)
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), 64):
        batch = lm_batch(tokenizer, kind, pairs[start:start + 64])
        labels = batch["labels"][:, 1:] if kind == "opt" else batch["labels"]  # OPT predicts token t from t-1
        targets = int((labels != IGNORE).sum())
        total += float(model(**batch).loss) * targets
        tokens += targets
    return {"held_out_loss": total / tokens, "held_out_perplexity": math.exp(total / tokens),
            "answer_accuracy": answer_accuracy(model, tokenizer, kind, held, seed, context=False),
            "context_answer_accuracy": answer_accuracy(model, tokenizer, kind, held, seed, context=True)}


@torch.no_grad()
def answer_accuracy(model: PreTrainedModel, tokenizer, kind: str, held: Sequence[Sample], seed: int,
                    context: bool) -> float:
    """Share of the held-out images' questions whose answer's first token is the model's top next token after
    the VQA prompt, alone or after a caption of the scene ("caption . Question: .. Answer:"): how far the model
    answers from what the text before it says rather than from the answers' prior."""
    rng = np.random.default_rng([seed, 13])
    pairs = [((caption_for(s.scene, rng) + " . " if context else "") + VQA_TEMPLATES[kind].format(q["question"]),
              q["answer"]) for s in held for q in s.questions]
    hits = []
    for start in range(0, len(pairs), 64):
        chunk = pairs[start:start + 64]
        batch = lm_batch(tokenizer, kind, chunk)
        logits = model(**batch).logits
        if kind == "opt":  # the answer's first token follows the prompt's tokens (bos included)
            first = torch.tensor([len(tokenizer(source)["input_ids"]) for source, _ in chunk])
            rows = torch.arange(len(chunk))
            hits += (logits[rows, first - 1].argmax(-1) == batch["input_ids"][rows, first]).tolist()
        else:
            hits += (logits[:, 0].argmax(-1) == batch["labels"][:, 0]).tolist()
    return float(np.mean(hits)) if hits else float("nan")


def foundation_lm(kind: str, cfg: FoundationConfig, train: Sequence[Sample], held: Sequence[Sample],
                  directory: Path, progress: bool) -> dict[str, float]:
    """Build, train and save the tiny OPT or T5 with its tokenizer; held-out perplexity."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    lm_cfg = cfg.opt if kind == "opt" else cfg.t5
    corpus = [c for s in train for c in s.captions] + [f"{q['question']} {q['answer']}" for s in train
                                                       for q in s.questions]
    tokenizer = lm_tokenizer(kind, corpus + [VQA_TEMPLATES[kind]])
    model = build_lm(kind, lm_cfg, len(tokenizer))
    losses = train_lm(model, tokenizer, kind, train, lm_cfg, cfg.seed, progress)

    def save(tmp: Path) -> None:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(directory, save)
    seconds = time.perf_counter() - started
    return {**evaluate_lm(directory, kind, held, cfg.seed), **loss_summary(losses), "seconds": round(seconds, 2),
            "eval_seconds": round(time.perf_counter() - started - seconds, 2)}
