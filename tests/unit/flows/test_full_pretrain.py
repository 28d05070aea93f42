"""The flow's cache keys and cache policy (Prefect's ephemeral API via prefect_test_harness)."""
import pytest

from flows import full_pretrain
from flows.common import cache_policy
from pipelines import pipeline
from pipelines.profiles import build_profile


def test_every_step_has_a_key_retries_and_a_cache_dir():
    names = [name for name, *_ in pipeline.STEPS]
    assert set(full_pretrain.DEPENDS_ON) == set(names) == set(full_pretrain.RETRIES) == set(full_pretrain.CACHE_DIR)


def test_step_keys_follow_what_each_step_depends_on(tmp_path):
    base = build_profile("tiny", str(tmp_path))
    key = {step: full_pretrain.step_key(step, base) for step in full_pretrain.DEPENDS_ON}
    tracked = build_profile("tiny", str(tmp_path), ["stage1.tracking.experiment=other", "stage1.scaling.workers=2",
                                                    "stage1.debug.fail_once_at_step=3", "experiment=x"])
    assert all(full_pretrain.step_key(s, tracked) == key[s] for s in key)  # how it is run or logged: same result
    changed = build_profile("tiny", str(tmp_path), ["stage1.optim.total_steps=9"])
    same = {"download", "foundation", "capfilt", "loader_check"}
    for step in key:  # stage 1 and everything downstream of it run again; upstream steps stay cached
        assert (full_pretrain.step_key(step, changed) == key[step]) == (step in same), step
    elsewhere = build_profile("tiny", str(tmp_path / "other"))
    assert full_pretrain.step_key("download", elsewhere) != key["download"]


def test_a_step_that_ran_again_makes_the_steps_reading_its_outputs_run_again(tmp_path):
    from pipelines import runroot

    cfg = build_profile("tiny", str(tmp_path))

    def keys():
        return {step: full_pretrain.step_key(step, cfg) for step in full_pretrain.DEPENDS_ON}

    def ran(step, uri):
        before = keys()
        runroot.write_success(uri, step=step, config_hash="h", input_hashes={}, result={}, started=0.0)
        after = keys()
        assert after == keys()  # stable while nothing is rewritten
        return {s for s in before if after[s] != before[s]}

    readers_of_capfilt = {"loader_check", "stage1", "stage2", "evaluate", "index"}
    assert ran("capfilt", cfg.path("capfilt")) == readers_of_capfilt
    assert ran("stage1", cfg.path("stage1")) == {"stage2", "evaluate", "index"}
    assert ran("capfilt", cfg.path("capfilt")) == readers_of_capfilt  # rewritten: a new record, new keys again
    assert ran("download", cfg.path("raw", "web")) == set(full_pretrain.DEPENDS_ON) - {"download"}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_cached_step_is_skipped_until_its_records_are_deleted(harness, tmp_path):
    from prefect import flow, task

    calls = []

    @task(persist_result=True)
    def work(x: int) -> int:
        calls.append(x)
        return x * 2

    where = tmp_path / "step" / ".prefect-cache"

    @flow
    def twice(key: str) -> list:
        step = work.with_options(cache_policy=cache_policy(key, str(where)))
        return [step(3, return_state=True), step(3, return_state=True)]

    first, second = twice("k1")
    assert first.result() == second.result() == 6 and calls == [3]
    assert second.name == "Cached" and any(where.iterdir())
    assert twice("k1")[0].name == "Cached" and calls == [3]  # a later flow run finds it too
    twice("k2")  # a changed config is a new key
    assert calls == [3, 3]
    import shutil
    shutil.rmtree(where)  # the step's outputs (and with them its records) deleted: it runs again
    twice("k1")
    assert calls == [3, 3, 3]


def test_prefect_environment_makes_the_ephemeral_api_home(tmp_path, monkeypatch):
    from flows.common import prefect_environment

    home = tmp_path / "not" / "made" / ".prefect"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    prefect_environment()
    assert home.is_dir()  # the API's database goes there; before, a missing home crashed the server at start
