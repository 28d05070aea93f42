#!/usr/bin/env bash
# Packs what the lent GPU machine's image lacks for the training jobs (Ray, MLflow, webdataset, FAISS and their
# missing dependencies) as .devsite/site.tar.xz (git-ignored), for `bash benchmarks/device_check.sh` there: name
# .devsite in the device call's `carry`.
# Ray's cp312 wheel alone (72 MB) is over the 64 MiB a device call carries, so the wheels are unpacked, Ray's Java
# jars, RLlib, Serve, LLM and dashboard client and MLflow's UI bundle are left out, and the rest is xz-packed
# (~53 MiB). Versions are this project's .venv's, for the image's Python (3.12); the packages the image already
# holds (torch, numpy, pandas, pyarrow, aiohttp, grpcio, ...: the image's package list) are not packed.
#   bash benchmarks/devsite.sh        (needs .venv: `make venv`)
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED="ray mlflow mlflow-skinny mlflow-tracing webdataset braceexpand open_clip_torch ftfy wcwidth faiss-cpu pydantic
pydantic_core annotated-types typing-inspection jsonschema jsonschema-specifications referencing rpds-py jsonpointer
rfc3339-validator sqlalchemy alembic mako sqlparse cachetools importlib_metadata opentelemetry-api opentelemetry-sdk
opentelemetry-proto opentelemetry-semantic-conventions opentelemetry-exporter-prometheus
opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-http-transport
opentelemetry-exporter-otlp-common databricks-sdk google-auth
google-api-core googleapis-common-protos proto-plus pyasn1 pyasn1-modules fastapi starlette uvicorn python-dotenv
prettytable colorful aiohttp-cors opencensus opencensus-context orjson pytz tzdata sniffio truststore h2 hpack
hyperframe httpcore2 httpx2 platformdirs cryptography cffi pycparser"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the .venv's version of each, in one interpreter (a name the venv lacks is fetched at the newest)
.venv/bin/python - $NEEDED > "$work/requirements.txt" <<'PY'
import importlib.metadata as metadata, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
PY
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work/wheels" -r "$work/requirements.txt"
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do
  unzip -q -o "$wheel" -d "$work/site"
done
rm -rf "$work"/site/ray/{jars,rllib,serve,llm,dashboard/client} "$work"/site/mlflow/server/js
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .devsite
tar -C "$work" -cf - site | xz -T0 -6 > .devsite/site.tar.xz
ls -l .devsite/site.tar.xz
