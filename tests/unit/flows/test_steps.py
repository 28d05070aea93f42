"""The per-step flows run their step under Prefect (ephemeral API): train -> evaluate -> index-build."""
import pytest
from train_support import config, make_shards

from flows import steps


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_train_then_evaluate_then_index_as_step_flows(harness, tmp_path):
    shards = make_shards(tmp_path)
    cfg = config(shards, tmp_path, **{"scaling.workers": 0, "optim.total_steps": 4, "samples_to_generate": 0})
    trained = steps.train_flow(cfg, str(tmp_path / "stage1"))
    assert trained["steps"] == 4 and trained["checkpoint"].endswith("step-00000004")
    eval_cfg = steps.evaluate.EvalConfig(checkpoint=str(tmp_path / "stage1"), shards=str(shards), k=8,
                                         tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    report = steps.evaluate_flow("retrieval", eval_cfg, str(tmp_path / "eval"))
    assert report["images"] == 64 and 0 <= report["metrics"]["r_mean"] <= 100
    built = steps.index_build_flow(steps.index.IndexConfig(checkpoint=str(tmp_path / "stage1"), shards=str(shards)),
                                   str(tmp_path / "index"))
    assert built["images"] == 64 and (tmp_path / "index" / "index.faiss").exists()
