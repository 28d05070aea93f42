# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= infra/constraints-cpu.txt
RUN_ROOT ?= runs/demo
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test test-fast bench stack-up stack-down clean

venv: $(STAMP)

# infra/venv.sh: uv with this machine's pip configuration (< 2 min; plain pip when uv is unavailable: ~5.5 min),
# torch pinned by the constraints (this machine has those wheels on disk), then drops the `dataclasses` backport
$(STAMP): pyproject.toml $(CONSTRAINTS) infra/venv.sh
	PYTHON=$(PYTHON) infra/venv.sh $(VENV) $(CONSTRAINTS) cpu,dev
	touch $(STAMP)

# the whole pipeline as one `full-pretrain` Prefect flow run (in-process, ephemeral API under the run root)
demo: $(STAMP)
	mkdir -p $(RUN_ROOT)/.prefect
	PREFECT_HOME=$${PREFECT_HOME:-$(abspath $(RUN_ROOT))/.prefect} $(PY) -m flows --profile demo --run-root $(RUN_ROOT)

test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script; done

stack-up: $(STAMP)
	infra/local/stack.sh up

stack-down:
	infra/local/stack.sh down

clean:
	rm -rf runs/demo .pytest_cache
