"""The training jobs on a GPU (skipped where there is none, as in CI): the loop's bf16 autocast over the frozen
fp16 encoder, a failure and a resume with the CUDA RNG state in the checkpoint, stage 2 with the fp16 OPT
from the stage-1 checkpoint, and the GPU-trained weights as fp32 tensors that load on the CPU."""
import math

import pytest
import torch
from safetensors.torch import load_file

from pipelines.train.state import RNG_FILE, latest_checkpoint
from train_support import config, history, make_shards, params

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shapes"))


def gpu_config(shards, tmp_path, **overrides):
    return config(shards, tmp_path, **{"scaling.workers": 0, "scaling.use_gpu": True, "precision": "auto",
                                       "optim.total_steps": 12, "checkpoint.every": 4, **overrides})


def test_stage1_on_a_gpu_fails_resumes_and_stage2_follows(shards, tmp_path):
    from pipelines import train_stage1, train_stage2

    output = tmp_path / "s1"
    cfg = gpu_config(shards, tmp_path, **{"debug.fail_once_at_step": 6})
    with pytest.raises(RuntimeError, match="injected failure"):
        train_stage1.run(cfg, str(output))
    step, path = latest_checkpoint(str(output))
    assert step == 4
    rng = torch.load(f"{path}/{RNG_FILE}", weights_only=True)
    assert len(rng) == 1 and len(rng[0]["cuda"]) == torch.cuda.device_count()
    result = train_stage1.run(cfg, str(output))  # the same job again: resumes from step 4
    assert result["steps"] == 12 and latest_checkpoint(str(output))[0] == 12
    losses = history(tmp_path, output, "loss")
    assert [s for s, _ in losses] == list(range(1, 13))  # each step once: none repeated, none missing
    assert all(math.isfinite(v) for _, v in losses)
    assert sum(v for _, v in losses[-3:]) < sum(v for _, v in losses[:3])
    weights = load_file(f"{result['checkpoint']}/model.safetensors", device="cpu")
    assert weights and {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    recorded = params(tmp_path, output)
    assert recorded["device"].startswith("cuda:0 (") and recorded["distributed_backend"] == "none", recorded

    cfg2 = gpu_config(shards, tmp_path, **{"stage": "stage2", "model.init_from": result["checkpoint"],
                                           "optim.total_steps": 8})
    assert train_stage2.run(cfg2, str(tmp_path / "s2"))["steps"] == 8
    losses2 = history(tmp_path, tmp_path / "s2", "loss")
    assert [s for s, _ in losses2] == list(range(1, 9)) and losses2[-1][1] < losses2[0][1]
