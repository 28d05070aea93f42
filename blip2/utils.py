"""Small helpers shared across the model library (no I/O)."""
from __future__ import annotations

import os

from torch import nn

_TRUE = {"1", "true", "yes", "on"}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in `module`'s parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import time)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_local_path(name: str) -> bool:
    """A name meant as a path on disk (absolute, ./, ../, ~ or an existing entry), not a hub id."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(name)
