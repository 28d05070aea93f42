"""`python -m flows`'s early local Prefect API (flows/local_api.py), and a forked loader inside a Prefect task."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.local_api import early_api

REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent("""
    import gc, os, sys
    from flows.local_api import early_api

    with early_api() as api:
        from prefect import flow, task
        from pipelines.data.loader import LoaderConfig, SourceConfig, TrainLoader
        from train_support import make_shards

        api.wait()
        print("API", api.url, api.process.pid, flush=True)
        shards = make_shards(__import__("pathlib").Path(sys.argv[1]))

        @task
        def first_batch() -> int:
            cfg = LoaderConfig(sources=[SourceConfig(name="c", shards=str(shards))], image_size=32, batch_size=4,
                               num_workers=2, train_transform=False)
            loader = TrainLoader(cfg)
            for batch in loader:  # stop early: the workers are still busy when the loader goes
                break
            del loader
            gc.collect()
            return len(batch["text"])

        @flow(name="early-api-check")
        def check() -> int:
            return first_batch()

        print("BATCH", check(), flush=True)
""")


def test_the_flow_runs_against_the_early_api_which_is_gone_after(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests' / 'support'}")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("API ", "BATCH ")))
    url, pid = lines["API"].split()
    assert url.startswith("http://127.0.0.1:") and lines["BATCH"] == "4"
    assert (tmp_path / "prefect" / "prefect.db").exists()  # the server kept its database under PREFECT_HOME
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)  # stopped with the block
    assert "exited unexpectedly" not in done.stderr  # the forked loader workers left quietly
    assert "Error logging to API" not in done.stderr  # logs were sent before the server went


def test_a_configured_api_is_left_alone(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with early_api() as api:
        assert api is None
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"


def test_a_profile_with_an_api_url_is_left_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "x"\n[profiles.x]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    with early_api() as api:
        assert api is None and "PREFECT_API_URL" not in os.environ
