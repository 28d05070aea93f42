"""Training into an object store: a real S3 API (moto's server on 127.0.0.1) through s3fs.

Each "node" has its own staging directory; the object store is what they share. The tests wipe a node's
staging directory to play a fresh node that has only the bucket to go on."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines import io
from pipelines.config import ConfigError
from pipelines.train import storage
from pipelines.train.state import list_checkpoints

from train_support import config, make_shards

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback; the fsspec/boto environment points at it (Ray workers inherit it)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # this process read the FSSPEC_* variables at import
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fsspec.config.conf.pop("s3", None)


@pytest.fixture
def bucket(s3_endpoint, tmp_path, monkeypatch):
    name = f"runs-{os.getpid()}-{time.time_ns() % 10**9}"
    fs, _ = io.fs_and_path(f"s3://{name}")
    fs.mkdir(name)
    monkeypatch.setenv("BLIP2_STAGING_DIR", str(tmp_path / "node-a"))
    return f"s3://{name}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shapes"))


def metric_steps(tmp_path, run_id, key="loss"):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_remote_output_needs_a_tracking_server(shards, tmp_path, bucket, monkeypatch):
    from pipelines import train_stage1

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(shards, tmp_path, **{"tracking.uri": None, "scaling.workers": 0})
    with pytest.raises(ConfigError, match="tracking.uri"):
        train_stage1.run(cfg, f"{bucket}/job")


def test_stage1_into_s3_resumes_on_a_fresh_node_and_stage2_starts_from_the_uri(shards, tmp_path, bucket,
                                                                               monkeypatch):
    from pipelines import train_stage1, train_stage2

    output = f"{bucket}/stage1"
    cfg = config(shards, tmp_path, **{"scaling.workers": 0, "optim.total_steps": 10, "checkpoint.every": 3,
                                      "checkpoint.keep": 2, "debug.fail_once_at_step": 8})
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        train_stage1.run(cfg, output)
    assert [step for step, _ in storage.remote_checkpoints(output)] == [3, 6]  # keep=2, committed uploads only
    # an upload cut short (files but no _COMMITTED marker) is never resumed from
    fs, path = io.fs_and_path(f"{output}/checkpoints/step-00000007")
    fs.pipe_file(f"{path}/state.json", b"{}")
    assert storage.latest(output)[0] == 6

    monkeypatch.setenv("BLIP2_STAGING_DIR", str(tmp_path / "node-b"))  # another node: only the bucket to go on
    result = train_stage1.run(cfg, output)
    assert result["steps"] == 10 and result["checkpoint"] == f"{output}/checkpoints/step-00000010"
    assert [step for step, _ in storage.remote_checkpoints(output)] == [9, 10]
    assert not fs.exists(path), "the uncommitted upload was pruned"
    run_id = json.loads(fs.cat_file(io.fs_and_path(f"{output}/mlflow_run.json")[1]))["run_id"]
    assert metric_steps(tmp_path, run_id) == list(range(1, 11))  # resumed at 6: none repeated, none missing
    assert io.exists(f"{output}/_SUCCESS.json") and io.exists(f"{output}/train_metrics.json")
    node_b = storage.work_dir(output)
    assert node_b.startswith(str(tmp_path / "node-b")) and [s for s, _ in list_checkpoints(node_b)] == [9, 10]

    monkeypatch.setenv("BLIP2_STAGING_DIR", str(tmp_path / "node-c"))
    cfg2 = config(shards, tmp_path, **{"stage": "stage2", "model.init_from": result["checkpoint"],
                                       "optim.total_steps": 4, "checkpoint.every": 2, "scaling.workers": 2})
    result2 = train_stage2.run(cfg2, f"{bucket}/stage2")
    assert result2["steps"] == 4
    assert [step for step, _ in storage.remote_checkpoints(f"{bucket}/stage2")] == [2, 4]
