"""`blip2 demo` end to end at a small size: shapes world -> faulty server -> img2dataset -> loader check."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

SMALL = ["curated_images=40", "web_images=40", "test_images=10", "loader_batches=2", "loader_batch_size=8",
         "faults.slow=0", "faults.not_found=0.1", "faults.corrupt=0.05", "train_workers=0", "stage1_steps=4",
         "stage2_steps=3", "train_batch_size=8", "stage1_batch_size=null", "foundation.held_out=8", "foundation.views=0",
         "foundation.clip.steps=10", "foundation.clip.region_steps=5", "foundation.clip.batch=16",
         "foundation.captioner.steps=10", "foundation.captioner.batch=8", "foundation.captioner.samples=2",
         "foundation.opt.steps=5", "foundation.t5.steps=5", "capfilt.num_captions=3", "capfilt.max_new_tokens=12", "eval_k=16"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_demo(run_root, port):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.demo", "--run-root", str(run_root), *SMALL,
                           f"port={port}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, time.perf_counter() - start


def test_demo_writes_the_summary_and_resumes(tmp_path):
    port = free_port()
    out, _ = run_demo(tmp_path, port)
    summary = json.loads((tmp_path / "summary.json").read_text())
    download = summary["download"]
    assert download["attempted"] == 90
    assert 0.6 < download["success_rate"] < 1.0  # faults were injected and counted
    assert download["succeeded"] + sum(download["failure_reasons"].values()) == download["attempted"]
    assert {"http_404", "decode_error"} <= set(download["failure_reasons"])
    assert summary["synth"]["web"]["noise"]["clean"] == 24  # 40 web images, noise rate 0.4
    for split in ("curated", "web", "test"):
        assert (tmp_path / "data" / split / "_SUCCESS.json").exists()
        assert (tmp_path / "raw" / split / "_SUCCESS.json").exists()
        assert list((tmp_path / "raw" / split).glob("*.tar"))
    assert set(summary["foundation"]["metrics"]) == {"clip", "captioner", "opt", "t5"}
    capfilt = summary["capfilt"]
    assert capfilt["images"] == download["splits"]["web"]["succeeded"] and capfilt["candidates"] == 3 * capfilt["images"]
    assert 0 <= capfilt["web_precision"] <= 1 and 0 <= capfilt["kept_precision"] <= 1
    check = summary["loader_check"]
    assert check["batch_shape"] == [8, 3, 96, 96] and sum(check["drawn"].values()) == 16
    assert (tmp_path / "loader_check.png").stat().st_size > 1000
    assert "== download:" in out and "caption:" in out
    assert summary["train_stage1"]["steps"] == 4 and summary["train_stage2"]["steps"] == 3
    assert set(summary["train_stage1"]["last"]) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert (tmp_path / "mlflow.db").exists() and "mlflow ui" in out
    retrieval = summary["retrieval"]
    test_images = download["splits"]["test"]["succeeded"]
    assert retrieval["images"] == test_images and retrieval["chance_r1"] == pytest.approx(100 / test_images, abs=0.01)
    assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"} <= set(retrieval)
    assert 0 <= summary["caption"]["accuracy"] <= 1 and summary["caption"]["cider"] >= 0
    assert all(0 <= summary["caption"][k] <= 1 for k in ("object_recall", "mention_precision"))
    assert 0 <= summary["vqa"]["accuracy"] <= 1
    assert summary["index"]["images"] == download["splits"]["curated"]["succeeded"]
    assert (tmp_path / "index" / "index.faiss").exists() and (tmp_path / "index" / "gallery.html").exists()
    assert (tmp_path / "eval" / "report.json").exists() and "== retrieval" in out

    # `make demo`'s path: the same steps as one full-pretrain flow run (ephemeral Prefect API in-process). On the
    # directly-run root every step finds its own finished outputs; a second flow run takes them from the cache.
    flow = [sys.executable, "-m", "flows", "--profile", "tiny", "--run-root", str(tmp_path),
            f"--knob=port={port}"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(flow, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "summary.json").read_text())
    assert all(s["reused"] for s in again["download"]["splits"].values())
    assert all(s["reused"] for s in again["synth"].values()) and again["foundation"]["reused"]
    assert again["download"]["succeeded"] == download["succeeded"]
    assert again["train_stage1"]["checkpoint"] == summary["train_stage1"]["checkpoint"]
    assert again["mlflow"]["parent_run_id"] != summary["mlflow"]["parent_run_id"]  # one parent run per flow run
    done = subprocess.run(flow, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("Finished in state Cached") == 8, log[-3000:]
