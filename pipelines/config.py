"""Step configs: pydantic models that load from YAML, take dotted CLI overrides and hash stably.

Every step config derives from `StepConfig` (``extra="forbid"``), so a misspelt field is an error
that names the field, and the same model is usable directly as a Prefect flow parameter.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

C = TypeVar("C", bound="StepConfig")


class ConfigError(ValueError):
    """A config file or override is unusable; the message names the file/field and what was expected."""


class StepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    merged_sections: ClassVar[tuple[str, ...]] = ()
    """Fields whose default is a customised section (a model built with other values than its class's own, or a
    dict): a partial value given for one (a YAML section, `faults.slow=0`) is merged onto that default rather than
    replacing it, so the section's other defaults are kept."""

    @model_validator(mode="before")
    @classmethod
    def _merge_onto_section_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.merged_sections:
            return data
        merged = dict(data)
        for name in cls.merged_sections:
            if isinstance(merged.get(name), dict):
                default = cls.model_fields[name].get_default(call_default_factory=True)
                base = default.model_dump() if isinstance(default, BaseModel) else dict(default)
                merged[name] = deep_merge(base, merged[name])
        return merged

    def config_hash(self) -> str:
        """Stable short hash of the resolved config (identifies a step's output)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=1e-4", "data.sources=[a,b]"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return nested


def _parse_value(raw: str) -> Any:
    """YAML scalars/lists/maps, plus floats like 1e-4 that YAML 1.1 would leave as strings."""
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (),
                **defaults: Any) -> C:
    """Build `cls` from keyword defaults, then a YAML file, then dotted overrides (later wins)."""
    data: dict[str, Any] = dict(defaults)
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of fields, got {type(loaded).__name__}")
        data = deep_merge(data, loaded)
        source = str(path)
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{cls.__name__} from {source}: {problems}") from None
