"""MLflow tracking for training jobs, used from Ray Train rank 0 only (other ranks get a `NullTracker`).

One `Tracker` is one MLflow run. Its id is recorded in `{output_uri}/mlflow_run.json`, so a restarted or
re-submitted job continues the same run. Metrics are buffered in memory and written only when the training
loop calls `flush(step)` after it has written checkpoint `step`: a crash loses exactly the metrics that the
resume from that checkpoint logs again, so the step history has neither duplicates nor gaps.

Everything goes through an `MlflowClient` with explicit run ids, so several Trackers can live in one process.
The one exception is `mlflow.pyfunc.log_model`, which only works on the fluent "active run": the run is
activated around that call and deactivated again without being ended.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH,
                                     MAX_TAG_VAL_LENGTH)

from pipelines import io

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
NONFINITE_METRIC = "tracking/nonfinite_values"
PARENT_TAG = "mlflow.parentRunId"
SYSTEM_PREFIX = "system/"


def default_tracking_uri(run_root: str) -> str:
    """`$MLFLOW_TRACKING_URI` if set, else an SQLite database at the root of the pipeline run."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + os.path.join(os.path.abspath(run_root), "mlflow.db")


def sqlite_dir(tracking_uri: str) -> str | None:
    """Directory holding the database of a `sqlite:///...` URI (None for any other kind of URI)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys; values stringified and cut to MLflow's limit (6000 characters)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = truncate(value if isinstance(value, str) else json_or_str(value), MAX_PARAM_VAL_LENGTH)
    return flat


def check_alias(alias: str) -> str:
    """`alias` if MLflow accepts it as a registered-model alias, else ValueError. MLflow reserves 'latest'
    (any case) and version-like names ('v1', 'V12'); allowed: letters, digits, '_' and '-', <= 255 chars."""
    if not alias or len(alias) > 255 or not re.fullmatch(r"[\w-]+", alias):
        raise ValueError(f"model alias {alias!r}: expected 1-255 letters, digits, '_' or '-'")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"model alias {alias!r} is reserved by MLflow ('latest' and 'v<number>' are); "
                         f"use another name, e.g. 'current' or 'champion'")
    return alias


def json_or_str(value: Any) -> str:
    """JSON for plain data (lists, numbers, booleans, None), `str()` for anything else."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return str(value)


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, the cut marked with '...'."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def chunks(items: list, size: int) -> Iterable[list]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """Set MLflow's process-wide tracking URI for the duration (the fluent API reads it), then put back the
    previous one. `mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI, which would otherwise leak into
    `default_tracking_uri` of a later run root in the same process and into every subprocess."""
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def now_ms() -> int:
    """Wall-clock time in milliseconds, MLflow's timestamp unit."""
    return int(time.time() * 1000)


class Blip2Checkpoint(mlflow.pyfunc.PythonModel):
    """A training checkpoint as an MLflow pyfunc model: it points at the checkpoint directory.

    Serving the model is out of scope; `predict` returns where the weights are and their config, which is
    what a downstream step (evaluation, export) needs to load them with `blip2`."""

    def load_context(self, context) -> None:
        """Record the local copy of the checkpoint directory and read its `config.json` when present."""
        self.checkpoint_dir = context.artifacts["checkpoint"]
        config_path = os.path.join(self.checkpoint_dir, "config.json")
        self.config = {}
        if os.path.exists(config_path):
            with open(config_path) as f:
                self.config = json.load(f)

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None):
        """The checkpoint's local path, its files and its config (the input is ignored)."""
        return {"checkpoint_dir": self.checkpoint_dir, "files": sorted(os.listdir(self.checkpoint_dir)),
                "config": self.config}


class Tracker:
    """One MLflow run of one training job, resumed across restarts; metrics buffered until `flush`."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, output_uri: str,
                 parent_run_id: str | None = None, system_metrics: bool = True,
                 artifact_location: str | None = None, system_metrics_interval: float | None = None):
        """Open (resume or create) the run. `artifact_location` defaults to `<db dir>/mlartifacts/<experiment>`
        for SQLite URIs, so artifacts never land in `./mlruns` of the current directory."""
        self.tracking_uri = tracking_uri
        self.output_uri = output_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)  # the registry follows, unless set apart
        self.experiment_id = self._experiment(experiment, artifact_location)
        self._buffer: dict[tuple[int, str], tuple[float, int]] = {}  # (step, key) -> (value, timestamp ms)
        self._params: dict[str, str] = {}
        self._finished = False
        self.resumed = False
        self._run_id = self._resume() or self._start(run_name, parent_run_id)
        self._monitor = self._start_system_metrics(system_metrics_interval) if system_metrics else None

    @property
    def run_id(self) -> str:
        """Id of the MLflow run (the same across resumes)."""
        return self._run_id

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        """Id of experiment `name`, created (with an explicit artifact location) when missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        db_dir = sqlite_dir(self.tracking_uri)
        if artifact_location is None and db_dir is not None:
            artifact_location = os.path.join(db_dir, "mlartifacts", re.sub(r"[^A-Za-z0-9._-]+", "_", name))
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _resume(self) -> str | None:
        """The run recorded in `{output_uri}/mlflow_run.json`, set back to RUNNING; None if there is none."""
        path = io.join(self.output_uri, RUN_FILE)
        if not io.exists(path):
            return None
        run_id = io.read_json(path).get("run_id")
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            log.warning("%s names run %s, which %s does not have (%s): starting a new run",
                        path, run_id, self.tracking_uri, err.message)
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("%s names run %s, which was deleted: starting a new run", path, run_id)
            return None
        self.client.update_run(run_id, status="RUNNING")
        self._params = dict(run.data.params)
        self.resumed = True
        log.info("resuming MLflow run %s (recorded in %s)", run_id, path)
        return run_id

    def _start(self, run_name: str, parent_run_id: str | None) -> str:
        """A new run (a child of `parent_run_id` when given); its id is written to `mlflow_run.json`."""
        tags = {"mlflow.runName": run_name, "output_uri": self.output_uri}
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        io.write_json_atomic(io.join(self.output_uri, RUN_FILE),
                             {"run_id": run_id, "experiment_id": self.experiment_id,
                              "tracking_uri": self.tracking_uri, "parent_run_id": parent_run_id})
        log.info("started MLflow run %s in experiment %s", run_id, self.experiment_id)
        return run_id

    def _start_system_metrics(self, interval: float | None):
        """CPU/memory/disk/network (and GPU) metrics under `system/`, sampled by MLflow's monitor thread.

        This is the monitor `mlflow.start_run(log_system_metrics=True)` starts, given our run id and URI
        directly, so no fluent run has to stay active."""
        import importlib.util

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if importlib.util.find_spec("psutil") is None:
            log.warning("psutil is not installed: no system metrics for run %s", self._run_id)
            return None
        kwargs = {"sampling_interval": interval} if interval else {}
        monitor = SystemMetricsMonitor(self._run_id, resume_logging=self.resumed,
                                       tracking_uri=self.tracking_uri, **kwargs)
        monitor.start()
        return monitor

    # ---- params and tags -------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Log (nested) params as dotted keys. On a resumed run a param already logged with the same value is
        skipped; a changed value (which MLflow refuses to overwrite) goes to `resumed.<key>` instead."""
        batch = []
        for key, value in flatten_params(params).items():
            name = self._param_name(key, value)
            if name is not None:
                batch.append(Param(name, value))
                self._params[name] = value
        for part in chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=part, synchronous=True)

    def _param_name(self, key: str, value: str) -> str | None:
        """The key to log `value` under: `key`, else the first free `resumed.<key>`, `resumed2.<key>`, ...;
        None when one of them already holds this value."""
        names = [key, f"resumed.{key}", *(f"resumed{n}.{key}" for n in range(2, 1000))]
        for name in names:
            old = self._params.get(name)
            if old == value:
                return None
            if old is None:
                if name != key:
                    log.warning("param %s changed on resume (%r -> %r): logged as %s", key,
                                self._params[key][:80], value[:80], name)
                return name
        raise ValueError(f"param {key}: too many different values logged on resumes of run {self._run_id}")

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (values stringified, cut to MLflow's 8000-character limit); tags may change."""
        batch = [RunTag(str(k), truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for part in chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=part, synchronous=True)

    # ---- metrics: buffered until the checkpoint of their step is written ---------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer `metrics` at `step` (a later value for the same key and step replaces the earlier one).
        Non-finite values are skipped and counted into `tracking/nonfinite_values` at that step."""
        stamp, nonfinite = now_ms(), 0
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}") from err
            if math.isfinite(value):
                self._buffer[(int(step), key)] = (value, stamp)
            else:
                nonfinite += 1
        if nonfinite:
            count = self._buffer.get((int(step), NONFINITE_METRIC), (0.0, stamp))[0]
            self._buffer[(int(step), NONFINITE_METRIC)] = (count + nonfinite, stamp)

    def flush(self, up_to_step: int | None = None) -> int:
        """Write the buffered metrics with step <= `up_to_step` (all when None), oldest step first, in batches
        of at most 1000; returns how many were written."""
        due = sorted(k for k in self._buffer if up_to_step is None or k[0] <= up_to_step)
        for part in chunks(due, MAX_METRICS_PER_BATCH):
            batch = [Metric(key, self._buffer[(step, key)][0], self._buffer[(step, key)][1], step)
                     for step, key in part]
            self.client.log_batch(self._run_id, metrics=batch, synchronous=True)
            for entry in part:
                del self._buffer[entry]
        return len(due)

    def unwritten(self, up_to_step: int) -> list[list]:
        """The buffered metrics with step <= `up_to_step` as [step, key, value, timestamp ms] rows. The training
        loop keeps them in the checkpoint of that step, written just before `flush`: a crash between the two
        would otherwise lose them (the resume starts after that step and never logs them again)."""
        return [[step, key, *self._buffer[(step, key)]] for step, key in sorted(self._buffer) if step <= up_to_step]

    def recover(self, rows: list[list]) -> int:
        """After a resume: write those of a checkpoint's `unwritten` rows that the run does not hold yet (a key
        without a value at that step); returns how many. Rows the crashed job did flush are not written twice."""
        by_key: dict[str, list[list]] = {}
        for step, key, value, stamp in rows:
            by_key.setdefault(key, []).append([int(step), float(value), int(stamp)])
        missing = []
        for key, entries in by_key.items():
            logged = {metric.step for metric in self.client.get_metric_history(self._run_id, key)}
            missing += [Metric(key, value, stamp, step) for step, value, stamp in entries if step not in logged]
        for part in chunks(missing, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id, metrics=part, synchronous=True)
        if missing:
            log.info("MLflow run %s: wrote %d metric values the previous job had left unwritten", self._run_id,
                     len(missing))
        return len(missing)

    def discard_after(self, step: int) -> int:
        """Drop the buffered metrics with step > `step` (they will be logged again after a resume from
        checkpoint `step`); returns how many were dropped."""
        late = [k for k in self._buffer if k[0] > step]
        for entry in late:
            del self._buffer[entry]
        return len(late)

    @property
    def pending(self) -> int:
        """Number of buffered, not yet written metric values."""
        return len(self._buffer)

    # ---- artifacts --------------------------------------------------------------------------------------

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a local file, or a directory's contents, under `artifact_path` of the run."""
        if os.path.isdir(path):
            self.client.log_artifacts(self._run_id, path, artifact_path)
        else:
            self.client.log_artifact(self._run_id, path, artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """A JSON (or YAML, by the name's suffix) artifact named `name`."""
        self.client.log_dict(self._run_id, obj, name)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact named `name`."""
        self.client.log_text(self._run_id, text, name)

    def log_figure(self, fig, name: str) -> None:
        """A matplotlib figure saved as the image artifact `name` (its suffix picks the format)."""
        self.client.log_figure(self._run_id, fig, name)

    def metric_series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of `key`: its whole history in MLflow plus the still buffered points."""
        points = {m.step: m.value for m in self.client.get_metric_history(self._run_id, key)}
        points.update({step: value for (step, k), (value, _) in self._buffer.items() if k == key})
        return sorted(points.items())

    def log_loss_curves(self, keys: list[str], name: str = "loss_curves.png") -> str:
        """Plot each key's full history (x = step, one line per key), log the PNG as artifact `name` and
        return its local path (under `{output_uri}/plots/` for a local output, else a temp dir)."""
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

        fig = Figure(figsize=(8, 4.5), dpi=100)
        ax = fig.add_subplot()
        for key in keys:
            series = self.metric_series(key)
            if series:
                ax.plot([s for s, _ in series], [v for _, v in series], label=key, linewidth=1)
            else:
                log.info("loss curves: no values for %s in run %s", key, self._run_id)
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        path = os.path.join(self._plot_dir(), os.path.basename(name))
        fig.savefig(path, format="png", bbox_inches="tight")
        self.client.log_artifact(self._run_id, path, os.path.dirname(name) or None)
        return path

    def _plot_dir(self) -> str:
        """A local directory for plots: `{output_uri}/plots` when the output is local, else a temp dir."""
        try:
            path = os.path.join(io.local_path(self.output_uri), "plots")
        except ValueError:
            path = tempfile.mkdtemp(prefix="blip2-plots-")
        os.makedirs(path, exist_ok=True)
        return path

    # ---- checkpoint as a registered model ---------------------------------------------------------------

    def log_checkpoint_model(self, checkpoint_dir: str, registered_name: str | None, alias: str | None,
                             exclude: tuple[str, ...] = ("optimizer.pt",)) -> str | None:
        """Log `checkpoint_dir` (less the `exclude` files: the optimizer state is not part of a model) as a
        pyfunc model of this run, register it under `registered_name` and point `alias` at the new version;
        returns the version (None when not registered; `alias` is then unused). Works offline: the pip requirements are given, so
        MLflow infers and installs nothing."""
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
        if registered_name and alias:
            check_alias(alias)  # before the upload, not after it
        with (tempfile.TemporaryDirectory(prefix="blip2-model-") as tmp, global_tracking_uri(self.tracking_uri),
              self._fluent_run()):
            staged = stage_checkpoint(checkpoint_dir, os.path.join(tmp, os.path.basename(checkpoint_dir)), exclude)
            info = mlflow.pyfunc.log_model(
                name="checkpoint", python_model=Blip2Checkpoint(), artifacts={"checkpoint": staged},
                pip_requirements=[f"mlflow=={mlflow.__version__}"], registered_model_name=registered_name,
                step=checkpoint_step(checkpoint_dir), await_registration_for=60)
        if not registered_name:
            return None
        version = str(info.registered_model_version)
        if alias:
            self.client.set_registered_model_alias(registered_name, alias, version)
        log.info("checkpoint %s registered as %s version %s%s", checkpoint_dir, registered_name, version,
                 f" (@{alias})" if alias else "")
        return version

    @contextlib.contextmanager
    def _fluent_run(self):
        """Make this run MLflow's active (fluent) run for the duration, without ending it afterwards.

        `mlflow.pyfunc.log_model` only logs into the active run (and without one it creates the model in
        the default experiment, whose artifacts go to ./mlruns). `end_run(status="RUNNING")` pops the run
        off the fluent stack and leaves it running; `finish` ends it. `end_run` also clears
        $MLFLOW_RUN_ID, which is put back."""
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self._run_id:
            yield
            return
        saved_env = os.environ.get("MLFLOW_RUN_ID")
        mlflow.start_run(run_id=self._run_id, nested=active is not None, log_system_metrics=False)
        try:
            yield
        finally:
            mlflow.end_run(status="RUNNING")
            if saved_env is not None:
                os.environ["MLFLOW_RUN_ID"] = saved_env

    # ---- end --------------------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED", flush: bool = True) -> None:
        """Write all buffered metrics (unless `flush=False`), stop system metrics and end the run."""
        if self._finished:
            return
        self._finished = True
        try:
            if flush:
                self.flush()
            elif self._buffer:
                log.info("run %s ends %s: %d buffered metric values after the last checkpoint are dropped",
                         self._run_id, status, self.discard_after(-(1 << 62)))
        finally:
            if self._monitor is not None:
                self._monitor.finish()
            self.client.set_terminated(self._run_id, status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """On an exception the run ends FAILED (KILLED for Ctrl-C) and the metrics logged after the last
        checkpoint are dropped, since the resume from that checkpoint logs them again."""
        if exc_type is None:
            self.finish()
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED", flush=False)
        return False


def stage_checkpoint(checkpoint_dir: str, staged: str, exclude: tuple[str, ...]) -> str:
    """A copy of `checkpoint_dir` at `staged` without the `exclude` names; files are hard links where the
    filesystem allows (no bytes copied), else copies."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(checkpoint_dir, staged, ignore=shutil.ignore_patterns(*exclude), copy_function=link_or_copy)
    return staged


def checkpoint_step(checkpoint_dir: str) -> int:
    """The step recorded in a checkpoint's `state.json` (0 when there is none)."""
    path = os.path.join(checkpoint_dir, "state.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f).get("step", 0))


class NullTracker:
    """The Tracker of ranks other than 0: same methods, nothing logged."""

    run_id = None
    resumed = False
    pending = 0

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self, up_to_step: int | None = None) -> int:
        return 0

    def unwritten(self, up_to_step: int) -> list[list]:
        return []

    def recover(self, rows: list[list]) -> int:
        return 0

    def discard_after(self, step: int) -> int:
        return 0

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_figure(self, fig, name: str) -> None:
        pass

    def log_loss_curves(self, keys: list[str], name: str = "loss_curves.png") -> None:
        return None

    def log_checkpoint_model(self, checkpoint_dir: str, registered_name: str | None,
                             alias: str | None) -> None:
        return None

    def finish(self, status: str = "FINISHED", flush: bool = True) -> None:
        pass

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


def make_tracker(rank: int, **kwargs) -> Tracker | NullTracker:
    """A real `Tracker(**kwargs)` on rank 0, a `NullTracker` elsewhere."""
    return Tracker(**kwargs) if rank == 0 else NullTracker()
