"""Stage-1 initialisation of the Q-Former from BERT-base (SPEC section 1).

From a local directory holding transformers' `BertForMaskedLM` (or `BertModel`, or the original
`BertForPreTraining`) weights, as safetensors or a pytorch .bin (read with weights_only=True):

    BERT                                              ours
    embeddings.word_embeddings        (V_bert rows)   qformer.embeddings.word_embeddings rows 0..V_bert-1
                                                      (the appended [DEC] row keeps its random init)
    embeddings.position_embeddings                    qformer.embeddings.position_embeddings (+ token type 0,
                                                      see below; rows beyond ours are dropped)
    embeddings.LayerNorm                              qformer.qformer.layernorm
    encoder.layer.i.attention.self.{query,key,value}  ....layer.i.attention.attention.{query,key,value}
    encoder.layer.i.attention.output.{dense,LayerNorm} ...layer.i.attention.output.{dense,LayerNorm}
    encoder.layer.i.intermediate.dense                ....layer.i.intermediate.dense  (text FFN; then copied
    encoder.layer.i.output.{dense,LayerNorm}          ....layer.i.output.*             into the query FFN)
    cls.predictions.transform.{dense,LayerNorm}       itg_head.{dense,layer_norm}
    cls.predictions.bias                              itg_head.bias rows 0..V_bert-1 (decoder = word embeddings)

Cross-attention layers, the query tokens and the stage-1 projections stay random.
BERT adds token-type embedding 0 to every token; our embeddings have no token types, so by default that
vector is folded into every position embedding (exact: the text pass then IS the BERT encoder). The
reference implementation drops it instead (`fold_token_type=False`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
IGNORED_BERT = (r"pooler\..*", r"cls\.seq_relationship\..*", r"cls\.predictions\.decoder\.weight",
                r"cls\.predictions\.decoder\.bias", r"embeddings\.position_ids",
                r"embeddings\.token_type_embeddings\..*")


@dataclass
class BertInitReport:
    loaded: list[str] = field(default_factory=list)  # our keys filled from BERT
    copied: list[str] = field(default_factory=list)  # query-FFN keys copied from the (BERT) text FFN
    left_random: list[str] = field(default_factory=list)  # our Q-Former / ITG keys not from BERT
    ignored: list[str] = field(default_factory=list)  # BERT keys not used
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ reading
def read_bert_weights(bert_dir: str) -> dict[str, torch.Tensor]:
    """BERT tensors with the `bert.` prefix removed and old LayerNorm names (gamma/beta) renamed."""
    candidates = [os.path.join(bert_dir, name) for name in ("model.safetensors", "pytorch_model.bin")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(f"{bert_dir}: no model.safetensors or pytorch_model.bin (expected a local "
                                "bert-base-uncased directory, e.g. `huggingface-cli download bert-base-uncased`)")
    try:
        raw = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                                 weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable BERT weights ({error})") from error
    out = {}
    for key, value in raw.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value.float()
    return out


def check_bert_config(bert_dir: str, qformer) -> list[str]:
    """Compare config.json (when present) with our Q-Former; raise on an architecture mismatch."""
    path = os.path.join(bert_dir, "config.json")
    if not os.path.isfile(path):
        return [f"{path} not found: architecture checked from the tensor shapes only"]
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    cfg = qformer.cfg
    want = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu"}
    wrong = [f"{key}: BERT {config.get(key)!r}, Q-Former {value!r}" for key, value in want.items()
             if config.get(key) != value]
    if wrong:
        raise ValueError(f"{path}: this BERT does not fit the Q-Former: " + "; ".join(wrong))
    eps = config.get("layer_norm_eps")
    return [] if eps == cfg.layer_norm_eps else [f"BERT layer_norm_eps {eps} != Q-Former {cfg.layer_norm_eps}"]


# ------------------------------------------------------------------------------------------ the map
def bert_layer_count(bert: dict[str, torch.Tensor]) -> int:
    found = {int(m.group(1)) for key in bert if (m := re.match(r"encoder\.layer\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


def plan_bert_map(bert: dict[str, torch.Tensor], layers: int, has_head: bool) -> dict[str, str]:
    """our key -> BERT key for everything copied whole (embeddings are handled separately)."""
    found = bert_layer_count(bert)
    if found != layers:
        raise ValueError(f"BERT has {found} layers, the Q-Former {layers}")
    plan = {f"qformer.qformer.layernorm.{p}": f"embeddings.LayerNorm.{p}" for p in ("weight", "bias")}
    ours = {"attention.self.query": "attention.attention.query", "attention.self.key": "attention.attention.key",
            "attention.self.value": "attention.attention.value"}
    for i in range(layers):
        for part in LAYER_PARTS:
            for p in ("weight", "bias"):
                plan[f"qformer.qformer.encoder.layer.{i}.{ours.get(part, part)}.{p}"] = \
                    f"encoder.layer.{i}.{part}.{p}"
    if has_head:
        for p in ("weight", "bias"):
            plan[f"itg_head.dense.{p}"] = f"cls.predictions.transform.dense.{p}"
            plan[f"itg_head.layer_norm.{p}"] = f"cls.predictions.transform.LayerNorm.{p}"
    return plan


def embedding_rows(bert: dict[str, torch.Tensor], fold_token_type: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """word / position embedding rows (and the MLM bias) to copy into the first rows of ours."""
    notes = []
    rows = {"qformer.embeddings.word_embeddings.weight": bert["embeddings.word_embeddings.weight"]}
    positions = bert["embeddings.position_embeddings.weight"]
    token_types = bert.get("embeddings.token_type_embeddings.weight")
    if token_types is not None and fold_token_type:
        positions = positions + token_types[0]
        notes.append("token_type_embeddings[0] folded into the position embeddings")
    elif token_types is not None:
        notes.append("token_type_embeddings dropped (as the reference does)")
    rows["qformer.embeddings.position_embeddings.weight"] = positions
    bias = bert.get("cls.predictions.bias", bert.get("cls.predictions.decoder.bias"))
    if bias is not None:
        rows["itg_head.bias"] = bias
    return rows, notes


# ------------------------------------------------------------------------------------------ apply
@torch.no_grad()
def init_from_bert(model, bert_dir: str, fold_token_type: bool = True) -> BertInitReport:
    """Initialise a `Blip2Stage1`'s Q-Former text path and ITG head from BERT (see the module docstring)."""
    bert = read_bert_weights(bert_dir)
    required = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")
    if any(key not in bert for key in required):
        raise ValueError(f"{bert_dir}: not BERT weights (expected {list(required)})")
    report = BertInitReport(notes=check_bert_config(bert_dir, model.qformer))
    has_head = "cls.predictions.transform.dense.weight" in bert
    if not has_head:
        report.notes.append("no MLM head in the checkpoint (a BertModel): the ITG head stays random")
    plan = plan_bert_map(bert, len(model.qformer.layers), has_head)
    rows, notes = embedding_rows(bert, fold_token_type)
    report.notes += notes
    own = model.state_dict()
    absent = sorted(b for b in plan.values() if b not in bert)
    wrong = [f"{b}: BERT {tuple(bert[b].shape)}, ours {tuple(own[o].shape)}" for o, b in plan.items()
             if b in bert and bert[b].shape != own[o].shape]
    wrong += [f"{o}: BERT {tuple(t.shape)}, ours {tuple(own[o].shape)} (BERT may have fewer rows, not more "
              "columns or more vocabulary)" for o, t in rows.items() if not _fits_rows(t, own[o], o)]
    if absent or wrong:
        raise ValueError(f"{bert_dir}: BERT weights do not fit the Q-Former: "
                         + "; ".join(([f"missing {absent}"] if absent else []) + wrong))
    for ours, theirs in plan.items():
        own[ours].copy_(bert[theirs])
        report.loaded.append(ours)
    for ours, tensor in rows.items():
        count = min(tensor.shape[0], own[ours].shape[0])
        own[ours][:count].copy_(tensor[:count])
        report.loaded.append(ours)
        if count < own[ours].shape[0]:
            report.notes.append(f"{ours}: rows {count}..{own[ours].shape[0] - 1} keep their random init")
        if count < tensor.shape[0]:
            report.notes.append(f"{ours}: BERT rows {count}..{tensor.shape[0] - 1} not used (fewer positions)")
    model.qformer.copy_text_ffn_to_query_ffn()
    bias_key = "cls.predictions.bias" if "cls.predictions.bias" in bert else "cls.predictions.decoder.bias"
    used = set(plan.values()) | {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", bias_key}
    if fold_token_type:
        used.add("embeddings.token_type_embeddings.weight")
    _finish_report(report, model, bert, used)
    return report


def _fits_rows(bert_tensor: torch.Tensor, ours: torch.Tensor, key: str) -> bool:
    """Same trailing shape; fewer rows allowed everywhere, more rows only for positions (cut)."""
    if bert_tensor.shape[1:] != ours.shape[1:]:
        return False
    return "position_embeddings" in key or bert_tensor.shape[0] <= ours.shape[0]


def _finish_report(report: BertInitReport, model, bert: dict[str, torch.Tensor], used: set[str]) -> None:
    query_ffn = re.compile(r".*\.(intermediate_query|output_query)\..*")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad
                 and name.startswith(("qformer.", "itg_head."))]
    report.copied = [name for name in trainable if query_ffn.fullmatch(name)]
    report.left_random = [name for name in trainable if name not in report.loaded and name not in report.copied]
    report.ignored = sorted(key for key in bert if key not in used)
    unknown = [key for key in report.ignored if not any(re.fullmatch(p, key) for p in IGNORED_BERT)]
    if unknown:
        report.notes.append(f"BERT keys not recognised (not used): {unknown}")
