"""What the flows share: Prefect's environment, the cache policy of a step, artifacts, MLflow links."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def prefect_environment() -> None:
    """Defaults set before Prefect is imported: no telemetry, and (run in-process with no API configured) an
    ephemeral API whose home is under the user's runs/ rather than ~/.prefect."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not os.environ.get("PREFECT_API_URL"):
        if not os.environ.get("PREFECT_HOME"):
            os.environ["PREFECT_HOME"] = os.path.abspath(os.path.join("runs", ".prefect"))
        # the ephemeral API keeps its database there; a home not made yet would crash it with a raw traceback
        os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)


def cache_policy(key: str, where: str):
    """A cache policy whose key is `key` (the step's config hash), its records kept at `where` (a local dir
    inside the run root; for an object-store run root, Prefect's default result storage)."""
    from prefect.cache_policies import CacheKeyFnPolicy
    policy = CacheKeyFnPolicy(cache_key_fn=lambda context, parameters: key)
    if "://" in where and not where.startswith("file://"):
        return policy
    path = Path(where.removeprefix("file://"))
    path.mkdir(parents=True, exist_ok=True)
    return policy.configure(key_storage=path)


def mlflow_link(tracking_uri: str, experiment: str, run_id: str | None) -> str:
    """A clickable link to the run when MLflow is a server, else where the run is and how to open its UI."""
    if not run_id:
        return ""
    if tracking_uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
        return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"run {run_id} in {tracking_uri} (`mlflow ui --backend-store-uri {tracking_uri}`)"


def flat_rows(part: dict[str, Any], prefix: str = "") -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for key, value in part.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and len(json.dumps(value, default=str)) > 120:
            rows.extend(flat_rows(value, f"{name}."))
        else:
            rows.append({"field": name, "value": json.dumps(value, default=str) if not isinstance(value, str)
                         else value})
    return rows


def publish_table(step: str, part: dict[str, Any], seconds: float, mlflow: str) -> None:
    """The step's Prefect artifact: every figure it added to the summary, its time and its MLflow run."""
    from prefect.artifacts import create_table_artifact
    rows = [{"field": "seconds", "value": f"{seconds:.1f}"}, {"field": "mlflow", "value": mlflow}, *flat_rows(part)]
    create_table_artifact(table=rows, key=f"step-{step.replace('_', '-')}",
                          description=f"`{step}`: counts and metrics ({mlflow or 'no MLflow run'})")


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# full-pretrain summary", ""]
    for step, part in summary.items():
        lines += [f"## {step}", "", "```json", json.dumps(part, indent=1, default=str)[:4000], "```", ""]
    return "\n".join(lines)
