"""Shared by the training integration tests: small shapes-world shards, a tiny training config, and a job's
MLflow metric history."""
import json

from mlflow.tracking import MlflowClient

from pipelines.shapes import synth
from pipelines.shapes.shards import pack_split
from pipelines.train.config import TrainConfig


def make_shards(root):
    synth.run(synth.SynthConfig(split="curated", images=64, seed=0, image_size=32), str(root), progress=False)
    pack_split(root, "curated", root / "shards", per_shard=16)  # 4 shards: one per reader with 2 x 2
    return root / "shards"


def config(shards, tmp_path, **overrides) -> TrainConfig:
    base = {
        "data": {"sources": [{"name": "curated", "shards": str(shards)}], "image_size": 32, "batch_size": 8,
                 "shuffle_buffer": 16, "num_workers": 0},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 2, "total_steps": 12, "weight_decay": 0.0},
        "scaling": {"workers": 2, "max_failures": 1},
        "checkpoint": {"every": 4, "keep": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "system_metrics": False},
        "model": {"qformer": {"dropout": 0.0}},
        "max_text_length": 24, "samples_to_generate": 2,
    }
    for key, value in overrides.items():
        node = base
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return TrainConfig.model_validate(base)


def history(tmp_path, output, key) -> list[tuple[int, float]]:
    """(step, value) of metric `key` of the job in `output` (its run id in mlflow_run.json), tracked in
    `tmp_path`/mlflow.db as `config` sets it."""
    run_id = json.load(open(output / "mlflow_run.json"))["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def params(tmp_path, output) -> dict[str, str]:
    """The MLflow params of the job in `output`, tracked as `history` reads them."""
    run_id = json.load(open(output / "mlflow_run.json"))["run_id"]
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.params
