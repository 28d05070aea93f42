"""The training job's config: one pydantic model for stage 1 and stage 2 (YAML + dotted overrides)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from blip2.config import Blip2Config, preset
from pipelines.config import StepConfig
from pipelines.data.loader import LoaderConfig
from pipelines.train.optim import OptimConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    preset: str = "tiny"
    vision: dict[str, Any] = Field(default_factory=dict, description="VisionConfig fields to override")
    qformer: dict[str, Any] = Field(default_factory=dict, description="QFormerConfig fields to override")
    llm: dict[str, Any] = Field(default_factory=dict, description="LLMConfig fields to override (stage 2)")
    tokenizer: str | None = Field(None, description="local BERT dir; None: the offline shapes-world vocabulary")
    itc_gather_grad: bool = False
    init_from: str | None = Field(None, description="stage 2: the stage-1 checkpoint directory to start from")

    def resolve(self, vocab_size: int | None = None) -> Blip2Config:
        """The preset with this section's overrides (and the tokenizer's vocabulary size) applied."""
        cfg = preset(self.preset)
        qformer = {**self.qformer, **({"vocab_size": vocab_size} if vocab_size else {})}
        llm = dataclasses.replace(cfg.llm, **self.llm) if cfg.llm is not None else None
        return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **self.vision),
                                   qformer=dataclasses.replace(cfg.qformer, **qformer), llm=llm,
                                   itc_gather_grad=self.itc_gather_grad)


class ScalingSection(_Section):
    workers: int = Field(2, ge=0, description="Ray Train workers; 0 = one plain process, no Ray")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")


class CheckpointSection(_Section):
    every: int = Field(100, gt=0, description="steps between checkpoints (a final one is always written)")
    keep: int = Field(3, gt=0)


class TrackingSection(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI or "
                                              "sqlite:///<output>/../mlflow.db")
    experiment: str = "blip2-pretrain"
    run_name: str | None = None
    parent_run_id: str | None = None
    register_as: str | None = Field(None, description="registered model name of the final checkpoint "
                                                      "(default blip2-<stage>)")
    alias: str = "current"
    system_metrics: bool = True


class DebugSection(_Section):
    fail_once_at_step: int | None = Field(None, description="raise once at this step (fault-tolerance drills)")


class TrainConfig(StepConfig):
    stage: Literal["stage1", "stage2"] = "stage1"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: LoaderConfig
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(total_steps=100, warmup_steps=10))
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    debug: DebugSection = Field(default_factory=DebugSection)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="trainable parts: auto = bf16 autocast on GPU, fp32 on CPU (frozen encoder fp16 and "
                            "LLM fp16/bf16 on GPU either way; fp16 Q-Former training gives NaNs: not offered)")
    max_text_length: int = Field(32, gt=1)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    max_nonfinite: int = Field(5, gt=0, description="consecutive non-finite losses before the job stops")
    samples_to_generate: int = Field(8, ge=0, description="captions generated at the end, logged to MLflow")

    def identity_hash(self) -> str:
        """Hash of what defines the run's results (not how it is scaled, logged or drilled)."""
        fixed = self.model_dump(mode="json", exclude={"scaling": True, "tracking": True, "debug": True,
                                                      "log_every": True, "samples_to_generate": True,
                                                      "data": {"cache_mb"}})  # the cache draws the same batches
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]
