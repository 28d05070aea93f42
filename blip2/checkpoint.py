"""Our own checkpoint format: a directory with the TRAINABLE weights and the architecture that owns them.

    <dir>/model.safetensors   parameters with requires_grad only (the frozen image encoder and LLM are not
                              carried: they are rebuilt from the config's references)
    <dir>/config.json         {"format_version", "model_class": "stage1"|"stage2", "dec_token_id",
                               "config": dataclasses.asdict(Blip2Config), "num_tensors"}
    <dir>/<extra files>       whatever `extra_state` names (the trainer's optimizer.pt and state.json)

A directory is written to a temporary sibling and renamed into place, so a crash never leaves half a
checkpoint and an older checkpoint at the same path stays intact until the new one is complete.
Loading is strict: every key is accounted for, expected missing/unexpected keys are listed explicitly
(regular expressions, matched against the whole key), shapes are checked, and a broken file or a config
that does not fit the model gives one error naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
Pattern = str | re.Pattern


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # keys copied into the model
    missing: list[str] = field(default_factory=list)  # model keys absent from the state dict (all expected)
    unexpected: list[str] = field(default_factory=list)  # state-dict keys the model has not (all expected)


# ------------------------------------------------------------------------------------ state dicts
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> detached tensor for every parameter that requires grad (shared parameters once)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {key: value.detach() for key, value in model.state_dict().items() if key in names}


def _matches(key: str, patterns: Iterable[Pattern]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def load_trainable(model: nn.Module, state_dict: Mapping[str, torch.Tensor], expected_missing: Iterable[Pattern] = (),
                   expected_unexpected: Iterable[Pattern] = (), source: str = "state dict") -> LoadReport:
    """Copy `state_dict` into `model`'s trainable parameters, strictly.

    Raises ValueError (naming `source`) listing every trainable key that is missing and not matched by
    `expected_missing`, every key the model has not that is not matched by `expected_unexpected`, and every
    shape mismatch (key, checkpoint shape, model shape). Nothing is copied unless everything fits.
    """
    expected_missing, expected_unexpected = tuple(expected_missing), tuple(expected_unexpected)
    own = trainable_state_dict(model)
    report = LoadReport()
    problems: list[str] = []
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    report.missing = [key for key in missing if _matches(key, expected_missing)]
    report.unexpected = [key for key in unexpected if _matches(key, expected_unexpected)]
    if len(report.missing) < len(missing):
        problems.append(f"missing keys: {[k for k in missing if k not in report.missing]}")
    if len(report.unexpected) < len(unexpected):
        problems.append(f"unexpected keys: {[k for k in unexpected if k not in report.unexpected]}")
    mismatched = [f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(value.shape)}"
                  for key, value in own.items() if key in state_dict and state_dict[key].shape != value.shape]
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for key, value in own.items():
            if key in state_dict:
                value.copy_(state_dict[key])
                report.loaded.append(key)
    return report


# --------------------------------------------------------------------------------- atomic writing
@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `directory`; on success it replaces `directory` (an older
    one is moved aside first and deleted only once the new one is in place); on failure it is removed and
    `directory` is left as it was. A crash in the instant between the two renames leaves the previous
    checkpoint as `.<name>.old-*` next to it: never a partial one."""
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = target.parent / f".{target.name}.old-{tag}"
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ save
def model_class(model: nn.Module) -> str:
    from blip2.stage1 import Blip2Stage1

    if isinstance(model, Blip2Stage1):
        return "stage1"
    from blip2.stage2 import Blip2Stage2

    if isinstance(model, Blip2Stage2):
        return "stage2"
    raise TypeError(f"save_model: expected a Blip2Stage1 or Blip2Stage2, got {type(model).__name__}")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tensor sharing storage with an earlier one is cloned (safetensors refuses
    shared storage)."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    return out


def write_extra(directory: Path, name: str, value: Any) -> None:
    """One extra file: `*.json` -> json, `*.pt` -> torch.save, bytes -> as is."""
    if os.path.basename(name) != name or name in (WEIGHTS_FILE, CONFIG_FILE):
        raise ValueError(f"extra_state: {name!r} must be a plain file name other than {WEIGHTS_FILE}/{CONFIG_FILE}")
    path = directory / name
    if name.endswith(".json"):
        path.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")
    elif name.endswith(".pt"):
        torch.save(value, path)
    elif isinstance(value, bytes):
        path.write_bytes(value)
    else:
        raise ValueError(f"extra_state[{name!r}]: expected a .json or .pt name, or bytes")


def save_model(model: nn.Module, directory: str | os.PathLike, extra_state: Mapping[str, Any] | None = None) -> Path:
    """Write `model`'s trainable weights and config to `directory` atomically (see the module docstring).

    extra_state: file name -> content written into the same directory in the same atomic step, e.g.
    {"optimizer.pt": optimizer.state_dict(), "state.json": {"step": 100}} (see `write_extra`).
    """
    kind = model_class(model)
    meta = {"format_version": FORMAT_VERSION, "model_class": kind, "config": dataclasses.asdict(model.cfg),
            "dec_token_id": getattr(model, "dec_token_id", None)}
    state = _unshared(trainable_state_dict(model))
    meta["num_tensors"] = len(state)
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "blip2_model_class": kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for name, value in (extra_state or {}).items():
            write_extra(tmp, name, value)
    return Path(directory)


# ------------------------------------------------------------------------------------------ load
def config_from_dict(data: Mapping[str, Any], source: str = "config") -> Blip2Config:
    """`dataclasses.asdict(Blip2Config)` back into the frozen dataclasses; unknown fields are errors."""
    try:
        fields = dict(data)
        fields["vision"] = VisionConfig(**fields["vision"])
        fields["qformer"] = QFormerConfig(**fields["qformer"])
        fields["llm"] = None if fields.get("llm") is None else LLMConfig(**fields["llm"])
        return Blip2Config(**fields)
    except (TypeError, KeyError) as error:
        raise ValueError(f"{source}: not a Blip2Config ({error})") from error


def load_config(directory: str | os.PathLike) -> tuple[Blip2Config, dict[str, Any]]:
    """(Blip2Config, the rest of config.json: format_version, model_class, dec_token_id, ...)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a checkpoint directory written by save_model)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: format_version {found!r}, this code reads {FORMAT_VERSION}")
    if meta.get("model_class") not in ("stage1", "stage2"):
        raise ValueError(f"{path}: model_class {meta.get('model_class')!r}, expected 'stage1' or 'stage2'")
    cfg = config_from_dict(meta.pop("config", None) or {}, source=str(path))
    return cfg, meta


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({error})") from error


def load_model(directory: str | os.PathLike, visual: nn.Module | None = None, llm: nn.Module | None = None,
               llm_tokenizer=None) -> nn.Module:
    """Build the model that `directory` was saved from (frozen parts from the config's references, or the
    `visual` / `llm` given) and load its trainable weights strictly. Returned in eval mode (call .train()
    to resume training)."""
    cfg, meta = load_config(directory)
    if visual is not None:
        from blip2.vision import check_encoder_matches

        try:
            check_encoder_matches(visual, cfg.vision)
        except ValueError as error:
            raise ValueError(f"{Path(directory) / CONFIG_FILE}: the visual= given does not fit: {error}") from error
    if meta["model_class"] == "stage1":
        from blip2.stage1 import Blip2Stage1

        model = Blip2Stage1(cfg, visual=visual, dec_token_id=meta.get("dec_token_id"))
    else:
        from blip2.stage2 import Blip2Stage2

        model = Blip2Stage2(cfg, visual=visual, llm=llm, llm_tokenizer=llm_tokenizer)
    load_into(model, directory, check_config=False)
    return model.eval()


def load_into(model: nn.Module, directory: str | os.PathLike, check_config: bool = True) -> LoadReport:
    """Load a checkpoint into an existing model (e.g. to resume). With `check_config`, the saved config must
    equal `model.cfg` and the model class must match; any difference is named."""
    cfg, meta = load_config(directory)
    if check_config:
        config_path = Path(directory) / CONFIG_FILE
        if meta["model_class"] != model_class(model):
            raise ValueError(f"{config_path}: a {meta['model_class']} checkpoint, the model is {model_class(model)}")
        if cfg != model.cfg:
            raise ValueError(f"{config_path}: saved config differs from the model's: {config_diff(cfg, model.cfg)}")
    source = str(Path(directory) / WEIGHTS_FILE)
    if not check_config:
        source += f" (the model was built from {Path(directory) / CONFIG_FILE})"
    return load_trainable(model, read_weights(directory), source=source)


def config_diff(saved: Blip2Config, current: Blip2Config) -> list[str]:
    """Dotted field names whose values differ, e.g. ['name: tiny != tiny-t5', 'llm.kind: opt != t5']."""
    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    a, b = flat(dataclasses.asdict(saved)), flat(dataclasses.asdict(current))
    return [f"{key}: {a.get(key)!r} != {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def load_extra(directory: str | os.PathLike, name: str) -> Any:
    """An extra file written by `save_model`: json, or a .pt loaded with weights_only=True."""
    path = Path(directory) / name
    if name.endswith(".json"):
        return json.loads(path.read_text(encoding="utf-8"))
    if name.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    return path.read_bytes()
