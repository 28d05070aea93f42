"""Evaluation of trained checkpoints on a test split: retrieval (stage 1), captioning and zero-shot VQA (stage 2).

    blip2 eval retrieval --checkpoint RUN_OR_CHECKPOINT --shards TEST --output DIR [dotted overrides]
    blip2 eval caption   --checkpoint STAGE2_RUN --shards TEST --output DIR [...]
    blip2 eval vqa       --checkpoint STAGE2_RUN --shards TEST --output DIR [...]

`--checkpoint` is a training output (its newest complete checkpoint is used) or one checkpoint directory,
local or an object-store URI. The test split is webdataset shards in img2dataset's layout; a sample's
references are `meta["captions"]` (several per image, e.g. 5 on COCO) or its caption, its questions
`meta["questions"]` ([{question, answer(s), type}]), and on the shapes world `meta["scene"]` for the caption
checker. Each evaluation writes `<output>/<kind>.json`, merges its metrics into `<output>/report.json`,
writes plots, and logs params, metrics and artifacts to one MLflow run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from pipelines import io
from pipelines.config import ConfigError, StepConfig, load_config
from pipelines.data.shards import SkipCounter, decode_sample, expand_shards, iter_raw_samples
from pipelines.data.transforms import EvalTransform

log = logging.getLogger(__name__)
KINDS = ("retrieval", "caption", "vqa")
REPORT = "report.json"


class EvalConfig(StepConfig):
    """Settings of `blip2 eval` (SPEC sections 4 and 7 for the defaults)."""

    checkpoint: str = Field(description="training output or checkpoint dir (local or URI): stage 1 for retrieval, "
                                        "stage 2 for caption / vqa")
    shards: str | list[str] = Field(description="test split shards: folder, glob or brace pattern")
    max_images: int | None = Field(None, ge=1, description="evaluate the first N images only")
    batch_size: int = Field(32, ge=1, description="images per forward pass (embedding, generation)")
    device: str = Field("auto", description='"auto" (cuda when present), "cpu", "cuda", "cuda:1" ...')
    tokenizer: str | None = Field(None, description="stage 1: Q-Former tokenizer dir; None: the training run's")
    # retrieval
    k: int = Field(128, ge=1, description="ITC candidates per row reranked by ITM")
    method: Literal["faiss", "row_by_row"] = Field("faiss", description="faiss: ours; row_by_row: the reference")
    max_text_length: int = Field(35, ge=4)
    itm_batch_size: int | None = Field(None, ge=1, description="ITM pairs per batch; None: sized to the model")
    image_chunk: int = Field(256, ge=1, description="images whose cross-attention keys/values are held at once")
    # captioning (SPEC: "a photo of", beam 5, max 30, min 8)
    prompt: str = "a photo of"
    num_beams: int = Field(5, ge=1)
    max_new_tokens: int = Field(30, ge=1)
    min_new_tokens: int = Field(8, ge=0)
    no_repeat_ngram_size: int = Field(0, ge=0, description="n > 0: no n-gram twice in a caption (0: off, as SPEC)")
    spice: bool = Field(False, description="also SPICE (needs Java and the Stanford CoreNLP models)")
    # VQA (SPEC: beam 5, max 10 new tokens; the prompt and length penalty follow the LLM)
    vqa_max_new_tokens: int = Field(10, ge=1)
    # tracking
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI or sqlite:///<output's parent>/mlflow.db")
    experiment: str = "blip2-eval"
    parent_run_id: str | None = None

    @model_validator(mode="after")
    def _lengths(self) -> "EvalConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")
        return self


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class TestSample:
    key: str
    image: Any  # PIL image
    captions: list[str]
    questions: list[dict[str, Any]] = field(default_factory=list)
    scene: str | None = None
    shard: str = ""


def _json_list(value: Any) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return value if isinstance(value, list) else []


def load_test_set(shards: str | list[str], max_images: int | None = None) -> tuple[list[TestSample], SkipCounter]:
    """The test split's samples (image, references, questions, scene); unreadable samples counted and skipped."""
    urls = expand_shards(shards, "test shards")
    skipped = SkipCounter()
    samples: list[TestSample] = []
    for url in urls:
        for raw in iter_raw_samples(url, skipped):
            sample = decode_sample(raw, skipped)
            if sample is None:
                continue
            meta = sample["meta"]
            captions = [c for c in _json_list(meta.get("captions")) if isinstance(c, str) and c.strip()]
            samples.append(TestSample(sample["key"], sample["image"], captions or [sample["text"]],
                                      _json_list(meta.get("questions")), meta.get("scene"), url))
            if max_images and len(samples) >= max_images:
                return samples, skipped
    if not samples:
        raise ValueError(f"test shards {shards!r}: no readable samples (skipped: {dict(skipped.counts)})")
    return samples, skipped


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_checkpoint(uri: str) -> tuple[str, dict[str, Any] | None]:
    """(local checkpoint dir, the training run's config as a dict or None) for a training output or a checkpoint
    directory, local or remote. Raises FileNotFoundError naming what is missing."""
    from pipelines.train import storage

    if io.exists(io.join(uri, "config.json")) and io.exists(io.join(uri, "model.safetensors")):
        checkpoint, output = uri, uri.rstrip("/").rsplit("/", 2)[0]
    else:
        found = storage.latest(uri) if io.exists(uri) else None
        if found is None:
            raise FileNotFoundError(f"checkpoint {uri}: neither a checkpoint directory (config.json + "
                                    "model.safetensors) nor a training output with a complete checkpoint")
        checkpoint, output = found[1], uri
    train_cfg = None
    cfg_uri = io.join(output, "train_config.yaml")
    if io.exists(cfg_uri):
        import yaml

        fs, path = io.fs_and_path(cfg_uri)
        train_cfg = yaml.safe_load(fs.cat_file(path).decode())
    return storage.localize(checkpoint), train_cfg


def load_stage1(cfg: EvalConfig, device: torch.device):
    """(model, Q-Former tokenizer, checkpoint dir) of a stage-1 checkpoint."""
    from blip2 import checkpoint as ckpt
    from blip2.tokenizer import build_qformer_tokenizer, shapes_vocabulary
    from blip2.vision import build_image_encoder

    path, train_cfg = resolve_checkpoint(cfg.checkpoint)
    model_cfg, meta = ckpt.load_config(path)
    if meta["model_class"] != "stage1":
        raise ValueError(f"checkpoint {path}: a {meta['model_class']} checkpoint; retrieval needs stage 1")
    tokenizer_dir = cfg.tokenizer or ((train_cfg or {}).get("model") or {}).get("tokenizer")
    tokenizer = (build_qformer_tokenizer(path=tokenizer_dir) if tokenizer_dir
                 else build_qformer_tokenizer(vocab_words=shapes_vocabulary()))
    if len(tokenizer) != model_cfg.qformer.vocab_size:
        raise ValueError(f"checkpoint {path}: vocabulary of {model_cfg.qformer.vocab_size} tokens, but the tokenizer "
                         f"({tokenizer_dir or 'shapes-world vocabulary'}) has {len(tokenizer)}; set tokenizer=DIR")
    model = ckpt.load_model(path, visual=build_image_encoder(model_cfg.vision, device))
    return model.to(device).eval(), tokenizer, path


def load_stage2(cfg: EvalConfig, device: torch.device):
    """(model with its LLM tokenizer, checkpoint dir) of a stage-2 checkpoint."""
    from blip2 import checkpoint as ckpt
    from blip2.llm import build_llm
    from blip2.vision import build_image_encoder

    path, _ = resolve_checkpoint(cfg.checkpoint)
    model_cfg, meta = ckpt.load_config(path)
    if meta["model_class"] != "stage2":
        raise ValueError(f"checkpoint {path}: a {meta['model_class']} checkpoint; caption/vqa need stage 2")
    llm, llm_tokenizer = build_llm(model_cfg.llm, device)
    model = ckpt.load_model(path, visual=build_image_encoder(model_cfg.vision, device), llm=llm,
                            llm_tokenizer=llm_tokenizer)
    return model.to(device).eval(), path


def image_batches(samples: Sequence[TestSample], image_size: int, batch_size: int, device: torch.device,
                  desc: str):
    transform = EvalTransform(image_size)
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, mininterval=2.0):
        chunk = samples[start:start + batch_size]
        yield start, torch.stack([transform(s.image, "")[0] for s in chunk]).to(device)


# ------------------------------------------------------------------------------------------ retrieval
def embed_test_set(model, tokenizer, samples: Sequence[TestSample], cfg: EvalConfig, device: torch.device):
    """Image query features, ln_vision tokens, text features and token ids of every test sample and caption."""
    from blip2.tokenizer import tokenize
    from pipelines.retrieval import Embeddings

    feats, embeds = [], []
    with torch.inference_mode():
        for _, images in image_batches(samples, model.cfg.vision.image_size, cfg.batch_size, device, "embed images"):
            f, e = model.image_embeddings(images)
            feats.append(f.cpu())
            embeds.append(e.cpu())
        texts = [c for s in samples for c in s.captions]
        txt2img = np.repeat(np.arange(len(samples)), [len(s.captions) for s in samples])
        ids, mask = tokenize(tokenizer, texts, cfg.max_text_length)
        text_feats = torch.cat([model.text_embeddings(ids[a:a + 256].to(device), mask[a:a + 256].to(device)).cpu()
                                for a in range(0, len(texts), 256)])
    offsets = np.concatenate([[0], np.cumsum([len(s.captions) for s in samples])])
    return Embeddings(torch.cat(feats), torch.cat(embeds), text_feats, ids, mask, txt2img,
                      [list(range(offsets[i], offsets[i + 1])) for i in range(len(samples))])


def evaluate_retrieval(cfg: EvalConfig, output: str) -> dict[str, Any]:
    from pipelines import retrieval

    device = pick_device(cfg.device)
    model, tokenizer, path = load_stage1(cfg, device)
    samples, skipped = load_test_set(cfg.shards, cfg.max_images)
    started = time.perf_counter()
    emb = embed_test_set(model, tokenizer, samples, cfg, device)
    embed_seconds = time.perf_counter() - started
    model = model.cpu() if device.type == "cpu" else model
    emb_dev = emb if device.type == "cpu" else emb.to(device)
    started = time.perf_counter()
    if cfg.method == "faiss":
        result = retrieval.retrieve(model, emb_dev, cfg.k, cfg.itm_batch_size, cfg.image_chunk, progress=True)
    else:
        result = retrieval.retrieve_row_by_row(model, emb_dev, cfg.k, progress=True)
    seconds = time.perf_counter() - started
    metrics = retrieval.metrics(result, emb)
    plots = [_recall_plot(metrics, io.join(output, "retrieval_recall.png")),
             _score_histogram(result, emb, io.join(output, "retrieval_scores.png"))]
    return {"kind": "retrieval", "checkpoint": path, "method": cfg.method, "k": cfg.k,
            "images": len(samples), "texts": int(emb.text_feats.shape[0]), "skipped_samples": skipped.total(),
            "skipped": dict(skipped.counts), "metrics": metrics, "itm_pairs": result.itm_pairs,
            "seconds": {"embed": round(embed_seconds, 3), "retrieval": round(seconds, 3),
                        **{k: round(v, 3) for k, v in result.seconds.items()}},
            "plots": plots}


# ------------------------------------------------------------------------------------------ generation
def checker_scores(predictions: dict[str, str], scenes: dict[str, str]) -> dict[str, float]:
    """The caption checker over generated captions: `accuracy` (share fully correct: every object named by colour
    and shape, nothing false), and partial credit: `object_recall` (share of the scenes' objects named by colour
    and shape) and `mention_precision` (share of the captions' object mentions that are true in their scene)."""
    from pipelines.shapes.checker import check_caption, count_facts
    from pipelines.shapes.scene import Scene

    pairs = [(predictions[key], Scene.from_json(scene)) for key, scene in scenes.items()]
    counts = [count_facts(caption, scene) for caption, scene in pairs]
    total = lambda field: sum(getattr(c, field) for c in counts)  # noqa: E731
    return {"accuracy": float(np.mean([check_caption(caption, scene).correct for caption, scene in pairs])),
            "object_recall": total("named") / max(total("objects"), 1),
            "mention_precision": total("true_mentions") / max(total("mentions"), 1)}


def evaluate_caption(cfg: EvalConfig, output: str) -> dict[str, Any]:
    from pipelines.metrics import caption_scores

    device = pick_device(cfg.device)
    model, path = load_stage2(cfg, device)
    samples, skipped = load_test_set(cfg.shards, cfg.max_images)
    predictions: dict[str, str] = {}
    with torch.inference_mode():
        for start, images in image_batches(samples, model.cfg.vision.image_size, cfg.batch_size, device, "caption"):
            texts = model.caption(images, prompt=cfg.prompt, num_beams=cfg.num_beams,
                                  max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                                  no_repeat_ngram_size=cfg.no_repeat_ngram_size)
            predictions.update({samples[start + i].key: t for i, t in enumerate(texts)})
    scores = caption_scores({s.key: s.captions for s in samples}, predictions, spice=cfg.spice)
    metrics: dict[str, Any] = {"cider": scores["cider"], "spice": scores["spice"]}
    scenes = {s.key: s.scene for s in samples if s.scene}
    if scenes:
        metrics.update(checker_scores(predictions, scenes))
    examples = [{"key": s.key, "generated": predictions[s.key], "references": s.captions[:2]} for s in samples[:20]]
    _write_json(io.join(output, "caption_predictions.json"), predictions)
    return {"kind": "caption", "checkpoint": path, "images": len(samples), "skipped_samples": skipped.total(),
            "skipped": dict(skipped.counts), "metrics": metrics, "tokenizer": scores["tokenizer"],
            "spice_note": scores.get("spice_note"), "examples": examples,
            "settings": {"prompt": cfg.prompt, "num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens,
                         "min_new_tokens": cfg.min_new_tokens, "no_repeat_ngram_size": cfg.no_repeat_ngram_size}}


def evaluate_vqa(cfg: EvalConfig, output: str) -> dict[str, Any]:
    from pipelines.metrics import normalize_answer, vqa_accuracy

    device = pick_device(cfg.device)
    model, path = load_stage2(cfg, device)
    samples, skipped = load_test_set(cfg.shards, cfg.max_images)
    rows = [(i, q) for i, s in enumerate(samples) for q in s.questions if q.get("question")]
    if not rows:
        raise ValueError(f"test shards {cfg.shards!r}: no sample has questions (meta['questions'])")
    transform = EvalTransform(model.cfg.vision.image_size)
    answers: list[str] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), cfg.batch_size), desc="vqa", mininterval=2.0):
            chunk = rows[start:start + cfg.batch_size]
            images = torch.stack([transform(samples[i].image, "")[0] for i, _ in chunk]).to(device)
            answers += model.answer(images, [q["question"] for _, q in chunk], num_beams=cfg.num_beams,
                                    max_new_tokens=cfg.vqa_max_new_tokens)
    per_type: dict[str, list[float]] = {}
    records = []
    for (i, q), answer in zip(rows, answers):
        truth = q.get("answers") or [q.get("answer", "")]
        score = vqa_accuracy(answer, truth)
        per_type.setdefault(q.get("type", "all"), []).append(score)
        records.append({"key": samples[i].key, "question": q["question"], "answer": answer,
                        "normalized": normalize_answer(answer), "truth": truth, "score": score})
    metrics = {"accuracy": float(np.mean([r["score"] for r in records])),
               **{f"accuracy_{t}": float(np.mean(v)) for t, v in sorted(per_type.items())}}
    _write_json(io.join(output, "vqa_answers.json"), records)
    return {"kind": "vqa", "checkpoint": path, "images": len(samples), "questions": len(records),
            "skipped_samples": skipped.total(), "skipped": dict(skipped.counts), "metrics": metrics,
            "per_type_counts": {t: len(v) for t, v in sorted(per_type.items())}, "examples": records[:20]}


# ------------------------------------------------------------------------------------------ outputs
def _write_json(uri: str, obj: Any) -> None:
    io.write_json_atomic(uri, obj)


def _recall_plot(metrics: dict[str, float], uri: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ks = [1, 5, 10]
    ax.plot(ks, [metrics[f"txt_r{k}"] for k in ks], "o-", label="image -> text")
    ax.plot(ks, [metrics[f"img_r{k}"] for k in ks], "s-", label="text -> image")
    ax.axhline(metrics["chance_r1"], color="grey", ls=":", label="chance R@1")
    ax.set(xlabel="K", ylabel="recall@K (%)", ylim=(0, 100), xticks=ks, title="retrieval recall")
    ax.legend()
    return _save_figure(fig, uri)


def _score_histogram(result, emb, uri: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positives, negatives = [], []
    for t, (ids, scores) in enumerate(zip(result.t2i.ids, result.t2i.scores)):
        hit = ids == emb.txt2img[t]
        positives += scores[hit].tolist()
        negatives += scores[~hit][:1].tolist()  # the best-scoring wrong image
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(negatives, bins=40, alpha=0.6, label="best wrong image")
    ax.hist(positives, bins=40, alpha=0.6, label="ground-truth image")
    ax.set(xlabel="ITM logit + ITC cosine", ylabel="texts", title="text -> image scores")
    ax.legend()
    return _save_figure(fig, uri)


def _save_figure(fig, uri: str) -> str:
    import matplotlib.pyplot as plt

    fs, path = io.fs_and_path(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return uri


def _merge_report(output: str, kind: str, result: dict[str, Any]) -> dict[str, Any]:
    uri = io.join(output, REPORT)
    report = io.read_json(uri) if io.exists(uri) else {}
    report[kind] = {"metrics": result["metrics"], "checkpoint": result["checkpoint"], "images": result["images"]}
    io.write_json_atomic(uri, report)
    return report


def _track(cfg: EvalConfig, output: str, kind: str, result: dict[str, Any]) -> str:
    from pipelines.train.tracking import Tracker, default_tracking_uri

    uri = cfg.tracking_uri or default_tracking_uri(os.path.dirname(os.path.abspath(io.local_path(output))))
    tracker = Tracker(uri, cfg.experiment, f"eval-{kind}", io.join(output, kind), parent_run_id=cfg.parent_run_id,
                      system_metrics=False)
    tracker.log_params({**cfg.model_dump(mode="json"), "kind": kind})
    numeric = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    tracker.log_metrics(numeric, step=0)
    tracker.log_dict(result, f"{kind}.json")
    for plot in result.get("plots", []):
        tracker.log_artifact(io.local_path(plot), "plots")
    tracker.finish()
    return tracker.run_id


def run(kind: str, cfg: EvalConfig, output: str) -> dict[str, Any]:
    """Run one evaluation, write `<output>/<kind>.json` and merge `<output>/report.json`; returns the result."""
    if kind not in KINDS:
        raise ValueError(f"evaluation {kind!r}: expected one of {KINDS}")
    io.makedirs(output)
    started = time.time()
    result = {"retrieval": evaluate_retrieval, "caption": evaluate_caption, "vqa": evaluate_vqa}[kind](cfg, output)
    result["wall_seconds"] = round(time.time() - started, 3)
    result["mlflow_run_id"] = _track(cfg, output, kind, result)
    _write_json(io.join(output, f"{kind}.json"), result)
    _merge_report(output, kind, result)
    log.info("%s: %s", kind, json.dumps(result["metrics"]))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2 eval", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--checkpoint", help="training output or checkpoint dir (local or URI)")
    parser.add_argument("--shards", help="test shards (folder, glob or brace pattern)")
    parser.add_argument("--output", required=True, help="folder for <kind>.json, report.json and plots")
    parser.add_argument("--config", help="YAML file with EvalConfig fields")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. k=64 max_images=500")
    args = parser.parse_intermixed_args(argv)
    given = {k: v for k, v in (("checkpoint", args.checkpoint), ("shards", args.shards)) if v}
    try:
        cfg = load_config(EvalConfig, args.config, args.overrides, **given)
        cfg = EvalConfig.model_validate({**cfg.model_dump(), **given})
        result = run(args.kind, cfg, args.output)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("kind", "metrics", "images", "wall_seconds")}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
