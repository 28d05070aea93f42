"""Architecture presets: frozen dataclasses, built by plain functions (no registries).

`tiny` is random-init and runs in seconds on a CPU; the paper presets describe the published models
(their frozen parts load from a local directory, or from the hub when online).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

VisionKind = Literal["open_clip", "eva_clip", "hf", "tiny"]
LLMKind = Literal["opt", "t5"]


@dataclass(frozen=True)
class VisionConfig:
    """A frozen image encoder, already cut to the blocks BLIP-2 keeps (the last block is dropped)."""

    kind: VisionKind
    name: str  # open_clip model name, HF repo id / local dir, or "tiny"
    weights: str | None = None  # open_clip: local file or pretrained tag; hf: local dir (overrides name)
    width: int = 1024  # token width C
    layers: int = 23  # blocks kept = the model's blocks - 1
    heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    ln_vision_eps: float = 1e-5  # the trainable LayerNorm on top (LAVIS: 1e-5; see SPEC section 8)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class QFormerConfig:
    """BERT-base shaped Q-Former (SPEC section 1)."""

    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    vocab_size: int = 30523  # BERT uncased 30522 + [DEC]
    max_position_embeddings: int = 512
    embed_dim: int = 256  # ITC projection width
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    bert_weights: str | None = None  # local BERT-base directory for initialisation


@dataclass(frozen=True)
class LLMConfig:
    kind: LLMKind
    name: str  # HF repo id or local dir, or "tiny"
    hidden_size: int = 2560
    layers: int = 32
    heads: int = 32
    ffn_dim: int = 10240
    vocab_size: int = 50272
    d_kv: int = 64  # T5 only


@dataclass(frozen=True)
class Blip2Config:
    name: str
    vision: VisionConfig
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = None
    max_text_length: int = 32
    temp_init: float = 0.07
    itc_gather_grad: bool = False  # reference: gathered ITC features carry no gradient

    def with_llm(self, llm: LLMConfig | None) -> "Blip2Config":
        return replace(self, llm=llm)


# ---------------------------------------------------------------------------------- vision presets
def vit_l_14(weights: str | None = "openai") -> VisionConfig:
    """CLIP ViT-L/14 (OpenAI weights need QuickGELU), 24 blocks of which 23 are kept."""
    return VisionConfig(kind="open_clip", name="ViT-L-14-quickgelu", weights=weights, width=1024, layers=23,
                        heads=16, mlp_dim=4096, patch_size=14, layer_norm_eps=1e-5)


def eva_vit_g_14(weights: str | None = None) -> VisionConfig:
    """EVA-CLIP ViT-g/14 (EVA01-g-14), 40 blocks of which 39 are kept."""
    return VisionConfig(kind="eva_clip", name="EVA01-g-14", weights=weights, width=1408, layers=39, heads=16,
                        mlp_dim=6144, patch_size=14, layer_norm_eps=1e-6)


def tiny_vision(image_size: int = 32, patch_size: int = 8, width: int = 48, layers: int = 2) -> VisionConfig:
    """A random EVA-shaped (transformers Blip2VisionModel) encoder for tests."""
    return VisionConfig(kind="tiny", name="tiny", width=width, layers=layers, heads=4, mlp_dim=2 * width,
                        patch_size=patch_size, image_size=image_size, layer_norm_eps=1e-5)


# ------------------------------------------------------------------------------------- LLM presets
def opt(size: str) -> LLMConfig:
    shapes = {"2.7b": (2560, 32, 32, 10240), "6.7b": (4096, 32, 32, 16384)}
    hidden, layers, heads, ffn = shapes[size]
    return LLMConfig(kind="opt", name=f"facebook/opt-{size}", hidden_size=hidden, layers=layers, heads=heads,
                     ffn_dim=ffn, vocab_size=50272)


def flan_t5(size: str) -> LLMConfig:
    shapes = {"xl": (2048, 24, 32, 5120), "xxl": (4096, 24, 64, 10240)}
    hidden, layers, heads, ffn = shapes[size]
    return LLMConfig(kind="t5", name=f"google/flan-t5-{size}", hidden_size=hidden, layers=layers, heads=heads,
                     ffn_dim=ffn, vocab_size=32128, d_kv=64)


def tiny_llm(kind: LLMKind = "opt", vocab_size: int = 128) -> LLMConfig:
    return LLMConfig(kind=kind, name="tiny", hidden_size=32, layers=2, heads=2, ffn_dim=64,
                     vocab_size=vocab_size, d_kv=16)


# ----------------------------------------------------------------------------------------- presets
def tiny_qformer(vocab_size: int = 128) -> QFormerConfig:
    return QFormerConfig(hidden_size=32, layers=2, heads=4, intermediate_size=64, num_query_tokens=4,
                         vocab_size=vocab_size, max_position_embeddings=64, embed_dim=16)


def preset(name: str) -> Blip2Config:
    """`tiny`, `tiny-t5`, or one of the paper's: vitl-opt2.7b, vitg-opt2.7b, vitg-opt6.7b,
    vitl-flant5xl, vitg-flant5xl, vitg-flant5xxl (stage 1 uses the same preset without the LLM)."""
    if name == "tiny":
        return Blip2Config(name=name, vision=tiny_vision(), qformer=tiny_qformer(), llm=tiny_llm("opt"),
                           max_text_length=16)
    if name == "tiny-t5":
        return Blip2Config(name=name, vision=tiny_vision(), qformer=tiny_qformer(), llm=tiny_llm("t5"),
                           max_text_length=16)
    vision = {"vitl": vit_l_14, "vitg": eva_vit_g_14}
    llms = {"opt2.7b": lambda: opt("2.7b"), "opt6.7b": lambda: opt("6.7b"),
            "flant5xl": lambda: flan_t5("xl"), "flant5xxl": lambda: flan_t5("xxl")}
    encoder, _, llm = name.partition("-")
    if encoder not in vision or llm not in llms:
        raise ValueError(f"unknown preset {name!r}: expected tiny, tiny-t5 or one of {PAPER_PRESETS}")
    return Blip2Config(name=name, vision=vision[encoder](), llm=llms[llm]())


PAPER_PRESETS = ("vitl-opt2.7b", "vitg-opt2.7b", "vitg-opt6.7b", "vitl-flant5xl", "vitg-flant5xl", "vitg-flant5xxl")
