"""Config and result of the foundation step (pydantic, `extra="forbid"`), and the step's constants."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.config import StepConfig
from pipelines.shapes.captions import STYLES

STEP = "foundation"
MODELS = ("clip", "captioner", "opt", "t5")
CaptionStyle = Literal[STYLES]  # a name from pipelines.shapes.captions.STYLES
VQA_TEMPLATES = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}  # blip2.stage2's VQA prompts


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClipConfig(_Section):
    """Tiny open_clip CLIP: a ViT image tower (`layers` blocks; stage 1 keeps layers - 1) + a text transformer.

    Phase 1 (`region_steps`) trains the image tower alone on the region loss; phase 2 (`steps`) trains both
    towers with ClipLoss + hard negatives (+ `region_weight` x the region loss)."""

    width: int = Field(64, ge=16)
    layers: int = Field(3, ge=2)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: int = Field(8, ge=2)
    text_width: int = Field(64, ge=16)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    embed_dim: int = Field(64, ge=8)
    context_length: int = Field(32, ge=8, description="BPE tokens per caption (open_clip SimpleTokenizer)")
    region_steps: int = Field(1600, ge=0, description="phase 1: image-tower steps on the region loss alone. The "
                              "demo's CLIP after 800 / 1600 / 3200: held-out region shape accuracy 84 / 90 / 90%, true "
                              "caption above a wrong-attribute one 76 / 82 / 85%, CapFilt kept-correct on one set of "
                              "candidates 77.8 / 82.4 / 82.1% (one run each; 800 more steps cost ~60 s here)")
    steps: int = Field(300, ge=1, description="phase 2: contrastive steps")
    batch: int = Field(64, ge=2)
    lr: float = Field(4e-3, gt=0)
    hard_negatives: int = Field(3, ge=0, description="wrong-attribute / partial captions per image (phase 2)")
    spam_negatives: int = Field(8, ge=0, description="spam captions per batch (phase 2)")
    region_weight: float = Field(1.0, ge=0, description="weight of the region loss next to ClipLoss in phase 2")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ClipConfig":
        for width, heads, name in ((self.width, self.heads, "heads"), (self.text_width, self.text_heads, "text_heads")):
            if width % heads:
                raise ValueError(f"clip.{name}={heads} must divide the width {width}")
        return self


class CaptionerConfig(_Section):
    """Tiny BLIP captioner: a ViT shaped like the CLIP image tower (initialised from the trained CLIP, as BLIP
    starts from a pretrained ViT, and fine-tuned with the captioning loss at `vit_lr`, as BLIP fine-tunes its
    ViT for captioning) + a BERT-style text decoder cross-attending to it."""

    image_size: int | None = Field(None, ge=16, description="its input size (None: the CLIP's `image_size`); a "
                                   "larger one resizes the CLIP's position embeddings to the finer patch grid. The "
                                   "demo's is the downloaded 96 (the CLIP's 64): held-out samples 78% correct against "
                                   "72%, CapFilt kept-correct 78% against 71% (same data, one run each), for 3 more "
                                   "minutes of training")
    text_width: int = Field(64, ge=16)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_length: int = Field(40, ge=8, description="tokens per caption, [DEC] and [SEP] included")
    styles: list[CaptionStyle] = Field(
        default_factory=lambda: ["plain"],
        description="the shapes world's caption styles it learns to write (pipelines/shapes/captions.py). One style, "
                    "as a BLIP captioner writes in one manner: the CLIP ranker's score moves more with a caption's "
                    "wording than with its truth (within an image, captions stating sizes scored 0.9 standard "
                    "deviations below those that did not, correct ones 0.1 above wrong ones), so candidates in mixed "
                    "styles are ranked by style. CapFilt kept-correct on the demo's web split (one run each, 3000 "
                    "steps): all six styles 53%, four without positions or relations 64%, 'plain' with sizes 71%")
    order: Literal["reading", "shuffled"] = Field(
        "reading", description="the order its training captions name the objects in: 'reading' (top to bottom, then "
        "left to right), as a captioner that writes in one manner describes a scene, or 'shuffled' (random). In "
        "reading order a caption is a function of the scene (up to synonyms), so the ten nucleus samples differ in "
        "what they say, not in the order they say it: the demo's captioner (2400 steps, same CLIP) wrote held-out "
        "samples 84% correct against 77%, CapFilt kept-correct 88.8-89.0% against 82.4-82.9% (CapFilt seeds 0-2)")
    object_count_power: float = Field(
        0.0, ge=0, description="its batches draw a training image with probability proportional to its scene's "
        "object count to this power (0: all alike), to practise the crowded scenes it gets wrong most. At 1 against 0 "
        "(reading order, 2400 steps, the demo's CLIP; one training run each): held-out samples 86.7% correct against "
        "84.0%, CapFilt kept-correct 89.9 / 89.9 / 90.2% against 88.8 / 89.0 / 89.0% (CapFilt seeds 0-2); at 2: "
        "88.2-88.4%. Off by default: stage 1 trained on that CapFilt output lost its ITM re-ranking on text->image "
        "retrieval (R@1 48.8 / 42.9% after ITM against 68.2 / 68.8% from ITC alone, stage-1 seeds 0 / 1), where "
        "at 0 ITM keeps it (75.5 / 67.8% against 78.3 / 69.1%; session 25); why is not understood")
    size_share: float = Field(1.0, ge=0, le=1, description="share of its training captions that state every size")
    position_share: float = Field(0.0, ge=0, le=1, description="share that state every position (styles 'there_is' "
                                  "and 'relation' always place the objects)")
    steps: int = Field(2400, ge=1, description="held-out nucleus samples correct after 1500 / 3000 / 6000 steps (all "
                       "styles, ViT lr 2e-3): 37 / 49 / 60%. The demo's (96 px, on the 1600-step CLIP) after 2400 / "
                       "3000: 79.2 / 80.8%, CapFilt kept-correct 81.5 / 82.8% (one run each), 279 / 368 s")
    batch: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    vit_lr: float = Field(1e-3, ge=0, description="peak lr of the ViT (same schedule as `lr`); 0 keeps it frozen. "
                          "At 2e-3, 3000 steps: greedy captions 56% correct against 69% at 1e-3 (one run each)")
    vit_frozen_blocks: int = Field(0, ge=0, description="the ViT's lowest blocks (and its patch embedding) kept as "
                                   "the CLIP's while the blocks above fine-tune: their outputs are computed once per "
                                   "image, so a step runs only the blocks above. The demo's captioner with 2 of 3 "
                                   "frozen trained in 165 s against 281 s, but held-out samples were 66.7% correct "
                                   "against 77.1% and CapFilt kept 75.0% correct against 82.9% (1 frozen: 242 s, "
                                   "63.6%; session 22, one run each)")
    samples: int = Field(10, ge=1, description="nucleus samples per held-out image for the figure")

    @field_validator("styles")
    @classmethod
    def _some_styles(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"captioner.styles is empty: expected one or more of {list(STYLES)}")
        return value

    @model_validator(mode="after")
    def _heads_divide(self) -> "CaptionerConfig":
        if self.text_width % self.text_heads:
            raise ValueError(f"captioner.text_heads={self.text_heads} must divide text_width {self.text_width}")
        return self


class LanguageModelConfig(_Section):
    """A tiny OPT or FlanT5-shaped T5 (stage 2 needs hidden >= 64, ffn 128 for the Q-Former to steer it)."""

    hidden_size: int = Field(64, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ffn_dim: int = Field(128, ge=16)
    steps: int = Field(300, ge=1)
    batch: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    context_share: float = Field(0.5, ge=0, le=1, description="share of training texts whose later part depends on "
                                 "an earlier caption of the same scene ('caption . caption', 'caption . Question: "
                                 ".. Answer: ..'): a real LLM has read such text, and zero-shot VQA relies on it")

    @model_validator(mode="after")
    def _heads_divide(self) -> "LanguageModelConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"heads={self.heads} must divide hidden_size {self.hidden_size}")
        return self


class OptConfig(LanguageModelConfig):
    """The tiny OPT (stage 2's LLM in the demo): trained longer, on text after a caption of the same scene only.
    Its own class, so that overriding one field (`opt.layers=4`) keeps the others' defaults."""

    steps: int = Field(2400, ge=1, description="at 2400 (~60 s) it answers a question from the caption before it "
                       "with some object's attribute (colour and shape questions ~60% right, one of the caption's "
                       "objects at random); at 9600 (~220 s) it binds the question's colour to its shape (shape "
                       "100%) and stage 2 through it names 50% of the test objects instead of 32%, VQA 47% instead "
                       "of 41%, CIDEr 2.13 instead of 1.62 (session 21), but the demo then takes 21 minutes; and "
                       "that was one draw: retrained on one thread (only float rounding differs) the 9600-step OPT "
                       "did not bind (shape 64%, session 24)")
    batch: int = Field(32, ge=1)
    context_share: float = Field(1.0, ge=0, le=1, description=LanguageModelConfig.model_fields["context_share"]
                                 .description)


class T5Config(LanguageModelConfig):
    """The tiny FlanT5-shaped T5 (for FlanT5-style stage 2 runs)."""

    steps: int = Field(150, ge=1)


class FoundationConfig(StepConfig):
    """Config of the foundation step."""

    curated: str | list[str] = Field(description="webdataset shards of the curated split (img2dataset layout)")
    image_size: int = Field(64, ge=16)
    seed: int = Field(0, ge=0)
    held_out: int = Field(100, ge=1, description="curated images kept out of training, for the figures")
    views: int = Field(8, ge=0, description="extra rendered images per training image, for the image models")
    new_scenes: bool = Field(True, description="the extra images show newly sampled scenes (true) or re-render the "
                             "curated ones with new jitter and noise (false). The stand-ins stand for models "
                             "trained elsewhere on far more data; on the curated scenes alone the CLIP overfits "
                             "(held-out shape from its region-pooled tokens 75% vs 94% on training images; with new "
                             "scenes 84-86% vs 90%)")
    models: list[Literal["clip", "captioner", "opt", "t5"]] = Field(default_factory=lambda: list(MODELS))
    clip: ClipConfig = Field(default_factory=ClipConfig)
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    opt: OptConfig = Field(
        default_factory=OptConfig,
        description="stage 2's LLM in the demo, trained on text after a caption of the same scene only: stage 2's "
                    "captions and answers always follow visual prompts, and an LLM that does not read the text before "
                    "cannot be steered by them (held-out answers from a caption before: 25% after 600 steps of "
                    "batch 64, 52% after 2400 of batch 32, 55% after 3000; stage 2's VQA colour accuracy 13% -> 54%)")
    t5: T5Config = Field(default_factory=T5Config,
                                    description="for FlanT5-style stage 2 runs (the demo's stage 2 uses the OPT)")

    @field_validator("models")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"models={value}: expected a non-empty list of distinct names from {MODELS}")
        return value

    @property
    def captioner_image_size(self) -> int:
        return self.captioner.image_size or self.image_size

    @model_validator(mode="after")
    def _consistent(self) -> "FoundationConfig":
        if self.image_size % self.clip.patch_size:
            raise ValueError(f"clip.patch_size={self.clip.patch_size} must divide image_size {self.image_size}")
        if self.captioner_image_size % self.clip.patch_size:
            raise ValueError(f"clip.patch_size={self.clip.patch_size} must divide captioner.image_size "
                             f"{self.captioner_image_size}")
        if self.captioner.vit_frozen_blocks > self.clip.layers:
            raise ValueError(f"captioner.vit_frozen_blocks={self.captioner.vit_frozen_blocks}: the ViT has "
                             f"clip.layers={self.clip.layers} blocks")
        if "captioner" in self.models and "clip" not in self.models:
            raise ValueError(f"models={self.models}: the captioner's ViT is the CLIP's, so 'clip' must be trained too")
        return self


class FoundationResult(BaseModel):
    """What one foundation run wrote (a model's dir is None when it was not asked for)."""

    output_dir: str
    clip_dir: str | None = None
    captioner_dir: str | None = None
    opt_dir: str | None = None
    t5_dir: str | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)  # per model: figures, losses, seconds
    samples: dict[str, int] = Field(default_factory=dict)  # train / held_out / skipped
    seconds: float = 0.0
    reused: bool = False  # True when an identical earlier run's recorded result was returned
