"""A local HTTP image server with deterministic fault injection, for offline download runs and tests.

It serves the files under a root directory (e.g. the synthetic "shapes world") on 127.0.0.1 only.
A share of the paths can be made to fail the way real web image hosts fail:

- ``not_found``: HTTP 404;
- ``corrupt``: HTTP 200 with bytes that no image decoder accepts (a JPEG start marker, then garbage);
- ``slow``: the answer comes only after ``slow_seconds`` (longer than the downloader's timeout);
- ``rate_limited``: HTTP 429 for the first ``rate_limit_hits`` requests of that path, then 200
  (a transient fault that the downloader's retries overcome).

Which fault a path gets is `planned_fault(path, faults)`: a pure function of (seed, path), so a test
can compute the expected outcome of every URL before anything is downloaded.

    python -m pipelines.serve OUT --port 8000 --not-found 0.05 --corrupt 0.02 --slow 0.01
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import logging
import mimetypes
import signal
import sys
import threading
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

FAULT_KINDS = ("not_found", "corrupt", "slow", "rate_limited")
"""The order in which the shares are laid out on [0, 1); the rest of the interval is "ok"."""

CORRUPT_BYTES = b"\xff\xd8\xff\xe0" + b"\x00corrupt image bytes\x00" * 8
"""Served for corrupt paths: starts like a JPEG, then nothing a decoder can use."""


class FaultConfig(BaseModel):
    """Shares of paths (each in [0, 1], summing to at most 1) that answer with each fault."""

    model_config = ConfigDict(extra="forbid")

    not_found: float = Field(0.0, ge=0.0, le=1.0)
    corrupt: float = Field(0.0, ge=0.0, le=1.0)
    slow: float = Field(0.0, ge=0.0, le=1.0)
    rate_limited: float = Field(0.0, ge=0.0, le=1.0)
    slow_seconds: float = Field(15.0, ge=0.0)
    rate_limit_hits: int = Field(1, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _shares_fit(self) -> "FaultConfig":
        total = sum(getattr(self, kind) for kind in FAULT_KINDS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault shares {', '.join(FAULT_KINDS)} sum to {total:.3f}; expected <= 1")
        return self


def _unit_interval(seed: int, path: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def planned_fault(path: str, faults: FaultConfig | None) -> str:
    """The fault ("ok" or one of FAULT_KINDS) that `path` (the URL path, e.g. /images/a.jpg) gets."""
    if faults is None:
        return "ok"
    u = _unit_interval(faults.seed, path)
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += getattr(faults, kind)
        if u < edge:
            return kind
    return "ok"


def url_path(url: str) -> str:
    """The part of a URL that `planned_fault` hashes: the unquoted path, without query string."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"
    # HTTP/1.0 (the default): one request per connection, so no idle keep-alive thread blocks stop()

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        owner = self.server.owner
        path = url_path(self.path)
        kind = planned_fault(path, owner.faults)
        owner._count("requests", kind)
        file = owner.resolve(path)
        if file is None:
            owner._count("missing")
            return self._send(404, b"not found\n", "text/plain", send_body)
        if kind == "not_found":
            return self._send(404, b"not found\n", "text/plain", send_body)
        if kind == "rate_limited" and owner._hit(path) <= owner.faults.rate_limit_hits:
            return self._send(429, b"too many requests\n", "text/plain", send_body, {"Retry-After": "1"})
        if kind == "slow" and owner._stopping.wait(owner.faults.slow_seconds):
            return  # server stopping: drop the connection instead of answering
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        body = CORRUPT_BYTES if kind == "corrupt" else file.read_bytes()
        self._send(200, body, ctype, send_body)

    def _send(self, code: int, body: bytes, ctype: str, send_body: bool,
              headers: dict[str, str] | None = None) -> None:
        self.server.owner._count(f"status_{code}")
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError) as err:  # client gave up (e.g. its timeout)
            log.debug("client %s went away: %s", self.client_address, err)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: "ImageServer"

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 (stdlib signature)
        log.debug("error while serving %s", client_address, exc_info=True)


class ImageServer:
    """Serve the files under `root` on http://127.0.0.1:PORT, with optional injected faults.

    Use as a context manager, or call `start()` / `stop()`. `stats()` counts requests per planned
    fault kind ("ok", "not_found", ...), per answered status ("status_200", ...), "missing" (no such
    file under root) and "requests" (all of them).
    """

    def __init__(self, root: str | Path, port: int = 0, faults: FaultConfig | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image server root {self.root}: not a directory")
        self.faults = faults
        self._port = port
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._hits: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> "ImageServer":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"image-server-{self.port}", daemon=True)
        self._thread.start()
        log.info("serving %s at %s (faults: %s)", self.root, self.url, self.faults)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes slow handlers at once
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
        assert self._thread is not None
        self._thread.join()
        self._httpd, self._thread = None, None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("image server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # bookkeeping
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Forget the counters and the rate-limit hits (a fresh server, same port and faults)."""
        with self._lock:
            self._counts.clear()
            self._hits.clear()

    def _count(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._counts[key] += 1

    def _hit(self, path: str) -> int:
        with self._lock:
            self._hits[path] += 1
            return self._hits[path]

    def resolve(self, path: str) -> Path | None:
        """The file under root that a URL path names, or None (missing, a directory, or outside root)."""
        relative = path.lstrip("/")
        if not relative or "\x00" in relative:
            return None
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="directory to serve (e.g. the shapes output dir)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--not-found", type=float, default=0.0, help="share of paths answering 404")
    parser.add_argument("--corrupt", type=float, default=0.0, help="share answering corrupt bytes")
    parser.add_argument("--slow", type=float, default=0.0, help="share answering after --slow-seconds")
    parser.add_argument("--slow-seconds", type=float, default=15.0)
    parser.add_argument("--rate-limited", type=float, default=0.0,
                        help="share answering 429 on the first --rate-limit-hits requests, then 200")
    parser.add_argument("--rate-limit-hits", type=int, default=1)
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faults = FaultConfig(not_found=args.not_found, corrupt=args.corrupt, slow=args.slow,
                         slow_seconds=args.slow_seconds, rate_limited=args.rate_limited,
                         rate_limit_hits=args.rate_limit_hits, seed=args.fault_seed)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with ImageServer(args.root, port=args.port, faults=faults) as server:
        print(server.url, flush=True)
        while not stop.wait(0.5):
            pass
        stats = server.stats()
    print("served: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
