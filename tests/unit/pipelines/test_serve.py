"""The local image server: files, traversal, deterministic faults, counters, clean stop."""
import io
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.serve import CORRUPT_BYTES, FAULT_KINDS, FaultConfig, ImageServer, planned_fault

ROOT = Path(__file__).resolve().parents[3]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("www")
    (root / "images").mkdir()
    for i in range(60):
        Image.new("RGB", (8, 8), (i * 4, 0, 0)).save(root / "images" / f"{i:03d}.jpg")
    (root / "images" / "sub").mkdir()
    (root.parent / "secret.txt").write_text("outside the root")
    return root


def paths_by_fault(faults: FaultConfig, n: int = 60) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in range(n):
        path = f"/images/{i:03d}.jpg"
        out.setdefault(planned_fault(path, faults), []).append(path)
    return out


def test_planned_fault_is_pure_and_follows_shares():
    faults = FaultConfig(not_found=0.2, corrupt=0.1, slow=0.1, rate_limited=0.2, seed=3)
    first = [planned_fault(f"/x/{i}.jpg", faults) for i in range(4000)]
    assert first == [planned_fault(f"/x/{i}.jpg", faults) for i in range(4000)]
    share = Counter(first)
    for kind, expected in [("not_found", 0.2), ("corrupt", 0.1), ("slow", 0.1), ("rate_limited", 0.2),
                           ("ok", 0.4)]:
        assert abs(share[kind] / 4000 - expected) < 0.03, (kind, share)
    other_seed = [planned_fault(f"/x/{i}.jpg", faults.model_copy(update={"seed": 4})) for i in range(4000)]
    assert other_seed != first
    assert planned_fault("/x/1.jpg", None) == "ok"
    assert planned_fault("/x/1.jpg", FaultConfig()) == "ok"


@pytest.mark.parametrize("bad", [{"not_found": 0.7, "corrupt": 0.4}, {"slow": -0.1}, {"corrupt": 1.5},
                                 {"typo": 0.1}])
def test_fault_config_validation(bad):
    with pytest.raises(ValidationError):
        FaultConfig(**bad)


def test_serves_files_and_refuses_traversal(root):
    with ImageServer(root) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0
        status, body = get(f"{server.url}/images/005.jpg")
        assert status == 200 and body == (root / "images" / "005.jpg").read_bytes()
        assert Image.open(io.BytesIO(body)).size == (8, 8)
        for bad in ["/images/nope.jpg", "/images/sub", "/", "/../secret.txt", "/images/../../secret.txt",
                    "/images/%2e%2e/%2e%2e/secret.txt"]:
            assert get(server.url + bad)[0] == 404, bad
        stats = server.stats()
    assert stats["status_200"] == 1 and stats["missing"] == 6 and stats["requests"] == 7


def test_every_fault_kind_answers_as_planned(root):
    faults = FaultConfig(not_found=0.15, corrupt=0.15, slow=0.1, rate_limited=0.2, slow_seconds=1.0,
                         rate_limit_hits=2, seed=7)
    planned = paths_by_fault(faults)
    assert set(planned) == {"ok", *FAULT_KINDS}, planned
    with ImageServer(root, faults=faults) as server:
        for path in planned["ok"]:
            assert get(server.url + path) == (200, (root / path.lstrip("/")).read_bytes())
        for path in planned["not_found"]:
            assert get(server.url + path)[0] == 404
        for path in planned["corrupt"]:
            assert get(server.url + path) == (200, CORRUPT_BYTES)
        for path in planned["rate_limited"]:
            assert [get(server.url + path)[0] for _ in range(3)] == [429, 429, 200]
        path = planned["slow"][0]
        with pytest.raises(TimeoutError):
            get(server.url + path, timeout=0.3)
        t0 = time.perf_counter()
        assert get(server.url + path, timeout=5)[0] == 200
        assert time.perf_counter() - t0 >= 0.9
        stats = server.stats()
        server.reset()
        assert server.stats() == {}
        assert get(server.url + planned["rate_limited"][0])[0] == 429  # hits forgotten too
    n = {kind: len(paths) for kind, paths in planned.items()}
    assert stats["ok"] == n["ok"] and stats["not_found"] == n["not_found"]
    assert stats["rate_limited"] == 3 * n["rate_limited"] and stats["status_429"] == 2 * n["rate_limited"]
    assert stats["slow"] == 2
    assert stats["status_404"] == n["not_found"]


def test_stop_does_not_wait_for_slow_answers(root):
    faults = FaultConfig(slow=1.0, slow_seconds=60)
    server = ImageServer(root, faults=faults).start()
    url = f"{server.url}/images/001.jpg"
    results = []
    client = threading.Thread(target=lambda: results.append(_swallow(url)))
    client.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    server.stop()
    client.join(10)
    assert time.perf_counter() - t0 < 3 and not client.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("image-server")]


def _swallow(url: str) -> str:
    try:
        return str(get(url, timeout=30))
    except Exception as err:  # noqa: BLE001 - any client error is fine once the server is gone
        return repr(err)


def test_quiet_by_default(root, capfd):
    with ImageServer(root) as server:
        get(f"{server.url}/images/001.jpg")
        get(f"{server.url}/nope")
    out, err = capfd.readouterr()
    assert "GET" not in err and "GET" not in out


def test_main_prints_url_and_stats_on_sigterm(root):
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve", str(root), "--port", "0",
                             "--not-found", "1.0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        assert get(f"{url}/images/001.jpg")[0] == 404
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "not_found=1" in out and "status_404=1" in out
