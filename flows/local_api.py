"""A throw-away Prefect API for `python -m flows`, started before the heavy imports so that they overlap.

With no `PREFECT_API_URL`, Prefect starts an ephemeral API server on the first client call: it imports the
server's modules in this process (about 7 s on the 2-core box) and then waits for a uvicorn subprocess to
migrate a fresh database and answer (about 15 s), all after the pipeline's own imports (about 13 s). Here
the same subprocess (Prefect's ephemeral app: no UI, no background services) is started first, the
pipeline is imported while it comes up, and `PREFECT_API_URL` points the flow at it. Stopped on exit.

Import-light on purpose (standard library only): it runs before anything else in `flows/__main__.py`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

STARTUP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalApi:
    """The server subprocess and its URL; `wait()` blocks until it answers /health."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the local Prefect API server (python -m uvicorn prefect.server.api.server:"
                                   f"create_app) exited with code {self.process.returncode} before answering "
                                   f"{self.url}/health; its error is printed above")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the local Prefect API server did not answer {self.url}/health within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _api_configured() -> bool:
    """Whether Prefect would not start an ephemeral API itself: a URL in the environment or in the active
    profile file, or ephemeral mode switched off."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if os.environ.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "").lower() in ("0", "false"):
        return True
    home = os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
    profiles = os.environ.get("PREFECT_PROFILES_PATH") or os.path.join(home, "profiles.toml")
    try:
        with open(profiles, encoding="utf-8") as file:
            return "PREFECT_API_URL" in file.read()
    except OSError:
        return False


@contextmanager
def early_api() -> Iterator[LocalApi | None]:
    """Start a local API now unless one is configured (`PREFECT_API_URL`) or ephemeral mode is switched off;
    set `PREFECT_API_URL` to it for this process; stop it when the block exits (also on errors)."""
    if _api_configured():
        yield None
        return
    api = LocalApi(_free_port())
    os.environ["PREFECT_API_URL"] = api.url
    try:
        yield api
    finally:
        _drain_prefect_workers()
        os.environ.pop("PREFECT_API_URL", None)
        api.stop()


def _drain_prefect_workers(timeout: float = 15.0) -> None:
    """Send the logs and events Prefect still holds before the server goes (else its exit handlers retry
    against a closed port for a minute and print 'Error logging to API')."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception as error:  # shutting down: report it and still stop the server
            print(f"flows.local_api: draining {worker.__name__} failed: {error!r}", file=sys.stderr)
