"""Stage 1: vision-language representation learning with a frozen image encoder (SPEC section 3).

One forward computes the three losses on a batch:
- ITC: max-over-queries similarity between the query pass and the text pass, over the global batch;
- ITM: 3B (image, text) pairs with hard negatives drawn over the global batch;
- ITG: text generation conditioned on the queries (UniLM mask), reusing the query pass's keys/values.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip2 import dist
from blip2.config import Blip2Config
from blip2.losses import linear_cross_entropy
from blip2.qformer import KV, QFormer, itg_mask, padding_mask

LABEL_SMOOTHING = 0.1
TEMP_RANGE = (0.001, 0.5)


@dataclass
class Stage1Output:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    sim_i2t: torch.Tensor  # (B, N) ITC logits of the local images against the global batch's texts
    itm_pairs: int  # pairs in the ITM pass (3B unless a row had no negative to draw)


class ITGHead(nn.Module):
    """BERT's LM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings (+ bias)."""

    def __init__(self, hidden: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)  # (B, L, V)

    def loss(self, hidden: torch.Tensor, word_embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Label-smoothed CE of the logits of `hidden` (n, D) against `targets` (n,), without materialising
        all the (n, V) logits at once (see blip2.losses)."""
        return linear_cross_entropy(self.transform(hidden), word_embeddings, self.bias, targets, LABEL_SMOOTHING)


class Blip2Stage1(nn.Module):
    def __init__(self, cfg: Blip2Config, visual: nn.Module | None = None, dec_token_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        q = cfg.qformer
        if visual is None:
            from blip2.vision import build_image_encoder

            visual = build_image_encoder(cfg.vision)
        self.visual = visual  # frozen, eval-locked
        self.ln_vision = nn.LayerNorm(cfg.vision.width, eps=cfg.vision.ln_vision_eps)
        self.qformer = QFormer(q, cfg.vision.width, text_input=True)
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query_tokens, q.hidden_size) * 0.02)
        self.vision_proj = nn.Linear(q.hidden_size, q.embed_dim)
        self.text_proj = nn.Linear(q.hidden_size, q.embed_dim)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        self.itg_head = ITGHead(q.hidden_size, q.vocab_size, q.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(cfg.temp_init))
        self.dec_token_id = q.vocab_size - 1 if dec_token_id is None else dec_token_id
        self.pad_token_id = q.pad_token_id
        if q.bert_weights:  # SPEC: text parts from BERT-base, cross-attention random
            from blip2.bert_init import init_from_bert

            self.bert_init_report = init_from_bert(self, q.bert_weights)

    # ----------------------------------------------------------------------------- the passes
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Frozen encoder -> trainable ln_vision.  (B, T, C)"""
        return self.ln_vision(self.visual(image).to(self.ln_vision.weight.dtype))

    def query_pass(self, image_kv: list[KV | None], batch: int) -> tuple[torch.Tensor, list[KV]]:
        """Queries only, bidirectional, cross-attending to the image. -> (B, Q, D), per-layer keys/values"""
        queries = self.qformer.embed(self.query_tokens.expand(batch, -1, -1), None)
        return self.qformer(queries, self.query_tokens.shape[1], image_kv=image_kv, return_kv=True)

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text only, padding mask, no cross-attention. -> the [CLS] output (B, D)"""
        hidden, _ = self.qformer(self.qformer.embed(None, input_ids), 0, padding_mask(attention_mask), last_rows=1)
        return hidden[:, 0]

    def itm_pass(self, image_kv: list[KV | None], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        """Queries + text, bidirectional, queries cross-attend. -> ITM logits (P, 2), mean over queries"""
        pairs, num_queries = input_ids.shape[0], self.query_tokens.shape[1]
        hidden = self.qformer.embed(self.query_tokens.expand(pairs, -1, -1), input_ids)
        query_mask = torch.ones(pairs, num_queries, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = padding_mask(torch.cat([query_mask, attention_mask], dim=1))
        out, _ = self.qformer(hidden, num_queries, mask, image_kv=image_kv, last_rows=num_queries)  # (P, Q, D)
        return self.itm_head(out).mean(dim=1)

    def itg_hidden(self, query_kv: list[KV], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text rows, [CLS] replaced by [DEC], attend to the cached query keys/values and to earlier text.
        -> (B, L, D), row i predicting token i + 1"""
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        mask = itg_mask(self.query_tokens.shape[1], attention_mask)
        hidden, _ = self.qformer(self.qformer.embed(None, dec_ids), 0, mask, prefix_kv=query_kv)
        return hidden

    def itg_loss(self, query_kv: list[KV], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token CE with label smoothing over the non-pad targets; the vocabulary head runs only on
        the rows that predict one (not on the last row, nor on padding)."""
        hidden = self.itg_hidden(query_kv, input_ids, attention_mask)[:, :-1]  # (B, L-1, D)
        targets = input_ids[:, 1:]
        predicting = attention_mask[:, 1:].bool()
        return self.itg_head.loss(hidden[predicting], self.qformer.embeddings.word_embeddings.weight,
                                  targets[predicting])

    # ----------------------------------------------------------------------------- the losses
    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None) -> Stage1Output:
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)
        batch = image.shape[0]
        image_embeds = self.encode_image(image)  # (B, T, C)
        image_kv = self.qformer.image_kv(image_embeds)
        query_out, query_kv = self.query_pass(image_kv, batch)  # (B, Q, D)
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)  # (B, Q, E)
        text_feat = F.normalize(self.text_proj(self.text_pass(input_ids, attention_mask)), dim=-1)  # (B, E)

        sim_i2t, sim_t2i, positives = self.itc_logits(image_feats, text_feat, image_ids)
        loss_itc = itc_loss(sim_i2t, sim_t2i, positives)
        itm_logits, itm_labels = self.itm_logits(image_embeds, image_kv, input_ids, attention_mask,
                                                 sim_i2t, sim_t2i, positives)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        loss_itg = self.itg_loss(query_kv, input_ids, attention_mask)
        return Stage1Output(loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm,
                            loss_itg=loss_itg, sim_i2t=sim_i2t.detach(), itm_pairs=itm_logits.shape[0])

    def itc_logits(self, image_feats: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Max-over-queries similarities / temp against the global batch, and the positive mask (B, N)."""
        gather = dist.gather_with_grad if self.cfg.itc_gather_grad else dist.gather_no_grad
        image_feats_all, text_feat_all = gather(image_feats), gather(text_feat)  # (N, Q, E), (N, E)
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_feat_all).amax(-1) / self.temp  # (B, N)
        sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_feats_all).amax(-1) / self.temp  # (B, N)
        return sim_i2t, sim_t2i, positive_mask(image_feats.shape[0], sim_i2t.shape[1], image_ids)

    def itm_logits(self, image_embeds: torch.Tensor, image_kv: list[KV | None], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                   positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positives, (negative image, text) and (image, negative text) pairs -> logits (P, 2), labels (P,)"""
        neg_image_rows, neg_images = draw_negatives(sim_t2i, positives)  # for each local text
        neg_text_rows, neg_texts = draw_negatives(sim_i2t, positives)  # for each local image
        ids_all = dist.gather_padded(input_ids, self.pad_token_id)  # (N, L')
        mask_all = dist.gather_padded(attention_mask, 0)
        length = max(input_ids.shape[1], ids_all.shape[1])
        pad = lambda x, v: F.pad(x, (0, length - x.shape[1]), value=v)  # noqa: E731
        text_ids = torch.cat([pad(input_ids, self.pad_token_id), pad(input_ids[neg_image_rows], self.pad_token_id),
                              pad(ids_all[neg_texts], self.pad_token_id)])
        text_mask = torch.cat([pad(attention_mask, 0), pad(attention_mask[neg_image_rows], 0),
                               pad(mask_all[neg_texts], 0)])
        kv = self.pair_image_kv(image_embeds, image_kv, neg_images, neg_text_rows)
        logits = self.itm_pass(kv, text_ids, text_mask)
        labels = torch.cat([torch.ones(input_ids.shape[0]), torch.zeros(len(neg_images) + len(neg_texts))])
        return logits, labels.long().to(logits.device)

    def pair_image_kv(self, image_embeds: torch.Tensor, image_kv: list[KV | None], neg_images: torch.Tensor,
                      own_rows: torch.Tensor) -> list[KV | None]:
        """Keys/values of the ITM pairs' images, [own; drawn negatives; own[own_rows]], built from the
        query pass's cache instead of recomputing them for 3B images."""
        kv_neg = self.negative_image_kv(image_embeds, image_kv, neg_images)
        return [None if pos is None else tuple(torch.cat([pos[j], neg[j], pos[j].index_select(0, own_rows)])
                                               for j in (0, 1))
                for pos, neg in zip(image_kv, kv_neg)]

    def negative_image_kv(self, image_embeds: torch.Tensor, image_kv: list[KV | None],
                          neg_images: torch.Tensor) -> list[KV | None]:
        """Keys/values of the drawn negative images: indexed from this rank's cache when one rank holds the
        whole batch, else computed from the gathered (gradient-carrying) image embeddings."""
        _, world = dist.rank_and_world()
        if world == 1:
            return [None if kv is None else (kv[0].index_select(0, neg_images), kv[1].index_select(0, neg_images))
                    for kv in image_kv]  # index_select: its backward (index_add) is far cheaper than index_put
        return self.qformer.image_kv(dist.gather_with_grad(image_embeds).index_select(0, neg_images))


    # ------------------------------------------------------------------------ inference API
    @torch.no_grad()
    def image_embeddings(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> normalised query features (B, Q, E) for ITC, and ln_vision image tokens (B, T, C) for ITM."""
        image_embeds = self.encode_image(image)
        query_out, _ = self.query_pass(self.qformer.image_kv(image_embeds), image.shape[0])
        return F.normalize(self.vision_proj(query_out), dim=-1), image_embeds

    @torch.no_grad()
    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> normalised [CLS] text features (B, E)."""
        return F.normalize(self.text_proj(self.text_pass(input_ids, attention_mask)), dim=-1)

    @staticmethod
    def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Max-over-queries cosine, NOT divided by temp (SPEC section 7).  (Ni, Q, E) x (Nt, E) -> (Ni, Nt)"""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(-1)

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM class-1 logit (mean over queries) of each (image_embeds[i], text i) pair.  -> (P,)"""
        return self.itm_pass(self.qformer.image_kv(image_embeds), input_ids, attention_mask)[:, 1]

    @torch.no_grad()
    def generate_captions(self, image: torch.Tensor, sep_token_id: int, max_length: int = 30,
                          min_length: int = 3, top_p: float | None = None, num_beams: int = 1,
                          generator: torch.Generator | None = None) -> list[list[int]]:
        """Captions from the Q-Former decoder ([DEC] first, stops at [SEP]): greedy, nucleus or beam."""
        from blip2.generate import qformer_generate

        return qformer_generate(self, image, sep_token_id, max_length, min_length, top_p, num_beams, generator)

def image_ids_tensor(ids: list[str] | list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Image ids of any kind (urls, keys, ints) as int64 for image-id-aware ITC (the reference crashes on
    strings): equal ids map to equal numbers (a 63-bit blake2b digest; collisions are negligible)."""
    def as_int(value) -> int:
        if isinstance(value, int):
            return value
        return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little") >> 1
    return torch.tensor([as_int(v) for v in ids], dtype=torch.long, device=device)


def positive_mask(batch: int, global_batch: int, image_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, N) True where text n belongs to local image b: the diagonal at this rank's offset, or the
    same image id (datasets that repeat an image with several captions)."""
    rank, _ = dist.rank_and_world()
    if image_ids is None:
        targets = rank * batch + torch.arange(batch)
        return F.one_hot(targets, global_batch).bool()
    ids_all = dist.gather_no_grad(image_ids)  # (N,)
    return (image_ids[:, None] == ids_all[None, :]).cpu()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """½(CE(i2t) + CE(t2i)) with label smoothing 0.1; targets spread evenly over each row's positives."""
    targets = positives.float().to(sim_i2t.device)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2


@torch.no_grad()
def draw_negatives(sim: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per row, drawn with probability softmax(sim) over the non-positives.

    Returns (rows that had a negative to draw, the drawn global indices). Rows whose every candidate is a
    positive (e.g. a global batch of one) draw nothing; rows with NaN/Inf similarities draw uniformly."""
    positives = positives.to(sim.device)
    logits = sim.float().masked_fill(positives, -10000.0)
    weights = torch.softmax(logits, dim=1).masked_fill(positives, 0.0)
    bad = ~torch.isfinite(weights).all(dim=1) | (weights.sum(dim=1) <= 0)
    weights[bad] = (~positives[bad]).float()
    rows = torch.nonzero((~positives).any(dim=1)).flatten()
    if rows.numel() == 0:
        return rows, rows
    return rows, torch.multinomial(weights[rows], 1).flatten()
