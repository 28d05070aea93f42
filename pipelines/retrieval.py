"""ITC-then-ITM retrieval (SPEC section 7) on precomputed embeddings, two ways that give the same metrics.

* `retrieve` (ours): a FAISS first stage per direction that returns the exact top-k of the max-over-queries
  ITC score, then ONE batched ITM pass over the union of both directions' candidate pairs (a pair found by
  both is scored once), grouped by image so that each image's cross-attention keys/values are computed once
  per chunk of images and indexed for its pairs.
* `retrieve_row_by_row` (the reference's procedure, the baseline of tests and benchmarks): the full ITC
  matrix, then for every image and then for every text its top-k by `topk`, each row's k pairs through ITM
  with the image's keys/values recomputed for every pair.

Why the FAISS stage is exact. i2t: index the texts, search with every query vector of an image for its top-k
texts. If text t is in the image's top-k by s(i, t) = max_q <q, t>, take the query q* that attains it: any
text above t for q* also has a higher s, so fewer than k texts are above t for q*, i.e. t is in q*'s top-k,
returned with its exact score. The max over the returned scores of each text is therefore exact for every
text of the true top-k. t2i: index every image's query vectors; in the list of vectors sorted by score for a
text, the images in order of first appearance are the images sorted by s. So the first k distinct images of
a long enough prefix are the exact top-k; the prefix grows until it holds k distinct images.
Ties are broken by the lower id in both procedures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

ScoreFn = Callable[[torch.Tensor, list, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Embeddings:
    """What retrieval needs of a test set, computed once (see pipelines.evaluate.embed_test_set)."""

    image_feats: torch.Tensor  # (Ni, Q, E) normalised query features (ITC)
    image_embeds: torch.Tensor  # (Ni, T, C) ln_vision image tokens (ITM)
    text_feats: torch.Tensor  # (Nt, E) normalised [CLS] features (ITC)
    text_ids: torch.Tensor  # (Nt, L) token ids (ITM)
    text_mask: torch.Tensor  # (Nt, L)
    txt2img: np.ndarray  # (Nt,) the image of each text
    img2txt: list[list[int]]  # per image, its texts

    def __post_init__(self) -> None:
        ni, nt = self.image_feats.shape[0], self.text_feats.shape[0]
        if ni == 0 or nt == 0:
            raise ValueError(f"retrieval needs images and texts: got {ni} images, {nt} texts")
        if self.image_feats.shape[-1] != self.text_feats.shape[-1]:
            raise ValueError(f"embedding dimension mismatch: image queries {tuple(self.image_feats.shape)}, "
                             f"texts {tuple(self.text_feats.shape)}")
        if self.image_embeds.shape[0] != ni or self.text_ids.shape[0] != nt or len(self.txt2img) != nt \
                or len(self.img2txt) != ni:
            raise ValueError("retrieval embeddings: image/text tensors and the id mappings disagree in length")

    def to(self, device: torch.device | str) -> "Embeddings":
        """The same embeddings with every tensor on `device` (the id mappings stay numpy/lists)."""
        return Embeddings(self.image_feats.to(device), self.image_embeds.to(device), self.text_feats.to(device),
                          self.text_ids.to(device), self.text_mask.to(device), self.txt2img, self.img2txt)


@dataclass
class Candidates:
    """Per row its k candidate ids (columns) and their scores, best first (ties: lower id first)."""

    ids: np.ndarray  # (rows, k) int64
    scores: np.ndarray  # (rows, k) float32


@dataclass
class RetrievalResult:
    i2t: Candidates  # per image: texts, final scores (ITM + ITC), best first
    t2i: Candidates  # per text: images
    i2t_itc: Candidates  # the first stage's candidates (ITC cosine)
    t2i_itc: Candidates
    itm_pairs: int  # pairs scored by ITM
    seconds: dict[str, float] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- first stage
def _order(ids: np.ndarray, scores: np.ndarray, k: int) -> Candidates:
    """Sort each row by (score desc, id asc) and keep k."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return Candidates(np.take_along_axis(ids, order, 1).astype(np.int64),
                      np.take_along_axis(scores, order, 1).astype(np.float32))


def _best_per_id(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[Candidates, np.ndarray]:
    """Per row: each distinct id once with its highest score, the k best (score desc, id asc). Also returns how
    many distinct ids each row had (rows with fewer than k are padded with id -1, score -inf)."""
    rows, width = ids.shape
    order = np.lexsort((ids, -scores), axis=-1)
    ids_sorted = np.take_along_axis(ids, order, 1)
    scores_sorted = np.take_along_axis(scores, order, 1)
    keys = (np.arange(rows, dtype=np.int64)[:, None] * (int(ids.max()) + 2) + ids_sorted + 1).ravel()
    _, first = np.unique(keys, return_index=True)  # first occurrence = that id's best score in its row
    first.sort()
    row_of = first // width
    distinct = np.bincount(row_of, minlength=rows)
    rank_in_row = np.arange(len(first)) - np.repeat(np.cumsum(distinct) - distinct, distinct)
    keep = rank_in_row < k
    out_ids = np.full((rows, k), -1, dtype=np.int64)
    out_scores = np.full((rows, k), -np.inf, dtype=np.float32)
    out_ids[row_of[keep], rank_in_row[keep]] = ids_sorted.ravel()[first[keep]]
    out_scores[row_of[keep], rank_in_row[keep]] = scores_sorted.ravel()[first[keep]]
    return Candidates(out_ids, out_scores), distinct


def _flat_ip_index(vectors: np.ndarray, use_gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def faiss_gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def itc_topk_faiss(image_feats: torch.Tensor, text_feats: torch.Tensor, k: int,
                   use_gpu: bool | None = None) -> tuple[Candidates, Candidates]:
    """Exact top-k of the max-over-queries ITC score in both directions with FAISS inner-product indexes.
    -> (i2t candidates (Ni, k), t2i candidates (Nt, k_img)), k clipped to the number of columns."""
    use_gpu = faiss_gpu_available() if use_gpu is None else use_gpu
    ni, q, e = image_feats.shape
    nt = text_feats.shape[0]
    queries = image_feats.float().reshape(ni * q, e).cpu().numpy()
    texts = text_feats.float().cpu().numpy()
    # image -> text: every query vector's top-k texts, the best score per text
    k_txt = min(k, nt)
    scores, ids = _flat_ip_index(texts, use_gpu).search(queries, k_txt)
    i2t, _ = _best_per_id(ids.reshape(ni, q * k_txt), scores.reshape(ni, q * k_txt), k_txt)
    # text -> image: a prefix of the query vectors sorted by score, grown until it holds k distinct images
    k_img = min(k, ni)
    index = _flat_ip_index(queries, use_gpu)
    t2i = Candidates(np.empty((nt, k_img), np.int64), np.empty((nt, k_img), np.float32))
    todo, depth = np.arange(nt), min(2 * k_img, ni * q)
    while len(todo):
        scores, ids = index.search(np.ascontiguousarray(texts[todo]), depth)
        found, distinct = _best_per_id(ids // q, scores, k_img)
        done = (distinct >= k_img) | (depth >= ni * q)
        t2i.ids[todo[done]], t2i.scores[todo[done]] = found.ids[done], found.scores[done]
        todo, depth = todo[~done], min(depth * 4, ni * q)
    return i2t, t2i


def itc_matrix(image_feats: torch.Tensor, text_feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The full (Ni, Nt) max-over-queries cosine, NOT divided by temp, computed a chunk of images at a time."""
    texts_t = text_feats.float().t()
    rows = [torch.einsum("cqe,et->cqt", image_feats[a:a + chunk].float(), texts_t).amax(1)
            for a in range(0, image_feats.shape[0], chunk)]
    return torch.cat(rows)


def itc_topk_exact(image_feats: torch.Tensor, text_feats: torch.Tensor, k: int) -> tuple[Candidates, Candidates]:
    """Brute force: the same top-k as `itc_topk_faiss` from the full ITC matrix (torch)."""
    sim = itc_matrix(image_feats, text_feats).cpu().numpy()
    k_txt, k_img = min(k, sim.shape[1]), min(k, sim.shape[0])
    cols = np.broadcast_to(np.arange(sim.shape[1]), sim.shape)
    rows = np.broadcast_to(np.arange(sim.shape[0]), sim.T.shape)
    return _order(cols, sim, k_txt), _order(rows, np.ascontiguousarray(sim.T), k_img)


# -------------------------------------------------------------------------------------------- ITM
LENGTH_BUCKET = 4  # texts whose lengths differ by less than this share batches (padding <= 3 tokens)


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal consecutive values: (value, start, length) of each run."""
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return values[starts], starts, np.diff(np.r_[starts, len(values)])


def auto_batch_size(model, emb: Embeddings, activation_floats: int | None = None) -> int:
    """Pairs per ITM batch whose hidden states ((Q + L) x hidden) hold about `activation_floats` floats: large
    enough to amortise per-op costs, small enough to stay in cache on CPU (bigger batches ran slower there);
    on a GPU 16x more, to fill the device and keep launches few."""
    if activation_floats is None:
        activation_floats = 1 << 20 if emb.image_embeds.device.type == "cpu" else 1 << 24
    rows = model.query_tokens.shape[1] + emb.text_ids.shape[1]
    return max(8, activation_floats // (rows * model.cfg.qformer.hidden_size))


def itm_pair_scores(model, emb: Embeddings, images: np.ndarray, texts: np.ndarray, batch_size: int | None = None,
                    image_chunk: int = 256, progress: bool = False) -> np.ndarray:
    """ITM class-1 logit (mean over queries) of the pairs (images[p], texts[p]), batched. Per chunk of images
    the cross-attention keys/values are computed once; the chunk's pairs go by text-length bucket, then by
    image, so a batch is padded only to its own longest text (the reference pads every text to max_length
    35) and holds runs of pairs of one image, which share that image's keys/values without copies
    (`SharedImageKV`: a run's query rows attend as one block). Returns scores in input order."""
    from blip2.qformer import SharedImageKV

    batch_size = batch_size or auto_batch_size(model, emb)
    lengths = emb.text_mask.sum(1).cpu().numpy()
    chunks = images // image_chunk
    order = np.lexsort((texts, images, lengths[texts] // LENGTH_BUCKET, chunks))
    sorted_images, sorted_chunks = images[order], chunks[order]
    out = np.empty(len(images), dtype=np.float32)
    bar = tqdm(total=len(images), desc="ITM pairs", disable=not progress, mininterval=1.0)
    with torch.inference_mode():
        for first in range(0, emb.image_embeds.shape[0], image_chunk):
            lo, hi = np.searchsorted(sorted_chunks, [first // image_chunk, first // image_chunk + 1])
            if lo == hi:
                continue
            chunk_kv = model.qformer.image_kv(emb.image_embeds[first:first + image_chunk])
            for start in range(lo, hi, batch_size):
                rows = order[start:min(start + batch_size, hi)]
                groups, starts, counts = _runs(sorted_images[start:start + len(rows)] - first)
                index = torch.from_numpy(groups).to(emb.image_embeds.device)
                kv = [None if kv is None else SharedImageKV(kv[0].index_select(0, index), kv[1].index_select(0, index),
                                                            counts.tolist()) for kv in chunk_kv]
                text_rows = torch.from_numpy(texts[rows]).to(emb.text_ids.device)
                mask = emb.text_mask.index_select(0, text_rows)
                length = int(mask.sum(1).max())
                ids = emb.text_ids.index_select(0, text_rows)[:, :length]
                out[rows] = model.itm_pass(kv, ids, mask[:, :length])[:, 1].float().cpu().numpy()
                bar.update(len(rows))
    bar.close()
    return out


def rerank(itc: Candidates, itm: np.ndarray) -> Candidates:
    """Final score = ITM logit + ITC cosine, re-sorted (score desc, id asc)."""
    return _order(itc.ids, itc.scores + itm.reshape(itc.ids.shape), itc.ids.shape[1])


def retrieve(model, emb: Embeddings, k: int = 128, batch_size: int | None = None, image_chunk: int = 256,
             use_gpu: bool | None = None, progress: bool = False) -> RetrievalResult:
    """Ours: FAISS first stage, one batched ITM pass over the distinct candidate pairs of both directions."""
    seconds = {}
    started = time.perf_counter()
    i2t_itc, t2i_itc = itc_topk_faiss(emb.image_feats, emb.text_feats, k, use_gpu)
    seconds["first_stage"] = time.perf_counter() - started
    ni, nt = emb.image_feats.shape[0], emb.text_feats.shape[0]
    i2t_keys = (np.arange(ni)[:, None] * nt + i2t_itc.ids).ravel()
    t2i_keys = (t2i_itc.ids * nt + np.arange(nt)[:, None]).ravel()
    keys = np.unique(np.concatenate([i2t_keys, t2i_keys]))
    started = time.perf_counter()
    itm = itm_pair_scores(model, emb, keys // nt, keys % nt, batch_size, image_chunk, progress)
    seconds["itm"] = time.perf_counter() - started
    i2t = rerank(i2t_itc, itm[np.searchsorted(keys, i2t_keys)])
    t2i = rerank(t2i_itc, itm[np.searchsorted(keys, t2i_keys)])
    return RetrievalResult(i2t, t2i, i2t_itc, t2i_itc, itm_pairs=len(keys), seconds=seconds)


def retrieve_row_by_row(model, emb: Embeddings, k: int = 128, progress: bool = False) -> RetrievalResult:
    """The reference's procedure: full ITC matrix; per image, then per text, topk and one ITM batch of the row's
    k pairs, each pair's image keys/values computed anew (`itm_scores` of the repeated image tokens). As the
    reference, each row's results are written into tensors on the embeddings' device and read back once."""
    seconds = {}
    started = time.perf_counter()
    sim = itc_matrix(emb.image_feats, emb.text_feats)
    seconds["first_stage"] = time.perf_counter() - started
    ni, nt = sim.shape
    k_txt, k_img = min(k, nt), min(k, ni)
    started = time.perf_counter()
    new = lambda rows, width, dtype: torch.empty(rows, width, dtype=dtype, device=sim.device)  # noqa: E731
    i2t_ids, i2t_itc, i2t_final = new(ni, k_txt, torch.long), new(ni, k_txt, torch.float), new(ni, k_txt, torch.float)
    t2i_ids, t2i_itc, t2i_final = new(nt, k_img, torch.long), new(nt, k_img, torch.float), new(nt, k_img, torch.float)
    with torch.inference_mode():
        for i in tqdm(range(ni), desc="i2t rows", disable=not progress, mininterval=1.0):
            top_sim, top_idx = sim[i].topk(k_txt)
            itm = model.itm_scores(emb.image_embeds[i:i + 1].expand(k_txt, -1, -1), emb.text_ids[top_idx],
                                   emb.text_mask[top_idx])
            i2t_ids[i], i2t_itc[i], i2t_final[i] = top_idx, top_sim, itm + top_sim
        for t in tqdm(range(nt), desc="t2i rows", disable=not progress, mininterval=1.0):
            top_sim, top_idx = sim[:, t].topk(k_img)
            itm = model.itm_scores(emb.image_embeds[top_idx], emb.text_ids[t:t + 1].expand(k_img, -1),
                                   emb.text_mask[t:t + 1].expand(k_img, -1))
            t2i_ids[t], t2i_itc[t], t2i_final[t] = top_idx, top_sim, itm + top_sim
    i2t_ids, i2t_itc, i2t_final, t2i_ids, t2i_itc, t2i_final = (
        x.cpu().numpy() for x in (i2t_ids, i2t_itc, i2t_final, t2i_ids, t2i_itc, t2i_final))
    seconds["itm"] = time.perf_counter() - started
    return RetrievalResult(_order(i2t_ids, i2t_final, k_txt), _order(t2i_ids, t2i_final, k_img),
                           _order(i2t_ids, i2t_itc, k_txt), _order(t2i_ids, t2i_itc, k_img),
                           itm_pairs=(ni * k_txt + nt * k_img), seconds=seconds)


def metrics(result: RetrievalResult, emb: Embeddings) -> dict[str, float]:
    """Recall metrics of a result (pipelines.metrics), plus chance R@1 (one image in Ni: 100 / Ni both ways)
    and, as `itc_*`, the first stage's recall on its own (what the ITM rerank adds or costs)."""
    from pipelines.metrics import i2t_ranks, recall_metrics, t2i_ranks

    def recalls(i2t: Candidates, t2i: Candidates) -> dict[str, float]:
        return recall_metrics(i2t_ranks(i2t.ids, i2t.scores, emb.img2txt), t2i_ranks(t2i.ids, t2i.scores, emb.txt2img))

    out = recalls(result.i2t, result.t2i)
    first_stage = recalls(result.i2t_itc, result.t2i_itc)
    out.update({f"itc_{name}": first_stage[name] for name in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")})
    out["chance_r1"] = 100.0 / emb.image_feats.shape[0]
    return out
