"""Claim (issue 6): retrieval evaluation with a FAISS first stage and one batched ITM pass is >= 3x faster than
the reference's row-by-row procedure at the same k, with identical metrics.

One run measures, for N images x 5N texts (N = 1000 and 5000 by default), on the same embeddings of the tiny
stage-1 model (Q-Former 32 wide, 2 layers, 4 queries; image tokens 65 x 64 from its tiny ViT on random
32 px images; shapes-world captions, 5 per image, tokenised with the
shapes-world vocabulary and padded to max_length 35 as the reference does): `pipelines.retrieval.retrieve_row_by_row` (baseline)
and `pipelines.retrieval.retrieve` (ours), k = 128, and asserts the two give the same recall metrics.
Embedding the test set is common to both and not timed. With `--device cuda` both run on the GPU (the model
and every embedding tensor there; FAISS on the GPU when faiss-gpu is installed, else on the CPU), each
procedure once untimed on a small slice first so that neither pays CUDA's start-up costs.

    .venv/bin/python benchmarks/bench_retrieval.py [--sizes 1000 5000] [--k 128] [--model tiny|small]
        [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from pipelines.retrieval import Embeddings, metrics, retrieve, retrieve_row_by_row  # noqa: E402
from tiny_models_bench import tiny_model  # noqa: E402

from blip2.tokenizer import build_qformer_tokenizer, shapes_vocabulary  # noqa: E402
from pipelines.shapes.captions import caption_for  # noqa: E402
from pipelines.shapes.scene import sample_scene  # noqa: E402

TOKENIZER = build_qformer_tokenizer(vocab_words=shapes_vocabulary())


def embeddings(model, n_images: int, per_image: int = 5, seed: int = 0) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    feats, embeds = [], []
    device = model.query_tokens.device
    with torch.inference_mode():
        for start in range(0, n_images, 256):
            images = torch.randn(min(256, n_images - start), 3, 32, 32, generator=g)
            f, e = model.image_embeddings(images.to(device))
            feats.append(f.cpu())
            embeds.append(e.cpu())
        nt = n_images * per_image
        rng = np.random.default_rng(seed)
        captions = [caption_for(sample_scene(rng), rng) for _ in range(nt)]
        # as the reference: every text padded to max_length 35
        batch = TOKENIZER(captions, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
        text_feats = torch.cat([model.text_embeddings(ids[a:a + 1024].to(device), mask[a:a + 1024].to(device)).cpu()
                                for a in range(0, nt, 1024)])
        print(f"{nt} captions, mean length {mask.sum(1).float().mean():.1f} tokens (padded to 35)", flush=True)
    txt2img = np.repeat(np.arange(n_images), per_image)
    return Embeddings(torch.cat(feats), torch.cat(embeds), text_feats, ids, mask, txt2img,
                      [list(range(i * per_image, (i + 1) * per_image)) for i in range(n_images)])


def small_model_and_embeddings(n_images: int, per_image: int = 5, seed: int = 0, device: str = "cpu"):
    """The ambition's small config (Q-Former 256 wide, 4 layers, 32 queries, BERT-size vocabulary) over image
    tokens 257 x 384, with random image tokens and ITC features: what ITM costs at realistic proportions."""
    from blip2.config import Blip2Config, QFormerConfig, tiny_vision
    from blip2.stage1 import Blip2Stage1

    q = QFormerConfig(hidden_size=256, layers=4, heads=4, intermediate_size=1024, num_query_tokens=32,
                      vocab_size=max(30523, len(TOKENIZER)), embed_dim=256, dropout=0.0)
    vision = dataclasses.replace(tiny_vision(), width=384)
    torch.manual_seed(seed)
    model = Blip2Stage1(Blip2Config(name="small", vision=vision, qformer=q, llm=None, max_text_length=35),
                        visual=torch.nn.Identity()).eval().to(device)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    nt = n_images * per_image
    batch = TOKENIZER([caption_for(sample_scene(rng), rng) for _ in range(nt)], padding="max_length",
                      truncation=True, max_length=35, return_tensors="pt")
    ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
    with torch.inference_mode():
        text_feats = torch.cat([model.text_embeddings(ids[a:a + 1024].to(device), mask[a:a + 1024].to(device))
                                for a in range(0, nt, 1024)]).cpu()
    image_feats = torch.nn.functional.normalize(torch.randn(n_images, 32, 256, generator=g), dim=-1)
    image_embeds = torch.randn(n_images, 257, 384, generator=g)
    emb = Embeddings(image_feats, image_embeds, text_feats, ids, mask, np.repeat(np.arange(n_images), per_image),
                     [list(range(i * per_image, (i + 1) * per_image)) for i in range(n_images)])
    return model, emb


def subset(emb: Embeddings, n_images: int, per_image: int = 5) -> Embeddings:
    nt = n_images * per_image
    return Embeddings(emb.image_feats[:n_images], emb.image_embeds[:n_images], emb.text_feats[:nt],
                      emb.text_ids[:nt], emb.text_mask[:nt], emb.txt2img[:nt], emb.img2txt[:n_images])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny",
                        help="small: the ambition's Q-Former 256x4, 32 queries, image tokens 257 x 384")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = tiny_model(vocab_size=len(TOKENIZER))
    rows, all_identical = {}, True
    for n in args.sizes:
        if args.model == "small":
            model, emb = small_model_and_embeddings(n, device=args.device)
        else:
            emb = embeddings(model, n)
        model, emb = model.to(device), emb.to(device)
        if device.type == "cuda":  # warm-up: kernels loaded, cuBLAS/cuDNN handles made, for both procedures
            warm = subset(emb, min(n, 64))
            retrieve(model, warm, k=min(args.k, 64), use_gpu=None)
            retrieve_row_by_row(model, warm, k=min(args.k, 64))
        sync()
        started = time.perf_counter()
        ours = retrieve(model, emb, k=args.k, use_gpu=None if device.type == "cuda" else False)
        sync()
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        ref = retrieve_row_by_row(model, emb, k=args.k)
        sync()
        ref_s = time.perf_counter() - started
        m_ours, m_ref = metrics(ours, emb), metrics(ref, emb)
        identical = m_ours == m_ref
        all_identical &= identical
        rows[n] = {"images": n, "texts": 5 * n, "k": args.k, "device": str(device),
                   "row_by_row_s": round(ref_s, 2), "ours_s": round(ours_s, 2), "speedup": round(ref_s / ours_s, 2),
                   "row_by_row_phases_s": {k: round(v, 2) for k, v in ref.seconds.items()},
                   "ours_phases_s": {k: round(v, 2) for k, v in ours.seconds.items()},
                   "itm_pairs": {"row_by_row": ref.itm_pairs, "ours": ours.itm_pairs},
                   "metrics_identical": identical, "metrics": m_ours,
                   **({} if identical else {"metrics_row_by_row": m_ref})}
        print(n, rows[n], flush=True)
    last = rows[args.sizes[-1]]
    name = "retrieval" if args.model == "tiny" else "retrieval_small"
    write_result(name + ("" if device.type == "cpu" else "_" + device.type),
                 baseline={"what": "row-by-row (the reference's procedure)", "seconds": last["row_by_row_s"]},
                 candidate={"what": "FAISS first stage + one batched ITM pass", "seconds": last["ours_s"]},
                 ratio=last["row_by_row_s"] / last["ours_s"], units="wall-time speed-up at the largest N",
                 goal=">= 3x faster, identical metrics", extra={"sizes": rows, "device": str(device)})
    if not all_identical:
        sys.exit("the two procedures' metrics differ (see metrics_row_by_row above)")


if __name__ == "__main__":
    main()
