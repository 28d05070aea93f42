"""Optimizer parameter groups and the per-iteration learning-rate schedule."""
import io
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipelines.train.optim import OptimConfig, build_optimizer, build_scheduler, lr_at, param_groups
from tiny_models import tiny_stage1


def test_decay_groups_on_the_stage1_model():
    model = tiny_stage1()
    groups = {g["group"]: g for g in param_groups(model, 0.05)}
    decay, no_decay = set(groups["decay"]["param_names"]), set(groups["no_decay"]["param_names"])
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert not any(n.startswith("visual.") for n in decay | no_decay)  # the frozen encoder is left out
    assert {"temp", "ln_vision.weight", "ln_vision.bias"} <= no_decay
    assert "query_tokens" in decay
    assert {n for n in trainable if n.endswith(".bias")} <= no_decay
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and not name.startswith("visual."):
            assert f"{name}.weight" in no_decay, name
        if isinstance(module, nn.Linear) and not name.startswith("visual.") and module.weight.requires_grad:
            assert f"{name}.weight" in decay, name
    for group in groups.values():  # names and tensors line up
        named = dict(model.named_parameters())
        assert all(named[n] is p for n, p in zip(group["param_names"], group["params"]))


def test_optimizer_keeps_the_groups_and_names():
    model = tiny_stage1()
    optimizer = build_optimizer(model, OptimConfig(total_steps=10, warmup_steps=0))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["group"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    saved = optimizer.state_dict()["param_groups"]
    assert "temp" in saved[1]["param_names"] and "query_tokens" in saved[0]["param_names"]


def test_lr_at_by_hand():
    cfg = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_start_lr=1e-6, warmup_steps=10, total_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(5, cfg) == pytest.approx(5.05e-5, rel=1e-12)  # 1e-6 + 0.5 * 9.9e-5
    assert lr_at(10, cfg) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(35, cfg) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-12)  # a quarter
    assert lr_at(60, cfg) == pytest.approx(5.5e-5, rel=1e-12)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-5, rel=1e-12)
    assert lr_at(111, cfg) == lr_at(10_000, cfg) == 1e-5
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    no_warmup = OptimConfig(warmup_steps=0, total_steps=4, lr=1e-3, min_lr=0.0)
    assert [lr_at(s, no_warmup) for s in range(5)] == pytest.approx([1e-3, 8.5355339e-4, 5e-4, 1.4644661e-4, 0.0])


def test_config_validation_names_the_fields():
    with pytest.raises(ValidationError, match="total_steps"):
        OptimConfig()
    with pytest.raises(ValidationError, match="warmup_steps"):
        OptimConfig(total_steps=100)  # default warmup 2000 > 100
    with pytest.raises(ValidationError, match="min_lr"):
        OptimConfig(total_steps=100, warmup_steps=0, min_lr=1.0)
    with pytest.raises(ValidationError, match="lr_typo"):
        OptimConfig(total_steps=100, warmup_steps=0, lr_typo=1.0)
    assert OptimConfig(total_steps=10, warmup_steps=0, clip_grad_norm=1.0).clip_grad_norm == 1.0


def _fresh(cfg):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, cfg)
    return model, optimizer, build_scheduler(optimizer, cfg)


def _step(model, optimizer, scheduler):
    model(torch.ones(2, 3)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_scheduler_follows_lr_at_across_a_state_dict_round_trip():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=4, total_steps=12)
    model, optimizer, scheduler = _fresh(cfg)
    uninterrupted = []
    for _ in range(16):
        uninterrupted.append([g["lr"] for g in optimizer.param_groups])
        _step(model, optimizer, scheduler)
    for step, lrs in enumerate(uninterrupted):
        assert lrs == pytest.approx([lr_at(step, cfg)] * 2, rel=1e-12), step

    model, optimizer, scheduler = _fresh(cfg)
    for _ in range(6):
        _step(model, optimizer, scheduler)
    blob = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    model, optimizer, scheduler = _fresh(cfg)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    resumed = []
    for _ in range(6, 16):
        resumed.append([g["lr"] for g in optimizer.param_groups])
        _step(model, optimizer, scheduler)
    assert resumed == uninterrupted[6:]


def test_precision_setting_picks_the_autocast():
    import torch

    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import autocast

    base = {"data": {"sources": [{"name": "a", "shards": "x"}]}}
    cpu_auto = TrainConfig.model_validate(base)
    assert type(autocast(cpu_auto)).__name__ == "nullcontext"  # fp32 on the CPU
    bf16 = TrainConfig.model_validate({**base, "precision": "bf16"})
    with autocast(bf16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
