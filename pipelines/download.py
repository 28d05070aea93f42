"""The download step: a real img2dataset run from a URL list to webdataset shards.

    python -m pipelines.download --url-list urls.parquet --output RUN/raw [--config FILE] [key=value ...]

Output (img2dataset's layout): ``{output}/{00000..}.tar`` (jpg + txt + json per sample),
``{00000..}.parquet`` (one metadata row per URL, failures included) and ``{00000..}_stats.json``;
beside them this step writes ``download_config.yaml`` (the resolved config), ``download_summary.json``
(counts, failure reasons, speed) and, last, ``_SUCCESS.json``.

Resuming: img2dataset's incremental mode treats a shard as finished when its ``NNNNN_stats.json``
exists (written after the shard's tar and parquet are closed). Before each run this step also drops
the stats file of any shard whose tar or parquet is missing or whose stats file does not parse, so
such a shard is downloaded again, and it refuses to mix shards made with a different layout (url list,
columns, image size, shard size ...).

Key order: img2dataset writes a shard's samples as their downloads finish; afterwards each shard is
rewritten with its samples in key (URL list) order (`pipelines.data.key_order`; `order_by_key=false`
skips it), so one URL list always gives the same shards and the same training run.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, Field

from pipelines import io, runroot
from pipelines.config import ConfigError, StepConfig, load_config
from pipelines.data import key_order

log = logging.getLogger(__name__)

STEP = "download"
SUMMARY_FILE = "download_summary.json"
CONFIG_FILE = "download_config.yaml"
# img2dataset keeps these names for its own metadata; an input column with one of them cannot be saved.
RESERVED_COLUMNS = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                              "status", "error_message", "exif", "md5", "sha256", "sha512"})
# Config fields that decide what a finished shard contains: a resume must not mix two of them.
LAYOUT_FIELDS = ("input_format", "url_col", "caption_col", "additional_columns", "image_size",
                 "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                 "number_sample_per_shard")
_STATS_NAME = re.compile(r"^(\d+)_stats\.json$")

InputFormat = Literal["parquet", "csv", "tsv", "jsonl", "json", "txt",
                      "csv.gz", "tsv.gz", "jsonl.gz", "json.gz", "txt.gz"]
INPUT_FORMATS: tuple[str, ...] = InputFormat.__args__  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """How one paper source's URL list looks and how its images are resized."""

    input_format: str | None
    url_col: str
    caption_col: str  # "" : none
    additional_columns: tuple[str, ...] | None  # None: every other column of the input
    image_size: int
    resize_mode: str
    note: str


PRESETS: dict[str, Preset] = {
    # These follow img2dataset's dataset examples (docs/dataset_examples/*.md in its repository):
    # column names and file types as those pages prepare them, images at 256 px with borders.
    "custom": Preset(None, "url", "caption", None, 224, "border",
                     "your own list: format from the file extension, url/caption columns, other columns kept"),
    "coco": Preset("parquet", "URL", "TEXT", (), 256, "border",
                   "MS COCO 2017 url/text parquet (img2dataset's mscoco example: URL and TEXT columns)"),
    "vg": Preset("parquet", "url", "caption", ("image_id",), 256, "border",
                 "Visual Genome: image_data.json urls joined with region captions into a url/caption parquet"),
    "cc3m": Preset("tsv", "url", "caption", (), 256, "border",
                   "Conceptual Captions 3M tsv, with the header line 'caption<TAB>url' added"),
    "cc12m": Preset("tsv", "url", "caption", (), 256, "border",
                    "Conceptual 12M tsv, with the header line 'url<TAB>caption' added"),
    "sbu": Preset("parquet", "url", "caption", (), 256, "border",
                  "SBU Captions: sbu-captions-all.json (image_urls, captions) turned into a url/caption parquet"),
    "laion400m": Preset("parquet", "URL", "TEXT", ("NSFW", "similarity", "LICENSE"), 256, "border",
                        "LAION-400M metadata parquet files (a folder of them works too)"),
}


# ------------------------------------------------------------------------------------------ config
class DownloadConfig(StepConfig):
    """img2dataset settings; fields left None take the preset's value (see `PRESETS`)."""

    url_list: str
    preset: Literal["custom", "coco", "vg", "cc3m", "cc12m", "sbu", "laion400m"] = "custom"
    input_format: InputFormat | None = None  # None: from the file extension
    url_col: str | None = None
    caption_col: str | None = None  # "" : the list has no caption column
    additional_columns: list[str] | None = None  # custom preset: every other input column
    image_size: int | None = Field(None, gt=0)  # custom preset: 224
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] | None = None
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    number_sample_per_shard: int = Field(1000, ge=1)
    processes_count: int = Field(2, ge=1)
    thread_count: int = Field(16, ge=1)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0)
    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"
    failure_warn_threshold: float = Field(0.2, ge=0.0, le=1.0)
    order_by_key: bool = Field(True, description="rewrite each shard with its samples in key (URL list) order: "
                               "img2dataset writes them as downloads finish, so without this two downloads of "
                               "one list train differently (costs one more write of each new shard)")
    enable_wandb: Literal[False] = False


class DownloadResult(BaseModel):
    output_uri: str
    config_hash: str
    url_list_sha256: str
    rows: int
    shards: int
    shards_downloaded: int  # by this run; the rest were finished before (resume)
    attempted: int
    succeeded: int
    failed_to_download: int
    failed_to_resize: int
    success_rate: float
    failure_rate: float
    reasons: dict[str, int]  # normalised failure classes: http_404, timeout, decode_error, ...
    raw_reasons: dict[str, int]  # img2dataset's messages as they are (most common 100)
    additional_columns: list[str]
    wall_seconds: float
    images_per_second: float  # URLs attempted by this run / its wall time
    warnings: list[str] = []
    reused: bool = False  # True when returned from an existing _SUCCESS.json without running


# ----------------------------------------------------------------------------------------- errors
class UrlListError(ConfigError):
    """The URL list cannot be used; the message names the file and the field."""


class UrlListUnreadable(UrlListError):
    pass


class UnsupportedFormat(UrlListError):
    pass


class EmptyUrlList(UrlListError):
    pass


class MissingColumn(UrlListError):
    pass


class ReservedColumn(UrlListError):
    pass


class OutputConflict(ConfigError):
    """The output dir holds something a resume must not build on."""


class DownloadIncomplete(RuntimeError):
    """Some shards did not finish; a rerun with the same config resumes them."""


# -------------------------------------------------------------------------------------- url list
@dataclass
class UrlList:
    uri: str
    files: list[str]
    input_format: str
    columns: list[str]
    rows_per_file: list[int]
    sha256: str
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file)

    def expected_shards(self, per_shard: int) -> int:
        return sum(math.ceil(n / per_shard) for n in self.rows_per_file)


def infer_format(uri: str) -> str | None:
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    for fmt in sorted(INPUT_FORMATS, key=len, reverse=True):  # "csv.gz" before "gz"-less matches
        if name.endswith("." + fmt):
            return fmt
    return None


def _list_files(uri: str, input_format: str | None) -> tuple[list[str], str]:
    try:
        fs, path = io.fs_and_path(uri)
        is_dir = fs.isdir(path)
        exists = is_dir or fs.isfile(path)
    except Exception as err:  # noqa: BLE001 - any storage error means: cannot read it
        raise UrlListUnreadable(f"url list {uri}: cannot be read ({type(err).__name__}: {err})") from err
    if not exists:
        raise UrlListUnreadable(f"url list {uri}: no such file or directory")
    if not is_dir:
        fmt = input_format or infer_format(uri)
        if fmt is None:
            raise UnsupportedFormat(f"url list {uri}: field input_format: cannot tell the format from the "
                                    f"extension; expected one of {', '.join('.' + f for f in INPUT_FORMATS)}")
        return [uri], fmt
    names = sorted(fs.ls(path, detail=False))
    found = sorted({infer_format(n) for n in names} - {None})
    fmt = input_format or (found[0] if len(found) == 1 else None)
    if fmt is None:
        raise UnsupportedFormat(f"url list folder {uri}: field input_format: set it (formats found: "
                                f"{found or 'none'}; expected one of {', '.join(INPUT_FORMATS)})")
    files = [n for n in names if n.endswith("." + fmt)]
    if not files:
        raise EmptyUrlList(f"url list folder {uri}: no *.{fmt} file in it")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return [prefix + f for f in files], fmt


def _read_columns_and_rows(uri: str, fmt: str) -> tuple[list[str], int]:
    """Column names and row count of one URL list file, read the way img2dataset will read it."""
    import pandas as pd
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    fs, path = io.fs_and_path(uri)
    if fs.size(path) == 0:
        return [], 0
    compression = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    with fs.open(path, "rb", compression=compression) as f:
        if base == "parquet":
            meta = pq.ParquetFile(f).metadata
            return list(meta.schema.to_arrow_schema().names), meta.num_rows
        if base in ("csv", "tsv", "txt"):
            names = ["url"] if base == "txt" else None
            delimiter = "\t" if base == "tsv" else ","
            reader = pa_csv.open_csv(f, read_options=pa_csv.ReadOptions(column_names=names),
                                     parse_options=pa_csv.ParseOptions(delimiter=delimiter))
            return list(reader.schema.names), sum(batch.num_rows for batch in reader)
        if base == "jsonl":
            table = pa_json.read_json(f)
            return list(table.column_names), table.num_rows
        frame = pd.read_json(f)
        return [str(c) for c in frame.columns], len(frame)


def read_url_list(uri: str, input_format: str | None = None) -> UrlList:
    """Find, open and measure a URL list (file or folder); errors name the file."""
    files, fmt = _list_files(uri, input_format)
    columns: list[str] | None = None  # those every non-empty file has (a folder may hold many files)
    rows: list[int] = []
    for file in files:
        try:
            cols, n = _read_columns_and_rows(file, fmt)
        except Exception as err:  # noqa: BLE001 - reported with the file name
            raise UrlListUnreadable(f"url list {file}: cannot be read as {fmt} ({type(err).__name__}: "
                                    f"{str(err).strip()[:300]})") from err
        if n:
            columns = cols if columns is None else [c for c in columns if c in cols]
        rows.append(n)
    if sum(rows) == 0:
        raise EmptyUrlList(f"url list {uri}: has no rows (0 URLs to download)")
    if len(files) == 1:
        digest = io.file_sha256(files[0])
    else:
        digest = hashlib.sha256("\n".join(f"{f.rsplit('/', 1)[-1]}:{io.file_sha256(f)}"
                                          for f in files).encode()).hexdigest()[:16]
    return UrlList(uri, files, fmt, columns or [], rows, digest)


def resolve(cfg: DownloadConfig) -> tuple[DownloadConfig, UrlList]:
    """Fill preset defaults, read the URL list and check its columns, all before any download."""
    preset = PRESETS[cfg.preset]
    urls = read_url_list(cfg.url_list, cfg.input_format or preset.input_format)
    is_txt = urls.input_format.startswith("txt")
    url_col = cfg.url_col or ("url" if is_txt else preset.url_col)
    caption_col = cfg.caption_col if cfg.caption_col is not None else ("" if is_txt else preset.caption_col)
    where = f"url list {urls.files[0] if len(urls.files) == 1 else urls.uri}"
    found = f"columns found: {urls.columns}"
    if url_col not in urls.columns:
        raise MissingColumn(f"{where}: field url_col={url_col!r}: no such column ({found})")
    if caption_col and caption_col not in urls.columns:
        hint = "; txt lists have no caption column" if is_txt else ""
        raise MissingColumn(f"{where}: field caption_col={caption_col!r}: no such column ({found}){hint}")
    extra = cfg.additional_columns
    if extra is None and preset.additional_columns is not None:
        extra = list(preset.additional_columns)
    if extra is None:  # custom: keep every other column that img2dataset can store
        extra = [c for c in urls.columns if c not in (url_col, caption_col)]
        for name in [c for c in extra if c in RESERVED_COLUMNS]:
            urls.notes.append(f"{where}: column {name!r} is not saved (img2dataset reserves that name; "
                              "each sample's json keeps its url)")
        extra = [c for c in extra if c not in RESERVED_COLUMNS]
    else:
        missing = [c for c in extra if c not in urls.columns]
        if missing:
            raise MissingColumn(f"{where}: field additional_columns: no such column(s) {missing} ({found})")
        reserved = sorted(set(extra) & RESERVED_COLUMNS)
        if reserved:
            raise ReservedColumn(f"{where}: field additional_columns: {reserved} are names img2dataset "
                                 "keeps for its own metadata; leave them out")
    resolved = cfg.model_copy(update=dict(
        input_format=urls.input_format, url_col=url_col, caption_col=caption_col, additional_columns=extra,
        image_size=cfg.image_size or preset.image_size, resize_mode=cfg.resize_mode or preset.resize_mode))
    return DownloadConfig.model_validate(resolved.model_dump()), urls


# ---------------------------------------------------------------------------------- output folder
def _config_text(cfg: DownloadConfig, url_sha: str) -> str:
    return f"# download step, resolved config; url_list sha256: {url_sha}\n" + cfg.to_yaml()


def _previous_layout(output_uri: str) -> tuple[dict[str, Any], str | None] | None:
    uri = io.join(output_uri, CONFIG_FILE)
    if not io.exists(uri):
        return None
    fs, path = io.fs_and_path(uri)
    text = fs.cat_file(path).decode()
    sha = re.search(r"url_list sha256: ([0-9a-f]+)", text)
    return (yaml.safe_load(text) or {}), (sha.group(1) if sha else None)


def finished_shards(output_uri: str) -> dict[int, str]:
    """Shard id -> stats file, for the shards img2dataset's incremental mode counts as done."""
    out = {}
    for uri in io.list_files(output_uri, ".json"):
        match = _STATS_NAME.match(uri.rsplit("/", 1)[-1])
        if match:
            out[int(match.group(1))] = uri
    return out


def _shard_is_whole(stats_uri: str) -> bool:
    base = stats_uri[: -len("_stats.json")]
    try:
        stats = io.read_json(stats_uri)
        ok = all(k in stats for k in ("count", "successes", "failed_to_download", "failed_to_resize"))
    except Exception:  # noqa: BLE001 - an unreadable stats file means an unfinished shard
        ok = False
    return ok and io.exists(base + ".tar") and io.exists(base + ".parquet")


def prepare_output(output_uri: str, cfg: DownloadConfig, urls: UrlList) -> tuple[set[int], list[str]]:
    """Make the output folder safe for an incremental img2dataset run; returns (finished ids, warnings).

    Checks come first (nothing is changed when one fails), then stale records are removed.
    """
    warnings: list[str] = []
    ours = {runroot.SUCCESS, SUMMARY_FILE}
    for uri in io.list_files(output_uri, ".json"):
        name = uri.rsplit("/", 1)[-1]
        if name not in ours and not _STATS_NAME.match(name):
            raise OutputConflict(f"output {output_uri}: file {name} is in the way (img2dataset reads every "
                                 "*.json there as a shard's stats); move it elsewhere")
    done = finished_shards(output_uri)
    previous = _previous_layout(output_uri)
    if done and previous is not None:
        old, old_sha = previous
        changed = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in LAYOUT_FIELDS
                   if old.get(k) != getattr(cfg, k)]
        if old_sha is not None and old_sha != urls.sha256:
            changed.append(f"url_list content: sha256 {old_sha} -> {urls.sha256}")
        if changed:
            raise OutputConflict(f"output {output_uri}: holds {len(done)} finished shards made with another "
                                 f"layout ({'; '.join(changed)}); use a new output folder or empty this one")
    elif done:
        warnings.append(f"output {output_uri}: {len(done)} finished shards without {CONFIG_FILE}; "
                        "resuming on them as they are")

    io.makedirs(output_uri)
    fs, _ = io.fs_and_path(output_uri)
    for name in ours:  # img2dataset would parse these names as shard ids; both are rewritten at the end
        uri = io.join(output_uri, name)
        if io.exists(uri):
            fs.rm(io.fs_and_path(uri)[1])
    for shard_id, stats_uri in sorted(done.items()):
        if not _shard_is_whole(stats_uri):
            log.warning("shard %d in %s is incomplete; it will be downloaded again", shard_id, output_uri)
            fs.rm(io.fs_and_path(stats_uri)[1])
            del done[shard_id]
    return set(done), warnings


# ------------------------------------------------------------------------------------ img2dataset
class _MainThreadSignals:
    """Stand-in for the `signal` module inside img2dataset.main: its SIGINT handler (cleanup + exit 0)
    is installed only from the main thread, where `signal.signal` is allowed (Prefect runs tasks in
    worker threads)."""

    SIGINT = signal.SIGINT

    @staticmethod
    def signal(signum: int, handler: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            return signal.signal(signum, handler)
        return None


def _img2dataset_download(cfg: DownloadConfig, urls: UrlList, output_uri: str) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset  # noqa: F401 - lazy: it imports ray, wandb, albumentations, cv2
    i2d_main = sys.modules["img2dataset.main"]
    i2d_main.signal = _MainThreadSignals  # type: ignore[attr-defined]

    kwargs = dict(
        url_list=urls.uri, output_folder=output_uri, output_format="webdataset",
        incremental_mode="incremental", input_format=urls.input_format, url_col=cfg.url_col,
        caption_col=cfg.caption_col or None, save_additional_columns=list(cfg.additional_columns or []) or None,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format, encode_quality=cfg.encode_quality,
        number_sample_per_shard=cfg.number_sample_per_shard, processes_count=cfg.processes_count,
        thread_count=cfg.thread_count, timeout=cfg.timeout, retries=cfg.retries, distributor=cfg.distributor,
        enable_wandb=False,
    )
    in_main = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if in_main else None
    started_ray = False
    try:
        if cfg.distributor == "ray":
            import ray
            if not ray.is_initialized():  # a local Ray on loopback, or the cluster in RAY_ADDRESS
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                if os.environ.get("RAY_ADDRESS"):
                    ray.init()
                else:
                    ray.init(num_cpus=cfg.processes_count, include_dashboard=False)
                started_ray = True
        img2dataset.download(**kwargs)
    except SystemExit as err:  # img2dataset's SIGINT handler exits with status 0: that is an interrupt
        raise KeyboardInterrupt(f"download into {output_uri} interrupted") from err
    except BaseException:
        _stop_img2dataset_logger()  # otherwise it polls forever and the interpreter waits for it at exit
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous_sigint)
        if started_ray:
            import ray
            ray.shutdown()


def _stop_img2dataset_logger() -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        if type(child).__name__ == "LoggerProcess":
            child.terminate()
            child.join(10)


# ------------------------------------------------------------------------------------- statistics
_REASONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"timed? ?out", re.I), "timeout"),
    (re.compile(r"decod|cannot identify image|truncated", re.I), "decode_error"),
    (re.compile(r"connection (refused|reset|aborted)|remote end closed|name or service|nodename|"
                r"no route|network is unreachable|eof occurred", re.I), "connection_error"),
    (re.compile(r"ssl|certificate", re.I), "ssl_error"),
    (re.compile(r"x-robots-tag", re.I), "disallowed_by_robots"),
    (re.compile(r"hash mismatch", re.I), "hash_mismatch"),
    (re.compile(r"image too small|image area too large|aspect ratio too large", re.I), "filtered_size"),
]


def reason_class(message: str) -> str:
    """Normalise one img2dataset status message: "HTTP Error 404: Not Found" -> "http_404"."""
    http = re.search(r"HTTP Error (\d{3})", message)
    if http:
        return f"http_{http.group(1)}"
    for pattern, name in _REASONS:
        if pattern.search(message):
            return name
    return f"other: {message.strip()[:80]}"


def aggregate_stats(output_uri: str) -> dict[str, Any]:
    """Sum every shard's ``*_stats.json``: counts plus failure reasons (normalised and raw)."""
    totals = Counter()
    raw: Counter[str] = Counter()
    shards = finished_shards(output_uri)
    for stats_uri in shards.values():
        stats = io.read_json(stats_uri)
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
        raw.update({k: int(v) for k, v in stats.get("status_dict", {}).items() if k != "success"})
    reasons = Counter()
    for message, n in raw.items():
        reasons[reason_class(message)] += n
    return {"shard_ids": sorted(shards), "count": totals["count"], "successes": totals["successes"],
            "failed_to_download": totals["failed_to_download"], "failed_to_resize": totals["failed_to_resize"],
            "reasons": dict(reasons.most_common()), "raw_reasons": dict(raw.most_common(100))}


# -------------------------------------------------------------------------------------------- run
def run(cfg: DownloadConfig, output_uri: str) -> DownloadResult:
    """Download `cfg.url_list` into `output_uri` with img2dataset (idempotent, resumable)."""
    started = time.time()
    cfg, urls = resolve(cfg)  # every input check happens here, before anything is written or fetched
    config_hash, input_hashes = cfg.config_hash(), {"url_list": urls.sha256}
    record = runroot.completed(output_uri, config_hash, input_hashes)
    if record is not None:
        log.info("download: %s already holds this result (config %s); not running again", output_uri,
                 config_hash)
        return DownloadResult.model_validate({**record["result"], "reused": True})

    done_before, warnings = prepare_output(output_uri, cfg, urls)
    warnings = [*urls.notes, *warnings]
    for message in warnings:
        log.warning(message)
    fs, config_path = io.fs_and_path(io.join(output_uri, CONFIG_FILE))
    fs.pipe_file(config_path, _config_text(cfg, urls.sha256).encode())

    expected = urls.expected_shards(cfg.number_sample_per_shard)
    log.info("download: %d URLs (%d shards, %d finished before) from %s into %s", urls.rows, expected,
             len(done_before), urls.uri, output_uri)
    t0 = time.perf_counter()
    _img2dataset_download(cfg, urls, output_uri)
    wall = time.perf_counter() - t0
    finished = finished_shards(output_uri)
    if cfg.order_by_key:
        t1 = time.perf_counter()
        changed = key_order.order_shards([uri[: -len("_stats.json")] for _, uri in sorted(finished.items())])
        log.info("download: %d of %d shards rewritten in key order in %.1f s", changed, len(finished),
                 time.perf_counter() - t1)

    stats = aggregate_stats(output_uri)
    attempted_now = sum(int(io.read_json(uri)["count"]) for sid, uri in finished.items() if sid not in done_before)
    result = _result(cfg, urls, output_uri, stats, done_before, wall, attempted_now, warnings)
    io.write_json_atomic(io.join(output_uri, SUMMARY_FILE), result.model_dump(mode="json"))
    missing = sorted(set(range(expected)) - set(stats["shard_ids"]))
    if missing:
        raise DownloadIncomplete(f"download into {output_uri}: {len(missing)} of {expected} shards did not "
                                 f"finish (ids {missing[:20]}); run again with the same config to resume")
    runroot.write_success(output_uri, step=STEP, config_hash=config_hash, input_hashes=input_hashes,
                          result=result.model_dump(mode="json"), started=started)
    return result


def _result(cfg: DownloadConfig, urls: UrlList, output_uri: str, stats: dict[str, Any], done_before: set[int],
            wall: float, attempted_now: int, warnings: list[str]) -> DownloadResult:
    attempted = stats["count"]
    succeeded = stats["successes"]
    failure_rate = 1.0 - succeeded / attempted if attempted else 0.0
    warnings = list(warnings)
    if failure_rate > cfg.failure_warn_threshold:
        message = (f"download into {output_uri}: {failure_rate:.1%} of {attempted} URLs failed (more than "
                   f"failure_warn_threshold={cfg.failure_warn_threshold:.0%}); reasons: {stats['reasons']}")
        log.warning(message)
        warnings.append(message)
    return DownloadResult(
        output_uri=output_uri, config_hash=cfg.config_hash(), url_list_sha256=urls.sha256, rows=urls.rows,
        shards=len(stats["shard_ids"]), shards_downloaded=len(set(stats["shard_ids"]) - done_before),
        attempted=attempted, succeeded=succeeded, failed_to_download=stats["failed_to_download"],
        failed_to_resize=stats["failed_to_resize"], success_rate=round(1.0 - failure_rate, 6),
        failure_rate=round(failure_rate, 6), reasons=stats["reasons"], raw_reasons=stats["raw_reasons"],
        additional_columns=list(cfg.additional_columns or []), wall_seconds=round(wall, 3),
        images_per_second=round(attempted_now / wall, 2) if wall > 0 else 0.0, warnings=warnings)


# ------------------------------------------------------------------------------------------- CLI
def format_summary(result: DownloadResult) -> str:
    lines = [
        f"download: {result.succeeded}/{result.attempted} images ({result.success_rate:.1%}) in "
        f"{result.shards} shards; failed to download {result.failed_to_download}, "
        f"failed to resize {result.failed_to_resize}"
        + (" (recorded result, nothing downloaded)" if result.reused else
           f"; {result.shards_downloaded} shards fetched in {result.wall_seconds:.1f} s "
           f"({result.images_per_second:.1f} images/s)"),
    ]
    lines += [f"  {reason}: {n}" for reason, n in result.reasons.items()]
    lines += [f"  WARNING: {w}" for w in result.warnings]
    lines.append(f"wrote {result.output_uri} ({SUMMARY_FILE}, {CONFIG_FILE}, {runroot.SUCCESS})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.download", description=__doc__.split("\n")[0])
    parser.add_argument("--url-list", help="URL list file or folder (overrides url_list in --config)")
    parser.add_argument("--output", required=True, help="output folder or URI (webdataset shards)")
    parser.add_argument("--config", help="YAML file with DownloadConfig fields")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. retries=0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        defaults = {"url_list": args.url_list} if args.url_list else {}
        cfg = load_config(DownloadConfig, args.config, args.overrides, **defaults)
        if args.url_list:
            cfg.url_list = args.url_list
        result = run(cfg, args.output)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
