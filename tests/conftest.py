"""Session-wide test settings: no hub access (a hub name must fail at once), quiet telemetry, loopback Ray; a
hard exit once pytest has reported."""
import atexit
import os
import sys

import pytest

for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(name, value)

_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Once pytest has reported, run the atexit handlers (Ray, Prefect, logging) and leave with pytest's status,
    skipping the interpreter's teardown of the C extensions' state. One CI run of cdf19d9 reported '412 passed' and
    then died with SIGSEGV in that teardown (torch, faiss, Ray, pyarrow and Prefect's threads all loaded), which
    failed `make test`. Set BLIP2_TEST_FULL_EXIT=1 to exit normally (with PYTHONFAULTHANDLER=1, as `make test` sets
    it, a crash there prints every thread's stack)."""
    if os.environ.get("BLIP2_TEST_FULL_EXIT") == "1" or _EXIT_STATUS not in config.stash:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(config.stash[_EXIT_STATUS])
