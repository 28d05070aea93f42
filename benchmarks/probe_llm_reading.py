"""How well the stand-in OPT (stage 2's frozen LLM) answers a question from a caption placed before it, by question
type: the ceiling of stage 2's VQA through that LLM (its visual prompts take the caption's place).

For each held-out curated scene of a run root (the foundation step's last `held_out` images by key) and each of its
questions, the OPT reads "[context] Question: .. Answer:" and its top next token is checked against the answer's
first token, with three contexts: none (the answers' prior), a true caption of the scene in a random style (as the
OPT was trained), and a caption naming every object with its size and position. `caption_binding`: in "caption .
caption" of one scene (as the OPT trains on), how often its top next token after a colour word of the second
caption is that object's shape (colours named once in the scene only), by the scene's object count: with 2-3 objects,
an OPT that has not learnt to look up the object in the first caption is near chance (~50 / ~33% plus the prior).

    .venv/bin/python benchmarks/probe_llm_reading.py --run-root runs/demo [--opt-dir OTHER_OPT | --t5-dir T5_DIR]

Session 13 (AMD box, the fresh-clone demo's run root): none 20% (count 33, colour 18, shape 19, position 18); random
caption 56% (count 100, colour 62, shape 57, position 28); every object with its size and position 58% (colour 62,
shape 55, position 36).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.data.shards import expand_shards  # noqa: E402
from pipelines.foundation.common import load_curated, split_held_out  # noqa: E402
from pipelines.foundation.config import VQA_TEMPLATES, FoundationConfig  # noqa: E402
from pipelines.foundation.language import lm_batch  # noqa: E402
from pipelines.shapes.captions import caption_for, compose  # noqa: E402
from pipelines.shapes.scene import SHAPES  # noqa: E402

CONTEXTS = ("none", "random_caption", "full_caption")


def context(kind: str, scene, rng: np.random.Generator) -> str:
    if kind == "none":
        return ""
    caption = caption_for(scene, rng) if kind == "random_caption" else compose(scene, rng, "plain", True, True)
    return caption + " . "


def _answer_hit(model, tokenizer, kind: str, source: str, answer: str) -> bool:
    """Whether the model's top next token after `source` is the answer's first token (OPT: after the prompt's
    tokens, bos included; T5: the decoder's first step)."""
    batch = lm_batch(tokenizer, kind, [(source, answer)])
    logits = model(**batch).logits  # (1, L, V)
    if kind == "t5":
        return int(logits[0, 0].argmax()) == int(batch["labels"][0, 0])
    first = len(tokenizer(source)["input_ids"])
    return int(logits[0, first - 1].argmax()) == int(batch["input_ids"][0, first])


@torch.no_grad()
def reading(model_dir: Path, held, seed: int = 0, kind: str = "opt") -> dict[str, dict[str, float]]:
    """Per context: answer accuracy overall and by question type (and, for the OPT, `caption_binding`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    loader = AutoModelForCausalLM if kind == "opt" else AutoModelForSeq2SeqLM
    model, tokenizer = loader.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for context_kind in CONTEXTS:
        rng, hits = np.random.default_rng(seed), collections.defaultdict(list)
        for sample in held:
            for question in sample.questions:
                source = context(context_kind, sample.scene, rng) + VQA_TEMPLATES[kind].format(question["question"])
                hits[question["type"]].append(_answer_hit(model, tokenizer, kind, source, question["answer"]))
        every = [hit for values in hits.values() for hit in values]
        by_type = {qtype: round(float(np.mean(values)), 3) for qtype, values in hits.items()}
        out[context_kind] = {"all": round(float(np.mean(every)), 3), **by_type}
    if kind == "opt":
        out["caption_binding"] = caption_binding(model, tokenizer, held, seed)
    return out


@torch.no_grad()
def caption_binding(model, tokenizer, held, seed: int, repeats: int = 3) -> dict[str, float]:
    """Share of the second caption's colour words (of a colour one object has) after which the top next token is
    that object's shape, in "caption . caption" of the same scene; by object count ("1", "2", "3")."""
    rng, hits = np.random.default_rng([seed, 1]), collections.defaultdict(list)
    for sample in held:
        shape_of = {o.color: o.shape for o in sample.scene.objects}
        unique = {c for c in shape_of if sum(o.color == c for o in sample.scene.objects) == 1}
        for _ in range(repeats):
            first, second = caption_for(sample.scene, rng), caption_for(sample.scene, rng)
            ids = tokenizer(f"{first} . {second}")["input_ids"]
            tokens = tokenizer.convert_ids_to_tokens(ids)
            predicted = tokenizer.convert_ids_to_tokens(model(torch.tensor([ids])).logits[0].argmax(-1).tolist())
            for j in range(len(tokenizer(f"{first} .")["input_ids"]), len(ids) - 1):
                if tokens[j] in unique and tokens[j + 1] in SHAPES:
                    hits[str(len(sample.scene.objects))].append(predicted[j] == shape_of[tokens[j]])
    return {count: round(float(np.mean(values)), 3) for count, values in sorted(hits.items())}


def curated_split(root: Path) -> tuple[list, list]:
    """(train, held-out) curated samples of a run root, split as the foundation step does."""
    held_out = FoundationConfig(curated=str(root / "raw" / "curated")).held_out
    samples, _ = load_curated(expand_shards(str(root / "raw" / "curated"), what="curated"), 64)
    return split_held_out(samples, held_out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-root", default="runs/demo", help="a demo run root (foundation/opt, raw/curated)")
    parser.add_argument("--opt-dir", default=None, help="probe this OPT dir instead of the run root's foundation/opt")
    parser.add_argument("--t5-dir", default=None, help="probe this FlanT5-shaped stand-in dir instead of an OPT")
    args = parser.parse_args()
    root = Path(args.run_root)
    _, held = curated_split(root)
    if args.t5_dir:
        print(json.dumps(reading(Path(args.t5_dir), held, kind="t5"), indent=1))
    else:
        print(json.dumps(reading(Path(args.opt_dir) if args.opt_dir else root / "foundation" / "opt", held), indent=1))


if __name__ == "__main__":
    main()
