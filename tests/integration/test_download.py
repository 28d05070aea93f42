"""The download step: real img2dataset runs against the local fault-injecting image server."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import download, runroot
from pipelines.download import (CONFIG_FILE, SUMMARY_FILE, DownloadConfig, EmptyUrlList, MissingColumn,
                                OutputConflict, UnsupportedFormat, UrlListUnreadable, run)
from pipelines.serve import FaultConfig, ImageServer, planned_fault, url_path

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 40
FAULTS = FaultConfig(not_found=0.15, corrupt=0.1, slow=0.05, rate_limited=0.15, slow_seconds=6, seed=3)
FAST = dict(processes_count=1, thread_count=16, image_size=32, number_sample_per_shard=10)


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("www")
    (root / "images").mkdir()
    for i in range(N_IMAGES):
        Image.new("RGB", (40 + i, 30), (6 * i, 255 - 6 * i, 90)).save(root / "images" / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def clean_server(www):
    with ImageServer(www) as server:
        yield server


@pytest.fixture(scope="module")
def faulty_server(www):
    with ImageServer(www, faults=FAULTS) as server:
        yield server


def url_frame(server: ImageServer) -> pd.DataFrame:
    return pd.DataFrame({
        "url": [f"{server.url}/images/{i:03d}.jpg" for i in range(N_IMAGES)],
        "caption": [f"picture number {i}" for i in range(N_IMAGES)],
        "key": [f"{i:03d}" for i in range(N_IMAGES)],  # reserved by img2dataset: dropped with a note
        "scene": [f"scene-{i % 3}" for i in range(N_IMAGES)],
        "captions": [[f"caption {i}a", f"caption {i}b"] for i in range(N_IMAGES)],
        "questions": [[{"q": "how many?", "a": str(i % 4)}] for i in range(N_IMAGES)],
    })


def write_list(frame: pd.DataFrame, path: Path) -> Path:
    fmt = path.suffix.lstrip(".")
    if fmt == "parquet":
        frame.to_parquet(path)
    elif fmt in ("csv", "tsv"):
        frame.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        raise ValueError(fmt)
    return path


def rows_by_url(output: Path) -> dict[str, dict]:
    table = pd.concat([pq.read_table(p).to_pandas() for p in sorted(output.glob("*.parquet"))])
    return {row["url"]: row for row in table.to_dict("records")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, clean_server):
    """One clean download of 40 URLs into 4 shards; tests below copy it before changing anything."""
    base = tmp_path_factory.mktemp("first")
    url_list = write_list(url_frame(clean_server), base / "urls.parquet")
    cfg = DownloadConfig(url_list=str(url_list), **FAST)
    clean_server.reset()
    result = run(cfg, str(base / "raw"))
    return cfg, base / "raw", result, clean_server.stats()


# ------------------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("retries", [2, 0])
def test_every_fault_is_counted_as_planned(tmp_path, faulty_server, retries):
    planned = {url: planned_fault(url_path(url), FAULTS) for url in url_frame(faulty_server)["url"]}
    n = Counter(planned.values())
    assert all(n[k] > 0 for k in ("ok", "not_found", "corrupt", "slow", "rate_limited")), n
    url_list = write_list(url_frame(faulty_server), tmp_path / "urls.parquet")
    faulty_server.reset()
    result = run(DownloadConfig(url_list=str(url_list), timeout=2, retries=retries, **FAST), str(tmp_path / "raw"))

    recovered = n["rate_limited"] if retries else 0
    assert (result.attempted, result.shards) == (N_IMAGES, 4)
    assert result.succeeded == n["ok"] + recovered
    assert result.failed_to_download == n["not_found"] + n["slow"] + n["rate_limited"] - recovered
    assert result.failed_to_resize == n["corrupt"]
    expected_reasons = {"http_404": n["not_found"], "decode_error": n["corrupt"], "timeout": n["slow"]}
    if not retries:
        expected_reasons["http_429"] = n["rate_limited"]
    assert result.reasons == expected_reasons
    assert sum(result.raw_reasons.values()) == N_IMAGES - result.succeeded
    assert any("failure_warn_threshold" in w for w in result.warnings)

    status = {"ok": "success", "not_found": "failed_to_download", "corrupt": "failed_to_resize",
              "slow": "failed_to_download", "rate_limited": "success" if retries else "failed_to_download"}
    rows = rows_by_url(tmp_path / "raw")
    assert {url: rows[url]["status"] for url in planned} == {url: status[k] for url, k in planned.items()}

    attempts = retries + 1  # img2dataset retries every failed fetch at once, 404s included
    served = faulty_server.stats()
    assert served["ok"] == n["ok"] and served["corrupt"] == n["corrupt"]
    assert served["not_found"] == attempts * n["not_found"] and served["slow"] == attempts * n["slow"]
    assert served["rate_limited"] == min(attempts, 2) * n["rate_limited"]
    summary = json.loads((tmp_path / "raw" / SUMMARY_FILE).read_text())
    assert summary["reasons"] == expected_reasons and (tmp_path / "raw" / runroot.SUCCESS).exists()


# ----------------------------------------------------------------------------- resume, idempotency
def test_first_run_output(first_run):
    cfg, raw, result, served = first_run
    assert (result.succeeded, result.shards, result.shards_downloaded, served["requests"]) == (40, 4, 4, 40)
    assert sorted(p.name for p in raw.glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert result.additional_columns == ["scene", "captions", "questions"]
    assert sum("'key' is not saved" in w for w in result.warnings) == 1
    with tarfile.open(raw / "00001.tar") as tar:
        names = sorted(tar.getnames())
        meta = json.load(tar.extractfile(next(n for n in names if n.endswith(".json"))))
    assert len(names) == 30 and {Path(n).suffix for n in names} == {".jpg", ".txt", ".json"}
    for shard in sorted(raw.glob("*.tar")):  # in key order (the URL list's), not download-completion order
        with tarfile.open(shard) as tar:
            keys = [name.split(".")[0] for name in tar.getnames()]
        assert keys == sorted(keys), keys
        keys = pq.read_table(shard.with_suffix(".parquet")).column("key").to_pylist()
        assert keys == sorted(keys)
    assert meta["scene"].startswith("scene-") and meta["caption"].startswith("picture number")
    assert meta["captions"][0].startswith("caption") and meta["questions"][0]["q"] == "how many?"
    assert (raw / CONFIG_FILE).read_text().startswith("# download step")
    assert DownloadConfig.model_validate(__import__("yaml").safe_load((raw / CONFIG_FILE).read_text())
                                         ).config_hash() == result.config_hash


def test_second_run_returns_the_recorded_result_without_requests(first_run, clean_server):
    cfg, raw, result, _ = first_run
    mtime = (raw / "00000.tar").stat().st_mtime_ns
    clean_server.reset()
    again = run(cfg, str(raw))
    assert again.reused and again.model_dump(exclude={"reused"}) == result.model_dump(exclude={"reused"})
    assert clean_server.stats() == {}
    assert (raw / "00000.tar").stat().st_mtime_ns == mtime


def test_resume_redoes_only_unfinished_shards(first_run, clean_server, tmp_path):
    cfg, raw, result, _ = first_run
    out = tmp_path / "raw"
    shutil.copytree(raw, out)
    (out / runroot.SUCCESS).unlink()
    (out / "00002.tar").unlink()  # interrupted before its stats were written
    (out / "00002_stats.json").unlink()
    (out / "00001.tar").unlink()  # stats left behind but the tar is gone: also unfinished
    clean_server.reset()
    resumed = run(cfg, str(out))
    assert clean_server.stats()["requests"] == 20
    assert (resumed.shards, resumed.shards_downloaded, resumed.attempted, resumed.succeeded) == (4, 2, 40, 40)
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert set(rows_by_url(out)) == set(rows_by_url(raw))
    assert (out / runroot.SUCCESS).exists() and not (out / "_tmp").exists()
    for name in ("00001.tar", "00002.tar"):  # downloaded twice, in whatever order they finished: same shards
        assert samples_in_order(out / name) == samples_in_order(raw / name)


def samples_in_order(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".json")]


def test_resume_refuses_another_layout(first_run, clean_server, tmp_path):
    cfg, raw, _, _ = first_run
    out = tmp_path / "raw"
    shutil.copytree(raw, out)
    clean_server.reset()
    with pytest.raises(OutputConflict, match="image_size: 32 -> 48"):
        run(cfg.model_copy(update={"image_size": 48}), str(out))
    assert clean_server.stats() == {} and (out / runroot.SUCCESS).exists()


def test_unfinished_shards_leave_no_success_record(first_run, tmp_path, monkeypatch):
    cfg, raw, _, _ = first_run
    out = tmp_path / "raw"
    shutil.copytree(raw, out)
    (out / runroot.SUCCESS).unlink()
    (out / "00003_stats.json").unlink()
    monkeypatch.setattr(download, "_img2dataset_download", lambda *args: None)  # a run that lost shard 3
    with pytest.raises(download.DownloadIncomplete, match=r"1 of 4 shards did not finish \(ids \[3\]\)"):
        run(cfg, str(out))
    assert not (out / runroot.SUCCESS).exists()
    assert json.loads((out / SUMMARY_FILE).read_text())["shards"] == 3


# ------------------------------------------------------------------------------------- bad inputs
def _bad_inputs(tmp: Path, server: ImageServer) -> list[tuple[str, Path, dict, type, list[str]]]:
    frame = url_frame(server)
    cases = [
        ("missing url column", write_list(frame.rename(columns={"url": "link"}), tmp / "a.parquet"), {},
         MissingColumn, ["url_col", "'url'", "link"]),
        ("missing caption column", write_list(frame.drop(columns=["caption"]), tmp / "b.csv"), {},
         MissingColumn, ["caption_col", "'caption'", "scene"]),
        ("missing additional column", write_list(frame, tmp / "c.tsv"), {"additional_columns": ["nope"]},
         MissingColumn, ["additional_columns", "nope"]),
        ("missing file", tmp / "absent.parquet", {}, UrlListUnreadable, ["no such file"]),
        ("unreadable file", tmp / "garbage.parquet", {}, UrlListUnreadable, ["cannot be read as parquet"]),
        ("empty list", tmp / "empty.csv", {}, EmptyUrlList, ["no rows"]),
        ("empty jsonl", tmp / "empty.jsonl", {}, EmptyUrlList, ["no rows"]),
        ("unsupported extension", tmp / "urls.xlsx", {}, UnsupportedFormat, ["input_format", ".parquet"]),
    ]
    (tmp / "garbage.parquet").write_bytes(b"this is not parquet at all")
    (tmp / "empty.csv").write_text("url,caption\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "urls.xlsx").write_bytes(b"PK\x03\x04")
    return cases


def test_bad_inputs_fail_before_any_request(tmp_path, clean_server):
    for name, path, extra, error, words in _bad_inputs(tmp_path, clean_server):
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        clean_server.reset()
        with pytest.raises(error) as info:
            run(DownloadConfig(url_list=str(path), **{**FAST, **extra}), str(out))
        message = str(info.value)
        assert str(path) in message, (name, message)
        for word in words:
            assert word in message, (name, word, message)
        assert clean_server.stats() == {}, name
        assert not out.exists(), name


# ---------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_formats(tmp_path, clean_server, fmt):
    url_list = write_list(url_frame(clean_server).iloc[:12], tmp_path / f"urls.{fmt}")
    result = run(DownloadConfig(url_list=str(url_list), **FAST), str(tmp_path / "raw"))
    assert (result.attempted, result.succeeded, result.shards) == (12, 12, 2)
    assert result.additional_columns == ["scene", "captions", "questions"]
    assert {row["scene"] for row in rows_by_url(tmp_path / "raw").values()} == {"scene-0", "scene-1", "scene-2"}


def test_cli_with_a_tsv_list(tmp_path, clean_server):
    """`python -m pipelines.download` (img2dataset spawns processes that re-import the script)."""
    url_list = write_list(url_frame(clean_server).iloc[:12], tmp_path / "urls.tsv")
    config = tmp_path / "download.yaml"
    config.write_text("processes_count: 1\nimage_size: 32\nretries: 0\n")
    cmd = [sys.executable, "-m", "pipelines.download", "--url-list", str(url_list), "--output",
           str(tmp_path / "raw"), "--config", str(config), "number_sample_per_shard=5", "thread_count=4"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12/12 images (100.0%) in 3 shards" in done.stdout
    assert f"wrote {tmp_path / 'raw'}" in done.stdout
    bad = subprocess.run([*cmd[:4], str(tmp_path / "nope.tsv"), *cmd[5:]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.tsv: no such file" in bad.stderr


# -------------------------------------------------------------------------------------------- ray
def test_ray_distributor(tmp_path, clean_server, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    url_list = write_list(url_frame(clean_server).iloc[:20], tmp_path / "urls.parquet")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = run(DownloadConfig(url_list=str(url_list), distributor="ray", **FAST), str(tmp_path / "raw"))
        assert ray.is_initialized()  # a Ray started by the caller is left running
    finally:
        ray.shutdown()
    assert (result.attempted, result.succeeded, result.shards) == (20, 20, 2)
