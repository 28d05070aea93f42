"""The Q-Former (SPEC section 1), built from transformers' own `Blip2QFormerModel` modules.

The weights are literally transformers' modules (`self.qformer` is a `Blip2QFormerModel`, `self.embeddings`
a `Blip2TextEmbeddings`), so checkpoints map 1:1 onto `Blip2QFormerModel` / `Blip2ForImageTextRetrieval`.
The forward is ours, written for the three stage-1 passes:
- fused attention (`scaled_dot_product_attention`) with one boolean mask per pass;
- the cross-attention keys/values of each image are computed once (`image_kv`) and reused by every pass
  that looks at that image (the query pass and the 3B-pair ITM pass);
- a pass can prepend cached self-attention keys/values (`prefix_kv`): the ITG pass attends to the query
  pass's keys/values instead of recomputing the query rows, as the reference does with past_key_values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

from blip2.config import QFormerConfig

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, heads, T, head_dim) each


@dataclass
class SharedImageKV:
    """Cross-attention keys/values of G images, each shared by a run of consecutive rows of the batch (rows
    counts[0] use image 0, the next counts[1] image 1, ...): retrieval's ITM pairs, grouped by image. The rows
    of one image attend as one longer query block, so no per-row copy of the image's keys/values is made."""

    key: torch.Tensor  # (G, heads, T, head_dim)
    value: torch.Tensor
    counts: list[int]


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout as F.dropout, but on the CPU with a random mask drawn as 16-bit integers, which
    is about twice as fast there as F.dropout's bernoulli (drop probability p to within 1e-5)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    noise = torch.randint(-32768, 32767, x.shape, dtype=torch.int16, device=x.device)  # 65535 levels
    return x * (noise >= -32768 + round(p * 65535)) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module) -> None:
    """Swap every nn.Dropout inside `module` for `Dropout` (no parameters: state dicts are unchanged)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))


def hf_qformer_config(cfg: QFormerConfig, encoder_width: int, text_input: bool) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=0.02,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=encoder_width,
        use_qformer_text_input=text_input,
    )


class QFormer(nn.Module):
    """Queries and text share self-attention; only query rows cross-attend; each has its own FFN."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, text_input: bool = True):
        super().__init__()
        self.cfg = cfg
        hf_cfg = hf_qformer_config(cfg, encoder_width, text_input)
        self.embeddings = Blip2TextEmbeddings(hf_cfg) if text_input else None
        self.qformer = Blip2QFormerModel(hf_cfg)
        use_fast_dropout(self.qformer)
        self.heads = cfg.heads
        self.head_dim = cfg.hidden_size // cfg.heads
        if self.embeddings is not None:
            for emb in (self.embeddings.word_embeddings, self.embeddings.position_embeddings):
                nn.init.normal_(emb.weight, std=0.02)
            self.copy_text_ffn_to_query_ffn()

    @property
    def layers(self) -> nn.ModuleList:
        return self.qformer.encoder.layer

    @torch.no_grad()
    def copy_text_ffn_to_query_ffn(self) -> None:
        """Stage-1 initialisation: each layer's query FFN starts as a copy of its text FFN."""
        for layer in self.layers:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())

    # ------------------------------------------------------------------------------------ inputs
    def embed(self, query_embeds: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        """[queries; word + position embeddings of the text] -> LayerNorm -> dropout.  (B, Q+L, D)"""
        if input_ids is None:
            hidden = query_embeds
        else:
            hidden = self.embeddings(input_ids=input_ids, query_embeds=query_embeds)
        hidden = hidden.to(self.qformer.layernorm.weight.dtype)
        return self.qformer.dropout(self.qformer.layernorm(hidden))

    def image_kv(self, image_embeds: torch.Tensor) -> list[KV | None]:
        """Cross-attention keys/values of every cross-attention layer for these images (None elsewhere)."""
        image_embeds = image_embeds.to(self.qformer.layernorm.weight.dtype)  # (B, T, C)
        kv: list[KV | None] = []
        for layer in self.layers:
            if not layer.has_cross_attention:
                kv.append(None)
                continue
            attention = layer.crossattention.attention
            kv.append((self._split(attention.key(image_embeds)), self._split(attention.value(image_embeds))))
        return kv

    # ---------------------------------------------------------------------------------- forward
    def forward(self, hidden: torch.Tensor, query_length: int, self_mask: torch.Tensor | None = None,
                image_kv: list[KV | None] | None = None, prefix_kv: list[KV] | None = None,
                return_kv: bool = False, last_rows: int | None = None) -> tuple[torch.Tensor, list[KV] | None]:
        """Run every layer over `hidden` (B, S, D), the first `query_length` rows being queries.

        self_mask: boolean, True = may attend, broadcastable to (B, 1, S, P+S) with P the prefix length.
        image_kv: from `image_kv`, required when there are query rows. prefix_kv: per-layer keys/values
        prepended to this pass's own (cached query rows). last_rows: only the first `last_rows` rows of
        the output are wanted (the ITM pass reads the queries, the text pass [CLS]), so the last layer
        computes nothing else for the other rows. Returns the output (B, S or last_rows, D) and, with
        `return_kv`, this pass's own per-layer self-attention keys/values.
        """
        own_kv: list[KV] = []
        for i, layer in enumerate(self.layers):
            prefix = prefix_kv[i] if prefix_kv is not None else None
            rows = last_rows if i == len(self.layers) - 1 else None
            attended, kv = self._self_attention(layer.attention, hidden, self_mask, prefix, rows)
            own_kv.append(kv)
            if query_length > 0:
                queries = attended[:, :query_length]  # (B, Q, D)
                if layer.has_cross_attention:
                    queries = self._cross_attention(layer.crossattention, queries, image_kv[i])
                queries = layer.output_query(layer.intermediate_query(queries), queries)
                if attended.shape[1] > query_length:
                    text = attended[:, query_length:]  # (B, L, D)
                    queries = torch.cat([queries, layer.output(layer.intermediate(text), text)], dim=1)
                hidden = queries
            else:
                hidden = layer.output(layer.intermediate(attended), attended)
        return hidden, (own_kv if return_kv else None)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, heads, S, head_dim)"""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, S, head_dim) -> (B, S, D)"""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.heads * self.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        p = self.cfg.dropout if self.training else 0.0
        if p == 0.0 or q.device.type != "cpu":  # fused kernels (with their own dropout on GPUs)
            return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p))
        # CPU training: no fused kernel takes dropout there, so write it out with the cheaper dropout
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2)  # (B, H, S, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return self._merge(dropout(scores.softmax(dim=-1), p, True) @ v)

    def _self_attention(self, block, hidden: torch.Tensor, mask: torch.Tensor | None, prefix: KV | None,
                        rows: int | None = None) -> tuple[torch.Tensor, KV]:
        """Self-attention sub-layer; with `rows`, only the first `rows` rows attend (all still serve as keys)."""
        attention = block.attention
        k, v = self._split(attention.key(hidden)), self._split(attention.value(hidden))
        keys, values = (k, v) if prefix is None else (torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2))
        if rows is not None:
            hidden = hidden[:, :rows]
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[..., :rows, :]
        q = self._split(attention.query(hidden))
        return block.output(self._attend(q, keys, values, mask), hidden), (k, v)

    def _cross_attention(self, block, queries: torch.Tensor, kv: KV | SharedImageKV) -> torch.Tensor:
        q = self._split(block.attention.query(queries))  # (B, H, Q, d)
        if isinstance(kv, SharedImageKV):
            return block.output(self._merge(self._attend_shared(q, kv)), queries)
        return block.output(self._attend(q, kv[0], kv[1], None), queries)

    def _attend_shared(self, q: torch.Tensor, kv: SharedImageKV) -> torch.Tensor:
        """Inference, -> (B, H, Q, d). CPU: per image, no copies; GPU: one fused call, since a launch per image
        would cost more there than gathering the keys/values per row."""
        return (attend_shared_blocks if q.device.type == "cpu" else attend_shared_gathered)(q, kv)


def attend_shared_blocks(q: torch.Tensor, kv: SharedImageKV) -> torch.Tensor:
    """Each image's rows as one (1, H, n*Q, d) query block against its keys/values.  -> (B, H, Q, d)"""
    _, heads, length, dim = q.shape
    out, start = [], 0
    for g, n in enumerate(kv.counts):
        block = q[start:start + n].transpose(0, 1).reshape(1, heads, n * length, dim)
        att = F.scaled_dot_product_attention(block, kv.key[g:g + 1], kv.value[g:g + 1])
        out.append(att.reshape(heads, n, length, dim).transpose(0, 1))
        start += n
    return torch.cat(out)


def attend_shared_gathered(q: torch.Tensor, kv: SharedImageKV) -> torch.Tensor:
    """One attention call over the batch, each row's image keys/values gathered.  -> (B, H, Q, d)"""
    counts = torch.tensor(kv.counts).to(q.device, non_blocking=True)
    rows = torch.repeat_interleave(torch.arange(len(kv.counts), device=q.device), counts, output_size=q.shape[0])
    return F.scaled_dot_product_attention(q, kv.key.index_select(0, rows), kv.value.index_select(0, rows))


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 -> (B, 1, 1, S) boolean key mask."""
    return attention_mask.bool()[:, None, None, :]


def itg_mask(query_length: int, text_mask: torch.Tensor) -> torch.Tensor:
    """UniLM mask for the text rows of the ITG pass: all queries + earlier non-pad text.  (B, 1, L, Q+L)"""
    batch, length = text_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()  # (L, L)
    text_keys = causal[None] & text_mask.bool()[:, None, :]  # (B, L, L)
    query_keys = torch.ones(batch, length, query_length, dtype=torch.bool, device=text_mask.device)
    return torch.cat([query_keys, text_keys], dim=2)[:, None]
