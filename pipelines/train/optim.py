"""AdamW with decoupled weight decay, and the per-iteration learning-rate schedule (SPEC section 5).

Schedule, as a function of the number of optimizer steps already taken (`step` 0 is the first update):

    step <  warmup_steps:               linear from warmup_start_lr to lr
    warmup_steps <= step <= total_steps: cosine from lr down to min_lr
    step >  total_steps:                flat at min_lr

The warmup start follows LAVIS (its `warmup_lr_schedule` goes linearly from `warmup_lr`, 1e-6 in the
BLIP-2 pretraining configs, to `init_lr`), but unlike LAVIS the warmup is not confined to epoch 0 and
the cosine is stepped every iteration, not every epoch (SPEC section 8). With gradient accumulation a
"step" is one optimizer update, not one micro-batch.

Weight decay: none on any parameter with fewer than two dimensions, i.e. biases, LayerNorm weights and
the 0-dim ITC temperature. The reference decays the temperature; we do not (decaying a temperature
pulls it towards 0, i.e. towards sharper logits, which is not a regulariser). The query tokens
(1, Q, D) are 3-D and keep their decay, as in the reference and the rule "no decay on biases and 1-D
parameters".
"""
from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class OptimConfig(BaseModel):
    """AdamW and schedule settings (paper values as defaults; `total_steps` has no default)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-4, gt=0, description="peak learning rate, reached at the end of warmup")
    min_lr: float = Field(1e-5, ge=0, description="the cosine ends here at total_steps (stage 2: 5e-5)")
    warmup_steps: int = Field(2000, ge=0, description="linear warmup length in optimizer steps")
    warmup_start_lr: float = Field(1e-6, ge=0, description="learning rate of the first step (LAVIS warmup_lr)")
    total_steps: int = Field(..., gt=0, description="optimizer steps in the whole run (the cosine's end)")
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.05, ge=0, description="on parameters with 2 or more dimensions only")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip_grad_norm: float | None = Field(None, gt=0, description="max global gradient norm; None: no clipping "
                                                                 "(the reference does not clip)")

    @model_validator(mode="after")
    def _consistent(self) -> "OptimConfig":
        """Reject settings that make the schedule meaningless, naming the fields involved."""
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_start_lr > self.lr:
            raise ValueError(f"warmup_start_lr ({self.warmup_start_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps}): "
                             f"the run would end before reaching the peak lr; lower optim.warmup_steps")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas {self.betas}: each must be in [0, 1)")
        return self


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups over the parameters that require grad (frozen parts are left out).

    Each group is {"group": "decay"|"no_decay", "params": [...], "param_names": [...], "weight_decay": ...};
    "param_names" is kept by torch in the optimizer's state dict (and checked on resume). Parameters with
    fewer than two dimensions (biases, norms, the temperature) get no decay; see the module docstring.
    Empty groups are omitted.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():  # shared parameters are listed once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append((name, param))
    groups = []
    for label, members, decay_value in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if members:
            groups.append({"group": label, "params": [p for _, p in members],
                           "param_names": [n for n, _ in members], "weight_decay": decay_value})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, cfg.weight_decay)`; torch picks the fused/foreach implementation."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError(f"build_optimizer: {type(model).__name__} has no parameter that requires grad")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step `step` (0-based; see the module docstring)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    if step >= cfg.total_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)  # in [0, 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is lr_at(step) / cfg.lr, so every group's lr follows `lr_at` (the groups'
    base lr is cfg.lr). Call `scheduler.step()` once after each `optimizer.step()`.

    The factor is a plain function (a closure), so the scheduler's state dict holds only numbers and
    round-trips through `torch.load(weights_only=True)`.
    """
    for group in optimizer.param_groups:
        if group.get("initial_lr", group["lr"]) != cfg.lr:
            raise ValueError(f"build_scheduler: a parameter group has base lr {group['lr']}, expected cfg.lr "
                             f"({cfg.lr}); build the optimizer with build_optimizer(model, cfg)")

    def factor(step: int) -> float:
        return lr_at(step, cfg) / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
