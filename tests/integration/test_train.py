"""Training jobs on real Ray (2 CPU workers, gloo) and in one plain process, on shapes-world shards."""
import pytest

from pipelines.train.config import TrainConfig
from pipelines.train.state import CheckpointError, latest_checkpoint
from train_support import config, history, make_shards, params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shapes"))


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
    recorded = params(tmp_path, output)
    assert (recorded["world_size"], recorded["device"], recorded["distributed_backend"]) == ("2", "cpu", "gloo")
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


def nan_at(calls: set[int] | None = None, from_call: int | None = None):
    """Stage 1's build, with the loss made NaN at the given forward calls (1-based; or at every call from
    `from_call` on): a loss that overflowed, as the loop sees it."""
    import dataclasses

    from pipelines.train_stage1 import build_stage1

    seen = {"calls": 0}

    def build(cfg, device):
        parts = build_stage1(cfg, device)

        def losses(output):
            seen["calls"] += 1
            terms = parts.losses(output)
            if seen["calls"] in (calls or ()) or (from_call is not None and seen["calls"] >= from_call):
                terms = {**terms, "loss": terms["loss"] * float("nan")}
            return terms

        return dataclasses.replace(parts, losses=losses)

    return build


def finite_weights(checkpoint: str) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for t in load_file(f"{checkpoint}/model.safetensors").values())


def test_a_non_finite_loss_skips_the_step_and_is_counted(shards, tmp_path):
    from pipelines.train.runner import run

    output = tmp_path / "nan-once"
    result = run(config(shards, tmp_path, **{"scaling.workers": 0, "optim.total_steps": 8}), str(output),
                 nan_at(calls={3}))
    assert result["steps"] == 8  # the skipped batch is not a step: 8 updates all the same
    assert [s for s, _ in history(tmp_path, output, "loss")] == list(range(1, 9))
    assert history(tmp_path, output, "train/nonfinite_steps") == [(3, 1.0)]  # while step 3 was being trained
    assert finite_weights(result["checkpoint"])


def test_consecutive_non_finite_losses_stop_with_the_last_good_checkpoint_intact(shards, tmp_path):
    from pipelines.train.loop import NonFiniteLoss
    from pipelines.train.runner import run

    output = tmp_path / "nan-always"
    cfg = config(shards, tmp_path, **{"scaling.workers": 0, "optim.total_steps": 12, "checkpoint.every": 4,
                                      "max_nonfinite": 3})
    with pytest.raises(NonFiniteLoss, match=r"3 consecutive non-finite losses after step 6.*checkpoint is step 4"):
        run(cfg, str(output), nan_at(from_call=7))
    step, checkpoint = latest_checkpoint(str(output))
    assert step == 4 and finite_weights(checkpoint)
    assert not (output / "_SUCCESS.json").exists()  # not recorded as finished: the next run resumes from step 4


def test_stage2_of_a_retrained_stage1_is_neither_reused_nor_resumed(shards, tmp_path):
    """The stage-1 checkpoint is named by path: trained again under the same path, the stage-2 run made from the
    old one is stale. The plain job refuses it before training; the pipeline's (replace_stale) sets it aside."""
    import shutil

    from pipelines import train_stage1, train_stage2
    from pipelines.train.inputs import StaleOutput

    plain = {"scaling.workers": 0, "checkpoint.every": 1}
    cfg1 = config(shards, tmp_path, **plain, **{"optim.total_steps": 2})
    cfg2 = config(shards, tmp_path, **plain, **{"stage": "stage2", "model.init_from": str(tmp_path / "s1"),
                                                "optim.total_steps": 2})
    train_stage1.run(cfg1, str(tmp_path / "s1"))
    first = train_stage2.run(cfg2, str(tmp_path / "s2"))
    assert train_stage2.run(cfg2, str(tmp_path / "s2")) == first  # nothing changed: the recorded result

    shutil.rmtree(tmp_path / "s1")
    train_stage1.run(cfg1, str(tmp_path / "s1"))  # the same config, trained again: new files at the same path
    with pytest.raises(StaleOutput, match="init_from changed"):
        train_stage2.run(cfg2, str(tmp_path / "s2"))
    (tmp_path / "s2" / "_SUCCESS.json").unlink()  # an interrupted stage 2 is refused too (train_inputs.json)
    with pytest.raises(StaleOutput, match="init_from changed"):
        train_stage2.run(cfg2, str(tmp_path / "s2"))

    again = train_stage2.run(cfg2, str(tmp_path / "s2"), replace_stale=True)
    assert again["steps"] == 2 and again["mlflow_run_id"] != first["mlflow_run_id"]  # trained anew
    kept = [p.name for p in tmp_path.iterdir() if p.name.startswith("s2.replaced-")]
    assert len(kept) == 1 and (tmp_path / kept[0] / "checkpoints").is_dir()  # the old run is kept, not deleted


def launch(cfg: TrainConfig, tmp_path, output, name="train.yaml"):
    """`python -m pipelines.train_stage1` as its own process group (so a kill takes its Ray with it)."""
    import subprocess
    import sys

    path = tmp_path / name
    path.write_text(cfg.to_yaml())
    return subprocess.Popen([sys.executable, "-m", "pipelines.train_stage1", "--config", str(path), "--output",
                             str(output)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_killing_the_driver_and_starting_again_resumes(shards, tmp_path):
    import os
    import signal
    import time

    output = tmp_path / "killed"
    cfg = config(shards, tmp_path, **{"optim.total_steps": 40, "checkpoint.every": 5})
    first = launch(cfg, tmp_path, output)
    deadline = time.time() + 240
    while (latest_checkpoint(str(output)) or (0,))[0] < 10 and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[0][-3000:]
    assert latest_checkpoint(str(output))[0] >= 10, "no checkpoint within the time limit"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
    first.wait()
    second = launch(cfg, tmp_path, output, "again.yaml")
    log, _ = second.communicate(timeout=300)
    assert second.returncode == 0, log[-3000:]
    assert "resumed from" in log
    assert latest_checkpoint(str(output))[0] == 40
    assert [s for s, _ in history(tmp_path, output, "loss")] == list(range(1, 41))


def test_a_job_submitted_to_a_local_ray_head_completes(shards, tmp_path):
    import socket
    import subprocess
    import sys

    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    env = {**__import__("os").environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray_bin = str(__import__("pathlib").Path(sys.executable).parent / "ray")
    dashboard = free_port()
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    try:
        output = tmp_path / "submitted"
        cfg = config(shards, tmp_path, **{"optim.total_steps": 6, "checkpoint.every": 3})
        (tmp_path / "job.yaml").write_text(cfg.to_yaml())
        done = subprocess.run([ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                               sys.executable, "-m", "pipelines.train_stage1", "--config", str(tmp_path / "job.yaml"),
                               "--output", str(output)], env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower()
        assert latest_checkpoint(str(output))[0] == 6
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
