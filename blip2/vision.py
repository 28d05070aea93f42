"""Frozen image encoders (SPEC section 2).

Every encoder is cut to the blocks BLIP-2 keeps: the model's LAST transformer block is dropped (not
just skipped, so its memory is freed) and the tokens of the second-to-last block, CLS first, without
any final norm, are returned as (B, T, C). The trainable `ln_vision` on top belongs to the stage-1
model, not to the encoder.

Three sources, one wrapper class each, built by plain functions:

* `open_clip` ViTs (CLIP ViT-L/14, or a custom config registered with `open_clip.add_model_config`):
  our own forward over open_clip's modules (conv1, class + positional embedding, ln_pre, blocks).
* `eva_clip`: EVA-CLIP ViT-g/14 through open_clip, whose vision tower is a timm `Eva`: its
  `forward_features` with the last block dropped and the final norm replaced by Identity.
* `hf` / `tiny`: transformers `Blip2VisionModel`. HF's BLIP-2 vision config already has the last
  block dropped (ViT-g: 39 layers) and HF's `post_layernorm` IS BLIP-2's `ln_vision`: the encoder
  runs embeddings + all encoder layers and never applies `post_layernorm`; its weights are handed to
  the caller (`load_hf_vision`, `HFImageEncoder.post_layernorm_state_dict`) to initialise ln_vision.

Frozen means: no parameter requires grad, always eval mode (`train(True)` is ignored), forward under
`torch.no_grad()` with autocast switched off. On CUDA the weights are fp16 and every LayerNorm runs
in fp32 (`cast_for_device`); the output is always fp32.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from safetensors import safe_open
from timm.models.eva import Eva
from torch import Tensor, nn
from transformers import Blip2VisionConfig, Blip2VisionModel
from transformers.utils import cached_file

from blip2.config import VisionConfig
from blip2.utils import hub_offline, looks_like_local_path

OFFLINE_HINT = "set vision.weights to a local file/dir (HF_HUB_OFFLINE=1: no hub downloads)"


# ------------------------------------------------------------------------------------ the wrapper
class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype; the result keeps the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def _as_fp32_layernorm(norm: nn.LayerNorm) -> Fp32LayerNorm:
    new = Fp32LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                        bias=norm.bias is not None, device="meta")
    new.weight, new.bias = norm.weight, norm.bias  # shared Parameters: state-dict names are unchanged
    return new


def use_fp32_layernorms(module: nn.Module) -> None:
    """Swap every nn.LayerNorm under `module` (open_clip's, timm's, HF's) for an Fp32LayerNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm) and not isinstance(child, Fp32LayerNorm):
            setattr(module, name, _as_fp32_layernorm(child))
        else:
            use_fp32_layernorms(child)


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class FrozenImageEncoder(nn.Module):
    """A frozen ViT trunk: forward (B, 3, H, W) -> (B, T, C) fp32 tokens of its last kept block.

    Attributes: `width` (C), `num_tokens` (T, CLS included), `num_blocks` (blocks kept), `image_size`.
    Subclasses provide `tokens(x)` and `patch_weight()` and call `_freeze()` at the end of __init__.
    """

    def __init__(self, width: int, num_blocks: int, image_size: int, num_tokens: int):
        super().__init__()
        self.width = width
        self.num_blocks = num_blocks
        self.image_size = image_size
        self.num_tokens = num_tokens

    def _freeze(self) -> None:
        use_fp32_layernorms(self)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenImageEncoder":
        """Always eval: `model.train()` on a parent cannot switch the frozen encoder's dropout back on."""
        return super().train(False)

    def patch_weight(self) -> Tensor:
        raise NotImplementedError

    def tokens(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: Tensor) -> Tensor:
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values: expected (B, 3, {self.image_size}, {self.image_size}), got {shape}")
        with torch.no_grad(), _autocast_off(pixel_values.device.type):
            x = pixel_values.to(self.patch_weight().dtype)  # (B, 3, H, W)
            tokens = self.tokens(x)  # (B, T, C)
        return tokens.float()


class OpenClipImageEncoder(FrozenImageEncoder):
    """An open_clip `VisionTransformer` whose last block was dropped; `visual.*` keeps open_clip's names."""

    def __init__(self, visual: VisionTransformer):
        size, patch = visual.image_size, visual.patch_size
        if size[0] != size[1] or patch[0] != patch[1]:
            raise ValueError(f"open_clip tower: only square images/patches are supported, got {size}/{patch}")
        grid = size[0] // patch[0]
        super().__init__(width=visual.conv1.out_channels, num_blocks=len(visual.transformer.resblocks),
                         image_size=size[0], num_tokens=grid * grid + 1)
        self.visual = visual
        self._freeze()

    def patch_weight(self) -> Tensor:
        return self.visual.conv1.weight

    def tokens(self, x: Tensor) -> Tensor:
        visual = self.visual
        x = visual.conv1(x)  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, T, C)
        x = visual.ln_pre(x)  # patch dropout is skipped: it is off in eval anyway
        batch_first = visual.transformer.batch_first
        if not batch_first:
            x = x.transpose(0, 1)  # (T, B, C)
        for block in visual.transformer.resblocks:
            x = block(x)  # no attention mask: every token sees every token
        return x if batch_first else x.transpose(0, 1)


class EvaImageEncoder(FrozenImageEncoder):
    """A timm `Eva` trunk (EVA-CLIP) with the last block dropped and its final norm set to Identity."""

    def __init__(self, trunk: Eva):
        size = trunk.patch_embed.img_size
        if size[0] != size[1]:
            raise ValueError(f"EVA tower: only square images are supported, got {size}")
        super().__init__(width=trunk.embed_dim, num_blocks=len(trunk.blocks), image_size=size[0],
                         num_tokens=trunk.patch_embed.num_patches + trunk.num_prefix_tokens)
        self.trunk = trunk
        self._freeze()

    def patch_weight(self) -> Tensor:
        return self.trunk.patch_embed.proj.weight

    def tokens(self, x: Tensor) -> Tensor:
        return self.trunk.forward_features(x)  # (B, T, C): patch embed, pos embed, blocks, Identity norm


class HFImageEncoder(FrozenImageEncoder):
    """A transformers `Blip2VisionModel` (`hf_model`), run without its `post_layernorm`."""

    def __init__(self, hf_model: Blip2VisionModel):
        config = hf_model.config
        size, patch = _square(config.image_size), _square(config.patch_size)
        super().__init__(width=config.hidden_size, num_blocks=len(hf_model.encoder.layers), image_size=size,
                         num_tokens=(size // patch) ** 2 + 1)
        self.hf_model = hf_model
        self._freeze()

    def patch_weight(self) -> Tensor:
        return self.hf_model.embeddings.patch_embedding.weight

    def tokens(self, x: Tensor) -> Tensor:
        x = self.hf_model.embeddings(x)  # (B, T, C)
        return self.hf_model.encoder(inputs_embeds=x).last_hidden_state  # (B, T, C), no post_layernorm

    def hf_vision_state_dict(self) -> dict[str, Tensor]:
        """The trunk's weights under HF `Blip2*` names (`vision_model.embeddings...`, `...encoder...`),
        post_layernorm left out (in an HF checkpoint it holds ln_vision). Dtypes as they are now."""
        return {f"vision_model.{key}": value.detach() for key, value in self.hf_model.state_dict().items()
                if not key.startswith("post_layernorm.")}

    def post_layernorm_state_dict(self) -> dict[str, Tensor]:
        """HF's post_layernorm (= BLIP-2's ln_vision) as {'weight', 'bias'} fp32 copies."""
        return {key: value.detach().float().clone() for key, value in self.hf_model.post_layernorm.state_dict().items()}


def _square(value) -> int:
    if isinstance(value, (list, tuple)):
        if value[0] != value[1]:
            raise ValueError(f"only square images/patches are supported, got {value}")
        return int(value[0])
    return int(value)


# ------------------------------------------------------------------------------------- builders
def build_image_encoder(cfg: VisionConfig, device: str | torch.device = "cpu", *, seed: int = 0) -> FrozenImageEncoder:
    """The frozen encoder described by `cfg`, cast for `device` (see `cast_for_device`).

    device="meta" (or building inside `with torch.device("meta"):`) builds the structure only:
    nothing is allocated and no weights are read. `seed` only matters for kind "tiny".
    """
    target = torch.device(device)
    meta = target.type == "meta" or torch.empty(0).device.type == "meta"
    target = torch.device("meta") if meta else target
    with torch.device("meta") if meta else contextlib.nullcontext():
        if cfg.kind == "open_clip":
            encoder = build_open_clip_encoder(cfg, meta=meta)
        elif cfg.kind == "eva_clip":
            encoder = build_eva_clip_encoder(cfg, meta=meta)
        elif cfg.kind == "hf":
            encoder = HFImageEncoder(Blip2VisionModel(hf_vision_config(cfg))) if meta else \
                load_hf_vision(cfg.weights or cfg.name)[0]
        elif cfg.kind == "tiny":
            encoder = build_tiny_encoder(cfg, seed=seed)
        else:
            raise ValueError(f"vision.kind={cfg.kind!r}: expected open_clip, eva_clip, hf or tiny")
    check_encoder_matches(encoder, cfg)
    return cast_for_device(encoder, target)


def check_encoder_matches(encoder: FrozenImageEncoder, cfg: VisionConfig) -> None:
    """Raise if the built encoder's width / kept blocks / tokens differ from what `cfg` declares."""
    pairs = {"width": (cfg.width, encoder.width), "layers (blocks kept)": (cfg.layers, encoder.num_blocks),
             "num_tokens": (cfg.num_tokens, encoder.num_tokens)}
    wrong = [f"{name}: config {want}, model {got}" for name, (want, got) in pairs.items() if want != got]
    if wrong:
        raise ValueError(f"vision config {cfg.kind}:{cfg.name} does not match the built encoder: " + "; ".join(wrong))


def cast_for_device(encoder: FrozenImageEncoder, device: str | torch.device,
                    dtype: torch.dtype | None = None) -> FrozenImageEncoder:
    """Move to `device`: on CUDA weights fp16 (default) with LayerNorms fp32; elsewhere everything fp32."""
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    encoder.to(device=device, dtype=dtype)
    for module in encoder.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    return encoder


def build_open_clip_encoder(cfg: VisionConfig, meta: bool = False) -> OpenClipImageEncoder:
    """open_clip ViT (`cfg.name` e.g. "ViT-L-14-quickgelu"; `cfg.weights` a local file, a tag or None)."""
    visual = _open_clip_visual(cfg, meta, force_image_size=cfg.image_size)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"open_clip model {cfg.name!r}: vision tower is {type(visual).__name__}, expected a "
                         "VisionTransformer (timm towers such as EVA use vision.kind='eva_clip')")
    visual.transformer.resblocks = visual.transformer.resblocks[:-1]  # drop the last block
    visual.ln_post, visual.proj = nn.Identity(), None  # pooling head: unused
    visual.attn_pool = visual.attn_pool_contrastive = None
    return OpenClipImageEncoder(visual)


def build_eva_clip_encoder(cfg: VisionConfig, meta: bool = False) -> EvaImageEncoder:
    """EVA-CLIP through open_clip (`cfg.name` e.g. "EVA01-g-14"): the timm Eva trunk, cut and un-normed."""
    visual = _open_clip_visual(cfg, meta)
    trunk = getattr(visual, "trunk", None)
    if not isinstance(trunk, Eva):
        raise ValueError(f"open_clip model {cfg.name!r}: vision tower is {type(trunk or visual).__name__}, "
                         "expected a timm Eva (kind='eva_clip')")
    trunk.blocks = trunk.blocks[:-1]  # drop the last block
    trunk.norm, trunk.fc_norm, trunk.head = nn.Identity(), nn.Identity(), nn.Identity()
    if trunk.patch_embed.img_size[0] != cfg.image_size:
        trunk.set_input_size(img_size=(cfg.image_size, cfg.image_size))  # resamples the position embedding
    return EvaImageEncoder(trunk)


def _open_clip_visual(cfg: VisionConfig, meta: bool, **kwargs) -> nn.Module:
    """`open_clip.create_model(...).visual` (the text tower is dropped); weights resolved first.

    `cfg.name` is a built-in or registered config name, "hf-hub:org/repo", or "local-dir:/path" (a folder
    with open_clip_config.json + weights, which then come from that folder and `cfg.weights` is ignored).
    """
    name = cfg.name
    if name.startswith(("hf-hub:", "local-dir:")) and cfg.weights is not None:
        raise ValueError(f"vision.weights={cfg.weights!r}: leave it empty for {name!r} (its weights come with it)")
    if name.startswith("hf-hub:"):
        _require_cached_in_offline_mode(name[len("hf-hub:"):], "open_clip_config.json", f"open_clip model {name!r}")
    elif name.startswith("local-dir:"):
        if not os.path.isfile(os.path.join(name[len("local-dir:"):], "open_clip_config.json")):
            raise FileNotFoundError(f"open_clip model {name!r}: expected a directory with open_clip_config.json "
                                    "(and open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    elif open_clip.get_model_config(name) is None:
        raise ValueError(f"open_clip has no model config {name!r} (see open_clip.list_models(); register a "
                         "custom JSON with open_clip.add_model_config)")
    weights = None if meta or cfg.weights is None else resolve_open_clip_weights(name, cfg.weights)
    try:
        model = open_clip.create_model(name, pretrained=weights, device="meta" if meta else "cpu",
                                       pretrained_text=False, **kwargs)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(f"open_clip could not build {name!r} with weights {weights!r}: {error}") from error
    return model.visual


def resolve_open_clip_weights(name: str, weights: str | None) -> str | None:
    """A local checkpoint path for `weights` (a file or a pretrained tag of `name`), or None (random).

    Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), a tag resolves only from the local caches and a
    miss fails at once; online a tag is downloaded by open_clip.
    """
    if weights is None:
        return None
    if os.path.isfile(weights):
        return weights
    if looks_like_local_path(weights) or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"vision.weights={weights!r}: no such file (a local open_clip checkpoint of {name!r})")
    tag_cfg = open_clip.get_pretrained_cfg(name, weights)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"vision.weights={weights!r} is neither a local file nor an open_clip pretrained tag of "
                         f"{name!r} (tags: {tags})")
    if tag_cfg.get("quick_gelu", False) and not open_clip.get_model_config(name).get("quick_gelu", False):
        raise ValueError(f"open_clip weights {name}@{weights} were trained with QuickGELU: use the model name "
                         f"{name}-quickgelu")
    if hub_offline():
        cached = _cached_open_clip_weights(tag_cfg)
        if cached is None:
            raise OSError(f"open_clip weights {name}@{weights} are not in the local cache and the hub is offline: "
                          f"download them where there is network, or {OFFLINE_HINT}")
        return cached
    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as error:  # network / hub errors of several libraries: re-raised with the way out
        raise OSError(f"could not download open_clip weights {name}@{weights}: {error}; {OFFLINE_HINT}") from error


def _cached_open_clip_weights(tag_cfg: dict) -> str | None:
    """The tag's checkpoint from the HF hub cache or open_clip's URL cache (~/.cache/clip), no network."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        for candidate in _open_clip_hub_filenames(filename or "open_clip_pytorch_model.bin"):
            path = _cached_hub_file(repo, candidate)
            if path:
                return path
    if tag_cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
        return path if os.path.isfile(path) else None
    return None


def _open_clip_hub_filenames(filename: str) -> Iterator[str]:
    """open_clip prefers a safetensors twin of a .bin/.pth file (see open_clip.pretrained)."""
    if filename == "open_clip_pytorch_model.bin":
        yield "open_clip_model.safetensors"
    elif filename.endswith((".bin", ".pth")):
        yield filename[:-4] + ".safetensors"
    yield filename


def _cached_hub_file(repo: str, filename: str) -> str | None:
    try:
        return cached_file(repo, filename, local_files_only=True, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None


def _require_cached_in_offline_mode(repo: str, filename: str, what: str) -> None:
    if hub_offline() and _cached_hub_file(repo, filename) is None:
        raise OSError(f"{what} is not in the local hub cache and the hub is offline: {OFFLINE_HINT}")


# ---------------------------------------------------------------------- transformers Blip2VisionModel
def hf_vision_config(cfg: VisionConfig) -> Blip2VisionConfig:
    """The `Blip2VisionConfig` of an hf/tiny encoder: read from the checkpoint (hf) or from `cfg` (tiny).

    Tiny encoders use initializer_range 0.02 (HF's default 1e-10 would make a random tower degenerate).
    """
    if cfg.kind == "hf":
        return read_hf_vision_config(cfg.weights or cfg.name)
    if cfg.kind != "tiny":
        raise ValueError(f"hf_vision_config: vision.kind={cfg.kind!r} is not a Blip2VisionModel (hf or tiny)")
    return Blip2VisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
                             num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                             layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu", qkv_bias=True,
                             initializer_range=0.02)


def build_tiny_encoder(cfg: VisionConfig, seed: int = 0) -> HFImageEncoder:
    """A random `Blip2VisionModel` from `cfg`; the same seed gives the same weights (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2VisionModel(hf_vision_config(cfg))
    return HFImageEncoder(model)


def load_hf_vision(path: str) -> tuple[HFImageEncoder, dict[str, Tensor]]:
    """The vision tower of a local (or, online, hub) Blip2VisionModel or full Blip2 checkpoint.

    Returns (encoder on CPU in fp32, {'weight', 'bias'} of HF's post_layernorm = the checkpoint's
    ln_vision). Loading is strict: a missing or unexpected vision key raises.
    """
    config = read_hf_vision_config(path)
    state = read_hf_vision_weights(path)  # keys without the "vision_model." prefix
    with torch.device("meta"):
        model = Blip2VisionModel(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: vision weights do not match its vision config: {error}") from error
    model.float()
    encoder = HFImageEncoder(model)
    return encoder, encoder.post_layernorm_state_dict()


def read_hf_vision_config(path: str) -> Blip2VisionConfig:
    """`vision_config` of a full Blip2 config.json, or the config of a saved Blip2VisionModel."""
    config_path = _hf_file(path, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        data = json.load(handle)
    if data.get("model_type") == "blip_2_vision_model":
        return Blip2VisionConfig.from_dict(data)
    if isinstance(data.get("vision_config"), dict):
        return Blip2VisionConfig.from_dict(data["vision_config"])
    raise ValueError(f"{config_path}: expected a Blip2 config (with vision_config) or a Blip2VisionModel config, "
                     f"got model_type={data.get('model_type')!r}")


def _vision_key(key: str, full_model: bool) -> str | None:
    """A checkpoint key as a Blip2VisionModel key, or None when it is not part of the vision tower.
    In a full Blip2 checkpoint (`full_model`) only "vision_model.*" is: its bare "embeddings.*" are the
    Q-Former's text embeddings (Blip2ForImageTextRetrieval)."""
    if key.startswith("vision_model."):
        return key[len("vision_model."):]
    if full_model:
        return None
    return key if key.split(".", 1)[0] in ("embeddings", "encoder", "post_layernorm") else None


def read_hf_vision_weights(path: str) -> dict[str, Tensor]:
    """The vision tower's tensors from `model.safetensors` or the shards a safetensors index names."""
    index_path = _hf_file(path, "model.safetensors.index.json", required=False)
    if index_path:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        full_model: bool | None = any(key.startswith("vision_model.") for key in weight_map)
        files = sorted({file for key, file in weight_map.items() if _vision_key(key, full_model) is not None})
    else:
        files, full_model = ["model.safetensors"], None
    state: dict[str, Tensor] = {}
    for name in files:
        with safe_open(_hf_file(path, name), framework="pt") as handle:
            keys = list(handle.keys())
            if full_model is None:
                full_model = any(key.startswith("vision_model.") for key in keys)
            for key in keys:
                short = _vision_key(key, full_model)
                if short is not None:
                    state[short] = handle.get_tensor(key)
    if not state:
        raise ValueError(f"{path}: no vision tower weights ('vision_model.*' or a Blip2VisionModel's own keys) "
                         f"in {files}")
    return state


def _hf_file(path: str, filename: str, required: bool = True) -> str | None:
    """`filename` of a local checkpoint dir, or (online, or cached) of a hub repo; clear errors otherwise."""
    if os.path.isdir(path):
        full = os.path.join(path, filename)
        if os.path.isfile(full) or not required:
            return full if os.path.isfile(full) else None
        raise FileNotFoundError(f"{full} not found (expected a saved Blip2 or Blip2VisionModel checkpoint dir "
                                "with config.json and safetensors weights)")
    if looks_like_local_path(path):
        raise FileNotFoundError(f"vision weights {path!r}: not a directory ({OFFLINE_HINT})")
    offline = hub_offline()
    try:
        found = cached_file(path, filename, local_files_only=offline,
                            _raise_exceptions_for_missing_entries=required)
    except (OSError, ValueError) as error:
        reason = "it is not in the local hub cache and the hub is offline" if offline else f"download failed: {error}"
        raise OSError(f"vision model {path!r}: {reason}; {OFFLINE_HINT}") from error
    return found
