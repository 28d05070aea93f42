"""Compare pipeline runs in the MLflow UI and take a screenshot of it with headless Chromium.

    .venv/bin/python infra/local/mlflow_compare.py --tracking-uri http://127.0.0.1:5000 \
        --experiment blip2-tiny --out runs/compare.png [--runs RUN_ID RUN_ID]

Without --runs it compares the two newest finished `full-pretrain` parent runs of the experiment (e.g. one with
CapFilt and one without). Prints the compare page's URL, the runs' headline metrics side by side and the
screenshot's path; exits 1 when the page does not render (a blank or tiny screenshot).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

HEADLINE = ("retrieval.r_mean", "retrieval.txt_r1", "retrieval.img_r1", "caption.accuracy", "vqa.accuracy",
            "capfilt.kept_precision", "download.succeeded")


def newest_parent_runs(client, experiment_id: str, count: int = 2) -> list:
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    parents = [r for r in runs if r.info.run_name and r.info.run_name.startswith("full-pretrain")]
    if len(parents) < count:
        raise SystemExit(f"experiment {experiment_id}: {len(parents)} finished full-pretrain runs, need {count}")
    return parents[:count]


def compare_url(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{tracking_uri.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: apt-get install -y chromium (or put chromium on PATH)")


def screenshot(url: str, out: str, width: int = 1600, height: int = 2400) -> int:
    """Headless Chromium renders `url` into `out` (PNG); returns the file's size in bytes."""
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                   "--hide-scrollbars", f"--window-size={width},{height}", "--virtual-time-budget=15000",
                   f"--screenshot={os.path.abspath(out)}", url]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    return os.path.getsize(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    parser.add_argument("--experiment", default="blip2-demo")
    parser.add_argument("--runs", nargs="*", help="run ids to compare (default: the two newest parent runs)")
    parser.add_argument("--out", default="runs/mlflow_compare.png")
    args = parser.parse_args(argv)
    if not args.tracking_uri.startswith(("http://", "https://")):
        raise SystemExit(f"--tracking-uri {args.tracking_uri}: the UI needs an MLflow server (http://...); for an "
                         "SQLite database start one: mlflow ui --backend-store-uri sqlite:///...")
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"--experiment {args.experiment}: not found at {args.tracking_uri}")
    runs = ([client.get_run(r) for r in args.runs] if args.runs
            else newest_parent_runs(client, experiment.experiment_id))
    url = compare_url(args.tracking_uri, experiment.experiment_id, [r.info.run_id for r in runs])
    print(f"compare page: {url}")
    for key in HEADLINE:
        values = [r.data.metrics.get(key) for r in runs]
        if any(v is not None for v in values):
            print(f"  {key:<26} " + "  ".join("-" if v is None else f"{v:10.4g}" for v in values))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    size = screenshot(url, args.out)
    print(f"screenshot: {args.out} ({size} bytes)")
    return 0 if size > 20_000 else 1


if __name__ == "__main__":
    sys.exit(main())
