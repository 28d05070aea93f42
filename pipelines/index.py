"""Persistent FAISS indexes of image collections, embedded with a stage-1 checkpoint, and queries against them.

    blip2 index build --checkpoint STAGE1 --shards CORPUS --output DIR [index_type=auto memory_mb=1024 ...]
    blip2 index add   --index DIR --shards MORE
    blip2 index query --index DIR --text "a red circle on the left" [--image FILE] [--k 10] [--rerank]
                      [--gallery out.html]

An image is its Q query vectors (ITC's max-over-queries score, SPEC section 7): vector v belongs to image
v // Q. A text query searches the vectors and keeps each image's best vector, growing the search until k
distinct images are found; an image query does the same with each of its query vectors. `--rerank` re-reads
the candidates' images and reorders them by ITM logit + ITC cosine.

The index folder holds `index.faiss`, `ids.parquet` (row, key, caption, shard) and `meta.json` (checkpoint,
model, index type and parameters, recall@10 against exact search measured on a sample of the corpus' own
captions, shards indexed). The index type follows corpus size and memory budget unless given:
exact (Flat) for small corpora, HNSW when the full vectors fit the budget, IVF-PQ with an fp16 refine
(OPQ rotation for wide vectors) above; its search parameters are the cheapest that reach `target_recall`.
"""
from __future__ import annotations

import argparse
import base64
import html
import io as pyio
import json
import logging
import os
import sys
import time
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from pipelines.config import ConfigError, StepConfig, load_config

log = logging.getLogger(__name__)
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.parquet", "meta.json"
IndexType = Literal["auto", "flat", "hnsw", "ivf_pq"]


class IndexConfig(StepConfig):
    checkpoint: str = Field(description="stage-1 training output or checkpoint dir (local or URI)")
    shards: str | list[str] = Field(description="image shards to index (folder, glob or brace pattern)")
    index_type: IndexType = "auto"
    memory_mb: float = Field(1024, gt=0, description="budget for the index in memory (auto type choice)")
    flat_max_vectors: int = Field(200_000, ge=1, description="auto: exact search up to this many vectors")
    target_recall: float = Field(0.95, gt=0, le=1, description="recall@10 vs exact that search parameters reach")
    recall_queries: int = Field(200, ge=10, description="caption queries sampled to measure recall")
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    tokenizer: str | None = None
    seed: int = 0


# ------------------------------------------------------------------------------------------ index types
def choose_index_type(vectors: int, dim: int, memory_mb: float, flat_max_vectors: int) -> str:
    """exact for small corpora, HNSW while the full vectors (+ graph) fit the budget, else IVF-PQ."""
    if vectors <= flat_max_vectors:
        return "flat"
    if vectors * (dim * 4 + 32 * 2 * 4) <= memory_mb * 2**20:
        return "hnsw"
    return "ivf_pq"


def factory_string(kind: str, vectors: int, dim: int) -> tuple[str, dict[str, int]]:
    """FAISS index_factory description and its build parameters."""
    if kind == "flat":
        return "Flat", {}
    if kind == "hnsw":
        return "HNSW32,Flat", {"M": 32}
    nlist = int(min(max(16, 4 * np.sqrt(vectors)), vectors // 39))
    m = max(1, min(64, dim // 2))  # 2 dimensions per sub-quantizer (at most 64 bytes a vector), then the refine
    while dim % m:
        m -= 1
    rotation = f"OPQ{m}," if dim >= 128 else ""
    return f"{rotation}IVF{nlist},PQ{m},Refine(SQfp16)", {"nlist": nlist, "pq_m": m}


def gpu_clustering_index(dim: int, metric: int):
    """A flat index on the GPUs for the IVF's k-means assignments (the slow part of a large build)."""
    import faiss

    flat = faiss.IndexFlatIP(dim) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)
    return faiss.index_cpu_to_all_gpus(flat)


def _new_index(kind: str, vectors: np.ndarray, seed: int, clustering=None):
    """A trained, empty index of `kind`. `clustering(dim, metric)`: the index the IVF's k-means assigns with
    (`gpu_clustering_index` when a GPU is there); the index built stays a CPU index, written and searched
    the same way with or without a GPU."""
    import faiss

    description, params = factory_string(kind, len(vectors), vectors.shape[1])
    index = faiss.index_factory(vectors.shape[1], description, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index) if clustering is not None and kind == "ivf_pq" else None
        if ivf is not None:
            helper = clustering(ivf.d, ivf.metric_type)  # held here: faiss keeps only a pointer to it
            ivf.clustering_index = helper
        rng = np.random.default_rng(seed)
        sample = vectors[rng.permutation(len(vectors))[:max(10_000, 64 * params.get("nlist", 1))]]
        index.train(np.ascontiguousarray(sample))
        if ivf is not None:
            ivf.clustering_index = None
    return index, description, params


SEARCH_GRID = {"flat": [{}],
               "hnsw": [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512)],
               "ivf_pq": [{"nprobe": p, "k_factor_rf": f} for p in (4, 8, 16, 32, 64, 128) for f in (4, 16, 64)]}


def set_search_params(index, params: dict[str, Any]) -> None:
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def recall_at(index, exact, queries: np.ndarray, k: int = 10) -> float:
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)]))


def tune(index, kind: str, vectors: np.ndarray, queries: np.ndarray, target: float) -> tuple[dict, float]:
    """The cheapest search parameters of the grid whose recall@10 against exact search reaches `target`
    (else the best found)."""
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    best = ({}, -1.0)
    for params in SEARCH_GRID[kind]:
        set_search_params(index, params)
        recall = recall_at(index, exact, queries)
        if recall > best[1]:
            best = (params, recall)
        if recall >= target:
            return params, recall
    set_search_params(index, best[0])
    return best


# ------------------------------------------------------------------------------------------ embedding
def embed_corpus(cfg: IndexConfig, shards, model, tokenizer, device):
    """Query vectors (N*Q, E) float32, the id rows and caption text features (for recall queries)."""
    from pipelines.evaluate import image_batches, load_test_set

    from blip2.tokenizer import tokenize

    samples, skipped = load_test_set(shards)
    rows, vectors = [], []
    with torch.inference_mode():
        for start, images in image_batches(samples, model.cfg.vision.image_size, cfg.batch_size, device, "embed"):
            feats, _ = model.image_embeddings(images)
            vectors.append(feats.float().cpu().reshape(-1, feats.shape[-1]).numpy())
        captions = [s.captions[0] for s in samples]
        ids, mask = tokenize(tokenizer, captions, 35)
        text = torch.cat([model.text_embeddings(ids[a:a + 256].to(device), mask[a:a + 256].to(device)).cpu()
                          for a in range(0, len(captions), 256)]).numpy()
    rows = [{"key": s.key, "caption": s.captions[0], "shard": s.shard} for s in samples]
    return np.concatenate(vectors).astype(np.float32), rows, text.astype(np.float32), skipped


# ------------------------------------------------------------------------------------------ build / add / query
def build(cfg: IndexConfig, output: str) -> dict[str, Any]:
    """Embed the corpus and write a new index folder at `output` (replaced atomically when it exists)."""
    import faiss
    import pandas as pd

    from pipelines.evaluate import load_stage1, pick_device
    from pipelines.retrieval import faiss_gpu_available

    started = time.time()
    device = pick_device(cfg.device)
    model, tokenizer, checkpoint = load_stage1(_eval_cfg(cfg), device)
    vectors, rows, text, skipped = embed_corpus(cfg, cfg.shards, model, tokenizer, device)
    queries_per_image = model.query_tokens.shape[1]
    kind = cfg.index_type if cfg.index_type != "auto" else choose_index_type(
        len(vectors), vectors.shape[1], cfg.memory_mb, cfg.flat_max_vectors)
    built = time.time()
    use_gpu = device.type == "cuda" and faiss_gpu_available()
    index, description, build_params = _new_index(kind, vectors, cfg.seed, gpu_clustering_index if use_gpu else None)
    index.add(vectors)
    build_seconds = time.time() - built
    rng = np.random.default_rng(cfg.seed)
    queries = text[rng.permutation(len(text))[:cfg.recall_queries]]
    search_params, recall = tune(index, kind, vectors, queries, cfg.target_recall)
    meta = {"checkpoint": checkpoint, "model": model.cfg.name, "embed_dim": int(vectors.shape[1]),
            "queries_per_image": int(queries_per_image), "image_size": model.cfg.vision.image_size,
            "tokenizer": _eval_cfg(cfg).tokenizer, "index_type": kind, "factory": description,
            "build_params": build_params, "search_params": search_params, "recall_at_10": recall,
            "recall_queries": len(queries), "images": len(rows), "vectors": int(index.ntotal),
            "shards": sorted({r["shard"] for r in rows}), "skipped_samples": skipped.total(),
            "build_seconds": round(build_seconds, 3), "gpu": use_gpu,
            "config": cfg.model_dump(mode="json")}
    tmp = f"{output.rstrip('/')}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    faiss.write_index(index, os.path.join(tmp, INDEX_FILE))
    pd.DataFrame([{"row": i, **r} for i, r in enumerate(rows)]).to_parquet(os.path.join(tmp, IDS_FILE))
    _write_json(os.path.join(tmp, META_FILE), meta)
    if os.path.exists(output):
        old = f"{output.rstrip('/')}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        import shutil

        shutil.rmtree(old)
    else:
        os.replace(tmp, output)
    meta["wall_seconds"] = round(time.time() - started, 3)
    log.info("index %s: %d images, %s, recall@10 %.3f", output, len(rows), description, recall)
    return meta


def add(index_dir: str, shards, batch_size: int = 32, device_name: str = "auto") -> dict[str, Any]:
    """Embed more shards with the index's checkpoint and append them (trained structures are kept: no rebuild).
    Shards already in the index are refused."""
    import faiss
    import pandas as pd

    from pipelines.data.shards import expand_shards
    from pipelines.evaluate import load_stage1, pick_device

    meta, index, ids = load(index_dir)
    urls = expand_shards(shards, "shards to add")
    again = sorted(set(urls) & set(meta["shards"]))
    if again:
        raise ValueError(f"index {index_dir}: shards already indexed: {again[:5]}")
    cfg = IndexConfig.model_validate({**meta["config"], "shards": urls, "batch_size": batch_size,
                                      "device": device_name})
    device = pick_device(device_name)
    model, tokenizer, _ = load_stage1(_eval_cfg(cfg), device)
    vectors, rows, _, skipped = embed_corpus(cfg, urls, model, tokenizer, device)
    if vectors.shape[1] != index.d:
        raise ValueError(f"index {index_dir}: vectors of {index.d} dims, the checkpoint gives {vectors.shape[1]}")
    index.add(vectors)
    start = len(ids)
    new_ids = pd.concat([ids, pd.DataFrame([{"row": start + i, **r} for i, r in enumerate(rows)])], ignore_index=True)
    meta.update(images=len(new_ids), vectors=int(index.ntotal), shards=sorted(set(meta["shards"]) | set(urls)),
                skipped_samples=meta["skipped_samples"] + skipped.total())
    # write beside, then replace: index and ids first, meta (which names the counts) last
    faiss.write_index(index, os.path.join(index_dir, INDEX_FILE + ".tmp"))
    new_ids.to_parquet(os.path.join(index_dir, IDS_FILE + ".tmp"))
    os.replace(os.path.join(index_dir, INDEX_FILE + ".tmp"), os.path.join(index_dir, INDEX_FILE))
    os.replace(os.path.join(index_dir, IDS_FILE + ".tmp"), os.path.join(index_dir, IDS_FILE))
    _write_json(os.path.join(index_dir, META_FILE), meta)
    return {"added_images": len(rows), "images": len(new_ids), "vectors": int(index.ntotal)}


def load(index_dir: str):
    import faiss
    import pandas as pd

    paths = [os.path.join(index_dir, name) for name in (META_FILE, INDEX_FILE, IDS_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"index {index_dir}: missing {', '.join(missing)} (build it with `blip2 index build`)")
    with open(paths[0]) as handle:
        meta = json.load(handle)
    index = faiss.read_index(paths[1])
    set_search_params(index, meta.get("search_params", {}))
    ids = pd.read_parquet(paths[2])
    if index.ntotal != len(ids) * meta["queries_per_image"]:
        raise ValueError(f"index {index_dir}: {index.ntotal} vectors but {len(ids)} images x "
                         f"{meta['queries_per_image']} queries in {IDS_FILE}: the folder is inconsistent")
    return meta, index, ids


def search_images(index, query_vectors: np.ndarray, queries_per_image: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k images for a set of query vectors (one text: 1 vector; one image: Q vectors), best vector per image."""
    images = index.ntotal // queries_per_image
    k = min(k, images)
    depth = min(4 * k * len(query_vectors), index.ntotal)
    while True:
        scores, ids = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), depth)
        flat_ids, flat_scores = (ids // queries_per_image).ravel(), scores.ravel()
        valid = ids.ravel() >= 0
        best: dict[int, float] = {}
        for image, score in zip(flat_ids[valid], flat_scores[valid]):
            if score > best.get(int(image), -np.inf):
                best[int(image)] = float(score)
        if len(best) >= k or depth >= index.ntotal:
            ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]
            return np.array([r[0] for r in ranked]), np.array([r[1] for r in ranked], dtype=np.float32)
        depth = min(depth * 4, index.ntotal)


def query(index_dir: str, text: str | None = None, image_path: str | None = None, k: int = 10,
          rerank: bool = False, device_name: str = "auto") -> list[dict[str, Any]]:
    """Top-k images for a text or an image: [{row, key, caption, shard, score (, itc, itm)}]."""
    from PIL import Image

    from blip2.tokenizer import tokenize
    from pipelines.data.transforms import EvalTransform
    from pipelines.evaluate import EvalConfig, load_stage1, pick_device

    if (text is None) == (image_path is None):
        raise ValueError("query: give exactly one of text or image")
    meta, index, ids = load(index_dir)
    device = pick_device(device_name)
    model, tokenizer, _ = load_stage1(EvalConfig(checkpoint=meta["checkpoint"], shards=[],
                                                 tokenizer=meta.get("tokenizer")), device)
    transform = EvalTransform(meta["image_size"])
    with torch.inference_mode():
        if text is not None:
            tids, tmask = tokenize(tokenizer, [text], 35)
            vectors = model.text_embeddings(tids.to(device), tmask.to(device)).cpu().numpy()
        else:
            image = transform(Image.open(image_path).convert("RGB"), "")[0][None].to(device)
            vectors = model.image_embeddings(image)[0][0].float().cpu().numpy()
    rows, scores = search_images(index, vectors, meta["queries_per_image"], k)
    results = [{**ids.iloc[int(r)].to_dict(), "score": float(s)} for r, s in zip(rows, scores)]
    if rerank and text is not None:
        results = _rerank(model, tokenizer, transform, text, results, device)
    return results


def _load_images(results: list[dict[str, Any]]) -> dict[str, Any]:
    """key -> PIL image of the results, read back from their shards."""
    from pipelines.data.shards import SkipCounter, decode_sample, iter_raw_samples

    wanted: dict[str, set[str]] = {}
    for r in results:
        wanted.setdefault(r["shard"], set()).add(r["key"])
    found = {}
    for shard, keys in wanted.items():
        skipped = SkipCounter()
        for raw in iter_raw_samples(shard, skipped):
            if raw.get("__key__") in keys:
                sample = decode_sample(raw, skipped)
                if sample is not None:
                    found[sample["key"]] = sample["image"]
    return found


def _rerank(model, tokenizer, transform, text: str, results, device) -> list[dict[str, Any]]:
    from blip2.tokenizer import tokenize

    images = _load_images(results)
    kept = [r for r in results if r["key"] in images]
    batch = torch.stack([transform(images[r["key"]], "")[0] for r in kept]).to(device)
    ids, mask = tokenize(tokenizer, [text] * len(kept), 35)
    with torch.inference_mode():
        _, embeds = model.image_embeddings(batch)
        itm = model.itm_scores(embeds, ids.to(device), mask.to(device)).float().cpu().numpy()
    for r, s in zip(kept, itm):
        r.update(itc=r["score"], itm=float(s), score=float(s) + r["score"])
    return sorted(kept, key=lambda r: -r["score"])


def gallery(results: list[dict[str, Any]], title: str, path: str) -> str:
    """A small self-contained HTML page of the results (thumbnails inline)."""
    images = _load_images(results)
    cells = []
    for rank, r in enumerate(results, 1):
        buffer = pyio.BytesIO()
        if r["key"] in images:
            images[r["key"]].save(buffer, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        cells.append(f'<figure><img src="{src}" width="128"><figcaption>#{rank} {r["score"]:.3f}<br>'
                     f'{html.escape(str(r["caption"]))}</figcaption></figure>')
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "figure{display:inline-block;width:150px;vertical-align:top;font:12px sans-serif}</style>"
            f"<h3>{html.escape(title)}</h3>" + "".join(cells))
    with open(path, "w") as handle:
        handle.write(page)
    return path


def _eval_cfg(cfg: IndexConfig):
    from pipelines.evaluate import EvalConfig

    return EvalConfig(checkpoint=cfg.checkpoint, shards=cfg.shards, batch_size=cfg.batch_size, device=cfg.device,
                      tokenizer=cfg.tokenizer)


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2 index", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build")
    b.add_argument("--checkpoint")
    b.add_argument("--shards")
    b.add_argument("--output", required=True)
    b.add_argument("--config")
    b.add_argument("overrides", nargs="*")
    a = sub.add_parser("add")
    a.add_argument("--index", required=True)
    a.add_argument("--shards", required=True)
    q = sub.add_parser("query")
    q.add_argument("--index", required=True)
    q.add_argument("--text")
    q.add_argument("--image")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--rerank", action="store_true", help="reorder by ITM logit + ITC cosine (text queries)")
    q.add_argument("--gallery", help="write an HTML page of the results here")
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and args.action != "build"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.action == "build":
            given = {k: v for k, v in (("checkpoint", args.checkpoint), ("shards", args.shards)) if v}
            cfg = load_config(IndexConfig, args.config, [*args.overrides, *extra], **given)
            out = build(IndexConfig.model_validate({**cfg.model_dump(), **given}), args.output)
        elif args.action == "add":
            out = add(args.index, args.shards)
        else:
            results = query(args.index, args.text, args.image, args.k, args.rerank)
            if args.gallery:
                gallery(results, args.text or args.image, args.gallery)
            out = {"results": results, "gallery": args.gallery}
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
