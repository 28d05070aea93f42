"""Caption generation with the stage-1 Q-Former decoder (the ITG path): greedy, nucleus, beam search.

Each step runs the text rows over the cached query keys/values with the UniLM mask, starting from
[DEC]; a caption ends at [SEP]. Captions are short (<= 30 tokens), so each step simply re-runs the
whole prefix instead of keeping a text key/value cache.
"""
from __future__ import annotations

import torch

from blip2.qformer import KV


def next_token_logits(model, query_kv: list[KV], ids: torch.Tensor) -> torch.Tensor:
    """Logits of the token after `ids` (B, L) given each row's query keys/values.  -> (B, V)"""
    hidden = model.itg_hidden(query_kv, ids, torch.ones_like(ids))[:, -1]  # (B, D)
    return model.itg_head(hidden, model.qformer.embeddings.word_embeddings.weight).float()


def _forbid(logits: torch.Tensor, model, sep_id: int, length: int, min_length: int) -> torch.Tensor:
    logits[:, model.pad_token_id] = -float("inf")
    logits[:, model.dec_token_id] = -float("inf")
    if length < min_length:
        logits[:, sep_id] = -float("inf")
    return logits


def nucleus_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability reaches top_p.  (B, V) -> (B,)"""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the token that crosses top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1)
    return order.gather(-1, choice).squeeze(-1)


def strip(ids: torch.Tensor, sep_id: int, pad_id: int) -> list[list[int]]:
    """Drop the leading [DEC] and everything from [SEP] on."""
    out = []
    for row in ids.tolist():
        row = row[1:]
        out.append([t for t in (row[: row.index(sep_id)] if sep_id in row else row) if t != pad_id])
    return out


@torch.no_grad()
def qformer_generate(model, image: torch.Tensor, sep_id: int, max_length: int = 30, min_length: int = 3,
                     top_p: float | None = None, num_beams: int = 1,
                     generator: torch.Generator | None = None) -> list[list[int]]:
    batch = image.shape[0]
    _, query_kv = model.query_pass(model.qformer.image_kv(model.encode_image(image)), batch)
    if num_beams > 1:
        return beam_search(model, query_kv, batch, sep_id, max_length, min_length, num_beams)
    ids = torch.full((batch, 1), model.dec_token_id, dtype=torch.long, device=image.device)
    done = torch.zeros(batch, dtype=torch.bool, device=image.device)
    for _ in range(max_length - 1):
        logits = _forbid(next_token_logits(model, query_kv, ids), model, sep_id, ids.shape[1], min_length)
        token = nucleus_sample(logits, top_p, generator) if top_p else logits.argmax(-1)  # (B,)
        token = token.masked_fill(done, model.pad_token_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == sep_id
        if done.all():
            break
    return strip(ids, sep_id, model.pad_token_id)


def beam_search(model, query_kv: list[KV], batch: int, sep_id: int, max_length: int, min_length: int,
                num_beams: int) -> list[list[int]]:
    """Keep `num_beams` hypotheses per image; finished ones are scored by mean log-probability."""
    kv = [(k.repeat_interleave(num_beams, 0), v.repeat_interleave(num_beams, 0)) for k, v in query_kv]
    device = kv[0][0].device
    ids = torch.full((batch * num_beams, 1), model.dec_token_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch, num_beams, device=device)
    scores[:, 1:] = -float("inf")  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    for _ in range(max_length - 1):
        logp = torch.log_softmax(_forbid(next_token_logits(model, kv, ids), model, sep_id, ids.shape[1],
                                         min_length), dim=-1)  # (B*K, V)
        vocab = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(batch, num_beams * vocab)
        top, index = total.topk(2 * num_beams, dim=-1)  # (B, 2K) candidates
        next_ids, next_scores = [], []
        for b in range(batch):
            keep = []
            for score, flat in zip(top[b].tolist(), index[b].tolist()):
                beam, token = divmod(flat, vocab)
                row = ids[b * num_beams + beam].tolist() + [token]
                if token == sep_id:
                    finished[b].append((score / (len(row) - 1), row))
                elif len(keep) < num_beams and score > -float("inf"):
                    keep.append((score, row))
            filler = ids[b * num_beams].tolist() + [model.pad_token_id]  # a dead beam, never expanded
            keep += [(-float("inf"), filler)] * (num_beams - len(keep))
            next_scores.append([s for s, _ in keep])
            next_ids.extend(r for _, r in keep)
        ids = torch.tensor(next_ids, device=device)
        scores = torch.tensor(next_scores, device=device)
        if all(len(f) >= num_beams for f in finished):
            break
    best = []
    for b in range(batch):
        alive = [(s / (ids.shape[1] - 1), ids[b * num_beams + k].tolist())
                 for k, s in enumerate(scores[b].tolist()) if s > -float("inf")]
        best.append(max(finished[b] + alive, key=lambda x: x[0])[1])
    return [strip(torch.tensor([row]), sep_id, model.pad_token_id)[0] for row in best]
