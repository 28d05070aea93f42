"""CapFilt's two models and its filter (SPEC section 6): a captioner that writes k synthetic captions per image
by nucleus sampling, a CLIP ranker that scores image-caption pairs by the cosine of their normalised
embeddings, and `rank_candidates`, which keeps the top two. `CaptionActor` / `RankActor` wrap the models for
Ray Data's actor pools.

Captioners (`load_captioner(spec, ...)`), each loaded in its library's native way:
* an HF dir / hub id of a transformers `BlipForConditionalGeneration` (+ `BlipProcessor`) or
  `Blip2ForConditionalGeneration` (+ `Blip2Processor`), told apart by the config's `model_type`;
* `stage2:<checkpoint dir>`: this platform's own stage-2 checkpoint (`blip2.checkpoint.load_model`).

Determinism: the captions of an image depend only on (seed, image key, model). Generation runs batched,
but sampling is done by `KeyedNucleusSampler`: row j of image `key` draws its tokens with the uniforms of
`numpy.random.default_rng([seed, hash(key), j])`, so neither batch composition nor executor changes them.

Ranker (`ClipRanker`): an open_clip model name: "local-dir:/path", "hf-hub:org/repo", or a built-in name
such as "ViT-L-14-quickgelu" with `weights` a pretrained tag or a local file; its own preprocess and
tokenizer.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor

from blip2.utils import hub_offline, looks_like_local_path

log = logging.getLogger(__name__)

STAGE2_PREFIX = "stage2:"
STAGE2_DEFAULT_PROMPT = "a photo of"  # as Blip2Stage2.caption


@dataclass(frozen=True)
class Sampling:
    """How the captioner samples: k captions per image, nucleus top_p, lengths in new tokens."""

    num_captions: int = 10
    top_p: float = 0.9
    max_new_tokens: int = 30
    min_new_tokens: int = 5
    seed: int = 0
    prompt: str | None = None  # None: the captioner's default ("" for HF BLIP / BLIP-2, "a photo of" for stage 2)


class Captioner(Protocol):
    """BLIP (transformers) captioners also have `log_likelihood(images, captions_per_image)`: CapFilt's
    `captioner_weight` needs it."""

    def generate(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        """`num_captions` synthetic captions per image (image order)."""


class Ranker(Protocol):
    def score(self, images: list[Image.Image], captions_per_image: list[list[str]]) -> list[list[float]]:
        """Image-text similarity of each image with each of its captions."""


def resolve_device(device: str) -> torch.device:
    """"auto": cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------ sampling
def key_seed(key: str) -> int:
    """A stable 63-bit integer of an image key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def row_uniforms(seed: int, keys: Sequence[str], per_key: int, steps: int) -> torch.Tensor:
    """Uniforms in [0, 1) for row (image i, sample j) = i * per_key + j, one per step.  -> (B*k, steps)"""
    rows = [np.random.default_rng([seed, key_seed(key), j]).random(steps) for key in keys for j in range(per_key)]
    return torch.from_numpy(np.stack(rows))


class KeyedNucleusSampler(LogitsProcessor):
    """Nucleus (top-p) sampling with one stream of uniforms per row, as a logits processor.

    At step t it keeps the smallest set of most probable tokens whose mass reaches top_p, picks the token
    whose cumulative (renormalised) mass first exceeds the row's uniform u[r, t], and returns logits that
    are 0 for that token and -inf elsewhere, so `generate`'s own sampling can only pick it. End tokens
    are forbidden before `min_new_tokens`. A fresh sampler is needed for every `generate` call.
    """

    def __init__(self, uniforms: torch.Tensor, top_p: float, end_ids: Sequence[int], min_new_tokens: int):
        self.uniforms, self.top_p = uniforms, top_p
        self.end_ids, self.min_new_tokens = list(end_ids), min_new_tokens
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float().clone()  # (R, V)
        if self.step < self.min_new_tokens and self.end_ids:
            scores[:, self.end_ids] = -float("inf")
        u = self.uniforms[:, min(self.step, self.uniforms.shape[1] - 1)].to(scores.device, torch.float64)  # (R,)
        self.step += 1
        probs, order = torch.softmax(scores, dim=-1).double().sort(dim=-1, descending=True, stable=True)  # (R, V)
        outside = probs.cumsum(-1) - probs >= self.top_p  # keep the token that crosses top_p
        probs = probs.masked_fill(outside, 0.0)
        cdf = probs.cumsum(-1)  # (R, V)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # (R, 1)
        pick = pick.clamp(max=(~outside).sum(-1, keepdim=True) - 1)
        token = order.gather(-1, pick)  # (R, 1)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(-1, token, 0.0)


def sampling_options(sampling: Sampling, sampler: KeyedNucleusSampler) -> dict:
    """`generate` settings that leave the choice of every token to `sampler` (no top-k, no temperature)."""
    return dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, num_beams=1, logits_processor=[sampler],
                num_return_sequences=sampling.num_captions, max_new_tokens=sampling.max_new_tokens)


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def _group(texts: list[str], per_image: int) -> list[list[str]]:
    texts = [t.strip() for t in texts]
    return [texts[i:i + per_image] for i in range(0, len(texts), per_image)]


# -------------------------------------------------------------------------------------- HF captioners
def _hf_path(spec: str) -> tuple[str, bool]:
    """(name, local_files_only): a local dir must exist; a hub id resolves from the cache when offline."""
    name = os.path.expanduser(spec)
    local = looks_like_local_path(name)
    if local and not os.path.isdir(name):
        raise FileNotFoundError(f"captioner={spec!r}: no such directory (expected a saved transformers "
                                "BLIP / BLIP-2 captioner with config.json, weights and processor files)")
    return name, hub_offline() and not local


def hf_model_type(spec: str) -> str:
    """The `model_type` of an HF captioner's config ("blip", "blip-2", ...)."""
    from transformers import AutoConfig

    name, offline = _hf_path(spec)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=offline).model_type
    except OSError as error:
        where = "it is not in the local hub cache and the hub is offline" if offline else str(error)
        raise OSError(f"captioner={spec!r}: {where}. Download it where there is network "
                      f"(huggingface-cli download {spec} --local-dir DIR) and pass captioner=DIR") from error


class HFBlipCaptioner:
    """transformers BLIP captioner (BLIP-large in the paper): the text decoder continues [DEC] (+ prompt)."""

    def __init__(self, spec: str, sampling: Sampling, device: torch.device):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        name, offline = _hf_path(spec)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.model = BlipForConditionalGeneration.from_pretrained(name, dtype=dtype, local_files_only=offline)
        self.model.to(device).eval()
        self.processor = BlipProcessor.from_pretrained(name, local_files_only=offline)
        self.sampling, self.device, self.dtype = sampling, device, dtype
        self.prompt = sampling.prompt or ""

    @torch.no_grad()
    def generate(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        s = self.sampling
        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        pixel_values = inputs["pixel_values"].to(self.dtype)  # (B, 3, H, W)
        prompt_len = inputs["input_ids"].shape[1] - 1 if text else 1  # the decoder input: [DEC] (+ prompt)
        text_config = self.model.config.text_config
        sampler = KeyedNucleusSampler(row_uniforms(s.seed, keys, s.num_captions, s.max_new_tokens + 1), s.top_p,
                                      [text_config.sep_token_id], s.min_new_tokens)
        ids = self.model.generate(pixel_values=pixel_values, input_ids=inputs.get("input_ids"),
                                  attention_mask=inputs.get("attention_mask"),
                                  **sampling_options(s, sampler))  # (B*k, prompt + T); BLIP sets eos and pad
        texts = self.processor.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
        return _group(texts, s.num_captions)

    @torch.no_grad()
    def log_likelihood(self, images: list[Image.Image], captions_per_image: list[list[str]]) -> list[list[float]]:
        """The decoder's mean log-probability per token of each caption (its words and [SEP]) after [DEC]
        (+ prompt), teacher-forced on its image: how sure the captioner is of what it wrote."""
        texts = [f"{self.prompt} {c}" if self.prompt else c for cs in captions_per_image for c in cs]
        owner = torch.tensor([i for i, cs in enumerate(captions_per_image) for _ in cs], device=self.device)
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, T, C)
        batch = self.processor.tokenizer(texts, padding="longest", return_tensors="pt").to(self.device)
        input_ids = batch["input_ids"].clone()  # (N, L): [CLS] (+ prompt) caption [SEP] padding
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        logits = self.model.text_decoder(input_ids=input_ids, attention_mask=batch["attention_mask"],
                                         encoder_hidden_states=image_embeds[owner], return_dict=True).logits
        token_logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        scored = batch["attention_mask"][:, 1:].bool()  # (N, L-1): position t predicts token t+1
        prompt_tokens = len(self.processor.tokenizer(self.prompt)["input_ids"]) - 2 if self.prompt else 0
        scored[:, :prompt_tokens] = False  # the prompt is given, not written
        mean = (token_logp * scored).sum(-1) / scored.sum(-1).clamp(min=1)  # (N,)
        values, start = mean.tolist(), 0
        grouped = []
        for captions in captions_per_image:
            grouped.append(values[start:start + len(captions)])
            start += len(captions)
        return grouped


class HFBlip2Captioner:
    """transformers BLIP-2: [visual prompts; bos (+ prompt)] into the frozen OPT / FlanT5."""

    def __init__(self, spec: str, sampling: Sampling, device: torch.device):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        name, offline = _hf_path(spec)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.model = Blip2ForConditionalGeneration.from_pretrained(name, dtype=dtype, local_files_only=offline)
        self.model.to(device).eval()
        self.processor = Blip2Processor.from_pretrained(name, local_files_only=offline)
        self.sampling, self.device, self.dtype = sampling, device, dtype
        self.prompt = sampling.prompt or ""

    def end_ids(self) -> list[int]:
        return _as_list(self.model.generation_config.eos_token_id) or \
            _as_list(self.model.config.text_config.eos_token_id)

    @torch.no_grad()
    def generate(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        s = self.sampling
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        end_ids = self.end_ids()
        sampler = KeyedNucleusSampler(row_uniforms(s.seed, keys, s.num_captions, s.max_new_tokens + 1), s.top_p,
                                      end_ids, s.min_new_tokens)
        ids = self.model.generate(**inputs, eos_token_id=end_ids, pad_token_id=self.processor.tokenizer.pad_token_id,
                                  **sampling_options(s, sampler))
        if not self.model.config.text_config.is_encoder_decoder:  # OPT returns the prompt too
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return _group(self.processor.batch_decode(ids, skip_special_tokens=True), s.num_captions)


# ---------------------------------------------------------------------------------- stage-2 captioner
class Stage2Captioner:
    """This platform's `Blip2Stage2` checkpoint: [visual prompts; prompt] continued by its frozen LLM."""

    def __init__(self, directory: str, sampling: Sampling, device: torch.device):
        from blip2 import checkpoint
        from pipelines.data.transforms import EvalTransform

        cfg, meta = checkpoint.load_config(directory)
        if meta["model_class"] != "stage2":
            raise ValueError(f"captioner=stage2:{directory}: a {meta['model_class']} checkpoint, expected stage2")
        if (cfg.llm is not None and cfg.llm.name == "tiny") or cfg.vision.kind == "tiny":
            log.warning("captioner stage2:%s: its frozen parts are random ('tiny'); built with torch seed 0 so "
                        "every process builds the same ones", directory)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = checkpoint.load_model(directory).to(device).eval()
        self.transform = EvalTransform(cfg.vision.image_size)
        self.sampling, self.device = sampling, device
        self.prompt = STAGE2_DEFAULT_PROMPT if sampling.prompt is None else sampling.prompt

    @torch.no_grad()
    def generate(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        from blip2.stage2 import end_token_ids, pack, prompt_batch

        s, model = self.sampling, self.model
        tokenizer = model.tokenizer
        pixels = torch.stack([self.transform(image, "")[0] for image in images]).to(self.device)  # (B, 3, H, W)
        batch = prompt_batch(tokenizer, [self.prompt] * len(images))
        embeds, mask = model.llm_inputs(pixels, batch["input_ids"].to(self.device),
                                        batch["attention_mask"].to(self.device))  # (B, Q+L, H), (B, Q+L)
        embeds, mask = pack(embeds, mask, left=model.kind == "opt")
        end_ids = end_token_ids(tokenizer, model.kind)
        sampler = KeyedNucleusSampler(row_uniforms(s.seed, keys, s.num_captions, s.max_new_tokens + 1), s.top_p,
                                      end_ids, s.min_new_tokens)
        ids = model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=end_ids,
                                            pad_token_id=tokenizer.pad_token_id, **sampling_options(s, sampler))
        ids = ids[:, 1:] if model.kind == "t5" else ids  # T5 rows start with the decoder start token
        return _group(tokenizer.batch_decode(ids, skip_special_tokens=True), s.num_captions)


def load_captioner(spec: str, sampling: Sampling, device: str | torch.device = "auto") -> Captioner:
    """`stage2:<dir>`, or an HF BLIP / BLIP-2 captioner (dir or hub id) told apart by its model_type."""
    device = resolve_device(device) if isinstance(device, str) else device
    if spec.startswith(STAGE2_PREFIX):
        return Stage2Captioner(spec[len(STAGE2_PREFIX):], sampling, device)
    model_type = hf_model_type(spec)
    if model_type == "blip":
        return HFBlipCaptioner(spec, sampling, device)
    if model_type == "blip-2":
        return HFBlip2Captioner(spec, sampling, device)
    raise ValueError(f"captioner={spec!r} is a {model_type!r} model: expected a transformers BLIP ('blip') or "
                     "BLIP-2 ('blip-2') captioner, or stage2:<checkpoint dir>")


# --------------------------------------------------------------------------------------------- ranker
def open_clip_pretrained(name: str, weights: str | None) -> str | None:
    """`weights` for open_clip: None for "local-dir:" / "hf-hub:" names (the weights come with them)."""
    if name.startswith(("local-dir:", "hf-hub:")):
        if weights:
            raise ValueError(f"ranker_weights={weights!r}: {name!r} carries its own weights; leave it unset")
        return None
    from blip2.vision import resolve_open_clip_weights

    return resolve_open_clip_weights(name, weights)


class ClipRanker:
    """open_clip image-text cosine: `score(images, captions_per_image)` -> one list of cosines per image."""

    def __init__(self, name: str, weights: str | None = None, device: str | torch.device = "auto",
                 precision: str | None = None):
        """precision: open_clip's ("fp16" casts the matmul weights only; norms, embeddings stay fp32); None: fp16
        on cuda, fp32 elsewhere."""
        import open_clip

        self.device = resolve_device(device) if isinstance(device, str) else device
        precision = precision or ("fp16" if self.device.type == "cuda" else "fp32")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=open_clip_pretrained(name, weights), device=self.device, precision=precision)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        # the image goes in as the patch embedding's weights are (open_clip's encode_image does not cast it)
        self.pixel_dtype = next(m.weight.dtype for m in self.model.visual.modules()
                                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))

    @torch.no_grad()
    def score(self, images: list[Image.Image], captions_per_image: list[list[str]]) -> list[list[float]]:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (B, 3, H, W)
        image_features = self.model.encode_image(pixels.to(self.pixel_dtype), normalize=True).float()  # (B, E)
        texts = [caption for captions in captions_per_image for caption in captions]
        tokens = self.tokenizer(texts).to(self.device)  # (N, context)
        text_features = self.model.encode_text(tokens, normalize=True).float()  # (N, E)
        scores, start = [], 0
        for i, captions in enumerate(captions_per_image):
            cosine = text_features[start:start + len(captions)] @ image_features[i]  # (n_i,)
            scores.append([float(c) for c in cosine.cpu()])
            start += len(captions)
        return scores


# ------------------------------------------------------------------------------------------ filter
@dataclass
class Candidate:
    """One caption of an image with its CLIP score (and the captioner's log-likelihood of it, when used)."""

    text: str
    source: str  # "web" | "synthetic"
    index: int  # 0: the web caption, 1..k: the synthetic ones in generation order
    score: float  # CLIP's image-text cosine
    loglik: float | None = None  # the captioner's mean token log-probability (synthetic captions only)
    rank_score: float = 0.0  # what the ranking sorts: score + captioner_weight * loglik
    rank: int = -1  # 0 = best
    kept: bool = False


def rank_candidates(web_caption: str, synthetic: list[str], scores: list[float], keep: int,
                    logliks: list[float] | None = None, captioner_weight: float = 0.0) -> list[Candidate]:
    """Rank by CLIP score, plus `captioner_weight` x the captioner's log-likelihood of each synthetic caption
    (`logliks`; the web caption, which no captioner wrote, gets the mean of its image's synthetic ones, so the
    term reorders the synthetic captions around it); ties: the web caption, then generation order. Keep the
    top `keep` distinct, non-empty texts. Returned in index order."""
    texts = [web_caption, *synthetic]
    if len(scores) != len(texts):
        raise ValueError(f"rank_candidates: {len(scores)} scores for {len(texts)} captions")
    if logliks is not None and len(logliks) != len(synthetic):
        raise ValueError(f"rank_candidates: {len(logliks)} log-likelihoods for {len(synthetic)} synthetic captions")
    if captioner_weight and logliks is None:
        raise ValueError("rank_candidates: captioner_weight needs the captioner's log-likelihoods")
    own = [float(np.mean(logliks)) if logliks else None, *(logliks or [None] * len(synthetic))]
    candidates = [Candidate(text, "web" if i == 0 else "synthetic", i, float(score),
                            loglik=None if i == 0 or own[i] is None else float(own[i]),
                            rank_score=float(score) + (captioner_weight * own[i] if captioner_weight else 0.0))
                  for i, (text, score) in enumerate(zip(texts, scores))]
    seen: set[str] = set()
    for rank, cand in enumerate(sorted(candidates, key=lambda c: (-c.rank_score, c.index))):
        cand.rank = rank
        norm = " ".join(cand.text.lower().split())
        if norm and norm not in seen and len(seen) < keep:
            cand.kept = True
            seen.add(norm)
    return candidates


def kept_texts(candidates: list[Candidate]) -> list[str]:
    """The kept captions, best first."""
    return [c.text for c in sorted(candidates, key=lambda c: c.rank) if c.kept]


# --------------------------------------------------------------------------------- Ray Data actors
def _decode(images) -> list[Image.Image]:
    return [Image.open(io.BytesIO(bytes(data))).convert("RGB") for data in images]


class CaptionActor:
    """Ray Data actor over sample rows (columns image, key): adds `synthetic` (a JSON list of captions per row)
    and `caption_seconds` (the batch's captioner time shared over its rows)."""

    def __init__(self, spec: str, sampling: Sampling, device: str, threads: int, loglik: bool = False):
        torch.set_num_threads(threads)
        self.captioner = load_captioner(spec, sampling, device)
        self.loglik = loglik  # also add `loglik` (a JSON list: the captioner's log-likelihood of each caption)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        images = _decode(batch["image"])
        synthetic = self.captioner.generate(images, [str(k) for k in batch["key"]])
        batch["synthetic"] = np.array([json.dumps(c) for c in synthetic], dtype=object)
        if self.loglik:
            batch["loglik"] = np.array([json.dumps(v) for v in self.captioner.log_likelihood(images, synthetic)],
                                       dtype=object)
        batch["caption_seconds"] = np.full(len(synthetic), (time.perf_counter() - started) / len(synthetic))
        return batch


class RankActor:
    """Ray Data actor over captioned rows (columns image, web_caption, synthetic): adds `scores` (a JSON list,
    [web, *synthetic]) and `rank_seconds`."""

    def __init__(self, name: str, weights: str | None, device: str, threads: int):
        torch.set_num_threads(threads)
        self.ranker = ClipRanker(name, weights, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        captions = [[str(web), *json.loads(c)] for web, c in zip(batch["web_caption"], batch["synthetic"])]
        scores = self.ranker.score(_decode(batch["image"]), captions)
        batch["scores"] = np.array([json.dumps(s) for s in scores], dtype=object)
        batch["rank_seconds"] = np.full(len(scores), (time.perf_counter() - started) / len(scores))
        return batch
