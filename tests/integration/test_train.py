"""Training jobs on real Ray (2 CPU workers, gloo) and in one plain process, on shapes-world shards."""
import json

import pytest
from mlflow.tracking import MlflowClient

from pipelines.shapes import synth
from pipelines.shapes.shards import pack_split
from pipelines.train.config import TrainConfig
from pipelines.train.state import CheckpointError, latest_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
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


def history(tmp_path, output, key):
    run_id = json.load(open(output / "mlflow_run.json"))["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_stage1_on_two_ray_workers_survives_a_worker_failure(shards, tmp_path):
    from pipelines import train_stage1

    output = tmp_path / "stage1"
    cfg = config(shards, tmp_path, **{"debug.fail_once_at_step": 6})
    result = train_stage1.run(cfg, str(output))
    assert result["steps"] == 12 and latest_checkpoint(str(output))[0] == 12
    assert (output / ".failed-once-at-6").exists()  # the failure did happen, and the run completed anyway
    losses = history(tmp_path, output, "loss")
    assert [step for step, _ in losses] == list(range(1, 13))  # each step once: none repeated, none missing
    assert sum(v for _, v in losses[-3:]) < sum(v for _, v in losses[:3])  # it learns
    widths = history(tmp_path, output, "itc_width")
    assert {v for _, v in widths} == {16.0}  # ITC logits span the global batch: 2 workers x 8
    # the same job again: already finished, returns the recorded result
    assert train_stage1.run(cfg, str(output))["steps"] == 12


def test_stage1_plain_process_then_stage2_from_its_checkpoint(shards, tmp_path):
    from pipelines import train_stage1, train_stage2

    stage1 = train_stage1.run(config(shards, tmp_path, **{"scaling.workers": 0, "optim.total_steps": 4}),
                              str(tmp_path / "s1"))
    cfg2 = config(shards, tmp_path, **{"stage": "stage2", "model.init_from": stage1["checkpoint"],
                                       "optim.total_steps": 6, "scaling.workers": 2})
    result = train_stage2.run(cfg2, str(tmp_path / "s2"))
    assert result["steps"] == 6
    losses = history(tmp_path, tmp_path / "s2", "loss")
    assert [s for s, _ in losses] == list(range(1, 7)) and losses[-1][1] < losses[0][1]


def test_a_checkpoint_from_another_config_is_refused(shards, tmp_path):
    from pipelines import train_stage1

    output = tmp_path / "job"
    train_stage1.run(config(shards, tmp_path, **{"scaling.workers": 0, "optim.total_steps": 2,
                                                 "checkpoint.every": 1}), str(output))
    (output / "_SUCCESS.json").unlink()
    with pytest.raises(CheckpointError, match="config"):
        train_stage1.run(config(shards, tmp_path, **{"scaling.workers": 0, "optim.total_steps": 3,
                                                     "optim.lr": 5e-4}), str(output))
