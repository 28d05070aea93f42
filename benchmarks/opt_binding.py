"""Does the stand-in OPT learn to *bind* (look up an object in the text before and read its other attribute)?

Issue 7's open lead: stage 2 names the test objects only when its frozen OPT can look up, after "red" in a caption,
the shape the caption before gave the red object. This script trains the OPT as the foundation step does (its
tokenizer, `build_lm` and `train_loop`; texts "caption . caption" and "caption . Question: ..
Answer: a") with one thing changed at a time, probes the held-out curated scenes every `--probe-every` steps
(`benchmarks/probe_llm_reading.py`'s random-caption answers, by question type) and prints at the end the caption
binding figure (`probe_llm_reading.caption_binding`: with 2-3 objects, 1.0 when it binds, ~0.4-0.5 when not).

    .venv/bin/python benchmarks/opt_binding.py --run-root runs/demo --seeds 0 1 [--batch 64] [--save DIR]

Variants: `--batch/--steps/--lr/--heads/--layers/--hidden/--ffn`, `--questions N` (N questions per text, joined by
the end-of-text token), `--copy-share` (a share of the texts is a random word sequence repeated after " .", the pure
copy task that forms induction heads), `--copy-steps` (the first steps only that), `--answer-only-loss` (no loss
before the answer in question texts), `--answerable` (position questions follow a caption that states positions; the
probe then also reports `positioned_position`, outside the overall figure), `--sinusoidal-positions` (position
embeddings start as sinusoids), `--recall-share` (a share of the texts is associative recall: random word pairs,
then the same pairs reordered, so that each second word is found only by looking up the first, as a colour's shape
in a caption), `--dropout P` (the OPT's residual dropout, 0.1 in transformers' OPTConfig). Each line of output is
JSON; the last one per seed has `final`, `by_type`, `caption_binding`, `curve` (probe every `--probe-every` steps)
and `seconds` (training only).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.foundation import language  # noqa: E402
from pipelines.foundation.common import IGNORE, train_loop  # noqa: E402
from pipelines.foundation.config import VQA_TEMPLATES, OptConfig  # noqa: E402
from pipelines.shapes.captions import STYLES, caption_for, compose  # noqa: E402
from probe_llm_reading import caption_binding, curated_split  # noqa: E402

PROMPT = VQA_TEMPLATES["opt"]


def texts(args, samples, words: list[str], rng: np.random.Generator, count: int, step: int) -> list[tuple[str, str]]:
    """`count` (source, target) pairs in the foundation OPT's format, or the copy task's."""
    pairs = []
    for _ in range(count):
        if step < args.copy_steps or rng.random() < args.copy_share:
            picked = " ".join(words[int(i)] for i in rng.integers(len(words), size=int(rng.integers(3, 11))))
            pairs.append((picked + " .", picked))
            continue
        if rng.random() < args.recall_share:  # associative recall: the key-value pairs again, in another order
            chosen = rng.choice(len(words), size=2 * int(rng.integers(2, 7)), replace=False).reshape(-1, 2)
            first = " ".join(f"{words[k]} {words[v]}" for k, v in chosen)
            again = " ".join(f"{words[k]} {words[v]}" for k, v in chosen[rng.permutation(len(chosen))])
            pairs.append((first + " .", again))
            continue
        sample = samples[int(rng.integers(len(samples)))]
        context = caption_for(sample.scene, rng) + " . "
        if sample.questions and rng.random() < args.qa_share:
            chosen = [sample.questions[int(i)] for i in rng.permutation(len(sample.questions))[:args.questions]]
            if args.answerable and any(q["type"] == "position" for q in chosen):
                context = positioned_caption(sample.scene, rng) + " . "
            asked = [PROMPT.format(q["question"]) + " " + q["answer"] for q in chosen[:-1]]
            asked.append(PROMPT.format(chosen[-1]["question"]))
            pairs.append((context + " \n ".join(asked), chosen[-1]["answer"]))
        else:
            pairs.append((context.strip(), caption_for(sample.scene, rng)))
    return pairs


@torch.no_grad()
def probe(model, tokenizer, questions) -> tuple[float, dict[str, float]]:
    """Top-1 first answer token after "caption . Question: .. Answer:", overall and by question type."""
    model.eval()
    hits = collections.defaultdict(list)
    for start in range(0, len(questions), 128):
        chunk = questions[start:start + 128]
        batch = language.lm_batch(tokenizer, "opt", [(source, answer) for source, answer, _ in chunk])
        logits = model(**batch).logits
        first = torch.tensor([len(tokenizer(source)["input_ids"]) for source, _, _ in chunk])
        rows = torch.arange(len(chunk))
        right = (logits[rows, first - 1].argmax(-1) == batch["input_ids"][rows, first]).tolist()
        for (_, _, qtype), hit in zip(chunk, right):
            hits[qtype].append(hit)
    model.train()
    every = [hit for qtype, values in hits.items() if not qtype.startswith("positioned_") for hit in values]
    return round(float(np.mean(every)), 3), {t: round(float(np.mean(v)), 2) for t, v in hits.items()}


def positioned_caption(scene, rng: np.random.Generator) -> str:
    """A true caption of `scene` in a random style that states every object's position."""
    styles = [s for s in STYLES if s != "relation" or len(scene.objects) > 1]
    return compose(scene, rng, styles[int(rng.integers(len(styles)))], bool(rng.random() < 0.5), True)


@torch.no_grad()
def sinusoidal_positions(model) -> None:
    """Start OPT's learned position embeddings as a sinusoid table (std that of the token embeddings): a shift by
    one position is then a fixed rotation, which a previous-token head can learn at once."""
    table = model.model.decoder.embed_positions.weight  # (max positions + 2 offset, hidden)
    width = table.shape[1]
    positions = torch.arange(table.shape[0] - 2, dtype=torch.float32)[:, None]
    freqs = torch.exp(-np.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    scale = float(model.model.decoder.embed_tokens.weight.std()) * 2 ** 0.5
    table[2:, 0::2] = torch.sin(positions * freqs) * scale
    table[2:, 1::2] = torch.cos(positions * freqs) * scale


def train_one(args, seed: int, train, held) -> dict:
    torch.manual_seed(seed)
    corpus = [c for s in train for c in s.captions] + [f"{q['question']} {q['answer']}" for s in train
                                                       for q in s.questions]
    tokenizer = language.lm_tokenizer("opt", corpus + [PROMPT])
    cfg = OptConfig(hidden_size=args.hidden, layers=args.layers, heads=args.heads, ffn_dim=args.ffn,
                    steps=args.steps, batch=args.batch, lr=args.lr)
    model = language.build_lm("opt", cfg, len(tokenizer))
    if args.sinusoidal_positions:
        sinusoidal_positions(model)
    if args.dropout is not None:  # the residual-stream dropout of every layer (OPT's config.dropout)
        model.config.dropout = args.dropout
        for module in model.modules():
            if isinstance(getattr(module, "dropout", None), float) and "Attention" not in type(module).__name__:
                module.dropout = args.dropout
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower())
    rng = np.random.default_rng([seed, 3])
    probe_rng = np.random.default_rng(0)
    questions = [(caption_for(s.scene, probe_rng) + " . " + PROMPT.format(q["question"]), q["answer"], q["type"])
                 for s in held for q in s.questions]
    questions += [(positioned_caption(s.scene, probe_rng) + " . " + PROMPT.format(q["question"]), q["answer"],
                   "positioned_" + q["type"]) for s in held for q in s.questions if q["type"] == "position"]
    curve, probe_seconds = [], 0.0

    def record(done: int, loss: float) -> None:
        nonlocal probe_seconds
        started = time.perf_counter()
        accuracy, by_type = probe(model, tokenizer, questions)
        curve.append(accuracy)
        print(json.dumps({"seed": seed, "step": done, "loss": round(loss, 3), "probe": accuracy,
                          "by_type": by_type}), flush=True)
        probe_seconds += time.perf_counter() - started

    def loss_at(step: int) -> torch.Tensor:
        if step and step % args.probe_every == 0:  # `step` optimizer steps done
            record(step, losses_seen[-1])
        pairs = texts(args, train, words, rng, args.batch, step)
        batch = language.lm_batch(tokenizer, "opt", pairs)
        if args.answer_only_loss:
            for row, (source, _) in enumerate(pairs):
                if source.endswith("Answer:"):
                    batch["labels"][row, :len(tokenizer(source)["input_ids"])] = IGNORE
        loss = model(**batch).loss
        losses_seen.append(loss.item())
        return loss

    losses_seen: list[float] = []
    model.train()
    started = time.perf_counter()
    train_loop(list(model.parameters()), loss_at, args.steps, args.lr, "opt", progress=False)
    if args.steps % args.probe_every == 0:
        record(args.steps, losses_seen[-1])
    seconds = time.perf_counter() - started - probe_seconds
    model.eval()
    accuracy, by_type = probe(model, tokenizer, questions)
    result = {"seed": seed, "final": accuracy, "by_type": by_type,
              "caption_binding": caption_binding(model, tokenizer, held, 0), "curve": curve,
              "seconds": round(seconds, 1)}
    if args.save:
        out = Path(args.save) / f"seed-{seed}"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        result["saved"] = str(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-root", default="runs/demo", help="a demo run root (raw/curated)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=OptConfig().steps)
    parser.add_argument("--batch", type=int, default=OptConfig().batch)
    parser.add_argument("--lr", type=float, default=OptConfig().lr)
    parser.add_argument("--heads", type=int, default=OptConfig().heads)
    parser.add_argument("--layers", type=int, default=OptConfig().layers)
    parser.add_argument("--hidden", type=int, default=OptConfig().hidden_size)
    parser.add_argument("--ffn", type=int, default=OptConfig().ffn_dim)
    parser.add_argument("--qa-share", type=float, default=0.6, help="share of texts with a question (the OPT's 0.6)")
    parser.add_argument("--questions", type=int, default=1, help="questions per question text")
    parser.add_argument("--copy-share", type=float, default=0.0)
    parser.add_argument("--copy-steps", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=None, help="OPT's residual dropout (default: its config's)")
    parser.add_argument("--recall-share", type=float, default=0.0, help="share of texts that are an associative recall "
                        "task: random word pairs, then the same pairs in another order")
    parser.add_argument("--answer-only-loss", action="store_true")
    parser.add_argument("--answerable", action="store_true", help="position questions follow a caption stating "
                        "positions")
    parser.add_argument("--sinusoidal-positions", action="store_true", help="position embeddings start as sinusoids")
    parser.add_argument("--probe-every", type=int, default=200)
    parser.add_argument("--save", default=None, help="save each trained OPT (+ tokenizer) under DIR/seed-N")
    args = parser.parse_args()
    train, held = curated_split(Path(args.run_root))
    for seed in args.seeds:
        print(json.dumps(train_one(args, seed, train, held)), flush=True)


if __name__ == "__main__":
    main()
