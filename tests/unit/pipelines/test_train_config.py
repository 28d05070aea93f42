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


def test_identity_ignores_how_a_run_is_scaled_logged_or_cached_but_not_what_it_learns():
    base = TrainConfig.model_validate({"data": {"sources": [{"name": "a", "shards": "/d/a"}]}})
    same = base.model_copy(update={"log_every": 3, "data": base.data.model_copy(update={"cache_mb": 512})})
    other = base.model_copy(update={"data": base.data.model_copy(update={"batch_size": 7})})
    assert same.identity_hash() == base.identity_hash()
    assert other.identity_hash() != base.identity_hash()
