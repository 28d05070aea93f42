"""The training jobs under Ray Train on a GPU (skipped where there is none, as in CI): one TorchTrainer worker
that holds the GPU (`use_gpu`, so the nccl backend), a worker failure at step 6 that FailureConfig answers by
restarting the worker group from the step-4 checkpoint, MLflow steps neither repeated nor missing, and stage 2
under Ray on the GPU from that stage-1 checkpoint. One GPU is enough: two nccl ranks may not share a device."""
import math

import pytest
import torch
from safetensors.torch import load_file

from pipelines.train.state import latest_checkpoint
from train_support import config, history, make_shards, params

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)  # the jobs below find it running and keep it
    yield ray
    ray.shutdown()


def ray_gpu_config(shards, tmp_path, **overrides):
    return config(shards, tmp_path, **{"scaling.workers": 1, "scaling.use_gpu": True, "scaling.cpus_per_worker": 2,
                                       "scaling.max_failures": 1, "precision": "auto", "optim.total_steps": 12,
                                       "checkpoint.every": 4, **overrides})


def test_stage1_under_ray_on_a_gpu_survives_a_worker_failure_and_stage2_follows(ray_with_a_gpu, shards, tmp_path):
    from pipelines import train_stage1, train_stage2

    output = tmp_path / "s1"
    result = train_stage1.run(ray_gpu_config(shards, tmp_path, **{"debug.fail_once_at_step": 6}), str(output))
    assert result["steps"] == 12 and latest_checkpoint(str(output))[0] == 12
    assert (output / ".failed-once-at-6").exists()  # the worker did fail, and the restarted group finished
    losses = history(tmp_path, output, "loss")
    assert [s for s, _ in losses] == list(range(1, 13))  # each step once: none repeated, none missing
    assert all(math.isfinite(v) for _, v in losses)
    assert sum(v for _, v in losses[-3:]) < sum(v for _, v in losses[:3])
    assert {v for _, v in history(tmp_path, output, "itc_width")} == {8.0}  # one worker: the global batch is 8
    recorded = params(tmp_path, output)
    assert recorded["device"].startswith("cuda:0 (") and recorded["distributed_backend"] == "nccl", recorded
    weights = load_file(f"{result['checkpoint']}/model.safetensors", device="cpu")
    assert weights and {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}

    cfg2 = ray_gpu_config(shards, tmp_path, **{"stage": "stage2", "model.init_from": result["checkpoint"],
                                               "optim.total_steps": 8})
    assert train_stage2.run(cfg2, str(tmp_path / "s2"))["steps"] == 8
    losses2 = history(tmp_path, tmp_path / "s2", "loss")
    assert [s for s, _ in losses2] == list(range(1, 9)) and losses2[-1][1] < losses2[0][1]
