"""MLflow tracking of training jobs: resume, buffered metrics, nested runs, curves, registered checkpoints.

Real MLflow on an SQLite database under tmp_path; one database per module (creating one costs ~1.5 s)."""
import json
import os
import time

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from safetensors.numpy import save_file

from pipelines.train.tracking import (NONFINITE_METRIC, NullTracker, Tracker, check_alias, default_tracking_uri,
                                      flatten_params, global_tracking_uri, make_tracker)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return default_tracking_uri(str(tmp_path_factory.mktemp("mlflow_root")))


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    """No MLflow settings from outside, and none left behind for other tests."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield
    assert "MLFLOW_TRACKING_URI" not in os.environ, "a Tracker leaked the tracking URI into the environment"
    assert mlflow.active_run() is None, "a Tracker left a fluent run active"


def open_tracker(uri, output, **kwargs):
    kwargs.setdefault("system_metrics", False)
    return Tracker(uri, kwargs.pop("experiment", "tests"), kwargs.pop("run_name", "run"), str(output), **kwargs)


def steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_default_tracking_uri(monkeypatch, tmp_path):
    assert default_tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(str(tmp_path)) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def test_flatten_params_dotted_and_truncated():
    flat = flatten_params({"optim": {"lr": 1e-4, "betas": [0.9, 0.98]}, "name": "x", "empty": {}, "none": None,
                           "long": "y" * 7000})
    assert flat["optim.lr"] == "0.0001" and flat["optim.betas"] == "[0.9, 0.98]" and flat["name"] == "x"
    assert flat["empty"] == "{}" and flat["none"] == "null"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")


def test_params_logged_and_resume_continues_the_run(uri, tmp_path):
    first = open_tracker(uri, tmp_path)
    first.log_params({"optim": {"lr": 1e-4}, "seed": 1, "long": "y" * 7000})
    first.finish()
    assert json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"] == first.run_id

    second = open_tracker(uri, tmp_path)
    assert second.resumed and second.run_id == first.run_id
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.log_params({"optim": {"lr": 2e-4}, "seed": 1})  # lr changed, seed the same
    second.finish()
    third = open_tracker(uri, tmp_path)
    third.log_params({"optim": {"lr": 3e-4}, "seed": 1})
    third.log_params({"optim": {"lr": 3e-4}})  # again: nothing new
    third.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0001" and run.data.params["seed"] == "1"
    assert run.data.params["resumed.optim.lr"] == "0.0002" and run.data.params["resumed2.optim.lr"] == "0.0003"
    assert len(run.data.params["long"]) == 6000


def test_flush_discard_and_crash_resume_log_each_step_once(uri, tmp_path):
    client = MlflowClient(uri)
    before_crash = open_tracker(uri, tmp_path)
    for step in range(1, 11):
        before_crash.log_metrics({"loss": 1.0 / step, "grad_norm": float("nan") if step == 3 else 1.0}, step)
    assert before_crash.flush(5) == 10  # steps 1..5, two keys, one of them non-finite + its count
    assert steps(client, before_crash.run_id, "loss") == [1, 2, 3, 4, 5]
    assert before_crash.discard_after(5) == 10 and before_crash.pending == 0
    # the process dies here without finish(); the job restarts from checkpoint 5
    after_crash = open_tracker(uri, tmp_path)
    assert after_crash.run_id == before_crash.run_id
    for step in range(6, 11):
        after_crash.log_metrics({"loss": 1.0 / step, "grad_norm": 1.0}, step)
    after_crash.finish()

    assert steps(client, after_crash.run_id, "loss") == list(range(1, 11))
    assert steps(client, after_crash.run_id, "grad_norm") == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    counts = client.get_metric_history(after_crash.run_id, NONFINITE_METRIC)
    assert [(m.step, m.value) for m in counts] == [(3, 1.0)]


def test_a_crash_between_checkpoint_and_flush_loses_no_step(uri, tmp_path):
    client = MlflowClient(uri)
    before_crash = open_tracker(uri, tmp_path)
    for step in range(1, 11):
        before_crash.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    assert before_crash.flush(5) == 10
    rows = json.loads(json.dumps(before_crash.unwritten(10)))  # kept in checkpoint 10's state.json
    assert [r[0] for r in rows if r[1] == "loss"] == [6, 7, 8, 9, 10]
    partial = [Metric("loss", 1.0 / s, 0, s) for s in (6, 7)]  # the flush got as far as step 7's loss
    before_crash.client.log_batch(before_crash.run_id, metrics=partial, synchronous=True)
    # the process dies here; the job restarts from checkpoint 10 and recovers what MLflow lacks
    after_crash = open_tracker(uri, tmp_path)
    assert after_crash.recover(rows) == 3 + 5  # loss 8..10, lr 6..10
    assert after_crash.recover(rows) == 0  # idempotent
    for step in range(11, 13):
        after_crash.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    after_crash.finish()
    assert steps(client, after_crash.run_id, "loss") == list(range(1, 13))
    assert steps(client, after_crash.run_id, "lr") == list(range(1, 13))
    assert NullTracker().unwritten(5) == [] and NullTracker().recover(rows) == 0


def test_flush_writes_in_batches_of_at_most_1000(uri, tmp_path, monkeypatch):
    tracker = open_tracker(uri, tmp_path)
    sizes = []
    original = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch",
                        lambda run_id, metrics=(), **kw: (sizes.append(len(metrics)), original(run_id, metrics, **kw)))
    for step in range(1, 1251):
        tracker.log_metrics({"a": step, "b": -step}, step)
    tracker.log_metrics({"a": 7.0}, 1)  # the same key and step again: replaces the first value
    assert tracker.flush(1200) == 2400 and tracker.pending == 100
    tracker.finish()
    assert sizes == [1000, 1000, 400, 100]
    history = MlflowClient(uri).get_metric_history(tracker.run_id, "a")
    assert len(history) == 1250 and [m.value for m in history if m.step == 1] == [7.0]


def test_exception_in_context_fails_the_run_and_drops_unsaved_metrics(uri, tmp_path):
    with pytest.raises(RuntimeError):
        with open_tracker(uri, tmp_path) as tracker:
            for step in range(1, 4):
                tracker.log_metrics({"loss": 1.0}, step)
            tracker.flush(2)
            raise RuntimeError("worker died")
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert steps(client, tracker.run_id, "loss") == [1, 2]


def test_child_run_nested_under_parent(uri, tmp_path):
    client = MlflowClient(uri)
    parent = client.create_run(client.get_experiment_by_name("tests").experiment_id, run_name="flow")
    child = open_tracker(uri, tmp_path / "stage1", parent_run_id=parent.info.run_id, run_name="stage1")
    child.finish()
    found = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [r.info.run_id for r in found] == [child.run_id]
    assert found[0].info.run_name == "stage1"


def test_loss_curves_png_logged(uri, tmp_path):
    tracker = open_tracker(uri, tmp_path)
    for step in range(1, 31):
        tracker.log_metrics({"loss": 2.0 / step, "loss_itc": 1.0 / step}, step)
    tracker.flush(20)  # 21..30 still buffered: plotted too
    path = tracker.log_loss_curves(["loss", "loss_itc", "never_logged"])
    tracker.finish()
    assert path == str(tmp_path / "plots" / "loss_curves.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "loss_curves.png" in [a.path for a in MlflowClient(uri).list_artifacts(tracker.run_id)]


def write_checkpoint(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"preset": "tiny"}))
    (path / "state.json").write_text(json.dumps({"step": 7}))
    (path / "optimizer.pt").write_bytes(b"not part of the model")
    save_file({"query_tokens": np.zeros((1, 4, 8), dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def test_checkpoint_registered_with_alias_and_loadable_offline(uri, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "checkpoints" / "step-7")
    tracker = open_tracker(uri, tmp_path / "out")
    with pytest.raises(ValueError, match="reserved"):
        tracker.log_checkpoint_model(str(checkpoint), "blip2-tiny", "latest")
    with global_tracking_uri(uri), mlflow.start_run(experiment_id=tracker.experiment_id) as outer:
        started = time.perf_counter()
        version = tracker.log_checkpoint_model(str(checkpoint), "blip2-tiny", "current")
        seconds = time.perf_counter() - started
        assert mlflow.active_run().info.run_id == outer.info.run_id  # the outer fluent run is untouched
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # logging the model did not end the run
    tracker.finish()

    assert version == "1" and seconds < 15
    by_alias = client.get_model_version_by_alias("blip2-tiny", "current")
    assert str(by_alias.version) == version and by_alias.run_id == tracker.run_id
    with global_tracking_uri(uri):
        model = mlflow.pyfunc.load_model("models:/blip2-tiny@current")
    out = model.predict(["anything"])
    assert out["files"] == ["config.json", "model.safetensors", "state.json"]
    assert out["config"] == {"preset": "tiny"}


def test_artifacts_stay_under_the_artifact_location_not_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = default_tracking_uri(str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    tracker = open_tracker(uri, tmp_path / "root" / "stage1", system_metrics=True, system_metrics_interval=0.1)
    tracker.log_dict({"a": 1}, "config/resolved.json")
    tracker.log_text("hello", "notes.txt")
    tracker.log_artifact(__file__, "code")
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_loss_curves(["loss"], name="plots/curves.png")
    assert tracker.log_checkpoint_model(str(write_checkpoint(tmp_path / "ckpt")), None, "latest") is None
    time.sleep(0.5)
    tracker.finish()
    explicit = open_tracker(uri, tmp_path / "other", experiment="explicit",
                            artifact_location=str(tmp_path / "custom"))
    explicit.log_text("x", "x.txt")
    explicit.finish()

    assert not (elsewhere / "mlruns").exists() and os.listdir(elsewhere) == []
    run_dir = tmp_path / "root" / "mlartifacts" / "tests" / tracker.run_id / "artifacts"
    assert (run_dir / "config" / "resolved.json").exists() and (run_dir / "plots" / "curves.png").exists()
    assert (run_dir / "notes.txt").exists() and (run_dir / "code" / "test_tracking.py").exists()
    assert list((tmp_path / "root" / "mlartifacts" / "tests" / "models").iterdir())
    assert (tmp_path / "custom" / explicit.run_id / "artifacts" / "x.txt").exists()
    metrics = MlflowClient(uri).get_run(tracker.run_id).data.metrics
    assert any(key.startswith("system/cpu_utilization") for key in metrics)


def test_null_tracker_on_other_ranks(tmp_path):
    tracker = make_tracker(1, tracking_uri="sqlite:///nowhere.db", experiment="x", run_name="x",
                           output_uri=str(tmp_path))
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    with tracker:
        tracker.log_params({"a": 1})
        tracker.set_tags({"b": 2})
        tracker.log_metrics({"loss": 1.0}, 1)
        assert tracker.flush(1) == 0 and tracker.discard_after(0) == 0
        tracker.log_dict({}, "a.json")
        assert tracker.log_loss_curves(["loss"]) is None
        assert tracker.log_checkpoint_model(str(tmp_path), "m", "a") is None
    assert os.listdir(tmp_path) == []


def test_check_alias():
    assert check_alias("champion") == "champion"
    for bad in ("latest", "Latest", "v3", "has space", ""):
        with pytest.raises(ValueError):
            check_alias(bad)


def test_unknown_recorded_run_starts_a_new_one(uri, tmp_path):
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32}))
    tracker = open_tracker(uri, tmp_path)
    tracker.finish()
    assert not tracker.resumed and tracker.run_id != "0" * 32
    assert json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"] == tracker.run_id
