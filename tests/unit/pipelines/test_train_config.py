import os

from pipelines.train.config import TrainConfig
from pipelines.train.runner import absolute_paths


def test_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.model_validate({
        "data": {"sources": [{"name": "a", "shards": "raw/a"}, {"name": "b", "shards": ["x/0.tar", "s3://b/1.tar"]},
                             {"name": "c", "shards": "/abs/c"}]},
        "model": {"init_from": "runs/stage1/checkpoints/step-1"}})
    fixed = absolute_paths(cfg)
    assert fixed.data.sources[0].shards == os.path.join(str(tmp_path), "raw/a")
    assert fixed.data.sources[1].shards == [os.path.join(str(tmp_path), "x/0.tar"), "s3://b/1.tar"]
    assert fixed.data.sources[2].shards == "/abs/c"
    assert fixed.model.init_from == os.path.join(str(tmp_path), "runs/stage1/checkpoints/step-1")
